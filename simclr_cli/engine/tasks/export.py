"""`simclr export`: an encoder file's weights in a form other tools load without simclr installed.

Targets:
- `torchvision`: the encoder f as a torchvision ResNet state dict (safetensors). Only width 1 with the
  standard stem has a torchvision twin. `torchvision.models.resnetXX().load_state_dict(sd, strict=False)`
  then reports exactly `fc.weight`, `fc.bias` missing and nothing unexpected; with `include_fc=True` a
  fine-tuned file's classifier (trained on h, head layer 0) becomes `fc`, so
  `resnetXX(num_classes=C)` loads it strictly.
- `safetensors-encoder`: the bare encoder f (any width or stem) with its architecture and input transform
  as safetensors metadata strings; it loads into `simclr_cli.engine.model.ResNet(arch=, width=, stem=)`.
- `onnx`: the encoder f as a graph image (B, 3, S, S) -> h (B, D), batch axis dynamic (needs `onnx`).

The projection head g is never exported: SimCLR §4.2 evaluates and transfers h, not z.
Every target expects images resized and normalised as the metadata says (mean/std, interpolation).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from simclr_cli.engine import rundir
from simclr_cli.engine.checkpoint import EncoderInfo
from simclr_cli.engine.configs import EXPORT_TARGETS, ExportConfig
from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.features import open_encoder
from simclr_cli.engine.supervised import CLASSIFIER_BIAS, CLASSIFIER_WEIGHT
from simclr_cli.engine.model import ResNet

log = logging.getLogger("simclr")

TARGETS = EXPORT_TARGETS
SUFFIXES = {"torchvision": ".safetensors", "safetensors-encoder": ".safetensors", "onnx": ".onnx"}
FC_KEYS = ("fc.weight", "fc.bias")  # what torchvision's ResNet has and the encoder does not


@dataclass(frozen=True)
class ExportResult:
    target: str
    out: Path
    checkpoint: Path
    architecture: str
    width: float
    stem: str
    feature_dim: int  # D of h, the exported network's output (or fc's input)
    tensors: int  # entries written (0 for onnx: its weights live inside the graph)
    parameters: int  # learnable weights exported (BN running statistics excluded)
    missing_keys: tuple[str, ...]  # keys the target model has that the file lacks (torchvision without fc)
    metadata: dict[str, str]
    bytes: int
    usage: str  # one line showing how to load the file

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "out": str(self.out),
            "checkpoint": str(self.checkpoint),
            "architecture": self.architecture,
            "width": self.width,
            "stem": self.stem,
            "feature_dim": self.feature_dim,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "missing_keys": list(self.missing_keys),
            "metadata": dict(self.metadata),
            "bytes": self.bytes,
            "usage": self.usage,
        }


def default_out(checkpoint: Path, *, to: str) -> Path:
    """`<checkpoint folder>/<checkpoint stem>-<target><suffix>`, e.g. `runs/x/encoder-torchvision.safetensors`."""
    _check_target(to)
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"{checkpoint.stem}-{to}{SUFFIXES[to]}"


def run(cfg: ExportConfig, *, checkpoint: Path | None, out: Path | None = None, overwrite: bool = False) -> ExportResult:
    """`checkpoint`'s encoder (default runs/latest/encoder.safetensors) as `cfg.to`, written to `out` (default: beside
    the checkpoint, named after the target)."""
    cfg.validate()
    checkpoint = rundir.resolve_checkpoint(checkpoint)
    return export(checkpoint, to=cfg.to, out=out or default_out(checkpoint, to=cfg.to), overwrite=overwrite,
                  include_fc=cfg.include_fc)


def export(checkpoint: Path, *, to: str, out: Path, overwrite: bool = False, include_fc: bool = False) -> ExportResult:
    """Write `checkpoint`'s encoder as `to` (one of TARGETS) to `out`, atomically; ConfigError when it cannot."""
    _check_target(to)
    checkpoint, out = Path(checkpoint), Path(out)
    if include_fc and to != "torchvision":
        raise ConfigError(f"--include-fc only applies to --to torchvision, not --to {to}")
    if to == "onnx" and not _installed("onnx"):
        raise ConfigError("--to onnx needs the onnx package; install onnx (pip install onnx) or export --to safetensors-encoder")
    _check_out(out, checkpoint=checkpoint, overwrite=overwrite)

    encoder = open_encoder(checkpoint)  # CheckpointError for missing or bad files
    info, net = encoder.info, encoder.model.encoder
    metadata = _metadata(info, net, checkpoint=checkpoint)
    if to == "torchvision":
        _check_torchvision(info, checkpoint=checkpoint)
        tensors = dict(net.state_dict())
        missing: tuple[str, ...] = FC_KEYS
        if include_fc:
            tensors.update(_classifier_as_fc(info, checkpoint=checkpoint))
            missing = ()
        _save_safetensors(out, tensors, metadata)
        usage = _torchvision_usage(info, out, include_fc=include_fc)
    elif to == "safetensors-encoder":
        tensors = dict(net.state_dict())
        missing = ()
        _save_safetensors(out, tensors, metadata)
        usage = (
            f"simclr_cli.engine.model.ResNet(arch={info.model.arch!r}, width={info.model.width!r}, stem={info.model.stem!r})"
            f".load_state_dict(safetensors.torch.load_file({str(out)!r}))"
        )
    else:
        tensors, missing = {}, ()
        _save_onnx(out, net, info, metadata)
        usage = f"onnxruntime.InferenceSession({str(out)!r}).run(['h'], {{'image': x}})  # x: (B, 3, {info.image_size}, {info.image_size}) float32, normalised"

    parameters = sum(p.numel() for p in net.parameters())
    if include_fc:
        parameters += sum(tensors[k].numel() for k in FC_KEYS)
    log.info("exported %s (%s) to %s", checkpoint, to, out)
    return ExportResult(
        target=to, out=out, checkpoint=checkpoint, architecture=info.model.arch, width=info.model.width,
        stem=str(info.model.stem), feature_dim=net.out_dim, tensors=len(tensors), parameters=parameters,
        missing_keys=missing, metadata=metadata, bytes=out.stat().st_size, usage=usage,
    )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _check_target(to: str) -> None:
    ExportConfig(to=to).validate()


def _check_out(out: Path, *, checkpoint: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the file to write")
    if out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve():
        raise ConfigError(f"--out {out} is the checkpoint being exported; choose another --out")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")


def _check_torchvision(info: EncoderInfo, *, checkpoint: Path) -> None:
    """ConfigError unless torchvision's `resnetXX()` has exactly this encoder's shapes."""
    reasons = []
    if float(info.model.width) != 1.0:
        reasons.append(f"width {info.model.width:g} (torchvision's ResNets are width 1: 64 stem channels)")
    if info.model.stem != "standard":
        reasons.append(f"the {info.model.stem} stem (torchvision has only the 7x7 stride-2 conv + max-pool stem)")
    if reasons:
        raise ConfigError(
            f"{checkpoint} cannot be exported --to torchvision: it has {' and '.join(reasons)}; "
            "use --to safetensors-encoder (loads into simclr_cli.engine.model.ResNet) or --to onnx"
        )


def _classifier_as_fc(info: EncoderInfo, *, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A fine-tuned file's classifier as torchvision's fc; only one trained on h (head layer 0) fits there."""
    if info.extra.get("task") != "finetune" or CLASSIFIER_WEIGHT not in info.extra_tensors:
        raise ConfigError(
            f"--include-fc needs a fine-tuned checkpoint (finetuned.safetensors); {checkpoint} has no classifier, "
            "so drop --include-fc and replace fc yourself"
        )
    layer = int(info.extra.get("from_head_layer", 0))
    if layer != 0:
        raise ConfigError(
            f"--include-fc: {checkpoint}'s classifier reads projection-head layer {layer}, not h, so it cannot be "
            "torchvision's fc; drop --include-fc, or fine-tune with --from-head-layer 0"
        )
    return {"fc.weight": info.extra_tensors[CLASSIFIER_WEIGHT], "fc.bias": info.extra_tensors[CLASSIFIER_BIAS]}


def _torchvision_usage(info: EncoderInfo, out: Path, *, include_fc: bool) -> str:
    load = f"safetensors.torch.load_file({str(out)!r})"
    if include_fc:
        classes = int(info.extra.get("num_classes", info.extra_tensors[CLASSIFIER_WEIGHT].shape[0]))
        return f"torchvision.models.{info.model.arch}(num_classes={classes}).load_state_dict({load})"
    return (
        f"torchvision.models.{info.model.arch}().load_state_dict({load}, strict=False)"
        "  # missing fc.weight, fc.bias: set model.fc = torch.nn.Identity() to get h"
    )


def _metadata(info: EncoderInfo, net: ResNet, *, checkpoint: Path) -> dict[str, str]:
    """What a consumer needs to feed the network (safetensors metadata must be str -> str; lists as JSON)."""
    return {
        "exported_by": "simclr-cli",
        "source": checkpoint.name,
        "architecture": info.model.arch,
        "width": f"{info.model.width:g}",
        "stem": str(info.model.stem),
        "feature_dim": str(net.out_dim),
        "image_size": str(info.image_size),
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "interpolation": info.interpolation,
        "epoch": str(info.epoch),
        "step": str(info.step),
    }


def _save_safetensors(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}  # unshared, as safetensors wants
    atomic_write(out, lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def _save_onnx(out: Path, net: ResNet, info: EncoderInfo, metadata: dict[str, str]) -> None:
    """Trace f in eval mode (BN on running statistics) with a dynamic batch axis; metadata as model properties."""
    import onnx

    net = net.to("cpu", torch.float32).eval()
    x = torch.zeros(2, 3, info.image_size, info.image_size)  # (B, 3, S, S); B=2 so the batch axis is not specialised to 1
    # The dynamo exporter needs onnxscript; without it the TorchScript exporter does the same job.
    dynamo = _installed("onnxscript")

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {"dynamo": dynamo}
        if dynamo:
            kwargs["external_data"] = False  # one self-contained file: a side .data file would not follow the rename
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)  # the dynamo exporter's own form
        else:
            kwargs["dynamic_axes"] = {"image": {0: "batch"}, "h": {0: "batch"}}
        torch.onnx.export(net, (x,), str(tmp), input_names=["image"], output_names=["h"], **kwargs)
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, metadata)
        onnx.save(model, str(tmp))

    atomic_write(out, write)
