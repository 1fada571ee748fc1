"""Every "auto" value of a config becomes a number here, once, before a run starts; the resolved config is what
config.yaml, the checkpoints and results.json record.

Three moments: `for_data` gives the defaults that follow the data's name (merged under the preset, so a preset
or a flag still wins); `resolve_pretrain` fills what follows the image size, the machine and the dataset's length
when a pretraining run opens, and `resolve_runtime` the device and precision it runs with; `resolve_workers` fills
the DataLoader workers once it is known whether the images are decoded every epoch. The temperature and the base learning rate follow the image size
(the CIFAR recipe at <= 64 px, the ImageNet one above), like colour strength, blur and the stem.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from simclr_cli.engine import pipeline
from simclr_cli.engine.augment import SMALL_IMAGE_MAX_SIZE
from simclr_cli.engine.device import Runtime, available_cpus
from simclr_cli.engine.errors import ConfigError, DataError

# Image sizes implied by the data when neither a preset nor --image-size gives one (SimCLR appendix B.9).
NATIVE_IMAGE_SIZES = {"digits": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}
DEFAULT_IMAGE_SIZE = 224
SMALL_IMAGE_TEMPERATURE, IMAGENET_TEMPERATURE = 0.5, 0.1


def for_data(data: str | None) -> dict[str, Any]:
    """Config values (nested, as in a preset) that follow the data's name; the digits when no data is given."""
    return {"augment": {"image_size": NATIVE_IMAGE_SIZES.get(data or "digits", DEFAULT_IMAGE_SIZE)}}


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


def resolve_workers(workers: int | None, device: torch.device, *, decoding: bool = True) -> int:
    """The workers asked for, or the machine's default (evaluation always decodes, with PIL)."""
    return workers if workers is not None else default_workers(device, decoding=decoding)


def default_temperature(image_size: int) -> float:
    """NT-Xent's tau for the recipe the image size implies: CIFAR's 0.5 at <= 64 px (app. B.9), ImageNet's 0.1
    above (Table 5). At small images and short runs 0.5 also trained better here (BENCHMARKS.md, "Quality")."""
    return SMALL_IMAGE_TEMPERATURE if image_size <= SMALL_IMAGE_MAX_SIZE else IMAGENET_TEMPERATURE


def resolve_sizes(cfg):
    """`cfg` (a configs.PretrainConfig) validated, with what follows the image size filled in: colour and blur
    strength, stem, decode side, temperature and base lr. Needs no machine and no data, so a bad config is reported
    before any process starts."""
    cfg.validate()
    augment = cfg.augment.resolved()
    size = augment.image_size
    data, train = cfg.data, cfg.train
    if data.decode_side is None:
        data = replace(data, decode_side=pipeline.decode_side(size))
    if train.temperature is None and cfg.reads_nt_xent_temperature():  # MoCo has its own (moco.T)
        train = replace(train, temperature=default_temperature(size))
    swav = cfg.swav  # its crops, temperature and epsilon follow the size; its large crops' scale, augment.crop_scale
    if train.method == "swav":
        swav = swav.with_sizes(image_size=size, crop_scale=augment.crop_scale)
    pirl = cfg.pirl.with_sizes(image_size=size) if train.method == "pirl" else cfg.pirl  # its T follows the size
    return replace(cfg, data=data, augment=augment, train=train, optim=cfg.optim.resolved(image_size=size),
                   model=cfg.model.resolved(image_size=size), swav=swav, pirl=pirl)


def cpu_hint(cfg, *, device: torch.device) -> str | None:
    """A line for a run sized for a GPU that is about to train on a CPU: what a quick first run looks like instead.

    The defaults stay the paper's on every machine (ResNet-50, 224 px above the small datasets): a default that
    followed the hardware would make the same command train a different, weaker model on a laptop than on a
    server, and the encoders and recipes would no longer carry over. The hint says what to change instead.
    """
    small = cfg.augment.image_size <= SMALL_IMAGE_MAX_SIZE and cfg.model.arch in ("resnet18", "resnet34") and cfg.model.width <= 1
    if device.type != "cpu" or small:
        return None
    return (f"hint: {cfg.model.arch} at {cfg.augment.image_size} px is sized for a GPU; for a quick first run on this CPU add "
            "--arch resnet18 --width 0.5 --image-size 32 --epochs 20, or run `simclr pretrain` with no DATA for the 2-minute demo")


def resolve_pretrain(cfg, *, device: torch.device, world_size: int, num_images: int):
    """`resolve_sizes`, then the global batch for this machine and dataset; raises before anything is written
    when the batch cannot work. The workers follow once the cache is built (`resolve_workers`)."""
    cfg = resolve_sizes(cfg)
    batch = cfg.train.batch_size
    if batch is None:
        batch = min(default_batch_size(device) * world_size, num_images)
        batch -= batch % world_size
        if batch < 2:
            raise DataError(f"the data holds {num_images} image(s); SimCLR needs at least 2 per batch (each is the others' negative)")
        cfg = replace(cfg, train=replace(cfg.train, batch_size=batch))
    elif batch > num_images:
        raise DataError(f"--batch-size {batch} is larger than the dataset ({num_images} images); lower --batch-size")
    if batch % world_size:
        raise ConfigError(
            f"--batch-size {batch} (the global batch) does not split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    return cfg.with_method_settings(num_images=num_images)  # e.g. a MoCo queue's length follows data and batch


def resolve_runtime(cfg, rt: Runtime):
    """`cfg` (a configs.PretrainConfig) with the device type and precision `rt` runs with in place of "auto", so
    config.yaml and the checkpoints say what ran (a resume keeps them; --device may change them)."""
    return replace(cfg, train=replace(cfg.train, device=rt.device.type, precision=rt.precision))
