"""`simclr pretrain`: self-supervised pretraining of an encoder with a method (SimCLR by default), in a run folder."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from simclr_cli.engine import defaults, distributed, rundir, trainer
from simclr_cli.engine.configs import PretrainConfig
from simclr_cli.engine.device import runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.report import NoProgress, Progress
from simclr_cli.engine.trainer import PretrainResult

log = logging.getLogger("simclr")


def run(
    cfg: PretrainConfig,
    *,
    out: Path | None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PretrainResult | None:
    """Pretrain as `cfg` says, writing the run folder `out` (None: a new runs/<timestamp>/); `resume` continues its
    newest valid checkpoint. Returns the result on the main process, None on the others."""
    cfg = defaults.resolve_sizes(cfg)  # a bad config fails here, before any process group
    with distributed.context(device=cfg.train.device) as world:
        if out is None:
            if world.world_size > 1:
                raise ConfigError("pass --out when you start the processes yourself (torchrun, srun), so every process writes to one folder")
            out = rundir.default_run_dir()
        if not resume and distributed.restarted_by_torchrun() and rundir.RunDir(out).saved_checkpoints():
            log.warning("torchrun restarted this run (attempt %d): resuming from its newest checkpoint", distributed.restart_count())
            resume, overwrite = True, False
        rt = runtime(device=cfg.train.device, precision=cfg.train.precision)
        with contextlib.ExitStack() as held:  # rank 0 keeps the run folder locked until the run ends, however it ends
            result = trainer.fit(cfg, world=world, rt=rt, out=out, resume_run=resume, overwrite=overwrite, held=held,
                                 progress=(progress or NoProgress()) if world.is_main else NoProgress())
        return result if world.is_main else None
