"""`simclr benchmark`: how fast pretraining runs, against its own limits and against the common PIL pipeline.

Four measurements of one pretraining config, each after `warmup` untimed steps:
- model: the SimCLR step alone on ready tensors (the compute limit of this hardware and precision);
- pretrain: the real `simclr pretrain` loop (decoding, cache, batched views, step) and its data-wait fraction;
- data: the input pipeline alone, views per second on one CPU core (one thread, no workers);
- baseline: the common peer setup on the same images — torchvision's PIL transforms one image at a time in
  DataLoader workers, fp32, contiguous tensors — as a full step and as a data pipeline on one core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from simclr_cli.engine import defaults, distributed, memory, methods, pipeline, trainer

from simclr_cli.engine.configs import PretrainConfig
from simclr_cli.engine.monitor import MonitorConfig
from simclr_cli.engine.report import NoProgress
from simclr_cli.engine.augment import TwoViews
from simclr_cli.engine.sampler import EpochSampler
from simclr_cli.engine.device import Runtime, available_cpus, runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.methods.base import StepImages
from simclr_cli.engine.optim import build_optimizer, scaled_lr
from simclr_cli.engine.views import BatchViews, Crops

log = logging.getLogger("simclr")


@dataclass(frozen=True)
class BenchmarkResult:
    arch: str
    width: float
    stem: str
    image_size: int
    batch_size: int
    device: str
    precision: str
    compile: bool
    steps: int
    warmup: int
    repeats: int  # each figure is the median over this many interleaved rounds
    images: int  # in the dataset
    model_images_per_s: float  # source images (2 views each) per second, model step on ready tensors
    pretrain_images_per_s: float  # the real pretrain loop, steady state
    pretrain_vs_model: float  # pretrain / model: how close the full loop gets to the compute limit
    data_views_per_s_per_core: float  # the input pipeline alone, one thread, no workers
    data_wait_fraction: float  # of the pretrain loop's time spent waiting for the next batch
    peak_rss_mb: float  # the benchmark process (model, data, cache) and its workers, the baseline's included
    rss_growth_mb: float  # resident memory at the end of the timed pretrain steps minus at their start
    baseline_pretrain_images_per_s: float | None
    baseline_data_views_per_s_per_core: float | None
    baseline_workers: int | None
    speedup_vs_baseline: float | None  # pretrain / baseline pretrain
    data_speedup_per_core: float | None  # data / baseline data
    machine: str
    torch_version: str
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def run(cfg: PretrainConfig, *, steps: int, warmup: int, repeats: int = 1, baseline: bool = True,
        report: Callable[[str], None] = log.info) -> BenchmarkResult:
    """Measure `cfg` over `steps` timed steps after `warmup` untimed ones, `repeats` times in turn; medians.

    The rounds interleave the measurements (model, data, pretrain, baseline, model, ...), so a neighbour's
    load on a shared machine falls on all of them rather than on one.
    """
    if steps < 1 or warmup < 1 or repeats < 1:
        raise ConfigError(f"--steps {steps}, --warmup {warmup} and --repeats {repeats} must all be >= 1")
    cfg = defaults.resolve_sizes(cfg)
    rt = runtime(device=cfg.train.device, precision=cfg.train.precision)
    images = trainer.source_images(cfg)
    cfg = defaults.resolve_pretrain(cfg, device=rt.device, world_size=1, num_images=len(images))
    batch = cfg.train.batch_size

    rounds: dict[str, list[float]] = {}
    base_workers = available_cpus() if baseline else None
    peak = 0.0
    for round_ in range(1, repeats + 1):
        of = f" (round {round_}/{repeats})" if repeats > 1 else ""
        report(f"model step on ready tensors: {warmup} + {steps} steps of {batch} images{of}")
        rounds.setdefault("model", []).append(model_images_per_s(cfg, rt=rt, steps=steps, warmup=warmup))
        report(f"input pipeline on one core: {warmup} + {steps} batches{of}")
        rounds.setdefault("data", []).append(data_views_per_s(cfg, images, rt=rt, steps=steps, warmup=warmup))
        report(f"simclr pretrain: {warmup} + {steps} steps{of}")
        rate, wait, growth = pretrain_images_per_s(cfg, steps=steps, warmup=warmup)
        for key, value in (("pretrain", rate), ("wait", wait), ("growth", growth)):
            rounds.setdefault(key, []).append(value)
        peak = max(peak, memory.peak_resident_mb(), memory.peak_resident_mb(children=True))
        if baseline:
            report(f"baseline (torchvision PIL transforms in {base_workers} DataLoader workers, fp32): {warmup} + {steps} steps{of}")
            rounds.setdefault("base", []).append(baseline_images_per_s(cfg, images, steps=steps, warmup=warmup, workers=base_workers))
            report(f"baseline input pipeline on one core{of}")
            rounds.setdefault("base_data", []).append(baseline_views_per_s(cfg, images, steps=steps, warmup=warmup))
    model_rate, data_rate, pretrain_rate = (statistics.median(rounds[k]) for k in ("model", "data", "pretrain"))
    wait, growth = statistics.median(rounds["wait"]), statistics.median(rounds["growth"])
    base_rate = statistics.median(rounds["base"]) if baseline else None
    base_data = statistics.median(rounds["base_data"]) if baseline else None
    return BenchmarkResult(
        arch=cfg.model.arch, width=cfg.model.width, stem=cfg.model.stem, image_size=cfg.augment.image_size,
        batch_size=batch, device=str(rt.device), precision=rt.precision, compile=cfg.train.compile, steps=steps,
        warmup=warmup, repeats=repeats, images=len(images),
        model_images_per_s=round(model_rate, 2), pretrain_images_per_s=round(pretrain_rate, 2),
        pretrain_vs_model=round(pretrain_rate / model_rate, 3),
        data_views_per_s_per_core=round(data_rate, 1), data_wait_fraction=round(wait, 4),
        peak_rss_mb=round(peak, 1), rss_growth_mb=round(growth, 1),
        baseline_pretrain_images_per_s=None if base_rate is None else round(base_rate, 2),
        baseline_data_views_per_s_per_core=None if base_data is None else round(base_data, 1),
        baseline_workers=base_workers,
        speedup_vs_baseline=None if base_rate is None else round(pretrain_rate / base_rate, 2),
        data_speedup_per_core=None if base_data is None else round(data_rate / base_data, 2),
        machine=_machine(), torch_version=torch.__version__, threads=torch.get_num_threads(),
    )


def model_images_per_s(cfg: PretrainConfig, *, rt: Runtime, steps: int, warmup: int) -> float:
    """The method's step (forward, loss, backward, update) on fixed random views: no data, no augmentation."""
    batch = cfg.train.batch_size
    update = _Update(cfg, rt, channels_last=rt.channels_last)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    views = [torch.randn(crops.count * batch, 3, crops.size, crops.size, device=rt.device).contiguous(memory_format=memory_format)
             for crops in update.method.crops()]  # (count * N, 3, S, S) per crop group; SimCLR's (2N, 3, S, S)
    return batch * steps / _timed(lambda: update(views), steps=steps, warmup=warmup, device=rt.device)


def data_views_per_s(cfg: PretrainConfig, images: Dataset, *, rt: Runtime, steps: int, warmup: int) -> float:
    """Views delivered by the pretrain input pipeline (cached pixels or decoding, then batched views) on one thread."""
    batch = cfg.train.batch_size
    dataset = pipeline.PixelDataset(images, max_side=cfg.data.decode_side, on_bad_image="skip")
    dataset.cache = pipeline.build_cache(dataset, budget=pipeline.cache_budget(cfg.data.cache_gb), workers=0)
    crops = method_crops(cfg)
    views = BatchViews(cfg.augment, seed=cfg.train.seed, crops=crops)
    batches = _endless(dataset, batch, seed=cfg.train.seed, loader=lambda sampler: pipeline.loader(
        dataset, sampler, local_batch_size=batch, workers=0, pin_memory=False))

    def step() -> None:
        epoch, pixels = next(batches)
        views(pixels.pixels.to(rt.device), pixels.sizes, pixels.indices, epoch=epoch)

    with _one_thread():
        seconds = _timed(step, steps=steps, warmup=warmup, device=rt.device)
    return sum(group.count for group in crops) * batch * steps / seconds


def method_crops(cfg: PretrainConfig) -> tuple[Crops, ...]:
    """The crop groups `cfg`'s method asks for, from its modules built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return methods.build(cfg, processes=1).crops()


def pretrain_images_per_s(cfg: PretrainConfig, *, steps: int, warmup: int) -> tuple[float, float, float]:
    """The real pretrain loop for warmup + steps steps in a scratch folder: (images/s, data-wait fraction, RSS growth MB)."""
    total = warmup + steps
    train = replace(cfg.train, max_steps=total, log_every=1, checkpoint_every=total + 1, tensorboard=False)
    cfg = replace(cfg, train=replace(train, epochs=max(cfg.train.epochs, total)), monitor=MonitorConfig())
    with tempfile.TemporaryDirectory(prefix="simclr-benchmark-") as scratch, contextlib.ExitStack() as held, \
            distributed.context(device=cfg.train.device) as world:
        out = Path(scratch) / "run"
        rt = runtime(device=cfg.train.device, precision=cfg.train.precision)
        trainer.fit(cfg, world=world, rt=rt, out=out, resume_run=False, overwrite=False, held=held, progress=NoProgress())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    start, end = by_step[warmup], by_step[total]
    timed = [by_step[s] for s in range(warmup + 1, total + 1)]
    seconds = end["time"] - start["time"]
    window = [cfg.train.batch_size / r["images_per_s"] for r in timed]  # each step's own seconds
    wait = sum(r["data_wait"] * w for r, w in zip(timed, window)) / sum(window)
    return cfg.train.batch_size * steps / seconds, wait, end["rss_mb"] - start["rss_mb"]


def baseline_images_per_s(cfg: PretrainConfig, images: Dataset, *, steps: int, warmup: int, workers: int) -> float:
    """The common peer setup: PIL views made one image at a time in DataLoader workers, fp32, contiguous tensors."""
    rt = Runtime(device=runtime(device=cfg.train.device, precision="fp32").device, precision="fp32")
    batch = cfg.train.batch_size
    update = _Update(replace(cfg, train=replace(cfg.train, compile=False)), rt, channels_last=False)  # peers' defaults
    batches = _endless(images, batch, seed=cfg.train.seed, loader=lambda sampler: DataLoader(
        _PilViews(images, TwoViews(cfg.augment)), batch_size=batch, sampler=sampler, num_workers=workers,
        pin_memory=rt.device.type == "cuda", drop_last=True, persistent_workers=workers > 0))

    def step() -> None:
        _, (view1, view2) = next(batches)
        update([torch.cat([view1, view2]).to(rt.device, non_blocking=True)])  # (2N, 3, S, S)

    return batch * steps / _timed(step, steps=steps, warmup=warmup, device=rt.device)


def baseline_views_per_s(cfg: PretrainConfig, images: Dataset, *, steps: int, warmup: int) -> float:
    """The PIL pipeline alone on one thread: decode and two PIL views per image, every epoch."""
    batch = cfg.train.batch_size
    batches = _endless(images, batch, seed=cfg.train.seed, loader=lambda sampler: DataLoader(
        _PilViews(images, TwoViews(cfg.augment)), batch_size=batch, sampler=sampler, num_workers=0, drop_last=True))
    with _one_thread():
        seconds = _timed(lambda: next(batches), steps=steps, warmup=warmup, device=torch.device("cpu"))
    return 2 * batch * steps / seconds


class _Update:
    """One update of `cfg`'s method on given views, as pretrain makes it: forward, loss, backward, step."""

    def __init__(self, cfg: PretrainConfig, rt: Runtime, *, channels_last: bool) -> None:
        torch.manual_seed(cfg.train.seed)
        self.method = methods.build(cfg, processes=1)
        model = self.method.modules.to(rt.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.method.modules = model
        lr = scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)
        self.optimizer, self.scaler = build_optimizer(model, cfg.optim, lr=lr), rt.grad_scaler()
        self.net = torch.compile(model) if cfg.train.compile else model
        self.rt = rt
        self.images = torch.arange(cfg.train.batch_size)  # the dataset indices the views stand for (PIRL's bank rows)
        self.steps = 0

    def __call__(self, views: list[torch.Tensor]) -> None:
        self.method.begin_step(StepImages(indices=self.images, epoch=0, step=self.steps))
        self.steps += 1
        trainer.forward_backward(self.method, self.net, views, rt=self.rt, optimizer=self.optimizer, scaler=self.scaler)
        self.scaler.step(self.optimizer)
        self.scaler.update()


class _PilViews(Dataset):
    """Item i: the two PIL-pipeline views of image i (decoded here, as peers do, every time it is drawn)."""

    def __init__(self, images: Dataset, transform: TwoViews) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index])


def _endless(dataset: Dataset, batch: int, *, seed: int, loader: Callable) -> Iterator:
    """(epoch, batch) pairs from the pretraining sampler, epoch after epoch."""
    sampler = EpochSampler(len(dataset), global_batch_size=batch, seed=seed)
    batches = loader(sampler)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for item in batches:
            yield epoch, item
        epoch += 1


def _timed(step: Callable[[], object], *, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {available_cpus()} cores"
