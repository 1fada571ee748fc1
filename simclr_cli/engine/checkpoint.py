"""Self-describing safetensors checkpoints: weights plus JSON metadata, written atomically, loaded strictly.

Two kinds share one container format:
- `encoder`: the SimCLR model's weights and enough metadata (architecture, image size, normalisation,
  the full resolved config) to rebuild the model and its eval transform from the file alone;
- `train-state`: model weights, optimiser buffers keyed by parameter name, RNG states and the
  position in the run, enough to continue bit-identically.
No pickle: safetensors holds only tensors, the metadata is JSON text.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from simclr_cli.engine import rundir
from simclr_cli.engine.augment import AugmentConfig
from simclr_cli.engine.errors import CheckpointError, ConfigError
from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.model import ModelConfig, SimCLR, build_model

FORMAT = "simclr-cli"
FORMAT_VERSION = 1
ENCODER = "encoder"
TRAIN_STATE = "train-state"


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


# safetensors' own cap on the JSON header; a larger length is damage, and is never read into memory
HEADER_LIMIT = 100_000_000
PICKLE_FIX = (
    "simclr never unpickles files (unpickling can run code): convert it to .safetensors where it was made "
    "(with the safetensors package), and pass that file"
)


def read_safetensors(path: Path, *, fix: str, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file (no tensors, and nothing but the header read, unless
    `tensors`), or CheckpointError saying what is wrong with the container and `fix` (a specific fix instead when
    the damage tells what the file is, e.g. a pickle)."""
    path = Path(path)
    problem = _container_problem(path)
    if problem is not None:
        what, specific_fix = problem
        raise CheckpointError(f"{path} {what}; {specific_fix or fix}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            found = {name: handle.get_tensor(name) for name in handle.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(exc)}); {fix}") from exc
    return metadata, found


NOT_SAFETENSORS = "is not a safetensors file"
DAMAGED = "is not a readable safetensors file"


def _container_problem(path: Path) -> tuple[str, str | None] | None:
    """(what is wrong, as "is not ...: why", and a fix or None) judged from the file's first bytes and JSON header,
    which are read as data and never trusted: a pickle is recognised, never loaded; a header length is checked
    against the file size before anything that long is read. None when the container looks sound (safetensors
    then checks the rest)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            start = handle.read(8)
            if start.startswith(b"PK\x03\x04"):
                return f"{NOT_SAFETENSORS}: it is a PyTorch zip archive, whose contents are pickled", PICKLE_FIX
            if len(start) >= 2 and start[0] == 0x80 and 2 <= start[1] <= 5:  # PROTO opcode of pickle protocols 2-5
                return f"{NOT_SAFETENSORS}: it is a pickle file", PICKLE_FIX
            if size == 0:
                return "is empty (0 bytes)", "copy it again, or pass another checkpoint"
            # A safetensors file starts with its header's length as 8 little-endian bytes, which hold NULs: text never does.
            if _is_text(start + handle.read(504)):
                return f"{NOT_SAFETENSORS}: it is a text file of {size} bytes", None
            if size < 8:
                return f"{NOT_SAFETENSORS}: it is only {size} bytes long", "copy it again, or pass another checkpoint"
            handle.seek(8)
            length = int.from_bytes(start, "little")
            first = handle.read(1)
            if length < 2 or length > HEADER_LIMIT or first != b"{":
                return f"{NOT_SAFETENSORS}: it does not start with a safetensors header (another format, or damaged)", None
            if length > size - 8:
                return (f"{DAMAGED}: it is cut short: its header announces {length} bytes, only {size - 8} follow",
                        "copy it again, or pass an earlier checkpoint")
            raw = first + handle.read(length - 1)
    except OSError as exc:
        return f"{DAMAGED}: it cannot be read ({exc.strerror or exc})", None
    try:
        header = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{DAMAGED}: its header is not valid JSON (the file is damaged)", None
    except ValueError as exc:
        return f"{DAMAGED}: its header cannot be read ({exc})", "the file is damaged or forged; pass a checkpoint written by simclr"
    if not isinstance(header, dict):
        return f"{DAMAGED}: its header is not a JSON object (the file is damaged)", None
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)
    ]
    data = size - 8 - length
    if max(ends, default=0) > data:
        return (f"{DAMAGED}: it is cut short: its tensors need {max(ends, default=0)} bytes of data, only {data} are there",
                "copy it again, or pass an earlier checkpoint")
    return None


def _is_text(head: bytes) -> bool:
    """Whether a file's first bytes are text (UTF-8 without NULs; a multi-byte character cut at the end is fine)."""
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
    return True


# Metadata nests a few levels (config -> section -> value); anything deeper is forged, and would take recursive code
# (comparisons, printing, saving) past Python's recursion limit.
MAX_JSON_DEPTH = 32


def parse_json(text: str) -> Any:
    """JSON read from a file as data: json.JSONDecodeError when it is not JSON; ValueError naming the reason when
    it nests deeper than MAX_JSON_DEPTH, holds an integer too long to read, or NaN/Infinity (which JSON has not)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        if "digits" in str(exc):  # Python's guard against quadratic int parsing (sys.get_int_max_str_digits)
            raise ValueError(f"it holds a number of more than {sys.get_int_max_str_digits()} digits") from None
        raise
    stack = [(value, 1)]
    while stack:  # iterative: a recursive walk would hit the very limit it guards
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_JSON_DEPTH:
                    raise ValueError(f"it nests deeper than {MAX_JSON_DEPTH} levels")
                stack.append((child, depth + 1))
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load(path: Path, *, kind: str, tensors: bool = True) -> Loaded:
    """Read a checkpoint of `kind`, checking the container, the format and its version (the metadata alone, and
    only the header read, unless `tensors`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .safetensors file written by simclr")
    header, found = read_safetensors(path, fix="pass a checkpoint written by simclr", tensors=tensors)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a simclr checkpoint (no '{FORMAT}' header)")
    version = header.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this simclr reads version {FORMAT_VERSION} — upgrade simclr"
        )
    if header.get("kind") == TRAIN_STATE and kind == ENCODER:
        encoder = rundir.run_encoder_for(path)
        where = f"its run's encoder is {encoder}" if encoder.is_file() else "pass the encoder.safetensors of its run"
        raise CheckpointError(f"{path} is a training-state checkpoint (what --resume reads), not an encoder; {where}")
    if header.get("kind") != kind:
        raise CheckpointError(f"{path} holds a '{header.get('kind')}' checkpoint where a '{kind}' one is needed")
    meta = {}
    for key, text in header.items():
        if key in ("format", "format_version", "kind"):
            continue
        try:
            meta[key] = parse_json(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} has corrupt metadata ({exc.msg}); the file is damaged") from exc
        except ValueError as exc:
            raise CheckpointError(f"{path} has corrupt metadata ({key}: {exc}); the file is damaged") from exc
    return Loaded(tensors=found, meta=meta)


DIGEST_CHUNK = 1 << 20  # bytes read at a time: a 100 MB encoder is hashed in bounded memory


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file's bytes, read in chunks: names exactly which weights an index or a result came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(DIGEST_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def check_finite(tensors: Mapping[str, torch.Tensor], *, source: Path) -> None:
    """CheckpointError naming the tensors holding NaN or inf: weights from a diverged run are never used."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{source} holds NaN/inf values in {few(sorted(bad))}; the run that wrote it diverged — use an earlier checkpoint"
        )


def check_state_dict(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], *, source: Path) -> None:
    """Raise naming exactly which keys are missing or extra and which shapes or dtypes differ."""
    problems = state_dict_problems(expected, found)
    if problems:
        raise CheckpointError(f"{source} does not match the model it describes: {'; '.join(problems[:4])}")


def state_dict_problems(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    *,
    optional: Callable[[str], bool] = lambda key: False,
    foreign: Callable[[str], bool] = lambda key: True,
    cast_ok: Callable[[torch.Tensor, torch.Tensor], bool] = lambda want, got: want.dtype == got.dtype,
    unexpected_note: str = "",
    shape_hint: Callable[[str, torch.Tensor, torch.Tensor], str] = lambda name, want, got: "",
) -> list[str]:
    """What keeps `found` from loading strictly into a module whose state dict is `expected`: the missing keys
    (except `optional` ones), the unexpected keys (those `foreign` claims for this module), and every tensor of
    another shape, or of a dtype `cast_ok` refuses. The one strict key check of checkpoints and --init weights."""
    missing = sorted(k for k in expected if k not in found and not optional(k))
    extra = sorted(k for k in found if k not in expected and foreign(k))
    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if extra:
        problems.append(f"unexpected {few(extra)}{unexpected_note}")
    for name in sorted(set(expected) & set(found)):
        want, got = expected[name], found[name]
        if want.shape != got.shape:
            problems.append(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}{shape_hint(name, want, got)}")
        elif not cast_ok(want, got):
            problems.append(f"{name} has dtype {got.dtype}, expected {want.dtype}")
    return problems


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


def _optimizer_entries(
    named: Mapping[str, torch.nn.Parameter], tensors: Mapping[str, torch.Tensor], *, source: Path
) -> list[tuple[torch.nn.Parameter, str, torch.Tensor]]:
    """(parameter, buffer name, value) for each `optim/<parameter>/<buffer>` tensor, or CheckpointError."""
    entries = []
    for key, value in tensors.items():
        parts = key.split("/", 2)
        if len(parts) != 3 or not parts[2]:
            raise CheckpointError(f"{source} has a malformed optimiser entry '{key}'; the file is damaged")
        _, name, buffer = parts
        if name not in named:
            raise CheckpointError(f"{source} has optimiser state for unknown parameter '{name}'; it belongs to another model")
        param = named[name]
        if value.ndim > 0 and value.shape != param.shape:  # a step count is a scalar; every buffer has its parameter's shape
            raise CheckpointError(
                f"{source} has optimiser state {key} of shape {tuple(value.shape)} for a parameter of shape "
                f"{tuple(param.shape)}; the file is damaged or belongs to another model"
            )
        entries.append((param, buffer, value))
    return entries


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

    @property
    def method(self) -> str:
        """The pretraining method that trained the encoder, as its config names it (`train.method`); files written
        before methods had names were trained with SimCLR."""
        train = self.config.get("train") if isinstance(self.config, dict) else None
        return str(train.get("method", "simclr")) if isinstance(train, dict) else "simclr"

    @property
    def flip_p(self) -> float | None:
        """How often the encoder's pretraining mirrored an image (`augment.flip_p`), None when its config does not say:
        whether a mirrored image is still the same thing is a property of the data, which its classifiers follow."""
        augment = self.config.get("augment") if isinstance(self.config, dict) else None
        return augment.get("flip_p") if isinstance(augment, dict) else None


EXTRA = "extra/"
METHOD_STATE = "method/"  # a training state's tensors beyond the modules' own (a queue's position, say)


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
    """Rebuild the model from the file alone and load its weights strictly.

    Everything is checked before a real model is built: the metadata's types and values, then the tensors against
    the shapes of a model on the meta device (so metadata describing a huge model allocates nothing), then that
    every weight is finite.
    """
    path = Path(path)
    loaded = load(path, kind=ENCODER)
    info = _encoder_info(loaded, path)
    weights = {k: v for k, v in loaded.tensors.items() if not k.startswith(EXTRA)}
    with torch.device("meta"):
        skeleton = build_model(info.model)
    check_state_dict(skeleton.state_dict(), weights, source=path)
    classifier = info.extra_tensors.get(CLASSIFIER_WEIGHT)
    if classifier is not None and classifier.shape[1] != skeleton.encoder.out_dim:
        raise CheckpointError(
            f"{path} has a classifier on {classifier.shape[1]} features, but its encoder gives {skeleton.encoder.out_dim}; "
            "the file is damaged"
        )
    check_finite(loaded.tensors, source=path)
    model = build_model(info.model)
    model.load_state_dict(weights, strict=True)
    return model, info


def _encoder_info(loaded: Loaded, path: Path) -> EncoderInfo:
    """The metadata as EncoderInfo, every field type- and value-checked: a damaged or foreign file is refused
    here with one message, not later by whatever first trips over a bad value."""
    try:
        meta = loaded.meta
        transform = meta["transform"]
        info = EncoderInfo(
            model=ModelConfig(**meta["model"]),
            image_size=transform["image_size"],
            mean=tuple(transform["mean"]),
            std=tuple(transform["std"]),
            interpolation=transform["interpolation"],
            config=meta["config"],
            epoch=meta["epoch"],
            step=meta["step"],
            extra=_mapping(meta.get("extra", {}), "extra"),
            extra_tensors={k.removeprefix(EXTRA): v for k, v in loaded.tensors.items() if k.startswith(EXTRA)},
        )
        info.model.validate()
        AugmentConfig(image_size=info.image_size, mean=info.mean, std=info.std, interpolation=info.interpolation).validate()
        for name in ("epoch", "step"):
            value = getattr(info, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} {value!r} is not a whole number >= 0")
        if not isinstance(info.config, dict):
            raise TypeError(f"config is a {type(info.config).__name__}, not a mapping")
        _check_encoder_values(info)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{path} has incomplete metadata ({exc!r}); the file is damaged or from another tool") from exc
    except ConfigError as exc:  # worded for a command-line option; here it is the file that is wrong
        raise CheckpointError(f"{path} has invalid metadata ({exc}); the file is damaged or from another tool") from exc
    return info


# No run takes more steps or seconds than these; a larger value is forged (and might print as thousands of digits).
MAX_COUNT = 2**53
MAX_SECONDS = 1e12
CLASSIFIER_WEIGHT, CLASSIFIER_BIAS = "classifier.weight", "classifier.bias"  # a fine-tuned file's extra tensors
# The `extra.task` of files that carry a classifier: fine-tuned (SimCLR §4.2) and distilled (SimCLRv2 §2.3) networks.
CLASSIFIER_TASKS = ("finetune", "distill")


def _check_encoder_values(info: EncoderInfo) -> None:
    """ConfigError naming the first metadata value the commands would trip over: counts past any run, the parts of
    `config` and `extra` they read, and a fine-tuned file's classifier."""
    for name in ("epoch", "step"):
        value = getattr(info, name)
        if value > MAX_COUNT:
            raise ConfigError(f"{name} {value} is not a whole number between 0 and {MAX_COUNT}")
    data = info.config.get("data")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config.data is a {type(data).__name__}, not a mapping")
    source = (data or {}).get("source")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"config.data.source is a {type(source).__name__}, not text")
    augment = info.config.get("augment")
    if augment is not None and not isinstance(augment, dict):
        raise ConfigError(f"config.augment is a {type(augment).__name__}, not a mapping")
    if info.flip_p is not None:
        AugmentConfig(image_size=info.image_size, flip_p=info.flip_p).validate()
    task = info.extra.get("task")
    if task is not None and not isinstance(task, str):
        raise ConfigError(f"extra.task is a {type(task).__name__}, not text")
    if task not in CLASSIFIER_TASKS:
        return
    weight, bias = info.extra_tensors.get(CLASSIFIER_WEIGHT), info.extra_tensors.get(CLASSIFIER_BIAS)
    if weight is None or bias is None or weight.ndim != 2 or tuple(bias.shape) != (weight.shape[0],):
        raise ConfigError(
            f"a {'distilled' if task == 'distill' else 'fine-tuned'} file needs {EXTRA}{CLASSIFIER_WEIGHT} (classes x features) and {EXTRA}{CLASSIFIER_BIAS} (classes)"
        )
    layer = info.extra.get("from_head_layer", 0)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= info.model.head_layers - 1:
        raise ConfigError(
            f"extra.from_head_layer {_shown(layer)} is not a whole number between 0 and {info.model.head_layers - 1}"
        )
    classes = info.extra.get("num_classes", weight.shape[0])
    if isinstance(classes, bool) or classes != weight.shape[0]:
        raise ConfigError(f"extra.num_classes {_shown(classes)} is not the classifier's {weight.shape[0]} classes")


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} is a {type(value).__name__}, not a mapping")
    return dict(value)


def _shown(value: Any) -> str:
    """A value from a file as it may appear in a one-line message: its repr, cut short."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else f"a {type(value).__name__}"
    return text if len(text) <= 40 else f"{text[:37]}..."


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
    extra: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Everything `--resume` needs to continue exactly where this step left off; `extra` is the method's own state."""
    names = {param: name for name, param in model.named_parameters()}
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"{METHOD_STATE}{k}": v for k, v in (extra or {}).items()})
    tensors.update(optimizer_tensors(optimizer, names))
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "epoch": epoch, "elapsed": elapsed, "config": config, "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
    save(path, tensors, kind=TRAIN_STATE, meta=meta)


def load_train_state(
    path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    extra: Mapping[str, torch.Tensor] | None = None, restore_extra: Callable[[dict[str, torch.Tensor]], None] | None = None,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """Restore model, optimiser, scaler and RNG in place; returns the metadata (step, epoch, elapsed, config). The
    method's own state is checked against `extra` (the state it has now) and handed to `restore_extra`.

    Everything is checked before anything is changed: a file refused here leaves model, optimiser, scaler and
    RNG exactly as they were, so `--resume` can fall back to an older checkpoint cleanly. A step past
    `total_steps` (the run's schedule) is refused as damage: no run of that schedule saved it.
    """
    path = Path(path)
    loaded = load(path, kind=TRAIN_STATE)
    meta = loaded.meta
    _check_train_state_meta(meta, path, total_steps=total_steps)
    weights = {k.removeprefix("model/"): v for k, v in loaded.tensors.items() if k.startswith("model/")}
    check_state_dict(model.state_dict(), weights, source=path)
    method_state = {k.removeprefix(METHOD_STATE): v for k, v in loaded.tensors.items() if k.startswith(METHOD_STATE)}
    check_state_dict(dict(extra or {}), method_state, source=path)
    buffers = {k: v for k, v in loaded.tensors.items() if k.startswith("optim/")}
    check_finite({**weights, **buffers, **method_state}, source=path)
    rng = {name: loaded.tensors.get(f"rng/{name}") for name in ("torch", "cuda")}
    _check_rng_state(rng["torch"], torch.get_rng_state(), name="rng/torch", source=path)
    if torch.cuda.is_available():
        _check_rng_state(rng["cuda"], torch.cuda.get_rng_state(), name="rng/cuda", source=path)
    entries = _optimizer_entries(dict(model.named_parameters()), buffers, source=path)
    scaler_state = meta.get("scaler") or {}
    if scaler_state and scaler.is_enabled():
        numbers = isinstance(scaler_state, dict) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1e300  # finite, and float() holds it
            for v in scaler_state.values()
        )
        if not numbers or set(scaler_state) != set(scaler.state_dict()):
            raise CheckpointError(f"{path} has a malformed 'scaler' entry in its metadata; the file is damaged")

    model.load_state_dict(weights, strict=True)
    optimizer.state.clear()
    for param, buffer, value in entries:
        device = param.device if value.ndim > 0 else torch.device("cpu")  # scalar steps stay on CPU as torch keeps them
        optimizer.state[param][buffer] = value.to(device)
    if rng["torch"] is not None:
        torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    if restore_extra is not None:
        restore_extra(method_state)
    return meta


def read_train_state_meta(path: Path, *, total_steps: int | None = None) -> dict[str, Any]:
    """A training state's metadata (step, epoch, elapsed, config), checked as `load_train_state` checks it, from
    the file's header alone: no tensor is read."""
    meta = load(path, kind=TRAIN_STATE, tensors=False).meta
    _check_train_state_meta(meta, Path(path), total_steps=total_steps)
    return meta


def _check_train_state_meta(meta: Mapping[str, Any], path: Path, *, total_steps: int | None) -> None:
    for key in ("step", "epoch"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path} has no valid '{key}' in its metadata; the file is damaged")
    problem = None
    elapsed = meta.get("elapsed", 0.0)
    if total_steps is not None and meta["step"] > total_steps:
        problem = f"step {_shown(meta['step'])} is past the end of this run's schedule ({total_steps} steps)"
    elif isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed <= MAX_SECONDS:
        problem = f"elapsed {_shown(elapsed)} is not a number of seconds >= 0"
    elif not isinstance(meta.get("config", {}), dict):
        problem = f"config is a {type(meta['config']).__name__}, not a mapping"
    if problem is not None:
        raise CheckpointError(f"{path} has invalid metadata: {problem}; the file is damaged")


def _check_rng_state(state: torch.Tensor | None, current: torch.Tensor, *, name: str, source: Path) -> None:
    """An RNG state must be the byte string torch keeps (anything else makes set_rng_state fail half-way)."""
    if state is not None and (state.dtype != current.dtype or state.shape != current.shape):
        raise CheckpointError(
            f"{source} has a malformed {name} ({state.dtype}, shape {tuple(state.shape)}); the file is damaged"
        )
