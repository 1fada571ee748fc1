"""The method-agnostic pretraining loop: data in, the method's loss, the optimiser step, and the run's bookkeeping
(logging, the non-finite guard, stop signals, the kNN monitor, checkpoints). SimCLR §2.1, Algorithm 1, with the
method (engine/methods/) supplying the views it needs, the modules it trains and its loss.

`fit` assembles a run from a resolved config; `Trainer` runs its steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from simclr_cli.engine import (badfiles, checkpoint, decoders, defaults, distributed, memory, methods, nonfinite, pipeline,
                               plots, resume, rundir, runlog, shards, subsets, weights)
from simclr_cli.engine.datasets import NAMED_DATASETS, fingerprint, pretrain_dataset
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError, Stopped
from simclr_cli.engine.images import ImageFiles, write_file_list
from simclr_cli.engine.methods.base import Method, StepImages
from simclr_cli.engine.model import parameter_count
from simclr_cli.engine.metrics import MetricsLog, Pace, Throughput, clock, require_tensorboard
from simclr_cli.engine.monitor import Monitor
from simclr_cli.engine.nonfinite import NonFiniteGuard
from simclr_cli.engine.optim import Schedule, build_optimizer, scaled_lr
from simclr_cli.engine.plain import to_plain
from simclr_cli.engine.report import Progress, StepStats
from simclr_cli.engine.sampler import EpochSampler
from simclr_cli.engine.signals import StopRequest, stop_requests
from simclr_cli.engine.views import BatchViews

log = logging.getLogger("simclr")

@dataclass
class TrainConfig:
    """The `train:` section: which method, how many images and steps, and the loop's bookkeeping."""

    method: str = "simclr"  # the pretraining method (engine/methods/): the views, modules and loss the trainer runs
    batch_size: int | None = None  # the GLOBAL batch N (2N views a step); None = 256 on a GPU, 64 on a CPU, at most the dataset
    epochs: int = 100
    max_steps: int | None = None  # stop (and end the schedule) after this many steps
    temperature: float | None = None  # tau; None = 0.5 for images of <= 64 px (app. B.9, CIFAR), else 0.1 (Table 5, ImageNet)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int | None = None  # steps between training-state checkpoints; None = by checkpoint_minutes
    # With checkpoint_every unset: a checkpoint at the first logged step this many minutes after the last one; 0 = none
    # but the last. Either way one is written at the end and on a stop signal. Writing a ResNet-50's state (~340 MB
    # with the encoder file) every step of a small run would take longer than its steps.
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2  # training-state files kept in checkpoints/ (the newest)
    log_every: int = 10  # steps between metrics lines (each reads the loss back from the device)
    sync_bn: bool = True  # with several processes, BN statistics over the global batch (SimCLR §2.2)
    init: str | None = None  # start from these weights (not their optimiser state); see engine/weights.py
    tensorboard: bool = False  # also log metrics as TensorBoard events in <run>/tensorboard (needs tensorboard)
    compile: bool = False  # torch.compile the model: faster steps after a compile of a minute or more
    on_nonfinite: str = "abort"  # abort: stop, saving nothing from the bad step on; skip: drop that update and go on
    max_skips: int = 10  # with on_nonfinite=skip: stop after this many updates in a row were dropped

    def validate(self) -> None:
        methods.check_name(self.method)
        for name in ("epochs", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} {getattr(self, name)} must be >= 1")
        if self.batch_size is not None and self.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2: NT-Xent needs other images in the batch as negatives")
        for name in ("max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} {value} must be >= 1, or unset")
        if isinstance(self.checkpoint_minutes, bool) or not isinstance(self.checkpoint_minutes, (int, float)) or not (
            math.isfinite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0
        ):
            raise ConfigError(f"train.checkpoint_minutes {self.checkpoint_minutes!r} must be a number of minutes >= 0 (0: only at the end)")
        if self.on_nonfinite not in nonfinite.POLICIES:
            raise ConfigError(f"train.on_nonfinite {self.on_nonfinite!r} is not supported; choose one of {', '.join(nonfinite.POLICIES)}")
        if self.max_skips < 1:
            raise ConfigError(f"train.max_skips {self.max_skips} must be >= 1 (updates in a row that may be dropped)")
        if not 0 <= self.seed < 2**63:  # what torch.manual_seed and numpy's generators all take
            raise ConfigError(f"train.seed {str(self.seed)[:30]} must be a whole number from 0 to 2**63 - 1")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"train.temperature {self.temperature} must be > 0; SimCLR uses 0.1 (ImageNet) or 0.5 (CIFAR)")


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
    already_complete: bool = False  # a --resume of a run that had finished its schedule: nothing was done


def source_images(cfg, *, out: Path | None = None, resume: bool = False):
    """The images `cfg` pretrains on: a named dataset's pretraining split, a folder (decoded under its pixel limit) or
    the images of its --file-list, never the files of the run folder `out` when it lies inside that folder; on a
    `resume`, the list the run saved in `out`."""
    return pretrain_dataset(cfg.data.source, root=_path(cfg.data.root), download=cfg.data.download,
                            max_pixels=cfg.data.max_image_pixels or None, exclude=out, file_list=cfg.data.file_list,
                            saved_list=rundir.RunDir(out).files if resume and out is not None else None,
                            saved_index=rundir.RunDir(out).shard_index if resume and out is not None else None)


def drawn(cfg, images):
    """The part of `images` the run trains on (--subset, --unbalanced; subsets.py): drawn before the sampler splits
    them across processes, with the seed every process shares, so each draws the same images."""
    return subsets.draw(images, subset=cfg.data.subset, unbalanced=cfg.data.unbalanced, seed=cfg.train.seed,
                        source=cfg.data.source)


def fit(cfg, *, world: distributed.World, rt: Runtime, out: Path, resume_run: bool, overwrite: bool,
        held: contextlib.ExitStack, progress: Progress) -> PretrainResult:
    """Pretrain as `cfg` (a configs.PretrainConfig) says, writing the run folder `out`; `resume_run` continues its
    newest valid checkpoint. Runs inside a process group (`distributed.context`); rank 0 holds the folder's lock in `held`,
    and copies the log into the run's train.log."""
    run_log = held.enter_context(runlog.recording()) if world.is_main else None
    memory.require_for_training(parameter_count(cfg.model), device_type=rt.device.type,
                                what=f"{cfg.model.arch} at width {cfg.model.width:g}")
    source = source_images(cfg, out=out, resume=resume_run)  # all of DATA: what the run saves for --resume
    images = drawn(cfg, source)
    cfg = defaults.resolve_pretrain(cfg, device=rt.device, world_size=world.world_size, num_images=len(images))
    cfg = defaults.resolve_runtime(cfg, rt)
    monitor = Monitor.open(cfg.monitor, root=_path(cfg.data.root), download=cfg.data.download)  # fails before any file
    if cfg.train.tensorboard:
        require_tensorboard()  # a missing package too
    run_dir = distributed.on_main(world, lambda: rundir.prepare(out, resume=resume_run, overwrite=overwrite, hold=held), device=rt.device)
    run_dir = run_dir or rundir.RunDir(out)
    data = fingerprint(images, data=cfg.data.source)
    if resume_run:  # before any checkpoint is read: other images change the schedule, and the messages with it
        distributed.on_main(world, lambda: rundir.check_same_data(run_dir, data), device=rt.device)
    batch = cfg.train.batch_size
    peak_lr = scaled_lr(cfg.optim.lr, batch, cfg.optim.lr_scaling)  # from the GLOBAL batch
    schedule = Schedule.fit(peak_lr=peak_lr, steps_per_epoch=len(images) // batch, epochs=cfg.train.epochs,
                            max_steps=cfg.train.max_steps, warmup_epochs=cfg.optim.warmup_epochs)
    final = resume.finished(run_dir, config=to_plain(cfg), total_steps=schedule.total_steps) if resume_run else None
    if final is not None:  # before any image is decoded
        return PretrainResult(
            run_dir=run_dir.root, encoder=run_dir.encoder, steps=final["step"], epochs_done=final["step"] / schedule.steps_per_epoch,
            first_loss=None, last_loss=None, seconds=float(final.get("elapsed", 0.0)), resumed_from=final["step"],
            named_data=cfg.data.source is None or cfg.data.source in NAMED_DATASETS, already_complete=True,
        )
    pixels, cfg = _pixels(cfg, images, rt=rt, world=world, run=run_dir.root, data=data)
    config_dict = to_plain(cfg)  # resolved: what config.yaml and every checkpoint record

    method = _method(cfg, world=world, rt=rt, init=not resume_run)
    optimizer = build_optimizer(method.modules, cfg.optim, lr=peak_lr)
    scaler = rt.grad_scaler()
    step, elapsed_before, resumed_from = 0, 0.0, None
    if resume_run:  # every rank reads the same file: checkpoints live on storage all nodes share
        meta = resume.load_newest(run_dir, config=config_dict, method=method, optimizer=optimizer, scaler=scaler,
                                  total_steps=schedule.total_steps, steps_per_epoch=schedule.steps_per_epoch)
        step, elapsed_before, resumed_from = meta["step"], float(meta.get("elapsed", 0.0)), meta["step"]

    def begin() -> None:
        rundir.start(run_dir, config_dict, resumed_from=resumed_from, data=data)
        if resumed_from is None and isinstance(source, ImageFiles):  # a folder's list, for --resume to reuse
            write_file_list(run_dir.files, source.paths, base=Path(cfg.data.source).expanduser())
        if resumed_from is None and isinstance(source, shards.ShardImages):  # the shards' index, for --resume
            shards.write_index(run_dir.shard_index, source)
        run_log.open(run_dir.train_log)

    distributed.on_main(world, begin, device=rt.device)
    log.info("%s", runlog.config_line(run_dir.config, config_dict, defaults=to_plain(type(cfg)())))

    sampler = EpochSampler(len(images), global_batch_size=batch, seed=cfg.train.seed, rank=world.rank, world_size=world.world_size)
    loader = pipeline.loader(pixels, sampler, local_batch_size=batch // world.world_size, workers=cfg.data.workers,
                             pin_memory=rt.device.type == "cuda")
    bad = badfiles.BadFiles(on_bad_image=cfg.data.on_bad_image, max_bad_fraction=cfg.data.max_bad_fraction,
                            max_image_pixels=cfg.data.max_image_pixels, report=run_dir.bad_files(world.rank))
    for folder, reason in getattr(images, "skipped_folders", ()):
        bad.add_folder(folder, reason)
    distributed.on_main(world, lambda: pipeline.require_decodable(pixels, bad), device=rt.device)
    log.info("%s", plan(cfg, method=method.name, images=len(images), schedule=schedule, rt=rt, world=world))
    hint = None if resume_run else defaults.cpu_hint(cfg, device=rt.device)
    if hint:
        log.info("%s", hint)
    info = checkpoint.EncoderInfo(model=cfg.model, image_size=cfg.augment.image_size, mean=cfg.augment.mean,
                                  std=cfg.augment.std, interpolation=cfg.augment.interpolation, config=config_dict,
                                  epoch=0, step=0)
    metrics = None
    if world.is_main:
        metrics = MetricsLog(run_dir.metrics, events_dir=run_dir.root / "tensorboard" if cfg.train.tensorboard else None)
        progress = runlog.StepLines(progress, images_per_step=batch)
    trainer = Trainer(
        cfg.train, method=method, net=_wrap(method.modules, world=world, rt=rt, compile=cfg.train.compile),
        views=BatchViews(cfg.augment, seed=cfg.train.seed, crops=method.crops()), optimizer=optimizer, scaler=scaler, schedule=schedule,
        rt=rt, world=world, run_dir=run_dir, info=info, metrics=metrics, monitor=monitor, bad=bad,
        num_images=len(images), progress=progress, elapsed_before=elapsed_before,
    )
    progress.start(total_steps=schedule.total_steps, completed=step, description="pretrain")
    try:
        with stop_requests() as requested:
            step = trainer.train(loader, sampler, start_step=step, stop=requested)
    except Stopped:  # every rank stopped after the same step, its list complete
        _report_bad_files(world, run_dir)
        raise
    finally:
        progress.stop()
        if metrics is not None:
            metrics.close()
    distributed.barrier()  # every rank's list of bad files is complete
    _report_bad_files(world, run_dir)
    return PretrainResult(
        run_dir=run_dir.root, encoder=run_dir.encoder, steps=step, epochs_done=step / schedule.steps_per_epoch,
        first_loss=trainer.first_loss, last_loss=trainer.last_loss, seconds=trainer.elapsed(), resumed_from=resumed_from,
        named_data=cfg.data.source is None or cfg.data.source in NAMED_DATASETS,
    )


def _report_bad_files(world: distributed.World, run_dir: rundir.RunDir) -> None:
    """On rank 0: every rank's bad files into the run's one bad_files.jsonl, and a warning that counts them."""
    if not world.is_main:
        return
    report = run_dir.bad_files()
    files, folders = badfiles.merge(report, run_dir.other_ranks_bad_files())
    if files or folders:
        log.warning("%s", badfiles.summary(files=files, folders=folders, report=report))


def plan(cfg, *, method: str, images: int, schedule: Schedule, rt: Runtime, world: distributed.World) -> str:
    """The run about to start, in one line: model, size, steps, batch, device, precision and checkpoint cadence."""
    train, per_epoch, total = cfg.train, schedule.steps_per_epoch, schedule.total_steps
    steps = f"{train.epochs} epochs of {per_epoch} step{'s' if per_epoch > 1 else ''} = {total} steps"
    if total < train.epochs * per_epoch:
        steps = f"{total} steps (--max-steps; {per_epoch} per epoch, {train.epochs} epochs planned)"
    if train.checkpoint_every:
        saves = f"checkpoints every {train.checkpoint_every} steps and at the end"
    else:
        saves = f"checkpoints every {train.checkpoint_minutes:g} min and at the end" if train.checkpoint_minutes else "a checkpoint at the end"
    processes = f" x {world.world_size} processes of {train.batch_size // world.world_size} images" if world.world_size > 1 else ""
    return (
        f"pretraining {method}: {cfg.model.arch} (width {cfg.model.width:g}, {cfg.model.stem} stem, "
        f"{parameter_count(cfg.model) / 1e6:.1f}M parameters) at {cfg.augment.image_size} px on {images} images; "
        f"{steps} of batch {train.batch_size}{processes}, peak lr {schedule.peak_lr:.4g}; {rt.precision} on {rt.device}"
        f"{', compiled' if train.compile else ''}, {cfg.data.workers} data workers; {saves}"
    )


def _pixels(cfg, images, *, rt: Runtime, world: distributed.World, run: Path, data: dict[str, Any]):
    """The uint8 pixels of `images`, decoded once into this machine's cache when it fits (named from the `run` folder
    and the `data` fingerprint); and `cfg` with the DataLoader workers resolved, now that it is known whether batches
    decode (the cache fills with the workers a decode needs)."""
    pixels = pipeline.PixelDataset(images, max_side=cfg.data.decode_side, on_bad_image=cfg.data.on_bad_image)
    key = json.dumps({"run": str(run), "data": data, "decode_side": cfg.data.decode_side,
                      "max_pixels": cfg.data.max_image_pixels}, sort_keys=True)
    pixels.cache = pipeline.build_cache(
        pixels, budget=pipeline.cache_budget(cfg.data.cache_gb), workers=defaults.resolve_workers(cfg.data.workers, rt.device),
        sharing=pipeline.Sharing(key=key, node=distributed.node(world), device=rt.device),
        decode_device=decoders.resolve(cfg.data.decode_device, train_device=rt.device))
    workers = defaults.resolve_workers(cfg.data.workers, rt.device, decoding=pixels.decoding)
    return pixels, replace(cfg, data=replace(cfg.data, workers=workers))


def _method(cfg, *, world: distributed.World, rt: Runtime, init: bool) -> Method:
    """The method `cfg` names, its modules built from the seed (the same weights on every rank), initialised from
    `train.init` when `init` (a resumed run's weights come from its checkpoint), and placed on the device."""
    torch.manual_seed(cfg.train.seed)
    method = methods.build(cfg, processes=world.world_size)
    if cfg.train.init and init:
        report = weights.init_encoder(method.network, Path(cfg.train.init).expanduser())
        log.info("initialised from %s (%s): %d tensors%s", report.source, report.layout, report.loaded,
                 ", projection head included" if report.head_loaded else "")
        if report.note:
            log.warning("%s", report.note)
        method.after_init()
    method.modules = method.modules.to(rt.device)
    if world.world_size > 1 and cfg.train.sync_bn:
        method.modules = distributed.sync_batchnorm(method.modules, device_type=rt.device.type)
    if rt.channels_last:
        method.modules = method.modules.to(memory_format=torch.channels_last)
    return method


def _wrap(modules: torch.nn.Module, *, world: distributed.World, rt: Runtime, compile: bool):
    """What the step runs through: DDP over several processes, compiled on request; `modules` stays the plain
    module that is saved and monitored."""
    net = modules
    if world.world_size > 1:
        device_ids = [rt.device.index if rt.device.index is not None else torch.cuda.current_device()] if rt.device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=device_ids)
    if compile:
        net = torch.compile(net)  # compiles at the first step
    return net


def forward_backward(method: Method, net, views: list[torch.Tensor], *, rt: Runtime, optimizer, scaler) -> torch.Tensor:
    """The method's loss on ready views and its gradients; the update is the caller's."""
    net.train()
    loss = method.loss(net, views, rt=rt)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    return loss.detach()


class Trainer:
    """The step loop and its bookkeeping (logging, the non-finite guard, monitor, checkpoints, stop requests)."""

    def __init__(self, cfg: TrainConfig, *, method: Method, net, views: BatchViews, optimizer, scaler, schedule: Schedule,
                 rt: Runtime, world: distributed.World, run_dir: rundir.RunDir, info: checkpoint.EncoderInfo,
                 metrics: MetricsLog | None, monitor: Monitor | None, bad: badfiles.BadFiles, num_images: int,
                 progress: Progress, elapsed_before: float = 0.0):
        self.cfg, self.method, self.net, self.views = cfg, method, net, views
        self.optimizer, self.scaler, self.schedule = optimizer, scaler, schedule
        self.rt, self.world, self.run_dir, self.info = rt, world, run_dir, info
        self.metrics, self.monitor, self.progress = metrics, monitor, progress
        self.bad, self.num_images, self.drawn = bad, num_images, 0
        self.guard = NonFiniteGuard(cfg.on_nonfinite, max_skips=cfg.max_skips, device=rt.device)
        self.started, self.elapsed_before = time.perf_counter(), elapsed_before
        self.saved_step: int | None = None  # the newest checkpoint this session wrote, and when
        self.saved_at = self.started
        self.pace = Pace(start_step=0, total_steps=schedule.total_steps)  # `train` starts it at its first step
        self.estimated = False  # whether the time the run needs has been reported
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.published = False  # runs/latest points here

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def train(self, loader: DataLoader, sampler: EpochSampler, *, start_step: int, stop: StopRequest) -> int:
        step, per_epoch, total = start_step, self.schedule.steps_per_epoch, self.schedule.total_steps
        window = Throughput(images_per_step=self.cfg.batch_size)
        self.pace = Pace(start_step=step, total_steps=total)
        while step < total:
            epoch = step // per_epoch  # 0-based, what the data order and the views are drawn from
            sampler.set_epoch(epoch, start_batch=step - epoch * per_epoch)
            batches = iter(loader)
            while True:
                waited = time.perf_counter()
                try:
                    batch = next(batches, None)  # the time spent here is the time the model waits for data
                except RuntimeError:  # a worker ended by the same SIGTERM that asked us to stop
                    if stop.signal is None:
                        raise
                    self.stop_here(stop, step=step)
                window.waited(time.perf_counter() - waited)
                if batch is None:
                    break
                self.report_skipped(batch.skipped)
                lr = self.schedule.lr(step)
                loss = self.step(batch, lr=lr, step=step, epoch=epoch)
                step += 1
                window.stepped()
                last = step == total
                logged = step % self.cfg.log_every == 0 or last or step % per_epoch == 0
                if logged:
                    images_per_s, data_wait = window.take()
                    self.log(step=step, loss=loss, lr=lr, images_per_s=images_per_s, data_wait=data_wait)
                elif self.pace.early(step):
                    self.show_pace(step=step, loss=loss, lr=lr)
                # the kNN check first, so the plots drawn when saving include it
                if self.monitor and self.world.is_main and self.monitor.due(step, steps_per_epoch=per_epoch, last=last):
                    record = self.monitor.check(self.method.network, self.encoder_info(step=step), rt=self.rt)
                    self.write_metrics({"step": step, "epoch": self.epoch_number(step), **record, "time": round(self.elapsed(), 3)})
                if last or self.checkpoint_due(step, logged=logged):
                    self.save(step=step)
                if last:
                    break
                if stop.agreed(self.world, step=step, every=self.cfg.log_every, device=self.rt.device):
                    self.stop_here(stop, step=step)
        return step

    def epoch_number(self, step: int) -> int:
        """The epoch `step` (1-based, done) belongs to, counted from 1: at an epoch's last step, the epochs completed.
        What every record, file and message calls "epoch"."""
        return -(-step // self.schedule.steps_per_epoch)

    def step(self, batch: pipeline.PixelBatch, *, lr: float, step: int, epoch: int) -> torch.Tensor:
        """One optimisation step on a batch of N images; returns the loss without syncing the host."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        memory_format = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        pixels = batch.pixels.to(self.rt.device, non_blocking=True)  # (N, 3, H, W) uint8: a quarter of float32's bytes
        # one (count * N, 3, S, S) tensor per crop group of the method; SimCLR's one: views 1, then views 2
        views = [x.contiguous(memory_format=memory_format) for x in self.views(pixels, batch.sizes, batch.indices, epoch=epoch)]
        self.method.begin_step(StepImages(indices=batch.indices, epoch=epoch, step=step))
        before = self.guard.snapshot(self.method.modules)  # skip mode: the forward pass writes BN statistics
        loss = forward_backward(self.method, self.net, views, rt=self.rt, optimizer=self.optimizer, scaler=self.scaler)
        if not self.guard.update_ok(loss, self.method.modules.parameters(), step=step,
                                    buffers=self.method.modules.buffers()):
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.restore(self.method.modules, before)
            return loss
        self.method.before_update(step=step + 1, epoch=epoch)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(step=step + 1)
        self.guard.record(loss, step=step)
        return loss

    def report_skipped(self, skipped: list[pipeline.Skipped]) -> None:
        """Name the images a batch replaced, and stop if most of what was drawn so far is unreadable."""
        self.drawn += self.cfg.batch_size // self.world.world_size + len(skipped)
        for item in skipped:
            self.bad.add(item.path, item.reason)
        if skipped:
            self.bad.check(seen=min(self.drawn, self.num_images), total=self.num_images)

    def stop_here(self, stop: StopRequest, *, step: int) -> None:
        """Save at this step boundary, then stop with the signal's exit code (128 + its number)."""
        if self.saved_step != step:
            self.save(step=step)
        name = signal.Signals(stop.signal).name
        epoch = self.epoch_number(step)
        self.write_metrics({"step": step, "epoch": epoch, "event": f"stopped by {name}", "time": round(self.elapsed(), 3)})
        raise Stopped(
            f"stopped by {name} at step {step}/{self.schedule.total_steps} (epoch {epoch}/{self.epochs}); "
            f"saved {self.run_dir.checkpoint(step)}. "
            f"Continue with: simclr pretrain --resume --out {self.run_dir.root}",
            signal_number=stop.signal,
        )

    @property
    def epochs(self) -> int:
        """The epochs the schedule spans (the last one partly, when --max-steps cuts it)."""
        return self.epoch_number(self.schedule.total_steps)

    def encoder_info(self, *, step: int) -> checkpoint.EncoderInfo:
        """What the encoder file says about the network being trained: architecture, eval transform, config."""
        return replace(self.info, step=step, epoch=self.epoch_number(step))

    def log(self, *, step: int, loss: torch.Tensor, lr: float, images_per_s: float, data_wait: float) -> None:
        self.guard.check()
        value: float | None = float(distributed.all_reduce_mean(loss).item())  # the global batch's loss
        if not math.isfinite(value):
            value = None  # a dropped update (on_nonfinite=skip); JSON has no NaN
        elif self.first_loss is None:
            self.first_loss = value
        if value is not None:
            self.last_loss = value
        epoch = self.epoch_number(step)
        self.write_metrics({"step": step, "epoch": epoch, "loss": value, "lr": lr, "time": round(self.elapsed(), 3),
                            "images_per_s": round(images_per_s, 2), "data_wait": round(data_wait, 4),
                            "rss_mb": round(memory.resident_mb(), 1)})
        self.pace.stepped(step)
        self.progress.update(StepStats(step=step, epoch=epoch, total_steps=self.schedule.total_steps, loss=value, lr=lr,
                                       images_per_s=images_per_s, data_wait=data_wait, seconds_left=self.pace.seconds_left(step)))
        self.report_estimate(step)

    def show_pace(self, *, step: int, loss: torch.Tensor, lr: float) -> None:
        """One of a session's first steps, not logged: wait for it to finish (on a GPU it may still be running) and
        show the time left, so an estimate appears after the first steps rather than the first logged one."""
        loss.item()  # the host waits for the device: the step's time is its work, not its launch
        self.pace.stepped(step)
        seconds = self.pace.seconds_per_step(step) or 0.0
        self.progress.update(StepStats(step=step, epoch=self.epoch_number(step), total_steps=self.schedule.total_steps,
                                       loss=None, lr=lr, images_per_s=self.cfg.batch_size / max(seconds, 1e-9),
                                       seconds_left=self.pace.seconds_left(step)))
        self.report_estimate(step)

    def report_estimate(self, step: int) -> None:
        """Once, when the session's first steps are timed: how long the rest of the run should take."""
        if self.estimated or (step - self.pace.start_step < Pace.FIRST_STEPS and step < self.schedule.total_steps):
            return
        self.estimated = True
        left = self.schedule.total_steps - step
        if left:
            per_step = self.pace.seconds_per_step(step)
            log.info("timed the first steps: %.3g s a step, about %s for the %d steps left", per_step, clock(per_step * left), left)

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def checkpoint_due(self, step: int, *, logged: bool) -> bool:
        """Every train.checkpoint_every steps; without it, at the first logged step train.checkpoint_minutes after the
        last save (processes agree: a save is collective, and their clocks differ)."""
        if self.cfg.checkpoint_every:
            return step % self.cfg.checkpoint_every == 0
        if not (self.cfg.checkpoint_minutes and logged):
            return False
        due = time.perf_counter() - self.saved_at >= 60 * self.cfg.checkpoint_minutes
        return bool(distributed.all_reduce_max(torch.tensor(int(due), device=self.rt.device)).item())

    def save(self, *, step: int) -> None:
        """Training state for --resume, then the encoder file the other commands read; never non-finite."""
        self.guard.check()
        self.guard.check_saveable(dict(self.method.modules.state_dict()), step=step)
        self.saved_step, self.saved_at = step, time.perf_counter()
        if not self.world.is_main:
            return  # every rank holds the same weights; one writes them
        path = self.run_dir.checkpoint(step)
        checkpoint.save_train_state(
            path, model=self.method.modules, optimizer=self.optimizer, scaler=self.scaler, step=step, epoch=self.epoch_number(step),
            config=self.info.config, elapsed=self.elapsed(), extra=self.method.extra_state(),
        )
        for old in self.run_dir.saved_checkpoints()[self.cfg.keep_checkpoints:]:
            old.unlink(missing_ok=True)
        checkpoint.save_encoder(self.run_dir.encoder, self.method.network, info=self.encoder_info(step=step))
        if not self.published:
            rundir.publish(self.run_dir)  # runs/latest: now there is an encoder to offer
            self.published = True
        log.debug("saved %s and %s", path, self.run_dir.encoder)
        if plots.available():  # an optional extra: without matplotlib the run simply has no pictures
            plots.plot_run(self.run_dir.root)


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
