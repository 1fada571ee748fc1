"""SimCLR pretraining: the task behind `simclr pretrain` (SimCLR §2.1, Algorithm 1)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from simclr_cli.engine import badfiles, checkpoint, distributed, features, knn, memory, pipeline, plots, rundir, weights
from simclr_cli.engine.augment import AugmentConfig
from simclr_cli.engine.data import (
    DEFAULT_MAX_PIXELS,
    NAMED_DATASETS,
    EpochSampler,
    LabelledSplits,
    labelled_splits,
    pretrain_dataset,
)
from simclr_cli.engine.device import MAX_WORKERS, Runtime, available_cpus, resolve_device, runtime
from simclr_cli.engine.errors import CheckpointError, ConfigError, DataError, NonFiniteLoss, Stopped
from simclr_cli.engine.loss import nt_xent, nt_xent_distributed
from simclr_cli.engine.model import ModelConfig, build_model, parameter_count
from simclr_cli.engine.optim import OptimConfig, build_optimizer, lr_at, scaled_lr, warmup_steps_for
from simclr_cli.engine.report import NoProgress, Progress, StepStats
from simclr_cli.engine.views import BatchViews

log = logging.getLogger("simclr")


@dataclass
class DataConfig:
    source: str | None = None  # a folder of images, a dataset name, or None for the embedded digits
    root: str | None = None  # where named datasets are stored
    download: bool = False
    workers: int | None = None  # DataLoader worker processes; None = chosen from the machine
    on_bad_image: str = "skip"  # skip: use the next decodable image and name the bad one; error: stop, naming it
    decode_side: int | None = None  # decoded images' short side is shrunk to at most this; None = 2x the view size
    cache_gb: float | None = None  # memory for decoded images kept between epochs; None = half the free memory, 0 = off
    max_bad_fraction: float = badfiles.DEFAULT_MAX_BAD_FRACTION  # stop when more of the images drawn are undecodable
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit, read from the header; 0 = off (warned)

    def validate(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"data.workers {self.workers} must be >= 0; use 0 to load in the main process")
        if self.workers is not None and self.workers > MAX_WORKERS:
            raise ConfigError(f"data.workers {self.workers} is more than {MAX_WORKERS}; use about one per CPU core")
        if self.decode_side is not None and (isinstance(self.decode_side, bool) or not isinstance(self.decode_side, int)
                                             or self.decode_side < 8):
            raise ConfigError(f"data.decode_side {self.decode_side!r} must be a whole number of pixels >= 8, or unset for 2x the image size")
        if self.cache_gb is not None and (isinstance(self.cache_gb, bool) or not isinstance(self.cache_gb, (int, float))
                                          or not math.isfinite(self.cache_gb) or self.cache_gb < 0):
            raise ConfigError(f"data.cache_gb {self.cache_gb!r} must be a number of GB >= 0 (0 turns the cache off), or unset")
        badfiles.BadFiles.check_settings(max_bad_fraction=self.max_bad_fraction, max_image_pixels=self.max_image_pixels)
        if self.on_bad_image not in badfiles.POLICIES:
            raise ConfigError(f"data.on_bad_image {self.on_bad_image!r} is not supported; choose one of {', '.join(badfiles.POLICIES)}")


NONFINITE_POLICIES = ("abort", "skip")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class TrainConfig:
    batch_size: int | None = None  # the GLOBAL batch N (2N views a step); None = 256 on a GPU, 64 on a CPU, at most the dataset
    epochs: int = 100
    max_steps: int | None = None  # stop (and end the schedule) after this many steps
    temperature: float = 0.1  # tau (SimCLR Table 5: 0.1 at batch 4096 on ImageNet, 0.5 on CIFAR)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int | None = None  # steps between checkpoints; None = at the end of every epoch
    keep_checkpoints: int = 2  # training-state files kept in checkpoints/ (the newest)
    log_every: int = 10  # steps between metrics lines (each reads the loss back from the device)
    sync_bn: bool = True  # with several processes, BN statistics over the global batch (SimCLR §2.2)
    init: str | None = None  # start from these weights (not their optimiser state); see engine/weights.py
    tensorboard: bool = False  # also log metrics as TensorBoard events in <run>/tensorboard (needs tensorboard)
    compile: bool = False  # torch.compile the model: faster steps after a compile of a minute or more
    on_nonfinite: str = "abort"  # abort: stop, saving nothing from the bad step on; skip: drop that update and go on
    max_skips: int = 10  # with on_nonfinite=skip: stop after this many updates in a row were dropped

    def validate(self) -> None:
        for name in ("epochs", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} {getattr(self, name)} must be >= 1")
        if self.batch_size is not None and self.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2: NT-Xent needs other images in the batch as negatives")
        for name in ("max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} {value} must be >= 1, or unset")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.on_nonfinite {self.on_nonfinite!r} is not supported; choose one of {', '.join(NONFINITE_POLICIES)}")
        if self.max_skips < 1:
            raise ConfigError(f"train.max_skips {self.max_skips} must be >= 1 (updates in a row that may be dropped)")
        if not 0 <= self.seed < 2**63:  # what torch.manual_seed and numpy's generators all take
            raise ConfigError(f"train.seed {str(self.seed)[:30]} must be a whole number from 0 to 2**63 - 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"train.temperature {self.temperature} must be > 0; SimCLR uses 0.1 (ImageNet) or 0.5 (CIFAR)")


@dataclass
class MonitorConfig:
    """A kNN check of the representation during pretraining, so quality is seen rising, not just the loss falling."""

    knn_data: str | None = None  # labelled data (a dataset name or a folder with train/ and val/); None = off
    every: int = 1  # epochs between checks (and one at the end)
    k: int | None = None  # None: 200, or 20 when the labelled train split has fewer than 10,000 images

    def validate(self) -> None:
        if self.every < 1:
            raise ConfigError(f"monitor.every {self.every} must be >= 1 (epochs between kNN checks)")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"monitor.k {self.k} must be >= 1, or unset")


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; saved resolved with every output."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        for section in (self.data, self.model, self.augment, self.optim, self.train, self.monitor):
            section.validate()

    def resolved(self) -> PretrainConfig:
        """Copy with every size-aware `auto` value filled in, so the saved config states what ran."""
        self.validate()
        augment = self.augment.resolved()
        data = self.data
        if data.decode_side is None:
            data = replace(data, decode_side=pipeline.decode_side(augment.image_size))
        return replace(self, data=data, augment=augment, model=self.model.resolved(image_size=augment.image_size))


# Fields that may change when a run is resumed: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = {
    "data.root", "data.workers", "data.download", "data.on_bad_image", "train.device", "train.log_every", "train.keep_checkpoints",
    "monitor.knn_data", "monitor.every", "monitor.k", "train.tensorboard", "data.cache_gb", "train.compile",
    "data.max_bad_fraction", "data.max_image_pixels", "train.on_nonfinite", "train.max_skips",
}


@dataclass(frozen=True)
class PretrainResult:
    run_dir: Path
    encoder: Path
    steps: int
    epochs_done: float
    first_loss: float | None
    last_loss: float | None
    seconds: float
    resumed_from: int | None
    named_data: bool  # pretrained on a named dataset, which evaluation commands then default to


def default_batch_size(device: torch.device) -> int:
    """256 on an accelerator; 64 on a CPU, where 2x256 ResNet-50 views at 224 px would need ~40 GB of activations."""
    return 64 if device.type == "cpu" else 256


def default_workers(device: torch.device, *, decoding: bool) -> int:
    """Worker processes for decoding (augmentation runs batched on the training device).

    Cached or in-memory pixels need no workers on a CPU: a batch is a copy. On a GPU two keep batches pinned
    and prefetched. A small CPU-only machine gives its cores to the model.
    """
    cpus = available_cpus()
    if device.type == "cuda":
        return min(8, cpus) if decoding else min(2, cpus)
    if not decoding:
        return 0
    return 0 if cpus <= 2 else min(4, cpus // 2)


def run(
    cfg: PretrainConfig,
    *,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PretrainResult:
    """Train SimCLR as `cfg` says, writing the run dir `out`; `resume` continues its newest valid checkpoint."""
    cfg = cfg.resolved()
    world = distributed.from_environment()
    distributed.init(world, device_type=resolve_device(cfg.train.device).type)
    distributed.setup_logging_filter(world)
    if not resume and restarted_by_torchrun() and rundir.RunDir(out).saved_checkpoints():
        log.warning("torchrun restarted this run (attempt %s): resuming from its newest checkpoint",
                    os.environ.get("TORCHELASTIC_RESTART_COUNT"))
        resume, overwrite = True, False
    try:
        with contextlib.ExitStack() as held:  # rank 0 keeps the run dir locked until the run ends, however it ends
            return _run(cfg, world=world, out=out, resume=resume, overwrite=overwrite, held=held,
                        progress=(progress or NoProgress()) if world.is_main else NoProgress())
    finally:
        distributed.shutdown()


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun (--max-restarts) started again after a failure: it should resume."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _run(cfg: PretrainConfig, *, world: distributed.World, out: Path, resume: bool, overwrite: bool,
         held: contextlib.ExitStack, progress: Progress) -> PretrainResult:
    rt = runtime(device=cfg.train.device, precision=cfg.train.precision)
    memory.require_for_training(parameter_count(cfg.model), device_type=rt.device.type,
                                what=f"{cfg.model.arch} at width {cfg.model.width:g}")
    images = source_images(cfg)
    batch = cfg.train.batch_size
    if batch is None:
        batch = min(default_batch_size(rt.device) * world.world_size, len(images))
        batch -= batch % world.world_size
        if batch < 2:
            raise DataError(f"the data holds {len(images)} image(s); SimCLR needs at least 2 per batch (each is the others' negative)")
        cfg = replace(cfg, train=replace(cfg.train, batch_size=batch))
    elif batch > len(images):
        raise DataError(f"--batch-size {batch} is larger than the dataset ({len(images)} images); lower --batch-size")
    if batch % world.world_size:
        raise ConfigError(
            f"--batch-size {batch} (the global batch) does not split evenly over {world.world_size} processes; "
            f"use a multiple of {world.world_size}"
        )
    monitor = _Monitor.open(cfg) if cfg.monitor.knn_data else None  # bad labelled data fails before any file is written
    if cfg.train.tensorboard:
        _event_writer_class()  # a missing package too
    run_dir = distributed.on_main(world, lambda: rundir.prepare(out, resume=resume, overwrite=overwrite, hold=held), device=rt.device)
    run_dir = run_dir or rundir.RunDir(out)
    config_dict = _to_dict(cfg)

    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
    model = build_model(cfg.model)
    if cfg.train.init and not resume:  # a resumed run's weights come from its checkpoint
        report = weights.init_encoder(model, Path(cfg.train.init).expanduser())
        log.info("initialised from %s (%s): %d tensors%s", report.source, report.layout, report.loaded,
                 ", projection head included" if report.head_loaded else "")
        if report.note:
            log.warning("%s", report.note)
    model = model.to(rt.device)
    if world.world_size > 1 and cfg.train.sync_bn:
        model = distributed.sync_batchnorm(model, device_type=rt.device.type)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    peak_lr = scaled_lr(cfg.optim.lr, batch, cfg.optim.lr_scaling)  # from the GLOBAL batch
    optimizer = build_optimizer(model, cfg.optim, lr=peak_lr)
    scaler = rt.grad_scaler()

    steps_per_epoch = len(images) // batch
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    warmup = warmup_steps_for(warmup_epochs=cfg.optim.warmup_epochs, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    step, elapsed_before, resumed_from = 0, 0.0, None
    if resume:  # every rank reads the same file: checkpoints live on storage all nodes share
        meta = _resume(run_dir, cfg=config_dict, model=model, optimizer=optimizer, scaler=scaler, total_steps=total_steps)
        step, elapsed_before, resumed_from = meta["step"], float(meta.get("elapsed", 0.0)), meta["step"]
    distributed.on_main(world, lambda: _start_files(run_dir, config_dict, resumed_from=resumed_from), device=rt.device)
    trained = model  # the bare model: what is saved, monitored and returned
    if world.world_size > 1:
        device_ids = [rt.device.index if rt.device.index is not None else torch.cuda.current_device()] if rt.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.train.compile:
        model = torch.compile(model)  # compiles at the first step; `trained` stays the plain module that is saved

    sampler = EpochSampler(len(images), global_batch_size=batch, seed=cfg.train.seed, rank=world.rank, world_size=world.world_size)
    bad = badfiles.BadFiles(on_bad_image=cfg.data.on_bad_image, max_bad_fraction=cfg.data.max_bad_fraction,
                            max_image_pixels=cfg.data.max_image_pixels, report=run_dir.bad_files(world.rank))
    for folder, reason in getattr(images, "skipped_folders", ()):
        bad.add_folder(folder, reason)
    loader, workers = _input_pipeline(cfg, images, sampler, rt=rt, world=world)
    log.info(
        "pretraining %s (width %g, %s stem) on %d images at %d px: batch %d, %d steps (%d per epoch), "
        "peak lr %.4g, %s on %s, %d data workers%s%s",
        cfg.model.arch, cfg.model.width, cfg.model.stem, len(images), cfg.augment.image_size, batch,
        total_steps, steps_per_epoch, peak_lr, rt.precision, rt.device, workers,
        f", {world.world_size} processes of {batch // world.world_size} images" if world.world_size > 1 else "",
        ", compiled" if cfg.train.compile else "",
    )

    trainer = _Trainer(
        cfg=cfg, config_dict=config_dict, rt=rt, world=world, model=model, trained=trained, optimizer=optimizer,
        scaler=scaler, run_dir=run_dir, bad=bad, num_images=len(images),
        progress=progress, peak_lr=peak_lr, warmup=warmup, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, elapsed_before=elapsed_before, monitor=monitor,
    )
    progress.start(total_steps=total_steps, completed=step, description="pretrain")
    try:
        with stop_requests() as requested:
            step = trainer.train(loader, sampler, start_step=step, stop=requested)
    finally:
        progress.stop()
        if trainer.events is not None:
            trainer.events.close()
    if bad.files or bad.folders:
        log.warning("%s", bad.summary())
    return PretrainResult(
        run_dir=run_dir.root,
        encoder=run_dir.encoder,
        steps=step,
        epochs_done=step / steps_per_epoch,
        first_loss=trainer.first_loss,
        last_loss=trainer.last_loss,
        seconds=trainer.elapsed(),
        resumed_from=resumed_from,
        named_data=cfg.data.source is None or cfg.data.source in NAMED_DATASETS,
    )


def source_images(cfg: PretrainConfig):
    """The images `cfg` pretrains on: a named dataset's pretraining split or a folder (decoded under its pixel limit)."""
    return pretrain_dataset(cfg.data.source, root=_path(cfg.data.root), download=cfg.data.download,
                            max_pixels=cfg.data.max_image_pixels or None)


def _input_pipeline(cfg: PretrainConfig, images, sampler: EpochSampler, *, rt: Runtime,
                    world: distributed.World) -> tuple[DataLoader, int]:
    """Padded uint8 batches of this process's share, decoded once into the cache when it fits; and the worker count."""
    pixels = pipeline.PixelDataset(images, max_side=cfg.data.decode_side, on_bad_image=cfg.data.on_bad_image)
    chosen = cfg.data.workers
    pixels.cache = pipeline.build_cache(pixels, budget=pipeline.cache_budget(cfg.data.cache_gb),
                                        workers=chosen if chosen is not None else default_workers(rt.device, decoding=True))
    decoding = pixels.arrays is None and (pixels.cache is None or not pixels.cache.complete)
    workers = chosen if chosen is not None else default_workers(rt.device, decoding=decoding)
    loader = pipeline.loader(pixels, sampler, local_batch_size=cfg.train.batch_size // world.world_size, workers=workers,
                             pin_memory=rt.device.type == "cuda")
    return loader, workers


class _Trainer:
    """The step loop and its bookkeeping (logging, non-finite guard, checkpoints)."""

    def __init__(self, *, cfg: PretrainConfig, config_dict: dict[str, Any], rt: Runtime, world: distributed.World,
                 model, trained, optimizer, scaler, run_dir: rundir.RunDir, bad: badfiles.BadFiles, num_images: int,
                 progress: Progress, peak_lr: float, warmup: int, total_steps: int,
                 steps_per_epoch: int, elapsed_before: float, monitor: _Monitor | None):
        self.cfg, self.config_dict, self.rt, self.world = cfg, config_dict, rt, world
        self.model, self.trained, self.optimizer, self.scaler = model, trained, optimizer, scaler
        # each process compares its anchors with the keys of all processes (SIMCLR.md, Multi-GPU)
        self.loss_fn = nt_xent_distributed if world.world_size > 1 else nt_xent
        self.views = BatchViews(cfg.augment, seed=cfg.train.seed)
        self.bad, self.num_images, self.drawn = bad, num_images, 0
        self.skips = 0  # updates dropped in a row (on_nonfinite=skip)
        self.run_dir, self.progress = run_dir, progress
        self.peak_lr, self.warmup, self.total_steps, self.steps_per_epoch = peak_lr, warmup, total_steps, steps_per_epoch
        self.started = time.perf_counter()
        self.elapsed_before = elapsed_before
        self.monitor = monitor
        self.events = _event_writer(run_dir) if cfg.train.tensorboard and world.is_main else None
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        # First step whose loss was not finite, kept on the device so the step never waits on the host.
        self.bad_step = torch.full((), -1, dtype=torch.long, device=rt.device)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def train(self, loader: DataLoader, sampler: EpochSampler, *, start_step: int, stop: StopRequest) -> int:
        step = start_step
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        while step < self.total_steps:
            epoch = step // self.steps_per_epoch
            sampler.set_epoch(epoch, start_batch=step - epoch * self.steps_per_epoch)
            batches = iter(loader)
            while True:
                waited = time.perf_counter()
                try:
                    batch = next(batches, None)  # the time spent here is the time the model waits for data
                except RuntimeError:  # a worker ended by the same SIGTERM that asked us to stop
                    if stop.signal is None:
                        raise
                    self.stop_here(stop, step=step, epoch=epoch)
                window_wait += time.perf_counter() - waited
                if batch is None:
                    break
                self.report_skipped(batch.skipped)
                lr = lr_at(step, peak_lr=self.peak_lr, warmup_steps=self.warmup, total_steps=self.total_steps)
                loss = self.step(batch, lr=lr, step=step, epoch=epoch)
                step += 1
                window_steps += 1
                last = step == self.total_steps
                if step % self.cfg.train.log_every == 0 or last or step % self.steps_per_epoch == 0:
                    now = time.perf_counter()
                    seconds = max(now - window_start, 1e-9)
                    self.log(step=step, epoch=epoch, loss=loss, lr=lr, images_per_s=window_steps * self.cfg.train.batch_size / seconds,
                             data_wait=min(1.0, window_wait / seconds))
                    window_start, window_steps, window_wait = now, 0, 0.0
                # the kNN check first, so the plots drawn when saving include it
                if self.monitor and self.world.is_main and (last or step % (self.steps_per_epoch * self.cfg.monitor.every) == 0):
                    self.write_metrics(self.monitor.check(self, step=step, epoch=epoch))
                if self.checkpoint_due(step) or last:
                    self.save(step=step, epoch=epoch)
                if last:
                    break
                if self.stop_agreed(stop, step=step):
                    self.stop_here(stop, step=step, epoch=epoch)
        return step

    def stop_agreed(self, stop: StopRequest, *, step: int) -> bool:
        """Whether every process has been asked to stop. One process checks after every step; several check
        at logging steps, which already wait for each other, so the step itself never waits on the host."""
        if self.world.world_size == 1:
            return stop.signal is not None
        if step % self.cfg.train.log_every:
            return False
        flag = torch.tensor(0 if stop.signal is None else int(stop.signal), device=self.rt.device)
        agreed = int(distributed.all_reduce_max(flag).item())
        if agreed and stop.signal is None:
            stop.signal = agreed
        return bool(agreed)

    def stop_here(self, stop: StopRequest, *, step: int, epoch: int) -> None:
        """Save at this step boundary, then stop with the signal's exit code (128 + its number)."""
        if not self.checkpoint_due(step):
            self.save(step=step, epoch=epoch)
        name = signal.Signals(stop.signal).name
        self.write_metrics({"step": step, "epoch": epoch, "event": f"stopped by {name}", "time": round(self.elapsed(), 3)})
        raise Stopped(
            f"stopped by {name} at step {step}/{self.total_steps}; saved {self.run_dir.checkpoint(step)}. "
            f"Continue with: simclr pretrain --resume --out {self.run_dir.root}",
            signal_number=stop.signal,
        )

    def report_skipped(self, skipped: list[pipeline.Skipped]) -> None:
        """Name the images a batch replaced, and stop if most of what was drawn so far is unreadable."""
        self.drawn += self.cfg.train.batch_size // self.world.world_size + len(skipped)
        for item in skipped:
            self.bad.add(item.path, item.reason)
        if skipped:
            self.bad.check(seen=min(self.drawn, self.num_images), total=self.num_images)

    def step(self, batch: pipeline.PixelBatch, *, lr: float, step: int, epoch: int) -> torch.Tensor:
        """One optimisation step on a batch of N images; returns the loss without syncing the host."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        memory_format = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        pixels = batch.pixels.to(self.rt.device, non_blocking=True)  # (N, 3, H, W) uint8: a quarter of float32's bytes
        # Both views through the encoder as one batch so BN statistics cover all 2N views (§2.2).
        x = self.views(pixels, batch.sizes, batch.indices, epoch=epoch)  # (2N, 3, S, S): views 1, then views 2
        x = x.contiguous(memory_format=memory_format)
        loss = forward_backward(self.model, x, rt=self.rt, loss_fn=self.loss_fn, temperature=self.cfg.train.temperature,
                                optimizer=self.optimizer, scaler=self.scaler)
        if self.cfg.train.on_nonfinite == "skip" and not self.update_is_finite(loss, step=step):
            self.optimizer.zero_grad(set_to_none=True)
            return loss
        self.scaler.step(self.optimizer)
        self.scaler.update()
        finite = torch.isfinite(loss)
        # numbered like metrics.jsonl: step k is the k-th update
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, step + 1, self.bad_step)  # no host round trip
        return loss

    def update_is_finite(self, loss: torch.Tensor, *, step: int) -> bool:
        """on_nonfinite=skip: every process checks its loss and gradients, and all drop the update if any is bad."""
        grads = [p.grad for p in self.trained.parameters() if p.grad is not None]
        finite = torch.isfinite(loss) & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        bad = int(distributed.all_reduce_max((~finite).to(torch.int64)).item())  # one host sync per step, in skip mode only
        if not bad:
            self.skips = 0
            return True
        self.skips += 1
        log.warning("step %d: the loss or gradients are NaN/inf; update dropped (%d in a row, at most %d)",
                    step + 1, self.skips, self.cfg.train.max_skips)
        if self.skips >= self.cfg.train.max_skips:
            raise NonFiniteLoss(step + 1, what=f"the loss or gradients ({self.skips} updates in a row)")
        return False

    def encoder_info(self, *, step: int, epoch: int) -> checkpoint.EncoderInfo:
        """What the encoder file says about the model being trained: architecture, eval transform, config."""
        return checkpoint.EncoderInfo(
            model=self.cfg.model,
            image_size=self.cfg.augment.image_size,
            mean=self.cfg.augment.mean,
            std=self.cfg.augment.std,
            interpolation=self.cfg.augment.interpolation,
            config=self.config_dict,
            epoch=epoch,
            step=step,
        )

    def check_finite(self) -> None:
        """Stop if any rank saw a non-finite loss; every rank calls this at the same steps, so all stop together."""
        bad = int(distributed.all_reduce_max(self.bad_step).item())
        if bad >= 0:
            raise NonFiniteLoss(bad)

    def log(self, *, step: int, epoch: int, loss: torch.Tensor, lr: float, images_per_s: float, data_wait: float) -> None:
        self.check_finite()
        value: float | None = float(distributed.all_reduce_mean(loss).item())  # the global batch's loss
        if not math.isfinite(value):
            value = None  # a dropped update (on_nonfinite=skip); JSON has no NaN
        elif self.first_loss is None:
            self.first_loss = value
        if value is not None:
            self.last_loss = value
        record = {"step": step, "epoch": epoch, "loss": value, "lr": lr, "time": round(self.elapsed(), 3),
                  "images_per_s": round(images_per_s, 2), "data_wait": round(data_wait, 4), "rss_mb": round(memory.resident_mb(), 1)}
        self.write_metrics(record)
        self.progress.update(StepStats(step=step, epoch=epoch, total_steps=self.total_steps, loss=value, lr=lr,
                                       images_per_s=images_per_s, data_wait=data_wait))

    def write_metrics(self, record: dict[str, Any]) -> None:
        if not self.world.is_main:
            return
        with checkpoint.writing(self.run_dir.metrics, kept="the lines already logged are intact"), \
                open(self.run_dir.metrics, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.events is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "time") and isinstance(value, (int, float)):
                    self.events.add_scalar(f"pretrain/{key}", value, record["step"])

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.train.checkpoint_every
        return step % every == 0 if every else step % self.steps_per_epoch == 0

    def save(self, *, step: int, epoch: int) -> None:
        """Training state for --resume, then the encoder file the other commands read; never non-finite."""
        self.check_finite()
        if not self.world.is_main:
            return  # every rank holds the same weights; one writes them
        path = self.run_dir.checkpoint(step)
        checkpoint.save_train_state(
            path, model=self.trained, optimizer=self.optimizer, scaler=self.scaler, step=step, epoch=epoch,
            config=self.config_dict, elapsed=self.elapsed(),
        )
        for old in self.run_dir.saved_checkpoints()[self.cfg.train.keep_checkpoints:]:
            old.unlink(missing_ok=True)
        checkpoint.save_encoder(self.run_dir.encoder, self.trained, info=self.encoder_info(step=step, epoch=epoch))
        log.debug("saved %s and %s", path, self.run_dir.encoder)
        if plots.available():  # an optional extra: without matplotlib the run simply has no pictures
            plots.plot_run(self.run_dir.root)


@dataclass
class StopRequest:
    """The stop signal received during training, if any (set by the handler, read at step boundaries)."""

    signal: int | None = None


@contextlib.contextmanager
def stop_requests():
    """While training, SIGTERM and SIGINT ask for a stop at the next step boundary instead of killing the run.

    A second signal of the same kind restores the default behaviour, so a user can still force an exit. Only the
    main thread can install handlers; elsewhere (a thread in a test harness) training simply runs without them.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request.signal is not None:
            signal.signal(signum, signal.SIG_DFL)  # a second request: stop now
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        request.signal = signum
        log.warning("%s received: stopping after this step, once a checkpoint is written", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def forward_backward(model, x: torch.Tensor, *, rt: Runtime, loss_fn, temperature: float, optimizer, scaler) -> torch.Tensor:
    """NT-Xent of 2N ready views (views 1, then views 2) and its gradients; the update is the caller's."""
    model.train()
    with rt.autocast():
        _, z = model(x)  # (2N, proj_dim)
    z1, z2 = z.float().chunk(2)  # (N, proj_dim) each; the loss is computed in fp32
    loss = loss_fn(z1, z2, temperature)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    return loss.detach()


class _Monitor:
    """kNN accuracy of the encoder being trained, on labelled data loaded once at the start."""

    def __init__(self, cfg: PretrainConfig, splits: LabelledSplits):
        self.splits = splits
        self.knn = knn.KnnConfig(k=(cfg.monitor.k or knn.default_k(len(splits.train)),), batch_size=256, workers=0)

    @classmethod
    def open(cls, cfg: PretrainConfig) -> _Monitor:
        return cls(cfg, labelled_splits(cfg.monitor.knn_data, root=_path(cfg.data.root), download=cfg.data.download))

    def check(self, trainer: _Trainer, *, step: int, epoch: int) -> dict[str, Any]:
        info = trainer.encoder_info(step=step, epoch=epoch)
        encoder = features.Encoder(model=trainer.trained, info=info, source=None)
        try:
            result = knn.run(self.knn, encoder, self.splits.train, self.splits.val, rt=trainer.rt)
        finally:
            trainer.trained.train()
        log.info("epoch %d: kNN top-1 %.2f%% on %s", epoch, 100 * result.top1, self.splits.name)
        return {"step": step, "epoch": epoch, "knn_top1": result.top1, "knn_top5": result.top5,
                "knn_k": result.scores[0].k_used, "time": round(trainer.elapsed(), 3)}


def _resume(run_dir: rundir.RunDir, *, cfg: dict[str, Any], model, optimizer, scaler, total_steps: int) -> dict[str, Any]:
    """Load the newest checkpoint that is complete and valid, saying why any newer one was skipped."""
    for path in run_dir.saved_checkpoints():
        try:
            meta = checkpoint.load_train_state(path, model=model, optimizer=optimizer, scaler=scaler, total_steps=total_steps)
        except CheckpointError as exc:
            log.warning("skipping %s: %s", path.name, exc)
            continue
        _check_same_run(meta.get("config", {}), cfg, source=path)
        log.info("resuming from %s (step %d)", path, meta["step"])
        return meta
    raise CheckpointError(f"no valid checkpoint to resume in {run_dir.checkpoints}; start a new run with --overwrite")


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], *, source: Path) -> None:
    """Refuse to resume with settings that change what the run computes."""
    saved, current = _flatten(saved), _flatten(current)
    # A key the saved config lacks was added by a later simclr; its default reproduces what the run did before.
    for key in sorted(saved.keys() - RESUMABLE_CHANGES):
        was, now = saved.get(key), current.get(key)
        if was != now:
            raise ConfigError(
                f"--resume would change {key} from {was!r} to {now!r} ({source.name}); "
                "resume with the run's own settings, or start a new run"
            )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _event_writer_class():
    """TensorBoard's SummaryWriter, or a one-line error naming the missing package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("--tensorboard needs the tensorboard package; pip install tensorboard (or the [tensorboard] extra)") from exc
    return SummaryWriter


def _event_writer(run_dir: rundir.RunDir):
    return _event_writer_class()(log_dir=str(run_dir.root / "tensorboard"))


def _start_files(run_dir: rundir.RunDir, config_dict: dict[str, Any], *, resumed_from: int | None) -> None:
    """Rank 0's bookkeeping before the first step: the config of a new run, or the metrics a resume replays."""
    if resumed_from is None:
        text = yaml.safe_dump(config_dict, sort_keys=False)
        checkpoint.atomic_write(run_dir.config, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    else:
        _truncate_metrics(run_dir.metrics, after_step=resumed_from)
    if run_dir.root.parent.name == rundir.RUNS.name:
        rundir.point_latest(run_dir.root)


def _truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from; those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= after_step]
    checkpoint.atomic_write(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))


def _to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """Plain data with lists for tuples, so YAML, JSON and comparisons agree."""
    return json.loads(json.dumps(asdict(cfg)))


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
