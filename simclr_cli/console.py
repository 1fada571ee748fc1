"""What the user sees: results on stdout; rich progress, logging and errors (as one line) on stderr."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from simclr_cli.engine import runlog
from simclr_cli.engine.errors import OutputError, SimCLRError, Stopped
from simclr_cli.engine.metrics import clock
from simclr_cli.engine.report import StepStats

# Results go to stdout, where a script or `> file` takes them; logs and progress to stderr, as Unix tools do.
# Neither console reads markup: what they print holds paths, file names and messages from torch or the data,
# and a `[/]` in any of them must print as itself, never raise MarkupError. Styles come as `styled` spans.
console = Console(stderr=True, markup=False)
results = Console(markup=False, soft_wrap=True)  # a result line is never broken in two for a narrow terminal

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def live_display() -> bool:
    """Whether stderr is a terminal, where a progress bar can draw (not a file under nohup or a scheduler)."""
    return sys.stderr.isatty() or console.is_terminal


def setup_logging(*, verbose: bool) -> None:
    """Engine messages (logger "simclr") go to stderr: through rich on a terminal, where the progress bar shows the
    steps; as plain timestamped lines, step lines included, to a file or pipe. --verbose adds debug detail."""
    logger = logging.getLogger("simclr")
    if live_display():
        handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
        handler.addFilter(lambda record: not runlog.is_step_line(record))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(runlog.formatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


@contextlib.contextmanager
def errors_as_messages(*, verbose: bool) -> Iterator[None]:
    """Turn the engine's user-facing errors into a one-line message and a non-zero exit (traceback with --verbose)."""
    try:
        yield
    except SimCLRError as exc:
        if verbose:
            console.print_exception()
        if isinstance(exc, Stopped):  # asked to stop (SIGTERM, Ctrl-C) and saved: exit 128 + the signal
            console.print(Text(_message(exc), style="yellow"), soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        console.print(styled("error:", "bold red", _message(exc)), soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        console.print("interrupted", style="yellow")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # a bug, unless the machine refused a file operation (disk full, read-only, ...)
        if verbose:
            console.print_exception()
        if isinstance(exc, OSError) and exc.errno in OutputError.CAUSES:
            console.print(styled("error:", "bold red", _os_error_line(exc)), soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        if not verbose:
            console.print(
                styled("internal error:", "bold red",
                       f"{type(exc).__name__}: {_message(exc)} — rerun with --verbose for the traceback and report it"),
                soft_wrap=True,
            )
        raise typer.Exit(EXIT_INTERNAL_ERROR) from None


class RichProgress:
    """The engine's `Progress` interface as a rich progress bar (epoch, step, loss, lr, images/s, data wait, ETA)."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[rate]} img/s"),
            TextColumn("data wait {task.fields[wait]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            _TimeLeft(),
            console=console,
            disable=not live_display(),
        )
        self._task = None

    def start(self, *, total_steps: int, completed: int, description: str) -> None:
        self._task = self._bar.add_task(description, total=total_steps, completed=completed, epoch="-", loss="-", lr="-", rate="-",
                                        wait="-", seconds_left=None)
        self._bar.start()

    def update(self, stats: StepStats) -> None:
        loss = "-" if stats.loss is None else f"{stats.loss:.4f}"
        self._bar.update(
            self._task, completed=stats.step, epoch="-" if stats.epoch is None else stats.epoch, loss=loss, lr=f"{stats.lr:.3g}",
            rate=f"{stats.images_per_s:.1f}", wait="-" if stats.data_wait is None else f"{stats.data_wait:.0%}",
            seconds_left=stats.seconds_left,
        )

    def stop(self) -> None:
        self._bar.stop()


def styled(label: str, style: str, text: str = "") -> Text:
    """`label` in `style`, then `text` exactly as it is (never read as markup)."""
    return Text.assemble((label, style), f" {text}" if text else "")


class _TimeLeft(TimeRemainingColumn):
    """The task's own estimate when it gives one (timed from its first steps), else rich's from the recent updates,
    which has none while steps take longer than its 30-second window."""

    def render(self, task) -> Text:
        seconds = task.fields.get("seconds_left")
        if seconds is None:
            return super().render(task)
        return Text(clock(seconds), style="progress.remaining")


def show_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A short two-column summary table, on stdout with the other results."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a long path wraps whole onto the next lines, never cut to "…"
    for key, value in rows:
        table.add_row(key, value)
    results.print(table)


def show_matrix(title: str, *, corner: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> None:
    """A small grid with named rows and columns (e.g. a CKA matrix), on stdout with the other results."""
    table = Table(title=title, title_justify="left")
    table.add_column(corner, style="bold")
    for name in columns:
        table.add_column(name, justify="right")
    for name, cells in rows:
        table.add_row(name, *cells)
    results.print(table)


# An error line echoes values from the user's input; whatever they hold, the line stays readable.
MAX_LINE = 1000


def _message(exc: BaseException) -> str:
    """The message itself, at most MAX_LINE characters: an error raised in a DataLoader worker arrives wrapped with
    the worker's traceback, whose last line is the original "module.ErrorClass: message"."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text if len(text) <= MAX_LINE else f"{text[:MAX_LINE]}... ({len(text) - MAX_LINE:,} more characters)"


def _os_error_line(exc: OSError) -> str:
    """An OSError no engine code wrapped, as the path, the system's words for it and what to do."""
    _, fix = OutputError.CAUSES[exc.errno]
    what = f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return f"{exc.filename}: {what}; {fix}" if exc.filename is not None else f"{what}; {fix}"
