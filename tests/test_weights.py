"""`--init` weights: every supported layout round-trips from a synthetic file, and anything else is refused.

Sources are our own model's tensors renamed into each layout by code written here from the layouts'
descriptions (not from weights.py's table), or a real torchvision ResNet. torch.save appears only here, to
write plain dicts of tensors (and one malicious pickle) the way other tools would.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from simclr_cli.engine import weights
from simclr_cli.engine.checkpoint import EncoderInfo, save_encoder
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.weights import InitReport, init_encoder, read_state_dict


def tiny(arch: str = "resnet18", *, seed: int = 0, width: float = 0.25, stem: str = "small", **kwargs):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch=arch, width=width, stem=stem, **kwargs))
    with torch.no_grad():  # BN running stats are buffers the init must copy too: make them distinct
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand_like(buffer) + 0.5)
            else:
                buffer.fill_(seed + 7)
    return model


def plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def assert_same_encoder(model, source: dict[str, torch.Tensor]) -> None:
    target = model.encoder.state_dict()
    assert set(target) == set(source)
    for name, tensor in source.items():
        assert torch.equal(target[name], tensor), name


def save_pth(path: Path, obj) -> Path:
    torch.save(obj, path)  # tests only: writing what other tools write
    return path


def save_st(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(plain(tensors), str(path))
    return path


def encoder_file(path: Path, model) -> Path:
    info = EncoderInfo(
        model=model.cfg, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), interpolation="bicubic",
        config={}, epoch=3, step=30, extra_tensors={"classifier.weight": torch.ones(2, model.encoder.out_dim)},
    )
    save_encoder(path, model, info=info)
    return path


# --- simclr encoder files ----------------------------------------------------------------------------


def test_a_simclr_encoder_file_gives_encoder_and_head(tmp_path):
    source = tiny(seed=1)
    path = encoder_file(tmp_path / "encoder.safetensors", source)
    model = tiny(seed=2)
    report = init_encoder(model, path)
    assert_same_encoder(model, plain(source.encoder.state_dict()))
    for name, tensor in source.head.state_dict().items():
        assert torch.equal(model.head.state_dict()[name], tensor), name
    assert report.layout == "simclr (prefixes encoder. stripped)"
    assert report.head_loaded
    assert report.loaded == len(source.state_dict())
    assert report.ignored == ("extra/classifier.weight",)
    assert report.source == path


def test_a_simclr_file_with_another_head_gives_only_the_encoder(tmp_path):
    source = tiny(seed=1, head_layers=3)
    path = encoder_file(tmp_path / "encoder.safetensors", source)
    model = tiny(seed=2, head_layers=2)
    head_before = plain(model.head.state_dict())
    report = init_encoder(model, path)
    assert_same_encoder(model, plain(source.encoder.state_dict()))
    assert not report.head_loaded
    for name, tensor in head_before.items():
        assert torch.equal(model.head.state_dict()[name], tensor), name
    assert set(report.ignored) == {f"head.{k}" for k in source.head.state_dict()} | {"extra/classifier.weight"}


def test_a_simclr_file_of_another_architecture_is_refused_from_its_metadata(tmp_path):
    path = encoder_file(tmp_path / "encoder.safetensors", tiny("resnet34", seed=1))
    model = tiny("resnet18")
    before = plain(model.state_dict())
    with pytest.raises(CheckpointError) as err:
        init_encoder(model, path)
    assert str(err.value) == (
        f"{path} holds another encoder architecture: model.arch is 'resnet34' there, 'resnet18' here. "
        "Set the model to match the file"
    )
    for name, tensor in before.items():  # nothing half-loaded
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_train_state_file_is_not_an_init_file(tmp_path):
    from simclr_cli.engine.checkpoint import save

    path = tmp_path / "state.safetensors"
    save(path, {"model/encoder.conv1.weight": torch.zeros(1)}, kind="train-state", meta={"step": 1})
    with pytest.raises(CheckpointError, match=r"is a training-state checkpoint \(what --resume reads\), not an encoder"):
        init_encoder(tiny(), path)


# --- torchvision / timm names, prefixes and wrappers -------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_real_torchvision_resnet_state_dict(tmp_path, suffix):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18()
    state = plain(tv.state_dict())
    path = tmp_path / f"resnet18{suffix}"
    save_pth(path, state) if suffix == ".pth" else save_st(path, state)
    model = tiny("resnet18", width=1.0, stem="standard")
    report = init_encoder(model, path)
    assert_same_encoder(model, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert report.layout == "torchvision"
    assert report.ignored == ("fc.bias", "fc.weight")
    assert not report.head_loaded
    assert report.loaded == len(model.encoder.state_dict())
    x = torch.randn(2, 3, 64, 64)
    tv.fc = torch.nn.Identity()
    assert torch.allclose(model.encoder.eval()(x), tv.eval()(x), atol=1e-5)  # the same function, not just tensors


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "model.", "encoder.", "module.encoder.", "model.backbone."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    source = plain(tiny("resnet18", seed=1).encoder.state_dict())  # our encoder names are torchvision's
    tensors = {f"{prefix}{k}": v for k, v in source.items()} | {f"{prefix}fc.weight": torch.zeros(3, 128)}
    model = tiny("resnet18", seed=2)
    report = init_encoder(model, save_pth(tmp_path / "ddp.pth", tensors))
    assert_same_encoder(model, source)
    stripped = ", ".join(sorted(set(re.findall(r"\w+\.", prefix))))
    assert report.layout == f"torchvision (prefixes {stripped} stripped)"
    assert report.ignored == (f"{prefix}fc.weight",)


def test_a_ddp_state_dict_of_our_model_gives_its_head(tmp_path):
    source = tiny("resnet18", seed=1)
    tensors = {f"module.{k}": v for k, v in plain(source.state_dict()).items()}
    model = tiny("resnet18", seed=2)
    report = init_encoder(model, save_pth(tmp_path / "ddp.pth", tensors))
    assert report.head_loaded and report.ignored == ()
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("wrapped", "layout", "dropped"),
    [
        (lambda sd: {"state_dict": sd, "epoch": 7, "hparams": {"lr": 0.1}}, "torchvision under 'state_dict'", ("epoch", "hparams")),
        (lambda sd: {"model": sd, "optimizer": {"state": {}}}, "torchvision under 'model'", ("optimizer",)),
        (lambda sd: {"checkpoint": 1, "state_dict": {"model": sd}}, "torchvision under 'state_dict' under 'model'", ("checkpoint",)),
    ],
)
def test_nested_state_dicts_are_unwrapped(tmp_path, wrapped, layout, dropped):
    source = plain(tiny("resnet18", seed=1).encoder.state_dict())
    path = save_pth(tmp_path / "wrapped.ckpt", wrapped(source))
    assert read_state_dict(path).keys() == source.keys()
    model = tiny("resnet18", seed=2)
    report = init_encoder(model, path)
    assert_same_encoder(model, source)
    assert report.layout == layout
    assert report.ignored == dropped


def test_missing_num_batches_tracked_keeps_the_models_counters(tmp_path):
    source = plain(tiny("resnet18", seed=1).encoder.state_dict())
    tensors = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    model = tiny("resnet18", seed=2)
    counters = {k: v.clone() for k, v in model.encoder.state_dict().items() if k.endswith("num_batches_tracked")}
    report = init_encoder(model, save_st(tmp_path / "no_counters.safetensors", tensors))
    assert_same_encoder(model, tensors | counters)
    assert report.loaded == len(tensors)


# --- community conversions of the official SimCLR v2 checkpoints -------------------------------------


def to_simclrv2_names(name: str) -> str:
    """Our (torchvision) name -> Separius/SimCLRv2-Pytorch resnet.py's, from that file's module structure:
    net = [Stem(conv, BatchNormRelu(BN, ReLU), MaxPool), Blocks x4]; a block's net is
    [conv, BNReLU, conv, BNReLU, conv, BNReLU]; its shortcut is projection.shortcut (conv) + projection.bn (BNReLU)."""
    parts = name.split(".")
    if parts[0] == "conv1":
        return "net.0.0." + parts[1]
    if parts[0] == "bn1":
        return "net.0.1.0." + parts[1]
    stage, block, module, rest = parts[0].removeprefix("layer"), parts[1], parts[2], parts[3:]
    head = f"net.{stage}.blocks.{block}"
    if module == "downsample":
        index, attr = rest
        return f"{head}.projection.shortcut.{attr}" if index == "0" else f"{head}.projection.bn.0.{attr}"
    index = int(module[-1]) - 1  # conv1/bn1 -> 0, conv2/bn2 -> 1, conv3/bn3 -> 2
    if module.startswith("conv"):
        return f"{head}.net.{2 * index}.{rest[0]}"
    return f"{head}.net.{2 * index + 1}.0.{rest[0]}"


def test_the_renaming_written_here_matches_the_documented_examples():
    assert to_simclrv2_names("conv1.weight") == "net.0.0.weight"
    assert to_simclrv2_names("bn1.running_var") == "net.0.1.0.running_var"
    assert to_simclrv2_names("layer3.2.conv2.weight") == "net.3.blocks.2.net.2.weight"
    assert to_simclrv2_names("layer3.2.bn3.bias") == "net.3.blocks.2.net.5.0.bias"
    assert to_simclrv2_names("layer1.0.downsample.0.weight") == "net.1.blocks.0.projection.shortcut.weight"
    assert to_simclrv2_names("layer1.0.downsample.1.running_mean") == "net.1.blocks.0.projection.bn.0.running_mean"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_simclrv2_pytorch_conversion(tmp_path, suffix):
    source = plain(tiny("resnet50", seed=1, stem="standard").encoder.state_dict())
    resnet = {to_simclrv2_names(k): v for k, v in source.items()}
    resnet |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    head = {"layers.0.weight": torch.zeros(512, 512), "layers.1.weight": torch.ones(512)}
    if suffix == ".pth":
        path = save_pth(tmp_path / "r50_1x_sk0.pth", {"resnet": resnet, "head": head})
        layout, extra = "simclrv2-converted under 'resnet'", ("head",)
    else:
        path = save_st(tmp_path / "r50_1x_sk0.safetensors", resnet)
        layout, extra = "simclrv2-converted", ()
    model = tiny("resnet50", seed=2, stem="standard")
    report = init_encoder(model, path)
    assert_same_encoder(model, source)
    assert report.layout == layout
    assert report.ignored == ("fc.bias", "fc.weight", *extra)
    assert not report.head_loaded
    assert "unnormalised [0, 1]" in report.note


def test_the_mapping_table_covers_every_bottleneck_name():
    names = tiny("resnet50", stem="standard").encoder.state_dict()
    for name in names:
        assert weights._rename_key(to_simclrv2_names(name), weights.SIMCLRV2_NAMES) == name


def to_simclrv2_sk_names(name: str) -> str:
    """Our SK name -> Separius/SimCLRv2-Pytorch resnet.py's with sk_ratio > 0, from that file's module structure:
    Stem = [conv, BNReLU, conv, BNReLU, conv, BNReLU, MaxPool]; a block's net is [conv, BNReLU, SelectiveKernel,
    conv, BNReLU], SelectiveKernel = main_conv [conv, BNReLU] + mixing_conv [conv, BNReLU, conv]; the shortcut is
    projection.shortcut [ZeroPad2d, AvgPool2d, conv] + projection.bn (BNReLU)."""
    parts = name.split(".")
    stem = {("conv1", "0"): "net.0.0", ("conv1", "1"): "net.0.1.0", ("conv1", "3"): "net.0.2",
            ("conv1", "4"): "net.0.3.0", ("conv1", "6"): "net.0.4"}
    if parts[0] == "conv1":
        return f"{stem[('conv1', parts[1])]}.{parts[2]}"
    if parts[0] == "bn1":
        return "net.0.5.0." + parts[1]
    stage, block, module, rest = parts[0].removeprefix("layer"), parts[1], parts[2], parts[3:]
    head = f"net.{stage}.blocks.{block}"
    if module == "downsample":
        index, attr = rest
        return f"{head}.projection.shortcut.2.{attr}" if index == "1" else f"{head}.projection.bn.0.{attr}"
    if module == "conv2":
        inner = {"conv": "main_conv.0", "bn": "main_conv.1.0", "attn_reduce": "mixing_conv.0",
                 "attn_bn": "mixing_conv.1.0", "attn_expand": "mixing_conv.2"}[rest[0]]
        return f"{head}.net.2.{inner}.{rest[1]}"
    return f"{head}.net." + {"conv1": "0", "bn1": "1.0", "conv3": "3", "bn3": "4.0"}[module] + f".{rest[0]}"


def sk_model(seed: int, sk_ratio: float = 0.0625):
    return tiny("resnet50", seed=seed, stem="standard", sk_ratio=sk_ratio)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_selective_kernel_simclrv2_pytorch_conversion(tmp_path, suffix):
    source = plain(sk_model(seed=1).encoder.state_dict())
    resnet = {to_simclrv2_sk_names(k): v for k, v in source.items()}
    assert "net.1.blocks.0.net.2.mixing_conv.2.weight" in resnet and "net.0.4.weight" in resnet
    resnet |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    if suffix == ".pth":
        path = save_pth(tmp_path / "r50_1x_sk1.pth", {"resnet": resnet, "head": {"layers.0.weight": torch.zeros(2, 2)}})
        layout = "simclrv2-converted sk1 under 'resnet'"
    else:
        path = save_st(tmp_path / "r50_1x_sk1.safetensors", resnet)
        layout = "simclrv2-converted sk1"
    model = sk_model(seed=2)
    report = init_encoder(model, path)
    assert_same_encoder(model, source)
    assert report.layout == layout
    assert "unnormalised [0, 1]" in report.note


def test_the_sk_mapping_table_covers_every_name():
    for name in sk_model(seed=0).encoder.state_dict():
        assert weights._rename_key(to_simclrv2_sk_names(name), weights.SIMCLRV2_SK_NAMES) == name


def test_a_selective_kernel_simclrv2_model_needs_the_official_sk_ratio(tmp_path):
    resnet = {to_simclrv2_sk_names(k): v for k, v in plain(sk_model(seed=1).encoder.state_dict()).items()}
    path = save_pth(tmp_path / "r50_1x_sk1.pth", {"resnet": resnet})
    for sk_ratio in (0.0, 0.125):
        model = sk_model(seed=2, sk_ratio=sk_ratio)
        with pytest.raises(CheckpointError, match=r"selective-kernel \(sk1\) SimCLRv2 model; build the same network with --sk-ratio 0.0625"):
            init_encoder(model, path)


def test_an_sk0_simclrv2_model_is_refused_by_an_sk_network(tmp_path):
    resnet = {to_simclrv2_names(k): v for k, v in plain(tiny("resnet50", seed=1, stem="standard").encoder.state_dict()).items()}
    path = save_pth(tmp_path / "r50_1x_sk0.pth", {"resnet": resnet})
    with pytest.raises(CheckpointError, match=r"without selective kernels \(sk0\); build the same network with --sk-ratio 0"):
        init_encoder(sk_model(seed=2), path)


def test_a_simclr_file_with_another_sk_ratio_is_refused(tmp_path):
    path = encoder_file(tmp_path / "encoder.safetensors", tiny(seed=1, sk_ratio=0.0625))
    with pytest.raises(CheckpointError, match=r"model.sk_ratio is 0.0625 there, 0.0 here"):
        init_encoder(tiny(seed=2), path)


# --- refusals ----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: what a malicious pickled checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_a_pickled_object_is_refused_without_running_it(tmp_path, suffix):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists(), "the payload must really act when unpickled, or this test proves nothing"

    marker = tmp_path / "marker"
    path = tmp_path / f"evil{suffix}"
    torch.save({"x": _Payload(marker), "conv1.weight": torch.zeros(1)}, path)
    assert not marker.exists()
    for call in (lambda: read_state_dict(path), lambda: init_encoder(tiny(), path)):
        with pytest.raises(CheckpointError) as err:
            call()
        assert "refuses to load it: it is not a plain tensor file (weights_only)" in str(err.value)
        assert "convert it to safetensors" in str(err.value)
    assert not marker.exists()


def test_torch_load_failure_is_final(tmp_path, monkeypatch):
    """One weights_only call, no second attempt of any kind."""
    calls = []

    def failing_load(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "load", failing_load)
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="refuses to load it"):
        read_state_dict(path)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def test_weights_is_the_one_audited_torch_load():
    source = Path(weights.__file__).read_text(encoding="utf-8")
    assert source.count("torch.load(") == 1
    assert "torch.load(path, map_location=\"cpu\", weights_only=True)" in source
    for forbidden in ("import pickle", "torch.save(", "weights_only=False", "pickle_module"):
        assert forbidden not in source
    engine = Path(weights.__file__).parent
    others = [p.name for p in engine.glob("*.py") if p.name != "weights.py" and "torch.load(" in p.read_text(encoding="utf-8")]
    assert others == []


def test_a_narrower_source_names_the_mismatched_key(tmp_path):
    source = plain(tiny("resnet18", seed=1, width=0.5, stem="standard").encoder.state_dict())
    path = save_st(tmp_path / "half.safetensors", source)
    model = tiny("resnet18", width=1.0, stem="standard")
    before = plain(model.state_dict())
    with pytest.raises(CheckpointError) as err:
        init_encoder(model, path)
    message = str(err.value)
    assert message.startswith(f"{path} (torchvision layout) does not fit this encoder: ")
    assert "bn1.bias has shape (32,), expected (64,)" in message
    assert "(+" in message  # every tensor differs: the first few, and a count
    for name, tensor in before.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_7x7_stem_into_a_small_stem_model_says_so(tmp_path):
    source = plain(tiny("resnet18", seed=1, stem="standard").encoder.state_dict())
    with pytest.raises(CheckpointError, match=r"conv1.weight has shape \(16, 3, 7, 7\), expected \(16, 3, 3, 3\) \(a 7x7 stem: set model.stem to match\)"):
        init_encoder(tiny("resnet18", stem="small"), save_st(tmp_path / "s.safetensors", source))


def test_a_deeper_resnet_is_not_silently_truncated(tmp_path):
    source = plain(tiny("resnet34", seed=1).encoder.state_dict())  # every resnet18 key exists, same shapes
    with pytest.raises(CheckpointError) as err:
        init_encoder(tiny("resnet18"), save_st(tmp_path / "r34.safetensors", source))
    assert "unexpected layer1.2.bn1.bias, layer1.2.bn1.num_batches_tracked, layer1.2.bn1.running_mean (+" in str(err.value)
    assert "a deeper or different ResNet?" in str(err.value)


def test_missing_keys_are_named_with_the_layout(tmp_path):
    source = plain(tiny("resnet18", seed=1).encoder.state_dict())
    del source["layer4.1.conv2.weight"]
    path = save_pth(tmp_path / "m.pth", {"state_dict": {f"module.{k}": v for k, v in source.items()}})
    with pytest.raises(CheckpointError) as err:
        init_encoder(tiny("resnet18"), path)
    assert str(err.value) == (
        f"{path} (torchvision under 'state_dict' (prefixes module. stripped) layout) does not fit this encoder: "
        "missing layer4.1.conv2.weight"
    )


def test_an_unknown_layout_is_refused_naming_missing_keys(tmp_path):
    path = save_st(tmp_path / "vit.safetensors", {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"\(torchvision layout\) does not fit this encoder: missing bn1.bias, bn1.running_mean, bn1.running_var \(\+\d+ more\)"):
        init_encoder(tiny(), path)


def test_keys_that_collide_after_stripping_are_ambiguous(tmp_path):
    path = save_st(tmp_path / "a.safetensors", {"conv1.weight": torch.zeros(1), "module.conv1.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match="is ambiguous: several keys become 'conv1.weight'"):
        init_encoder(tiny(), path)


@pytest.mark.parametrize("name", ["weights.npz", "weights", "model.ckpt-250228", "weights.PTH.gz"])
def test_unknown_extensions_are_refused_listing_the_accepted_ones(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert "--init reads .safetensors, .pt, .pth, .bin, .ckpt files" in str(err.value)


def test_upper_case_extensions_are_accepted(tmp_path):
    source = plain(tiny("resnet18", seed=1).encoder.state_dict())
    assert read_state_dict(save_pth(tmp_path / "W.PTH", source)).keys() == source.keys()


def test_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        init_encoder(tiny(), tmp_path / "nope.safetensors")


def test_a_damaged_safetensors_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"garbage!" * 4)
    with pytest.raises(CheckpointError, match="is not a safetensors file: it is a text file"):
        init_encoder(tiny(), path)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"conv1.weight": torch.zeros(1), "step": 3}, r"step \(int\) are not tensors"),
        ({}, "it is empty"),
        ({"student": {"a": torch.zeros(1)}}, r"none of the keys state_dict, model, resnet holding one"),
        ([torch.zeros(1)], "holds a list, not a state dict of tensors"),
        (torch.zeros(1), "holds a Tensor, not a state dict of tensors"),
    ],
)
def test_anything_but_a_dict_of_tensors_is_refused(tmp_path, obj, match):
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(save_pth(tmp_path / "x.pt", obj))


def test_the_report_serialises(tmp_path):
    source = plain(tiny("resnet18", seed=1).encoder.state_dict())
    report = init_encoder(tiny("resnet18"), save_st(tmp_path / "w.safetensors", source | {"fc.bias": torch.zeros(2)}))
    assert isinstance(report, InitReport)
    assert json.loads(json.dumps(report.to_dict())) == {
        "layout": "torchvision",
        "source": str(tmp_path / "w.safetensors"),
        "loaded": len(source),
        "ignored": ["fc.bias"],
        "head_loaded": False,
        "note": "",
    }
    with pytest.raises(AttributeError):
        report.loaded = 0  # frozen
