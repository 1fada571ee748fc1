"""`simclr distill`: SimCLRv2's third step (Chen et al. 2020b, §2.3) — a student network is trained on unlabelled
images to match the class distribution of a fine-tuned teacher, with only the teacher's soft labels:

    L = - sum_x sum_y P_T(y|x; tau) log P_S(y|x; tau)            (eq. 2, `loss.distillation_loss`)

The teacher (a `finetuned.safetensors`: encoder, head layers and classifier) is fixed, in eval mode, with no
gradient; the student is an encoder of any of our architectures (default: the teacher's, i.e. self-distillation)
with a linear classifier on h, both trained from scratch unless `init` gives the encoder's starting weights. Both see
the same view of each image: the fine-tuning augmentation (random crop + flip), in the teacher's input transform.
Optimiser and schedule as v2 §3: those of pretraining (LARS 0.1 x sqrt(B), weight decay 1e-4, 5% warm-up, cosine).

The run folder holds config.yaml, metrics.jsonl (one line per epoch), checkpoints/ (a training state per epoch,
for --resume), `student.safetensors` (an encoder file with the classifier as extra tensors, `extra.task` "distill",
naming its teacher: `linear-eval`, `knn`, `embed`, `info`, `export` and `distill` itself accept it) and results.json
(the student's top-1/top-5 and the teacher's on the same split).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image

from simclr_cli.engine import checkpoint, defaults, metrics, resume, rundir, weights
from simclr_cli.engine.augment import eval_transform, train_eval_transform
from simclr_cli.engine.badfiles import BadFiles
from simclr_cli.engine.configs import LR_SCALING, DistillConfig
from simclr_cli.engine.datasets import NAMED_DATASETS, labelled_splits, pretrain_dataset
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.errors import DataError, NonFiniteLoss
from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.loss import distillation_loss
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.optim import lr_at, scaled_lr
from simclr_cli.engine.pipeline import PixelDataset, decode_side
from simclr_cli.engine.plain import to_plain
from simclr_cli.engine.report import NoProgress, Progress, StepStats
from simclr_cli.engine.results import write_results
from simclr_cli.engine.supervised import (
    CLASSIFIER_BIAS,
    CLASSIFIER_WEIGHT,
    Backbone,
    Classifier,
    LinearClassifier,
    classifier_optimizer,
    eval_loader,
    evaluate,
    load_classifier,
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


class _Views(Dataset):
    """Item i: (the fine-tuning view of image i, or of the next decodable one, the skipped files), via PixelDataset's
    bad-image policy."""

    def __init__(self, pixels: PixelDataset, transform) -> None:
        self.pixels = pixels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        pixels, _, skipped = self.pixels[index]  # (3, H, W) uint8
        return self.transform(to_pil_image(pixels)), skipped


def _collate(items):
    return torch.stack([view for view, _ in items]), [s for _, skipped in items for s in skipped]


class _Trained:
    """What `resume.load_newest` restores: the student (encoder and classifier as one module), no extra state."""

    def __init__(self, modules: nn.Module) -> None:
        self.modules = modules

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, tensors) -> None:
        pass


def run(cfg: DistillConfig, *, teacher: Path, out: Path | None = None, resume_run: bool = False, overwrite: bool = False,
        progress: Progress | None = None) -> DistillResult:
    """Distil the fine-tuned `teacher` into a student on `cfg.data`, in the run folder `out` (default
    runs/distill-<timestamp>); `resume_run` continues its newest checkpoint."""
    progress = progress or NoProgress()
    started = time.perf_counter()
    cfg = cfg.resolved()
    teacher = Path(teacher).expanduser()
    teacher_net, info = load_classifier(teacher)  # CheckpointError naming `finetune` for a plain encoder
    num_classes = info.extra_tensors[CLASSIFIER_WEIGHT].shape[0]
    source = (info.config.get("data") or {}).get("source")
    data = cfg.data if cfg.data is not None else source
    images = pretrain_dataset(data, root=_path(cfg.data_root), download=cfg.download, max_pixels=cfg.max_image_pixels or None)
    val_name = cfg.val if cfg.val is not None else (data if data in NAMED_DATASETS else None)
    val = None
    if val_name is not None:
        val = labelled_splits(val_name, root=_path(cfg.data_root), download=cfg.download).val
        classes = len(getattr(val, "classes", [])) or num_classes
        if classes != num_classes:
            raise DataError(f"--val {val_name} has {classes} classes but the teacher's classifier has {num_classes}; "
                            "evaluate on the data the teacher was fine-tuned on")
    rt = runtime(device=cfg.device, precision=cfg.precision)
    cfg = replace(cfg, workers=defaults.resolve_workers(cfg.workers, rt.device))
    batch = min(cfg.batch_size, len(images))
    if batch < 2:
        raise DataError(f"the data holds {len(images)} image(s); distillation trains with BN and needs at least 2")

    student_cfg = ModelConfig(
        arch=cfg.student_arch or info.model.arch,
        width=info.model.width if cfg.student_width is None else cfg.student_width,
        sk_ratio=info.model.sk_ratio if cfg.student_sk_ratio is None else cfg.student_sk_ratio,
        stem=info.model.stem, head_layers=info.model.head_layers, proj_dim=info.model.proj_dim,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(student_cfg)
    if cfg.init is not None:
        report = weights.init_encoder(model, Path(cfg.init).expanduser())
        log.info("student initialised from %s (%s): %d tensors", report.source, report.layout, report.loaded)
    student = Classifier(Backbone(model, depth=0), LinearClassifier(model.encoder.out_dim, num_classes), frozen=False)
    student.to(rt.device)
    teacher_net.to(rt.device).eval().requires_grad_(False)

    peak_lr = scaled_lr(cfg.lr, batch, LR_SCALING[cfg.optimizer])
    optimizer = classifier_optimizer(list(student.parameters()), name=cfg.optimizer, lr=peak_lr, momentum=cfg.momentum,
                                     weight_decay=cfg.weight_decay)
    transform = dict(image_size=info.image_size, mean=info.mean, std=info.std, interpolation=info.interpolation)
    views = _Views(PixelDataset(images, max_side=decode_side(info.image_size), on_bad_image=cfg.on_bad_image),
                   train_eval_transform(**transform))
    steps_per_epoch = len(images) // batch
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    val_loader = None if val is None else eval_loader(val, transform=eval_transform(**transform),
                                                      batch_size=cfg.batch_size, workers=cfg.workers, rt=rt)
    config = {"distill": to_plain(cfg), "teacher": str(teacher), "student": to_plain(student_cfg),
              "data": {"source": None if data is None else str(data)}}

    with contextlib.ExitStack() as held:
        run_dir = rundir.prepare(out or rundir.default_run_dir(prefix="distill-"), resume=resume_run,
                                 overwrite=overwrite, hold=held)
        bad = BadFiles(on_bad_image=cfg.on_bad_image, max_bad_fraction=cfg.max_bad_fraction,
                       max_image_pixels=cfg.max_image_pixels, report=run_dir.bad_files())
        scaler = rt.grad_scaler()
        epoch0, history = 0, []
        if resume_run:
            meta = resume.load_newest(run_dir, config=config, method=_Trained(student), optimizer=optimizer,
                                      scaler=scaler, total_steps=total_steps)
            epoch0 = meta["epoch"]
            history = _history(run_dir.metrics, through=epoch0)
        if resume_run:
            metrics.truncate(run_dir.metrics, after_step=epoch0 * steps_per_epoch)
        else:  # like rundir.start, but runs/latest keeps pointing at the newest pretraining run
            text = yaml.safe_dump(config, sort_keys=False)
            atomic_write(run_dir.config, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        for folder, reason in getattr(images, "skipped_folders", ()):
            bad.add_folder(folder, reason)
        teacher_top1 = teacher_top5 = None
        if val_loader is not None:
            teacher_top1, teacher_top5 = evaluate(teacher_net, val_loader, rt=rt)
            log.info("teacher %s: val top-1 %.4f", teacher, teacher_top1)
        log.info("distilling %s into %s width %g%s on %d images: batch %d, %d epochs, %s, peak lr %.4g, tau %g",
                 teacher.name, student_cfg.arch, student_cfg.width,
                 f" SK {student_cfg.sk_ratio:g}" if student_cfg.sk_ratio else "", len(images), batch, cfg.epochs,
                 cfg.optimizer, peak_lr, cfg.temperature)
        progress.start(total_steps=total_steps, completed=epoch0 * steps_per_epoch, description="distill")
        try:
            for epoch in range(epoch0, cfg.epochs):
                # the order of an epoch depends only on the seed and the epoch, so a resumed run draws the same
                loader = DataLoader(views, batch_size=batch, shuffle=True, drop_last=True, collate_fn=_collate,
                                    generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
                                    num_workers=cfg.workers, pin_memory=rt.device.type == "cuda")
                loss = _epoch(student, teacher_net, loader, optimizer=optimizer, scaler=scaler, rt=rt, bad=bad,
                              seen=epoch * steps_per_epoch * batch, images=len(images), temperature=cfg.temperature,
                              lr=lambda step: lr_at(step, peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps),
                              first_step=epoch * steps_per_epoch, total_steps=total_steps, epoch=epoch,
                              progress=progress, log_every=cfg.log_every)
                top1, top5 = evaluate(student, val_loader, rt=rt) if val_loader is not None else (None, None)
                step = (epoch + 1) * steps_per_epoch
                entry = {"step": step, "epoch": epoch + 1, "loss": loss, "top1": top1, "top5": top5}
                history.append(entry)
                metrics.append_line(run_dir.metrics, json.dumps(entry))
                checkpoint.save_train_state(run_dir.checkpoint(step), model=student, optimizer=optimizer, scaler=scaler,
                                            step=step, epoch=epoch + 1, config=config, elapsed=time.perf_counter() - started)
                log.info("distill epoch %d/%d: loss %.4f, val top-1 %s", epoch + 1, cfg.epochs, loss,
                         "-" if top1 is None else f"{top1:.4f}")
        finally:
            progress.stop()
        if bad.files or bad.folders:
            log.info(bad.summary())

        path = run_dir.root / STUDENT_FILE
        settings = {"temperature": cfg.temperature, "epochs": cfg.epochs, "batch_size": batch, "optimizer": cfg.optimizer,
                    "base_lr": cfg.lr, "lr_scaling": LR_SCALING[cfg.optimizer], "peak_lr": peak_lr,
                    "weight_decay": cfg.weight_decay, "warmup_epochs": cfg.warmup_epochs, "augmentation": "crop+flip",
                    "init": cfg.init, "seed": cfg.seed}
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


def _epoch(student: nn.Module, teacher: nn.Module, loader: DataLoader, *, optimizer, scaler, rt: Runtime, bad: BadFiles,
           seen: int, images: int, temperature: float, lr, first_step: int, total_steps: int, epoch: int,
           progress: Progress, log_every: int) -> float:
    """One pass over the unlabelled images; returns the mean loss."""
    student.train()
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    total = torch.zeros((), device=rt.device)
    window, steps = time.perf_counter(), 0
    step = first_step
    for x, skipped in loader:
        for item in skipped:
            bad.add(item.path, item.reason)
        seen += len(x)
        bad.check(seen=seen, total=images)
        for group in optimizer.param_groups:
            group["lr"] = lr(step)
        x = x.to(rt.device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
        with torch.no_grad(), rt.autocast():
            teacher_logits = teacher(x)  # (B, C)
        with rt.autocast():
            student_logits = student(x)  # (B, C)
        loss = distillation_loss(student_logits, teacher_logits, temperature)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(step + 1, what="the distillation loss")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss = loss.detach()
        total += loss
        step += 1
        steps += 1
        if step % log_every == 0:
            now = time.perf_counter()
            progress.update(StepStats(step=step, epoch=epoch, total_steps=total_steps, loss=float(loss), lr=lr(step - 1),
                                      images_per_s=log_every * len(x) / max(now - window, 1e-9)))
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
