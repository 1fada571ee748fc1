"""What every evaluation of an encoder on labelled data does around its protocol: open the encoder (or its
random-init twin), the labelled splits (by default the encoder's own pretraining data, when it is a named dataset)
and the runtime; then write results.json beside the checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simclr_cli.engine import defaults, distributed, external, rundir
from simclr_cli.engine.datasets import NAMED_DATASETS, LabelledSplits, labelled_splits
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.features import Encoder, open_encoder, weights_of
from simclr_cli.engine.files import check_output_folder
from simclr_cli.engine.report import Progress
from simclr_cli.engine.results import write_results

log = logging.getLogger("simclr")


@dataclass(frozen=True)
class Opened:
    """An evaluation's inputs, and its config with the machine's defaults filled in."""

    cfg: Any  # a configs.LabelledEvalConfig, workers resolved
    checkpoint: Path
    encoder: Encoder
    splits: LabelledSplits
    rt: Runtime


@dataclass(frozen=True)
class Evaluated:
    """What a command shows: the task's result, the data it was measured on, and where results.json is."""

    result: Any
    data: str
    results_file: Path


def run(cfg, *, checkpoint: Path | None, out: Path | None, command: str, progress: Progress | None,
        evaluate: Callable[[Opened, Path, Progress | None], Any]) -> Evaluated | None:
    """An evaluation command from end to end: inside the process group, open its inputs, `evaluate(opened, out_dir,
    progress)`, and on the main process write results.json (default folder: beside the checkpoint) and return
    what to show; None on the other processes."""
    cfg.validate()
    with distributed.context(device=cfg.device) as world:
        path = rundir.resolve_checkpoint(checkpoint)
        folder = out or rundir.default_eval_dir(external.file_of(path), command)
        check_output_folder(folder)  # now, not after the evaluation
        opened = open_labelled(cfg, path)
        result = evaluate(opened, folder, progress if world.is_main else None)
        if not world.is_main:
            return None
        return Evaluated(result=result, data=opened.splits.name,
                         results_file=write_results(folder, {**result.to_dict(), "data": opened.splits.name,
                                                             "weights": weights_of(opened.encoder),
                                                             "encoder_spec": opened.encoder.spec,
                                                             "checkpoint_sha256": opened.encoder.digest}))


def open_labelled(cfg, checkpoint: Path | None) -> Opened:
    """The encoder file (default runs/latest/encoder.safetensors), the labelled splits and the runtime `cfg` names."""
    path = rundir.resolve_checkpoint(checkpoint)
    log.info("checkpoint: %s%s", path, " (architecture only: --random-init)" if cfg.random_init else "")
    encoder = open_encoder(path, random_init=cfg.random_init, seed=cfg.seed)
    splits = splits_for(cfg, encoder)
    rt = runtime(device=cfg.device, precision=cfg.precision)
    cfg = replace(cfg, workers=defaults.resolve_workers(cfg.workers, rt.device))  # evaluation decodes with PIL
    return Opened(cfg=cfg, checkpoint=path, encoder=encoder, splits=splits, rt=rt)


def splits_for(cfg, encoder: Encoder) -> LabelledSplits:
    """The labelled splits `cfg` names (data, or train and val), by default the encoder's pretraining data."""
    data = cfg.data
    if data is None and cfg.train is None:
        data = pretraining_dataset(encoder)
    return labelled_splits(data, train=_path(cfg.train), val=_path(cfg.val), root=_path(cfg.data_root),
                           download=cfg.download)


def pretraining_dataset(encoder: Encoder) -> str | None:
    """The named dataset the encoder was pretrained on: the natural default for evaluating it."""
    source = (encoder.info.config.get("data") or {}).get("source")
    if source in NAMED_DATASETS:
        log.info("data: %s (the encoder's pretraining data; pass --data to choose)", source)
        return source
    return None


def _path(value: str | Path | None) -> Path | None:
    return Path(value).expanduser() if value else None
