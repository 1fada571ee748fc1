"""Self-describing safetensors checkpoints: weights plus JSON metadata, written atomically, loaded strictly.

Two kinds share one container format:
- `encoder`: the SimCLR model's weights and enough metadata (architecture, image size, normalisation,
  the full resolved config) to rebuild the model and its eval transform from the file alone;
- `train-state`: model weights, optimiser buffers keyed by parameter name, RNG states and the
  position in the run, enough to continue bit-identically.
No pickle: safetensors holds only tensors, the metadata is JSON text.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.model import ModelConfig, SimCLR, build_model

FORMAT = "simclr-cli"
FORMAT_VERSION = 1
ENCODER = "encoder"
TRAIN_STATE = "train-state"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, fsync it, rename it over `path`, fsync the folder.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # Not mkstemp: its 0600 mode would survive the rename; created like any file, the umask decides.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors does) would leave it 0600
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(path: Path, tensors: Mapping[str, torch.Tensor], *, kind: str, meta: Mapping[str, Any]) -> None:
    """Save `tensors` with `meta` (JSON-serialisable values) under the project's format header."""
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kind": kind}
    header.update({key: json.dumps(value) for key, value in meta.items()})
    # safetensors wants contiguous, unshared CPU tensors
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=header))


@dataclass
class Loaded:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def load(path: Path, *, kind: str) -> Loaded:
    """Read a checkpoint of `kind`, checking the container, the format and its version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .safetensors file written by simclr")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); pass a checkpoint written by simclr"
        ) from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a simclr checkpoint (no '{FORMAT}' header)")
    version = header.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this simclr reads version {FORMAT_VERSION} — upgrade simclr"
        )
    if header.get("kind") != kind:
        raise CheckpointError(f"{path} holds a '{header.get('kind')}' checkpoint where a '{kind}' one is needed")
    try:
        meta = {k: json.loads(v) for k, v in header.items() if k not in ("format", "format_version", "kind")}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} has corrupt metadata ({exc.msg}); the file is damaged") from exc
    return Loaded(tensors=tensors, meta=meta)


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], *, source: Path) -> None:
    """Raise naming exactly which keys are missing or extra and which shapes or dtypes differ."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if extra:
        problems.append(f"unexpected {few(extra)}")
    for name in sorted(set(expected) & set(found)):
        want, got = expected[name], found[name]
        if want.shape != got.shape:
            problems.append(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif want.dtype != got.dtype:
            problems.append(f"{name} has dtype {got.dtype}, expected {want.dtype}")
    if problems:
        raise CheckpointError(f"{source} does not match the model it describes: {'; '.join(problems[:4])}")


def few(names: list[str]) -> str:
    """At most three names, then how many more: keeps key-mismatch messages to one line."""
    shown = ", ".join(names[:3])
    return f"{shown} (+{len(names) - 3} more)" if len(names) > 3 else shown


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: Mapping[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """Optimiser buffers keyed `optim/<parameter name>/<buffer>`, so files survive parameter reordering."""
    out = {}
    for param, state in optimizer.state.items():
        for buffer, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"optim/{names[param]}/{buffer}"] = tensor
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, named: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor], *, source: Path
) -> None:
    """Inverse of `optimizer_tensors`: put each buffer back on its parameter's device."""
    for key, value in tensors.items():
        _, name, buffer = key.split("/", 2)
        if name not in named:
            raise CheckpointError(f"{source} has optimiser state for unknown parameter '{name}'; it belongs to another model")
        param = named[name]
        device = param.device if value.ndim > 0 else torch.device("cpu")  # scalar steps stay on CPU as torch keeps them
        optimizer.state[param][buffer] = value.to(device)


@dataclass
class EncoderInfo:
    """What an encoder file says about itself, beyond its weights."""

    model: ModelConfig
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    config: dict[str, Any]
    epoch: int
    step: int
    extra: dict[str, Any] = field(default_factory=dict)  # what a later stage added (e.g. fine-tuning's classifier)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


EXTRA = "extra/"


def save_encoder(path: Path, model: SimCLR, *, info: EncoderInfo) -> None:
    """The model's weights, plus `info.extra_tensors` under the `extra/` prefix, with `info` as metadata."""
    meta = {
        "model": asdict(info.model),
        "transform": {"image_size": info.image_size, "mean": info.mean, "std": info.std, "interpolation": info.interpolation},
        "config": info.config,
        "epoch": info.epoch,
        "step": info.step,
        "extra": info.extra,
    }
    tensors = dict(model.state_dict())
    tensors.update({f"{EXTRA}{name}": value for name, value in info.extra_tensors.items()})
    save(path, tensors, kind=ENCODER, meta=meta)


def load_encoder(path: Path) -> tuple[SimCLR, EncoderInfo]:
    """Rebuild the model from the file alone and load its weights strictly."""
    loaded = load(path, kind=ENCODER)
    try:
        meta = loaded.meta
        info = EncoderInfo(
            model=ModelConfig(**meta["model"]),
            image_size=int(meta["transform"]["image_size"]),
            mean=tuple(meta["transform"]["mean"]),
            std=tuple(meta["transform"]["std"]),
            interpolation=str(meta["transform"]["interpolation"]),
            config=meta["config"],
            epoch=int(meta["epoch"]),
            step=int(meta["step"]),
            extra=dict(meta.get("extra", {})),
            extra_tensors={k.removeprefix(EXTRA): v for k, v in loaded.tensors.items() if k.startswith(EXTRA)},
        )
        info.model.validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has incomplete metadata ({exc!r}); the file is damaged or from another tool") from exc
    model = build_model(info.model)
    weights = {k: v for k, v in loaded.tensors.items() if not k.startswith(EXTRA)}
    check_state_dict(model.state_dict(), weights, source=Path(path))
    model.load_state_dict(weights, strict=True)
    return model, info


def save_train_state(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    epoch: int,
    config: dict[str, Any],
    elapsed: float,
) -> None:
    """Everything `--resume` needs to continue exactly where this step left off."""
    names = {param: name for name, param in model.named_parameters()}
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors(optimizer, names))
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "epoch": epoch, "elapsed": elapsed, "config": config, "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
    save(path, tensors, kind=TRAIN_STATE, meta=meta)


def load_train_state(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> dict[str, Any]:
    """Restore model, optimiser, scaler and RNG in place; returns the metadata (step, epoch, config)."""
    loaded = load(path, kind=TRAIN_STATE)
    weights = {k.removeprefix("model/"): v for k, v in loaded.tensors.items() if k.startswith("model/")}
    check_state_dict(model.state_dict(), weights, source=Path(path))
    model.load_state_dict(weights, strict=True)
    buffers = {k: v for k, v in loaded.tensors.items() if k.startswith("optim/")}
    optimizer.state.clear()
    load_optimizer_tensors(optimizer, dict(model.named_parameters()), buffers, source=Path(path))
    if "rng/torch" in loaded.tensors:
        torch.set_rng_state(loaded.tensors["rng/torch"])
    if "rng/cuda" in loaded.tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(loaded.tensors["rng/cuda"])
    if loaded.meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(loaded.meta["scaler"])
    for key in ("step", "epoch"):
        if not isinstance(loaded.meta.get(key), int):
            raise CheckpointError(f"{path} has no valid '{key}' in its metadata; the file is damaged")
    return loaded.meta
