"""The `simclr` command line: each command parses options, resolves its config and calls one engine task.

torch is imported inside the commands, so `simclr --help` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli import __version__, options
from simclr_cli.console import RichProgress, console, errors_as_messages, setup_logging

app = typer.Typer(
    name="simclr",
    help="SimCLR self-supervised pretraining of image encoders, and the tools to evaluate and use them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"simclr {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """SimCLR (Chen et al. 2020) from the command line."""


@app.command()
def pretrain(
    data: Annotated[
        str | None,
        typer.Argument(help="A folder of images (searched recursively), or cifar10 | cifar100 | stl10 | imagenet | digits. "
                       "Omit it to train the demo on scikit-learn's bundled digits."),
    ] = None,
    preset: options.Preset = None,
    arch: Annotated[str | None, typer.Option(help="resnet18 | resnet34 | resnet50 | resnet101 | resnet152.")] = None,
    width: Annotated[float | None, typer.Option(help="Channel multiplier for every layer (SimCLR's R50 2x is --width 2).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Training resolution. <= 64 px uses the CIFAR stem, weaker colour jitter and no blur.")] = None,
    batch_size: options.BatchSize = None,
    epochs: options.Epochs = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps; the lr schedule is fitted to the shorter run.")] = None,
    lr: Annotated[float | None, typer.Option(help="BASE learning rate, scaled by --lr-scaling with the global batch (0.3 linear = 4.8 at 4096).")] = None,
    lr_scaling: Annotated[str | None, typer.Option(help="linear (lr x B/256) | sqrt (lr x sqrt(B), better for small batches).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="lars (the paper's) | sgd | adamw.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="1e-6 in the SimCLR paper, 1e-4 in SimCLRv2.")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warm-up length, capped at 10% of the run.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="NT-Xent tau: 0.1 for ImageNet at batch 4096, 0.5 for CIFAR.")] = None,
    head_layers: Annotated[int | None, typer.Option(help="Projection head depth: 2 (SimCLR v1) or 3 (SimCLRv2).")] = None,
    proj_dim: Annotated[int | None, typer.Option(help="Output size of the projection head (128 in the paper).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save a checkpoint every N steps (default: every epoch, and at the end).")] = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    set_: options.Set = None,
    out: options.Out = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out (default runs/latest) from its newest valid checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a non-empty --out, replacing the previous run's files.")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Pretrain a ResNet encoder with SimCLR on unlabelled images; writes encoder.safetensors in the run folder."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine import pretrain as task, rundir
        from simclr_cli.engine.errors import ConfigError

        flags = {
            "model.arch": arch, "model.width": width, "model.head_layers": head_layers, "model.proj_dim": proj_dim,
            "augment.image_size": image_size,
            "train.batch_size": batch_size, "train.epochs": epochs, "train.max_steps": max_steps,
            "train.temperature": temperature, "train.checkpoint_every": checkpoint_every, "train.seed": seed,
            "train.device": device, "train.precision": precision,
            "optim.lr": lr, "optim.lr_scaling": lr_scaling, "optim.name": optimizer, "optim.weight_decay": weight_decay,
            "optim.warmup_epochs": warmup_epochs,
            "data.workers": workers, "data.root": str(data_root) if data_root else None, "data.download": download,
        }
        saved = None
        if resume:
            out = (out or rundir.RUNS / rundir.LATEST).resolve()
            saved = config.load_yaml(rundir.RunDir(out).config) if rundir.RunDir(out).config.is_file() else None
            if saved is None:
                raise ConfigError(f"{out} has no config.yaml, so it is not a run folder to resume; check --out")
        cfg = config.resolve_pretrain(data=data, preset=preset, sets=set_, flags=flags, saved=saved)
        result = task.run(cfg, out=out or rundir.default_run_dir(), resume=resume, overwrite=overwrite, progress=RichProgress())
        _report_pretrain(result)


def _report_pretrain(result) -> None:
    """Where the encoder is, how the loss moved, and what to run next."""
    minutes = result.seconds / 60
    console.print(f"[bold green]done[/] {result.steps} steps ({result.epochs_done:.1f} epochs) in {minutes:.1f} min")
    if result.first_loss is not None and result.last_loss is not None:
        console.print(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f} (metrics in {result.run_dir / 'metrics.jsonl'})")
    console.print(f"encoder: [bold]{result.encoder}[/]")
    console.print(f"if it stops early, continue it with: simclr pretrain --resume --out {result.run_dir}")
