"""Resuming a run: the newest complete and valid checkpoint, and refusing settings that would change what it computes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from simclr_cli.engine import checkpoint
from simclr_cli.engine.plain import flatten
from simclr_cli.engine.errors import CheckpointError, ConfigError
from simclr_cli.engine.rundir import RunDir

log = logging.getLogger("simclr")

# Fields that may change when a run is resumed: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = {
    "data.root", "data.workers", "data.download", "data.on_bad_image", "train.device", "train.log_every", "train.keep_checkpoints",
    "monitor.knn_data", "monitor.every", "monitor.k", "train.tensorboard", "data.cache_gb", "train.compile",
    "data.max_bad_fraction", "data.max_image_pixels", "train.on_nonfinite", "train.max_skips", "train.checkpoint_every",
    "train.checkpoint_minutes",
}
# Fields a run recorded as "auto" before simclr wrote what "auto" resolved to: any resolved value matches them.
RECORDED_AS_AUTO = {"train.precision"}


def load_newest(run_dir: RunDir, *, config: dict[str, Any], method, optimizer, scaler, total_steps: int | None = None,
                steps_per_epoch: int = 1) -> dict[str, Any]:
    """Load the newest checkpoint that is complete and valid into the method's modules, the optimiser and the scaler,
    saying why any newer one was skipped; returns its metadata."""
    for path in run_dir.saved_checkpoints():
        try:
            meta = checkpoint.load_train_state(path, model=method.modules, optimizer=optimizer, scaler=scaler,
                                               extra=method.extra_state(), restore_extra=method.load_extra_state,
                                               total_steps=total_steps)
        except CheckpointError as exc:
            log.warning("skipping %s: %s", path.name, exc)
            continue
        check_same_run(meta.get("config", {}), config, source=path)
        # the epoch from the step, counted from 1 as everywhere (older files stored it counted from 0)
        log.info("resuming from %s (step %d, epoch %d)", path, meta["step"], -(-meta["step"] // steps_per_epoch))
        return meta
    raise CheckpointError(f"no valid checkpoint to resume in {run_dir.checkpoints}; start a new run with --overwrite")


def finished(run_dir: RunDir, *, config: dict[str, Any], total_steps: int) -> dict[str, Any] | None:
    """The metadata of the newest checkpoint when it ends the run's schedule and the encoder was written at that step
    too (read from the headers alone): a --resume then has nothing to do and need not open the data. None otherwise,
    also when the newest checkpoint is unreadable (`load_newest` then says why and falls back)."""
    saved = run_dir.saved_checkpoints()
    if not saved or not run_dir.encoder.is_file():
        return None
    try:
        meta = checkpoint.read_train_state_meta(saved[0], total_steps=total_steps)
        encoder_step = checkpoint.load(run_dir.encoder, kind=checkpoint.ENCODER, tensors=False).meta.get("step")
    except CheckpointError:
        return None
    if meta.get("step") != total_steps or encoder_step != total_steps:
        return None
    check_same_run(meta.get("config", {}), config, source=saved[0])  # a changed recipe is refused, not "complete"
    return meta


def check_same_run(saved: dict[str, Any], current: dict[str, Any], *, source: Path) -> None:
    """Refuse to resume with settings that change what the run computes."""
    saved, current = flatten(saved), flatten(current)
    # A key the saved config lacks was added by a later simclr; its default reproduces what the run did before.
    for key in sorted(saved.keys() - RESUMABLE_CHANGES):
        was, now = saved.get(key), current.get(key)
        if was != now and not (was == "auto" and key in RECORDED_AS_AUTO):
            raise ConfigError(
                f"--resume would change {key} from {was!r} to {now!r} ({source.name}); "
                "resume with the run's own settings, or start a new run"
            )
