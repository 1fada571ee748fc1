"""Initial weights for `--init`: a ResNet encoder from another simclr checkpoint, a torchvision/timm state
dict or a community conversion of the official SimCLR v1/v2 TensorFlow checkpoints. Weights only: unlike
`--resume`, no optimiser state, step or RNG comes along.

Layouts, detected from the file (names after the wrapper prefixes below are stripped):
- `simclr`: an encoder file written by simclr (`checkpoint.save_encoder`); its metadata must give the same
  arch, width and stem. Its projection head is loaded too when head_layers and proj_dim match. (Any other
  source holding our own head names, e.g. a DDP state dict of a SimCLR model, also gives its head when every
  head tensor is there with the right shape; otherwise the head keeps its fresh init.)
- `torchvision`: torchvision `resnetXX().state_dict()` names (conv1, bn1, layer1.0.conv1, ...,
  downsample.0/.1, fc). timm's plain ResNets (resnet18/34/50/101/152 and their `.a1_in1k`-style
  weights) use the very same names, so they load through this layout too; timm's deep-stem and
  avg-down variants (resnet50d, ...: conv1.0, downsample.2) do not fit and are refused as missing keys.
  SimCLR v1 conversions by tonylins/simclr-converter are this layout under a "state_dict" key
  (a torchvision-named ResNet-50 1x/2x/4x, stem scaled with the width like ours).
- `simclrv2-converted`: Separius/SimCLRv2-Pytorch's convert.py writes {"resnet": ..., "head": ...}; the
  "resnet" dict names its modules net.0 (stem: net.0.0 conv, net.0.1.0 BN) and net.1..4 (stages:
  net.S.blocks.B.net.{0,2,4} convs, .net.{1,3,5}.0 BNs, .projection.shortcut / .projection.bn.0 for the
  shortcut); `SIMCLRV2_NAMES` maps these onto ours. Its selective-kernel models (`*_sk1`: a ResNet-D stem
  net.0.{0,2,4} convs, SK convs net.S.blocks.B.net.2.main_conv / .mixing_conv, average-pool shortcuts
  .projection.shortcut.2) map through `SIMCLRV2_SK_NAMES` onto a model with sk_ratio 0.0625 (the ratio they were
  trained with). Its contrastive "head" entry is not loaded (the head keeps its fresh init). The official
  models were trained on unnormalised [0, 1] pixels (both v1 and v2): see InitReport.note.
Wrapper prefixes stripped from every key, repeatedly: `WRAPPER_PREFIXES` ("module." from DDP, "model.",
"backbone.", "encoder."). Keys outside the ResNet namespace (fc.*, a projection head, extra/*) are ignored
and listed in the report; BN `num_batches_tracked` counters may be absent (they keep the model's value).
Not supported: TensorFlow checkpoints themselves (convert them first), ResNet variants
whose modules differ from torchvision's (ResNet-D without SK, SE/ECA blocks, ResNeXt groups change shapes).

Files are read through safetensors, or for .pt/.pth/.bin/.ckpt through `_load_torch_file`, the one place in
this project that calls `torch.load`, with `weights_only=True`: anything that is not a plain container of
tensors is refused, never retried another way (the project's no-pickle rule).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from simclr_cli.engine import checkpoint, rundir
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.model import SimCLR

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Tried in this order when the loaded object is not itself a flat dict of tensors: Lightning / simclr-converter
# ("state_dict"), many training scripts ("model"), SimCLRv2-Pytorch ("resnet").
WRAPPER_KEYS = ("state_dict", "model", "resnet")
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
ENCODER_NAMESPACE = re.compile(r"^(conv1|bn1|layer\d+)\.")  # a key here that the encoder lacks is an error
HEAD_PREFIX = "head."

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# Separius/SimCLRv2-Pytorch resnet.py (sk0) -> torchvision names; net.S for S in 1..4 is layerS.
SIMCLRV2_NAMES: dict[str, str] = {
    r"^net\.0\.0\.weight$": r"conv1.weight",
    rf"^net\.0\.1\.0\.{_BN}$": r"bn1.\1",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.0\.weight$": r"layer\1.\2.conv1.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.net\.1\.0\.{_BN}$": r"layer\1.\2.bn1.\3",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.2\.weight$": r"layer\1.\2.conv2.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.net\.3\.0\.{_BN}$": r"layer\1.\2.bn2.\3",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.4\.weight$": r"layer\1.\2.conv3.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.net\.5\.0\.{_BN}$": r"layer\1.\2.bn3.\3",
    r"^net\.([1-4])\.blocks\.(\d+)\.projection\.shortcut\.weight$": r"layer\1.\2.downsample.0.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.projection\.bn\.0\.{_BN}$": r"layer\1.\2.downsample.1.\3",
}
# Separius/SimCLRv2-Pytorch resnet.py with sk_ratio > 0 (its `*_sk1` files) -> our SK names (timm's ResNet-D layout).
SIMCLRV2_SK_NAMES: dict[str, str] = {
    r"^net\.0\.0\.weight$": r"conv1.0.weight",
    rf"^net\.0\.1\.0\.{_BN}$": r"conv1.1.\1",
    r"^net\.0\.2\.weight$": r"conv1.3.weight",
    rf"^net\.0\.3\.0\.{_BN}$": r"conv1.4.\1",
    r"^net\.0\.4\.weight$": r"conv1.6.weight",
    rf"^net\.0\.5\.0\.{_BN}$": r"bn1.\1",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.0\.weight$": r"layer\1.\2.conv1.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.net\.1\.0\.{_BN}$": r"layer\1.\2.bn1.\3",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.2\.main_conv\.0\.weight$": r"layer\1.\2.conv2.conv.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.net\.2\.main_conv\.1\.0\.{_BN}$": r"layer\1.\2.conv2.bn.\3",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.2\.mixing_conv\.0\.weight$": r"layer\1.\2.conv2.attn_reduce.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.net\.2\.mixing_conv\.1\.0\.{_BN}$": r"layer\1.\2.conv2.attn_bn.\3",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.2\.mixing_conv\.2\.weight$": r"layer\1.\2.conv2.attn_expand.weight",
    r"^net\.([1-4])\.blocks\.(\d+)\.net\.3\.weight$": r"layer\1.\2.conv3.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.net\.4\.0\.{_BN}$": r"layer\1.\2.bn3.\3",
    r"^net\.([1-4])\.blocks\.(\d+)\.projection\.shortcut\.2\.weight$": r"layer\1.\2.downsample.1.weight",
    rf"^net\.([1-4])\.blocks\.(\d+)\.projection\.bn\.0\.{_BN}$": r"layer\1.\2.downsample.2.\3",
}
SIMCLRV2_SK_RATIO = 0.0625  # every official SK model (SimCLRv2 §2; the converter's name_to_params)
_SIMCLRV2_MARKER = re.compile(r"^net\.[0-4]\.(\d+\.|blocks\.)")
_SELECTIVE_KERNEL_MARKER = re.compile(r"\.(main_conv|mixing_conv)\.")
UNNORMALISED_NOTE = (
    "the official SimCLR models were trained on unnormalised [0, 1] pixels: use mean 0,0,0 and std 1,1,1"
)


@dataclass(frozen=True)
class InitReport:
    """What `init_encoder` loaded, from where, and what it left out."""

    layout: str  # simclr | torchvision | simclrv2-converted, plus what was unwrapped/stripped
    source: Path
    loaded: int  # tensors copied into the model (encoder, plus head when head_loaded)
    ignored: tuple[str, ...]  # source keys not used (fc.*, a head that does not fit, extra/*), as in the file
    head_loaded: bool
    note: str = ""  # advice on using these weights (e.g. their input normalisation)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["source"] = str(self.source)
        out["ignored"] = list(self.ignored)
        return out


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat {name: tensor} from a .safetensors file or a plain-tensor .pt/.pth/.bin/.ckpt file, with one
    {"state_dict" | "model" | "resnet": ...} wrapper level (or several) unwrapped; CheckpointError otherwise."""
    return _read(Path(path))[0]


def _read(path: Path, *, role: str = "--init") -> tuple[dict[str, Tensor], tuple[str, ...], tuple[str, ...]]:
    """The tensors, the wrapper keys unwrapped to reach them (outermost first) and the entries left beside them;
    `role` names what the file was given as, in the messages."""
    if not path.is_file():
        raise CheckpointError(f"{role} file {path} does not exist; pass a .safetensors or .pth file of ResNet weights")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        _, tensors = checkpoint.read_safetensors(path, fix="pass a .safetensors or .pth file of ResNet weights")
        return tensors, (), ()
    if suffix in TORCH_SUFFIXES:
        return _unwrap(_load_torch_file(path), path)
    accepted = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise CheckpointError(
        f"{path} has an unsupported extension {path.suffix or '(none)'!r}; {role} reads {accepted} files "
        "(TensorFlow checkpoints must be converted to PyTorch first)"
    )


def _load_torch_file(path: Path) -> object:
    """THE audited torch.load: tensors and plain containers only (weights_only=True); refusal, never a fallback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, ...: whatever the cause, the file is not loaded
        raise CheckpointError(
            f"{path}: simclr refuses to load it: it is not a plain tensor file (weights_only) ({type(exc).__name__}); "
            "convert it to safetensors (safetensors.torch.save_file) where it was made, and pass that file"
        ) from exc


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], tuple[str, ...], tuple[str, ...]]:
    trail: list[str] = []
    dropped: list[str] = []  # e.g. "head", "optimizer", "epoch" beside the state dict
    while isinstance(obj, Mapping):
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return {str(k): v.detach() for k, v in obj.items()}, tuple(trail), tuple(dropped)
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not torch.is_tensor(v)]
            raise CheckpointError(
                f"{path} is not a state dict: {checkpoint.few(bad) or 'it is empty'} are not tensors, and it has none of "
                f"the keys {', '.join(WRAPPER_KEYS)} holding one"
            )
        trail.append(wrapper)
        dropped += [".".join([*trail[:-1], str(k)]) for k in obj if k != wrapper]
        obj = obj[wrapper]
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")


def init_encoder(model: SimCLR, path: Path) -> InitReport:
    """Copy the encoder weights of `path` into `model` in place (and its head from a matching simclr file).

    Every encoder tensor must be filled with the right shape, else CheckpointError naming the keys and layout.
    A run folder stands for its encoder.safetensors.
    """
    path = rundir.encoder_file(path)
    note = ""
    if _is_simclr_file(path):
        loaded = checkpoint.load(path, kind=checkpoint.ENCODER)
        _check_architecture(model, loaded.meta, path)
        tensors, layout, trail, dropped = loaded.tensors, "simclr", (), ()
        source_head = loaded.meta.get("model", {})
        head_fits = (source_head.get("head_layers"), source_head.get("proj_dim")) == (
            model.cfg.head_layers, model.cfg.proj_dim
        )
    else:
        tensors, trail, dropped = _read(path)
        layout, head_fits = "torchvision", True
    names, stripped = _map_names(tensors, table=None)
    if layout == "torchvision" and any(_SIMCLRV2_MARKER.match(k) for k in names.values()):
        selective = any(_SELECTIVE_KERNEL_MARKER.search(k) for k in names.values())
        _check_sk_ratio(model, selective=selective, path=path)
        layout, note = "simclrv2-converted" + (" sk1" if selective else ""), UNNORMALISED_NOTE
        names, stripped = _map_names(tensors, table=SIMCLRV2_SK_NAMES if selective else SIMCLRV2_NAMES)
    renamed = _renamed(tensors, names, path)
    described = _described(layout, trail, stripped)

    encoder_state = _fill(model.encoder.state_dict(), renamed, source=path, layout=described)
    head_state = None
    if head_fits:
        head = {k.removeprefix(HEAD_PREFIX): v for k, v in renamed.items() if k.startswith(HEAD_PREFIX)}
        head_state = _exact(model.head.state_dict(), head)
    # nothing is copied until every tensor that would be is known to be finite: a failed init leaves `model` as it was
    used_tensors = {k: v for k, v in encoder_state.items() if k in renamed}
    checkpoint.check_finite(used_tensors | {HEAD_PREFIX + k: v for k, v in (head_state or {}).items()}, source=path)
    model.encoder.load_state_dict(encoder_state, strict=True)
    if head_state is not None:
        model.head.load_state_dict(head_state, strict=True)
    used = {k for k in encoder_state if k in renamed} | {HEAD_PREFIX + k for k in head_state or {}}
    return InitReport(
        layout=described,
        source=path,
        loaded=len(used),
        ignored=tuple(sorted(original for original, name in names.items() if name not in used)) + dropped,
        head_loaded=head_state is not None,
        note=note,
    )


def load_resnet(model: SimCLR, path: Path, *, named: str) -> int:
    """Copy a torchvision/timm ResNet state dict (the `torchvision` layout above, fc and other foreign keys ignored)
    into `model.encoder` in place; the count of tensors copied. `named` is what the user called the file (e.g.
    `torchvision:resnet18`): CheckpointError messages name it with the missing, unexpected or misshapen keys.
    A simclr file is refused: it describes itself and is opened as it is."""
    path = Path(path).expanduser()
    if _is_simclr_file(path):
        raise CheckpointError(f"{path} is a simclr encoder file, not a {named} state dict; pass it without '{named}='")
    tensors, trail, _ = _read(path, role=named)
    names, stripped = _map_names(tensors, table=None)
    described = _described("torchvision", trail, stripped)
    state = _fill(model.encoder.state_dict(), _renamed(tensors, names, path), source=path, layout=described, target=named)
    checkpoint.check_finite(state, source=path)
    model.encoder.load_state_dict(state, strict=True)
    return len(set(names.values()) & set(state))


def _described(layout: str, trail: tuple[str, ...], stripped: set[str]) -> str:
    """A layout as reports name it, with the wrappers unwrapped and the prefixes stripped to reach it."""
    return layout + "".join(f" under '{k}'" for k in trail) + (
        f" (prefixes {', '.join(sorted(stripped))} stripped)" if stripped else ""
    )


def _is_simclr_file(path: Path) -> bool:
    """A safetensors file carrying simclr's format header (then `checkpoint.load` checks kind and version)."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("format") == checkpoint.FORMAT
    except (SafetensorError, OSError, ValueError):
        return False  # `_read` reports the damage


def _check_sk_ratio(model: SimCLR, *, selective: bool, path: Path) -> None:
    """A converted SimCLRv2 file fits only the same kind of network: sk1 files need sk_ratio 0.0625, sk0 files 0."""
    if selective and model.cfg.sk_ratio != SIMCLRV2_SK_RATIO:
        raise CheckpointError(
            f"{path} is a selective-kernel (sk1) SimCLRv2 model; build the same network with --sk-ratio "
            f"{SIMCLRV2_SK_RATIO} (model.sk_ratio), not {model.cfg.sk_ratio:g}"
        )
    if not selective and model.cfg.sk_ratio > 0:
        raise CheckpointError(
            f"{path} is a SimCLRv2 model without selective kernels (sk0); build the same network with --sk-ratio 0"
        )


_ABSENT = {"sk_ratio": 0.0}  # files written before selective kernels existed have none


def _check_architecture(model: SimCLR, meta: Mapping[str, Any], path: Path) -> None:
    source = meta.get("model")
    if not isinstance(source, Mapping):
        raise CheckpointError(f"{path} has no model metadata; the file is damaged")
    differ = [
        f"model.{name} is {source.get(name, _ABSENT.get(name))!r} there, {getattr(model.cfg, name)!r} here"
        for name in ("arch", "width", "stem", "sk_ratio")
        if source.get(name, _ABSENT.get(name)) != getattr(model.cfg, name)
    ]
    if differ:
        raise CheckpointError(
            f"{path} holds another encoder architecture: {'; '.join(differ)}. Set the model to match the file"
        )


def _map_names(tensors: Mapping[str, Tensor], *, table: Mapping[str, str] | None) -> tuple[dict[str, str], set[str]]:
    """Each source key -> its model name: WRAPPER_PREFIXES removed from the front (repeatedly), then renamed by
    `table` (SIMCLRV2_NAMES or SIMCLRV2_SK_NAMES for SimCLRv2 conversions); also the set of prefixes removed."""
    names: dict[str, str] = {}
    stripped: set[str] = set()
    for key in tensors:
        name, again = key, True
        while again:
            prefix = next((p for p in WRAPPER_PREFIXES if name.startswith(p)), None)
            again = prefix is not None
            if prefix is not None:
                name = name.removeprefix(prefix)
                stripped.add(prefix)
        names[key] = _rename_key(name, table) if table is not None else name
    return names, stripped


def _rename_key(key: str, table: Mapping[str, str]) -> str:
    for pattern, replacement in table.items():
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key  # outside the table: fc.*, or unknown names the strict fill reports


def _renamed(tensors: Mapping[str, Tensor], names: Mapping[str, str], path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if names[key] in out:
            raise CheckpointError(
                f"{path} is ambiguous: several keys become '{names[key]}' once the prefixes "
                f"{', '.join(WRAPPER_PREFIXES)} are removed"
            )
        out[names[key]] = value
    return out


def _fill(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], *, source: Path, layout: str,
          target: str = "this encoder") -> dict[str, Tensor]:
    """The encoder's state dict taken from `found`; CheckpointError naming missing, extra or misshapen keys."""
    problems = checkpoint.state_dict_problems(
        expected, found,
        optional=lambda key: key.endswith("num_batches_tracked"),  # absent in some exports; harmless
        foreign=lambda key: bool(ENCODER_NAMESPACE.match(key)),  # the rest of a file (a classifier, a head) is not ours
        cast_ok=_same_kind, unexpected_note=" (a deeper or different ResNet?)", shape_hint=_stem_hint,
    )
    if problems:
        raise CheckpointError(
            f"{source} ({layout} layout) does not fit {target}: {'; '.join(problems[:4])}"
            + (f" (+{len(problems) - 4} more problems)" if len(problems) > 4 else "")
        )
    return {k: found[k] if k in found else expected[k] for k in expected}


def _stem_hint(name: str, want: Tensor, got: Tensor) -> str:
    if name == "conv1.weight" and want.ndim == got.ndim == 4 and want.shape[2:] != got.shape[2:]:
        return f" (a {got.shape[2]}x{got.shape[3]} stem: set model.stem to match)"
    return ""


def _exact(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """`found` when it has exactly the keys and shapes of `expected` (in dtypes that cast harmlessly), else None."""
    if set(expected) != set(found) or any(expected[k].shape != found[k].shape or not _same_kind(expected[k], found[k]) for k in expected):
        return None
    return dict(found)


def _same_kind(want: Tensor, got: Tensor) -> bool:
    """Whether loading `got` into `want` is a harmless cast: fp16/bf16/fp64 weights into fp32, or a BN counter saved
    as a float; integers, bools or complex numbers where real-valued weights belong are damage."""
    if got.is_complex() or got.dtype == torch.bool:
        return False
    return got.is_floating_point() or not want.is_floating_point()
