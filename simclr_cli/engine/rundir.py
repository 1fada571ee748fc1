"""The run directory: its layout, the `runs/latest` link, and refusing to clobber a previous run."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from simclr_cli.engine.errors import ConfigError

RUNS = Path("runs")
LATEST = "latest"
CHECKPOINT_GLOB = "step-*.safetensors"


@dataclass(frozen=True)
class RunDir:
    """The files a pretraining run writes, all below `root`."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:09d}.safetensors"

    def saved_checkpoints(self) -> list[Path]:
        """Training-state files, newest (highest step) first."""
        return sorted(self.checkpoints.glob(CHECKPOINT_GLOB), reverse=True)

    def owned(self) -> list[Path]:
        return [self.config, self.metrics, self.encoder, self.checkpoints]


def default_run_dir(base: Path = RUNS, *, prefix: str = "") -> Path:
    """`runs/<prefix><UTC timestamp>`, suffixed when two runs start in the same second."""
    stamp = prefix + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = base / stamp
    n = 1
    while candidate.exists():
        n += 1
        candidate = base / f"{stamp}-{n}"
    return candidate


def prepare(root: Path, *, resume: bool, overwrite: bool) -> RunDir:
    """Create or reopen a run dir; a non-empty one needs `resume` (continue) or `overwrite` (start over)."""
    run = RunDir(root)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file, not a folder; choose another --out")
    if resume:
        if not run.saved_checkpoints():
            raise ConfigError(f"nothing to resume in {root}: it holds no checkpoints/step-*.safetensors; drop --resume to start a new run")
        return run
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError(f"{root} already holds a run; pass --resume to continue it, --overwrite to start over, or another --out")
        for path in run.owned():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    return run


def point_latest(root: Path) -> None:
    """Make `<parent>/latest` a relative symlink to `root`, replaced atomically."""
    link = root.parent / LATEST
    if link.exists() and not link.is_symlink():
        return  # a real file or folder of the user's is never replaced
    tmp = root.parent / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(root.name, tmp)
    os.replace(tmp, link)


def default_checkpoint(base: Path = RUNS) -> Path:
    """The newest run's encoder: what evaluation commands use when no CHECKPOINT is given."""
    return base / LATEST / "encoder.safetensors"


def resolve_checkpoint(path: Path | None) -> Path:
    """CHECKPOINT as given, or `runs/latest/encoder.safetensors`, with the fix when it is not there."""
    if path is not None:
        return Path(path).expanduser()
    latest = default_checkpoint()
    if not latest.is_file():
        raise ConfigError(
            f"no CHECKPOINT given and {latest} does not exist; pass the encoder.safetensors of a run, "
            "or run `simclr pretrain` first"
        )
    return latest


def default_eval_dir(checkpoint: Path | None, command: str) -> Path:
    """`<checkpoint's folder>/eval/<command>-<UTC timestamp>`: results stay beside the encoder they judge."""
    base = Path(checkpoint).parent if checkpoint is not None else RUNS
    return default_run_dir(base / "eval", prefix=f"{command}-")
