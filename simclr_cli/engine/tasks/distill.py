"""`simclr distill`: SimCLRv2's third step (Chen et al. 2020b, §2.3) — a student network is trained on unlabelled
images to match the class distribution of a fine-tuned teacher, with only the teacher's soft labels:

    L = - sum_x sum_y P_T(y|x; tau) log P_S(y|x; tau)            (eq. 2, `loss.distillation_loss`)

The teacher (a `finetuned.safetensors`: encoder, head layers and classifier) is fixed, in eval mode, with no
gradient; the student is an encoder of any of our architectures (default: the teacher's, i.e. self-distillation)
with a linear classifier on h, both trained from scratch unless `init` gives the encoder's starting weights. Both see
the same view of each image: the teacher's fine-tuning augmentation (`supervised.training_crops`: a random crop, and
a flip only as often as its pretraining flipped), in its input transform, drawn from (seed, epoch, image) alone.
With `labels_weight` a > 0, eq. 3 adds the labels: (1 - a) x the loss above + a x the cross-entropy of a labelled
batch (the teacher's fine-tuning labels by default) drawn with every unlabelled one and sent through the student in
the same forward pass. Optimiser and schedule as v2 §3: those of pretraining (LARS 0.1 x sqrt(B), weight decay 1e-4,
5% warm-up, cosine). Under a process group (`--gpus N`) each rank takes its contiguous share of every global batch,
BN statistics cover the global batch and DDP averages the gradients, so N processes train what one does.

The run folder holds config.yaml, metrics.jsonl (one line per epoch), checkpoints/ (a training state per epoch,
for --resume), `student.safetensors` (an encoder file with the classifier as extra tensors, `extra.task` "distill",
naming its teacher: `linear-eval`, `knn`, `embed`, `info`, `export` and `distill` itself accept it) and results.json
(the student's top-1/top-5 and the teacher's on the same split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.functional import to_pil_image

from simclr_cli.engine import checkpoint, defaults, distributed, features, metrics, resume, rundir, seeds, weights
from simclr_cli.engine.augment import eval_transform, train_eval_transform
from simclr_cli.engine.badfiles import BadFiles
from simclr_cli.engine.configs import LR_SCALING, DistillConfig
from simclr_cli.engine.datasets import NAMED_DATASETS, labelled_splits, pretrain_dataset
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.errors import ConfigError, DataError, NonFiniteLoss
from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.labelsets import class_balanced_subset, image_paths, label_file_subset
from simclr_cli.engine.loss import semi_supervised_distillation_loss
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.optim import lr_at, scaled_lr
from simclr_cli.engine.pipeline import PixelDataset, decode_side
from simclr_cli.engine.plain import to_plain
from simclr_cli.engine.report import NoProgress, Progress, StepStats
from simclr_cli.engine.results import write_results
from simclr_cli.engine.sampler import EpochSampler
from simclr_cli.engine.supervised import (
    CLASSIFIER_BIAS,
    CLASSIFIER_WEIGHT,
    Backbone,
    Classifier,
    LinearClassifier,
    check_labels,
    classifier_optimizer,
    eval_loader,
    evaluate,
    load_classifier,
    training_crops,
)

log = logging.getLogger("simclr")

STUDENT_FILE = "student.safetensors"


@dataclass(frozen=True)
class DistillResult:
    top1: float | None  # the student's, on the val split after the last epoch (fractions); None without val data
    top5: float | None
    teacher_top1: float | None  # the teacher's own, on the same split
    teacher_top5: float | None
    teacher: Path
    student: Path
    val: str | None  # the labelled data evaluated on
    images: int  # unlabelled images trained on
    num_classes: int
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["teacher"], out["student"] = str(self.teacher), str(self.student)
        return out


class SeededViews(Dataset):
    """Item i of `images` (an (image, ...) tuple; the image PIL or (3, H, W) uint8) with the image through `transform`,
    whose random draws are a function of (seed, epoch, i) alone: one process or several, a whole run or a resumed
    one, see the same views. Set `epoch` before each pass."""

    def __init__(self, images: Dataset, transform, *, seed: int) -> None:
        self.images, self.transform, self.seed = images, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, *rest = self.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds.mix(self.seed, self.epoch, index))
            view = self.transform(image if isinstance(image, Image.Image) else to_pil_image(image))
        return (view, *rest)


def _collate_unlabelled(items):
    """(views (B, 3, S, S), the skipped files) from PixelDataset items (pixels, index, skipped)."""
    return torch.stack([item[0] for item in items]), [s for item in items for s in item[2]]


class _Labelled:
    """The labelled batch of every step: an EpochSampler's chunk of this rank, its epochs following one another
    through the run, so step s always draws the same images and views."""

    def __init__(self, views: SeededViews, *, global_batch: int, world: distributed.World, seed: int) -> None:
        self.views = views
        self.sampler = EpochSampler(len(views), global_batch_size=global_batch, seed=seed, rank=world.rank,
                                    world_size=world.world_size)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(views (b, 3, S, S), labels (b,)) of this rank at training step `step` (0-based)."""
        per_epoch = self.sampler.batches_per_epoch
        self.sampler.set_epoch(step // per_epoch, start_batch=step % per_epoch)
        self.views.epoch = step // per_epoch
        indices = list(itertools.islice(iter(self.sampler), self.sampler.local_batch_size))
        items = [self.views[i] for i in indices]
        return torch.stack([view for view, _ in items]), torch.tensor([int(y) for _, y in items])


class _Trained:
    """What `resume.load_newest` restores: the student (encoder and classifier as one module), no extra state."""

    def __init__(self, modules: nn.Module) -> None:
        self.modules = modules

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, tensors) -> None:
        pass


def run(cfg: DistillConfig, *, teacher: Path, out: Path | None = None, resume_run: bool = False, overwrite: bool = False,
        progress: Progress | None = None) -> DistillResult | None:
    """Distil the fine-tuned `teacher` into a student on `cfg.data`, in the run folder `out` (default
    runs/distill-<timestamp>); `resume_run` continues its newest checkpoint. Runs in the process group the environment
    describes (`--gpus N`); returns the result on rank 0, None on the others."""
    with distributed.context(device=cfg.device) as world:
        return _run(cfg, teacher=Path(teacher).expanduser(), world=world, out=out, resume_run=resume_run,
                    overwrite=overwrite, progress=progress or NoProgress())


def _run(cfg: DistillConfig, *, teacher: Path, world: distributed.World, out: Path | None, resume_run: bool,
         overwrite: bool, progress: Progress) -> DistillResult | None:
    started = time.perf_counter()
    cfg = cfg.resolved()
    teacher_net, info = load_classifier(teacher)  # CheckpointError naming `finetune` for a plain encoder
    num_classes = info.extra_tensors[CLASSIFIER_WEIGHT].shape[0]
    source = (info.config.get("data") or {}).get("source")
    data = cfg.data if cfg.data is not None else source
    images = pretrain_dataset(data, root=_path(cfg.data_root), download=cfg.download, max_pixels=cfg.max_image_pixels or None)
    val_name = cfg.val if cfg.val is not None else (data if data in NAMED_DATASETS else None)
    splits = None if val_name is None else labelled_splits(val_name, root=_path(cfg.data_root), download=cfg.download)
    transform = dict(image_size=info.image_size, mean=info.mean, std=info.std, interpolation=info.interpolation)
    view = train_eval_transform(**transform, **training_crops(info))  # the teacher's fine-tuning input (v2 §3)
    labelled_images, label_source = None, None
    if cfg.labels_weight > 0:  # before the val check, so that a label file of other classes is the one named
        labelled_images, label_source = _labelled_images(cfg, info=info, splits=splits, num_classes=num_classes)
    if splits is not None:
        classes = len(getattr(splits.val, "classes", [])) or num_classes
        if classes != num_classes:
            raise DataError(f"--val {val_name} has {classes} classes but the teacher's classifier has {num_classes}; "
                            "evaluate on the data the teacher was fine-tuned on")
    rt = runtime(device=cfg.device, precision=cfg.precision)
    cfg = replace(cfg, workers=defaults.resolve_workers(cfg.workers, rt.device))
    batch = min(cfg.batch_size, len(images))
    if batch < 2:
        raise DataError(f"the data holds {len(images)} image(s); distillation trains with BN and needs at least 2")
    if batch % world.world_size:
        raise ConfigError(f"--batch-size {batch} does not divide among {world.world_size} processes; "
                          f"use a multiple of {world.world_size}")
    labelled = None
    if labelled_images is not None:
        labelled_batch = min(batch, len(labelled_images)) // world.world_size * world.world_size
        if labelled_batch < world.world_size:
            raise DataError(f"{label_source} holds {len(labelled_images)} labelled image(s), fewer than the "
                            f"{world.world_size} processes; label more images or run fewer processes")
        labelled = _Labelled(SeededViews(labelled_images, view, seed=seeds.mix(cfg.seed, 1)), global_batch=labelled_batch,
                             world=world, seed=seeds.mix(cfg.seed, 2))

    student_cfg = ModelConfig(
        arch=cfg.student_arch or info.model.arch,
        width=info.model.width if cfg.student_width is None else cfg.student_width,
        sk_ratio=info.model.sk_ratio if cfg.student_sk_ratio is None else cfg.student_sk_ratio,
        stem=info.model.stem, head_layers=info.model.head_layers, proj_dim=info.model.proj_dim,
    )
    torch.manual_seed(cfg.seed)  # the same initial student on every rank
    model = build_model(student_cfg)
    init = None if cfg.init is None else Path(cfg.init).expanduser()
    if init is not None and not resume_run:
        report = weights.init_encoder(model, init)
        log.info("student initialised from %s (%s): %d tensors", report.source, report.layout, report.loaded)
    model.head.requires_grad_(False)  # the student classifies h: its projection head takes no part (nor DDP's reduction)
    student = Classifier(Backbone(model, depth=0), LinearClassifier(model.encoder.out_dim, num_classes), frozen=False)
    student.to(rt.device)
    if rt.channels_last:  # the layout of the inputs, so DDP's buckets match the gradients' strides
        student.to(memory_format=torch.channels_last)
    if world.world_size > 1:
        student = distributed.sync_batchnorm(student, device_type=rt.device.type)  # BN over the global batch
    teacher_net.to(rt.device).eval().requires_grad_(False)
    net = student
    if world.world_size > 1:
        device_ids = [rt.device.index if rt.device.index is not None else torch.cuda.current_device()] if rt.device.type == "cuda" else None
        net = DistributedDataParallel(student, device_ids=device_ids)

    peak_lr = scaled_lr(cfg.lr, batch, LR_SCALING[cfg.optimizer])  # from the GLOBAL batch
    optimizer = classifier_optimizer([p for p in student.parameters() if p.requires_grad], name=cfg.optimizer, lr=peak_lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)
    views = SeededViews(PixelDataset(images, max_side=decode_side(info.image_size), on_bad_image=cfg.on_bad_image), view,
                        seed=cfg.seed)
    sampler = EpochSampler(len(images), global_batch_size=batch, seed=cfg.seed, rank=world.rank, world_size=world.world_size)
    loader = DataLoader(views, batch_size=batch // world.world_size, sampler=sampler, collate_fn=_collate_unlabelled,
                        num_workers=cfg.workers, pin_memory=rt.device.type == "cuda")
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    val_loader = None if splits is None else eval_loader(splits.val, transform=eval_transform(**transform),
                                                         batch_size=cfg.batch_size, workers=cfg.workers, rt=rt)
    config = {"distill": to_plain(cfg), "teacher": str(teacher), "student": to_plain(student_cfg),
              "data": {"source": None if data is None else str(data)}}

    with contextlib.ExitStack() as held:
        run_dir = distributed.on_main(world, lambda: rundir.prepare(out or rundir.default_run_dir(prefix="distill-"),
                                                                    resume=resume_run, overwrite=overwrite, hold=held),
                                      device=rt.device)
        run_dir = run_dir or rundir.RunDir(out)  # other ranks: --gpus gives every worker the parent's --out
        bad = BadFiles(on_bad_image=cfg.on_bad_image, max_bad_fraction=cfg.max_bad_fraction,
                       max_image_pixels=cfg.max_image_pixels, report=run_dir.bad_files(world.rank))
        scaler = rt.grad_scaler()
        epoch0, history = 0, []
        if resume_run:  # every rank reads the same file
            meta = resume.load_newest(run_dir, config=config, method=_Trained(student), optimizer=optimizer,
                                      scaler=scaler, total_steps=total_steps)
            epoch0 = meta["epoch"]
            history = _history(run_dir.metrics, through=epoch0)

        def begin() -> None:
            if resume_run:
                metrics.truncate(run_dir.metrics, after_step=epoch0 * steps_per_epoch)
            else:  # like rundir.start, but runs/latest keeps pointing at the newest pretraining run
                text = yaml.safe_dump(config, sort_keys=False)
                atomic_write(run_dir.config, lambda tmp: tmp.write_text(text, encoding="utf-8"))

        distributed.on_main(world, begin, device=rt.device)
        for folder, reason in getattr(images, "skipped_folders", ()):
            bad.add_folder(folder, reason)
        teacher_top1 = teacher_top5 = None
        if val_loader is not None and world.is_main:
            teacher_top1, teacher_top5 = evaluate(teacher_net, val_loader, rt=rt)
            log.info("teacher %s: val top-1 %.4f", teacher, teacher_top1)
        log.info("distilling %s into %s width %g%s on %d images%s: batch %d%s, %d epochs of %d steps, %s, peak lr %.4g, "
                 "tau %g%s", teacher.name, student_cfg.arch, student_cfg.width,
                 f" SK {student_cfg.sk_ratio:g}" if student_cfg.sk_ratio else "", len(images),
                 f" (+ {len(labelled.views)} labelled from {label_source}, weight {cfg.labels_weight:g})" if labelled else "",
                 batch, f" x {world.world_size} processes" if world.world_size > 1 else "", cfg.epochs, steps_per_epoch,
                 cfg.optimizer, peak_lr, cfg.temperature, f", student from {init}" if init is not None else ", student from random init")
        progress.start(total_steps=total_steps, completed=epoch0 * steps_per_epoch, description="distill")
        try:
            for epoch in range(epoch0, cfg.epochs):
                sampler.set_epoch(epoch)
                views.epoch = epoch
                loss = _epoch(net, teacher_net, loader, optimizer=optimizer, scaler=scaler, rt=rt, bad=bad,
                              seen=epoch * steps_per_epoch * batch, images=len(images), temperature=cfg.temperature,
                              labelled=labelled, labels_weight=cfg.labels_weight,
                              lr=lambda step: lr_at(step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps),
                              first_step=epoch * steps_per_epoch, total_steps=total_steps, epoch=epoch,
                              progress=progress, log_every=cfg.log_every)
                step = (epoch + 1) * steps_per_epoch

                def record() -> None:
                    top1, top5 = evaluate(student, val_loader, rt=rt) if val_loader is not None else (None, None)
                    entry = {"step": step, "epoch": epoch + 1, "loss": loss, "top1": top1, "top5": top5}
                    history.append(entry)
                    metrics.append_line(run_dir.metrics, json.dumps(entry))
                    checkpoint.save_train_state(run_dir.checkpoint(step), model=student, optimizer=optimizer, scaler=scaler,
                                                step=step, epoch=epoch + 1, config=config,
                                                elapsed=time.perf_counter() - started)
                    log.info("distill epoch %d/%d: loss %.4f, val top-1 %s", epoch + 1, cfg.epochs, loss,
                             "-" if top1 is None else f"{top1:.4f}")

                distributed.on_main(world, record, device=rt.device)
        finally:
            progress.stop()
        if bad.files or bad.folders:
            log.info(bad.summary())
        distributed.barrier()
        if not world.is_main:
            return None

        path = run_dir.root / STUDENT_FILE
        settings = {"temperature": cfg.temperature, "epochs": cfg.epochs, "batch_size": batch, "optimizer": cfg.optimizer,
                    "base_lr": cfg.lr, "lr_scaling": LR_SCALING[cfg.optimizer], "peak_lr": peak_lr,
                    "weight_decay": cfg.weight_decay, "warmup_epochs": cfg.warmup_epochs, "augmentation": "crop+flip",
                    **training_crops(info), "init": None if init is None else str(init),
                    "labels_weight": cfg.labels_weight, "labels": label_source, "processes": world.world_size,
                    "seed": cfg.seed}
        extra = {"task": "distill", "teacher": str(teacher), "num_classes": num_classes,
                 "classes": info.extra.get("classes", [str(c) for c in range(num_classes)]), "from_head_layer": 0,
                 "images": len(images), "settings": settings}
        checkpoint.save_encoder(path, model, info=dataclasses.replace(
            info, model=student_cfg, config=config, epoch=cfg.epochs, step=total_steps, extra=extra,
            extra_tensors={CLASSIFIER_WEIGHT: student.head.fc.weight, CLASSIFIER_BIAS: student.head.fc.bias},
        ))
        last = history[-1] if history else {}
        result = DistillResult(
            top1=last.get("top1"), top5=last.get("top5"), teacher_top1=teacher_top1, teacher_top5=teacher_top5,
            teacher=teacher, student=path, val=val_name, images=len(images), num_classes=num_classes,
            settings=settings, history=history, seconds=round(time.perf_counter() - started, 3),
        )
        write_results(run_dir.root, result.to_dict())
        return result


def _labelled_images(cfg: DistillConfig, *, info, splits, num_classes: int) -> tuple[Dataset, str]:
    """The labelled training images of eq. 3 and where they come from: `cfg.label_file`'s images, or a class-balanced
    `cfg.label_fraction` of the labelled train split; by default the teacher's own fine-tuning labels."""
    if splits is None:
        raise DataError("--labels-weight needs labelled data: pass --val DATA (a dataset name, or a folder with train/ "
                        "and val/ holding the labelled images)")
    train = splits.train
    taught = info.extra.get("settings") or {}
    label_file = cfg.label_file
    fraction = cfg.label_fraction
    if label_file is None and fraction is None:  # the labels the teacher was fine-tuned on
        label_file, fraction = taught.get("label_file"), taught.get("label_fraction")
    seed = int(taught.get("seed", cfg.seed)) if cfg.label_fraction is None else cfg.seed
    labels = features.labels_of(train).tolist()
    if label_file is not None:
        paths = image_paths(train)
        root = Path(os.path.commonpath([str(p) for p in paths]))
        subset = label_file_subset(Path(label_file).expanduser(), paths, root=root)
        source = f"--label-file {label_file}"
        classes = len(getattr(train, "classes", [])) or len(set(labels))
        if classes != num_classes:
            raise DataError(f"--label-file {label_file} labels images of {classes} classes (the train folder of "
                            f"{splits.name}) but the teacher's classifier has {num_classes}; label images of the "
                            "classes the teacher was fine-tuned on")
    else:
        fraction = 1.0 if fraction is None else float(fraction)
        subset = class_balanced_subset(labels, fraction, seed=seed)
        source = f"{100 * fraction:g}% of {splits.name}'s train labels"
    check_labels([labels[i] for i in subset], num_classes=num_classes, name="labelled train")
    return Subset(train, subset), source


def _epoch(net: nn.Module, teacher: nn.Module, loader: DataLoader, *, optimizer, scaler, rt: Runtime, bad: BadFiles,
           seen: int, images: int, temperature: float, labelled: _Labelled | None, labels_weight: float, lr,
           first_step: int, total_steps: int, epoch: int, progress: Progress, log_every: int) -> float:
    """One pass over the unlabelled images (this rank's share of every batch); returns the mean loss over all ranks."""
    net.train()
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    total = torch.zeros((), device=rt.device)
    window, steps = time.perf_counter(), 0
    step = first_step
    world = distributed.world_size()
    for x, skipped in loader:
        for item in skipped:
            bad.add(item.path, item.reason)
        seen += len(x) * world
        bad.check(seen=seen, total=images)
        for group in optimizer.param_groups:
            group["lr"] = lr(step)
        x = x.to(rt.device, non_blocking=True, memory_format=memory_format)  # (b, 3, S, S): this rank's share
        with torch.no_grad(), rt.autocast():
            teacher_logits = teacher(x)  # (b, C)
        x_labelled = y = None
        if labelled is not None:  # one forward through both, so DDP sees one graph per step
            x_labelled, y = labelled.batch(step)  # (m, 3, S, S), (m,)
            x = torch.cat([x, x_labelled.to(rt.device, memory_format=memory_format)])
            y = y.to(rt.device)
        with rt.autocast():
            logits = net(x)  # (b [+ m], C)
        n = len(teacher_logits)
        loss = semi_supervised_distillation_loss(logits[:n], teacher_logits, temperature, labelled_logits=logits[n:],
                                                 labels=y, labels_weight=labels_weight)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(step + 1, what="the distillation loss")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss = distributed.all_reduce_mean(loss.detach())
        total += loss
        step += 1
        steps += 1
        if step % log_every == 0:
            now = time.perf_counter()
            progress.update(StepStats(step=step, epoch=epoch, total_steps=total_steps, loss=float(loss), lr=lr(step - 1),
                                      images_per_s=log_every * len(x) * world / max(now - window, 1e-9)))
            window = now
    return float(total) / max(steps, 1)


def _history(path: Path, *, through: int) -> list[dict[str, Any]]:
    """The epochs metrics.jsonl recorded up to epoch `through` (what a resumed run reports beside its new ones)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if isinstance(r, dict) and r.get("epoch", through + 1) <= through]


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
