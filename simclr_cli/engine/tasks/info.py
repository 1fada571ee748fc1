"""`simclr info`: what an encoder or fine-tuned file holds, and the evaluations already run on it.

Everything comes from the file itself (architecture, transform, the config it was trained with) plus the
`eval/*/results.json` that `knn`, `linear-eval` and `finetune` leave beside it by default.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simclr_cli.engine import external, rundir
from simclr_cli.engine.augment import describe_eval_transform
from simclr_cli.engine.features import open_encoder
from simclr_cli.engine.results import RESULTS_FILE

ENCODER = "encoder"
FINE_TUNED = "fine-tuned"
DISTILLED = "distilled"
# eval folders are `<command>-<UTC timestamp>[-n]` (rundir.default_eval_dir)
_EVAL_DIR = re.compile(r"^(?P<command>.+?)-\d{8}-\d{6}(?:-\d+)?$")


@dataclass(frozen=True)
class EvalRecord:
    """One `results.json` found beside the checkpoint; fields None when the file does not say."""

    path: Path
    command: str  # from the folder name (knn, linear-eval, finetune, ...)
    protocol: str | None
    data: str | None
    top1: float | None  # fractions in [0, 1]
    top5: float | None
    error: str | None = None  # why the file could not be read
    baseline: bool = False  # measured on a random-init network (--random-init), not on this file's weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "command": self.command, "protocol": self.protocol, "data": self.data,
            "top1": self.top1, "top5": self.top5, "error": self.error, "baseline": self.baseline,
        }


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    kind: str  # "encoder", "fine-tuned" or "distilled" (info.extra says task finetune / distill)
    method: str  # the pretraining method that trained the encoder
    architecture: str
    width: float
    stem: str
    sk_ratio: float  # selective kernels (SimCLRv2); 0 = none
    head_layers: int
    proj_dim: int
    feature_dim: int  # D of h
    encoder_parameters: int  # learnable weights only (BN running statistics excluded)
    head_parameters: int
    classifier_parameters: int  # a fine-tuned file's linear classifier; 0 otherwise
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    preprocessing: str  # the input transform in words, for using the network outside simclr
    epoch: int
    step: int
    config: dict[str, Any]  # the resolved config it was trained with
    extra: dict[str, Any]  # what a later stage recorded (fine-tuning: classes, head layer, label subset)
    file_bytes: int
    evaluations: tuple[EvalRecord, ...]  # sorted by path

    @property
    def total_parameters(self) -> int:
        return self.encoder_parameters + self.head_parameters + self.classifier_parameters

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "method": self.method,
            "architecture": self.architecture,
            "width": self.width,
            "stem": self.stem,
            "sk_ratio": self.sk_ratio,
            "head_layers": self.head_layers,
            "proj_dim": self.proj_dim,
            "feature_dim": self.feature_dim,
            "parameters": {
                "encoder": self.encoder_parameters,
                "head": self.head_parameters,
                "classifier": self.classifier_parameters,
                "total": self.total_parameters,
            },
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "preprocessing": self.preprocessing,
            "epoch": self.epoch,
            "step": self.step,
            "config": self.config,
            "extra": self.extra,
            "file_bytes": self.file_bytes,
            "evaluations": [record.to_dict() for record in self.evaluations],
        }


def run(checkpoint: Path | None) -> CheckpointInfo:
    """Describe `checkpoint` (default runs/latest/encoder.safetensors); `info` has nothing to configure."""
    return describe(rundir.resolve_checkpoint(checkpoint))


def describe(checkpoint: Path) -> CheckpointInfo:
    """Read `checkpoint` (CheckpointError when it is not a readable encoder file) and the evaluations beside it."""
    checkpoint = Path(checkpoint)
    encoder = open_encoder(checkpoint)
    info, model = encoder.info, encoder.model
    kind = {"finetune": FINE_TUNED, "distill": DISTILLED}.get(info.extra.get("task"), ENCODER)
    headless = external.is_external(info)  # its placeholder head is not part of it (external.py)
    return CheckpointInfo(
        path=checkpoint,
        kind=kind,
        method=f"none: external {external.name_of(info)} weights" if headless else info.method,
        architecture=info.model.arch,
        width=info.model.width,
        stem=str(info.model.stem),
        sk_ratio=info.model.sk_ratio,
        head_layers=0 if headless else info.model.head_layers,
        proj_dim=0 if headless else info.model.proj_dim,
        feature_dim=model.encoder.out_dim,
        encoder_parameters=sum(p.numel() for p in model.encoder.parameters()),
        head_parameters=0 if headless else sum(p.numel() for p in model.head.parameters()),
        classifier_parameters=sum(t.numel() for name, t in info.extra_tensors.items() if name.startswith("classifier.")),
        image_size=info.image_size,
        mean=tuple(info.mean),
        std=tuple(info.std),
        interpolation=info.interpolation,
        preprocessing=describe_eval_transform(image_size=info.image_size, mean=info.mean, std=info.std,
                                              interpolation=info.interpolation),
        epoch=info.epoch,
        step=info.step,
        config=info.config,
        extra=info.extra,
        file_bytes=external.file_of(checkpoint).stat().st_size,
        evaluations=find_evaluations(external.file_of(checkpoint).parent),
    )


def find_evaluations(folder: Path) -> tuple[EvalRecord, ...]:
    """Every `folder/eval/*/results.json`, sorted by path; an unreadable one is listed with its error."""
    return tuple(_read_record(path) for path in sorted(Path(folder).glob(f"eval/*/{RESULTS_FILE}")))


def _read_record(path: Path) -> EvalRecord:
    match = _EVAL_DIR.match(path.parent.name)
    command = match["command"] if match else path.parent.name
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _unreadable(path, command, str(exc))
    except RecursionError:
        return _unreadable(path, command, "nested too deeply")
    if not isinstance(results, dict):
        return _unreadable(path, command, "not a JSON object")
    return EvalRecord(
        path=path,
        command=command,
        protocol=_text(results.get("protocol")),
        data=_text(results.get("data")),
        top1=_number(results.get("top1")),
        top5=_number(results.get("top5")),
        # older results.json files say it by random_init (knn) or by a null checkpoint (linear-eval, finetune)
        baseline=results.get("random_init") is True or ("checkpoint" in results and results["checkpoint"] is None),
    )


def _unreadable(path: Path, command: str, error: str) -> EvalRecord:
    return EvalRecord(path=path, command=command, protocol=None, data=None, top1=None, top5=None, error=error)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) > 1e300:  # no float holds it
        return None
    return float(value)
