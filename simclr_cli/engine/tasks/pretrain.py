"""`simclr pretrain`: self-supervised pretraining of an encoder with a method (SimCLR by default), in a run folder."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from simclr_cli.engine import defaults, distributed, rundir, trainer
from simclr_cli.engine.configs import PretrainConfig
from simclr_cli.engine.datasets import fingerprint
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


def preflight(cfg: PretrainConfig, *, out: Path, resume: bool, overwrite: bool, device_type: str, processes: int,
              check_out: bool = True) -> None:
    """Raise what a run of `processes` processes on `device_type` would, before any of them starts: the config, the
    data, the global batch against the data and the processes, and (`check_out`; on the node that writes it) the
    run folder. Initialises no GPU: the workers do."""
    cfg = defaults.resolve_sizes(cfg)
    images = trainer.drawn(cfg, trainer.source_images(cfg, out=out, resume=resume))
    defaults.resolve_pretrain(cfg, device=torch.device(device_type), world_size=processes, num_images=len(images))
    if check_out:
        rundir.check(out, resume=resume, overwrite=overwrite)
        if resume:
            rundir.check_same_data(rundir.RunDir(out), fingerprint(images, data=cfg.data.source))
