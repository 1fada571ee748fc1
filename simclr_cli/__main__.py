"""`python -m simclr_cli` runs the same app as the `simclr` command."""

from simclr_cli.cli import app

app(prog_name="simclr")
