"""Export: torchvision state dicts that load into torchvision's ResNets, bare encoders with metadata, ONNX."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file

from simclr_cli.engine.tasks import export as export_module
from simclr_cli.engine.checkpoint import EncoderInfo, load, save_encoder
from simclr_cli.engine.errors import CheckpointError, ConfigError
from simclr_cli.engine.tasks.export import TARGETS, default_out, export
from simclr_cli.engine.model import ModelConfig, ResNet, build_model

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def perturb(model: torch.nn.Module) -> None:
    """Move BN affine parameters and running statistics off their init, so identical outputs mean identical weights."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")):
                tensor.normal_(0.0, 0.1)
            elif tensor.ndim == 1:  # BN gamma, zero-initialised on the residual branches
                tensor.uniform_(0.5, 1.5)


def saved_encoder(
    folder: Path,
    *,
    arch: str = "resnet18",
    width: float = 1.0,
    stem: str = "standard",
    sk_ratio: float = 0.0,
    image_size: int = 32,
    extra: dict | None = None,
    extra_tensors: dict | None = None,
    name: str = "encoder.safetensors",
):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, width=width, stem=stem, proj_dim=16, sk_ratio=sk_ratio)
    model = build_model(cfg)
    perturb(model)
    info = EncoderInfo(
        model=cfg, image_size=image_size, mean=MEAN, std=STD, interpolation="bilinear",
        config={"train": {"epochs": 2}}, epoch=2, step=30, extra=extra or {}, extra_tensors=extra_tensors or {},
    )
    path = folder / name
    save_encoder(path, model, info=info)
    return path, model.eval()


# --- torchvision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_round_trip(tmp_path, arch):
    path, model = saved_encoder(tmp_path, arch=arch)
    out = tmp_path / "tv.safetensors"
    result = export(path, to="torchvision", out=out)

    state = load_file(str(out))
    tv = getattr(torchvision.models, arch)()
    loaded = tv.load_state_dict(state, strict=False)
    assert sorted(loaded.missing_keys) == ["fc.bias", "fc.weight"]
    assert loaded.unexpected_keys == []
    ours = model.encoder.state_dict()
    assert state.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(state[name], tensor), name

    tv.fc = torch.nn.Identity()
    tv.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h_tv, h_ours = tv(x), model.encoder(x)
    assert h_tv.shape == (2, model.encoder.out_dim)
    assert torch.equal(h_tv, h_ours)  # the same weights through the same ops

    assert result.missing_keys == ("fc.weight", "fc.bias")
    assert result.tensors == len(ours)
    assert result.parameters == sum(p.numel() for p in model.encoder.parameters())
    assert result.bytes == out.stat().st_size
    assert result.feature_dim == model.encoder.out_dim
    assert json.loads(json.dumps(result.to_dict()))["out"] == str(out)


@pytest.mark.parametrize(
    ("width", "stem", "sk_ratio", "why"),
    [(0.25, "standard", 0.0, r"width 0\.25 \(torchvision's ResNets are width 1"), (1.0, "small", 0.0, "the small stem"),
     (1.0, "standard", 0.0625, r"selective kernels \(sk_ratio 0\.0625; torchvision's ResNets have none\)")],
)
def test_torchvision_refuses_what_torchvision_cannot_hold(tmp_path, width, stem, sk_ratio, why):
    path, _ = saved_encoder(tmp_path, width=width, stem=stem, sk_ratio=sk_ratio)
    out = tmp_path / "tv.safetensors"
    with pytest.raises(ConfigError, match=f"cannot be exported --to torchvision: it has {why}.*use --to safetensors-encoder"):
        export(path, to="torchvision", out=out)
    assert not out.exists()


def test_torchvision_with_a_fine_tuned_classifier_as_fc(tmp_path):
    weight, bias = torch.randn(3, 512), torch.randn(3)
    path, model = saved_encoder(
        tmp_path, extra={"task": "finetune", "from_head_layer": 0, "num_classes": 3},
        extra_tensors={"classifier.weight": weight, "classifier.bias": bias}, name="finetuned.safetensors",
    )
    out = tmp_path / "tv.safetensors"
    result = export(path, to="torchvision", out=out, include_fc=True)
    tv = torchvision.models.resnet18(num_classes=3)
    tv.load_state_dict(load_file(str(out)), strict=True)
    tv.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), model.encoder(x) @ weight.T + bias, rtol=1e-5, atol=1e-5)
    assert result.missing_keys == ()
    assert "num_classes=3" in result.usage


def test_include_fc_needs_a_classifier_on_h(tmp_path):
    path, _ = saved_encoder(tmp_path)
    with pytest.raises(ConfigError, match="--include-fc needs a fine-tuned checkpoint"):
        export(path, to="torchvision", out=tmp_path / "a.safetensors", include_fc=True)
    path, _ = saved_encoder(
        tmp_path, extra={"task": "finetune", "from_head_layer": 1},
        extra_tensors={"classifier.weight": torch.zeros(3, 512), "classifier.bias": torch.zeros(3)}, name="ft.safetensors",
    )
    with pytest.raises(ConfigError, match="reads projection-head layer 1, not h"):
        export(path, to="torchvision", out=tmp_path / "b.safetensors", include_fc=True)
    with pytest.raises(ConfigError, match="--include-fc only applies to --to torchvision"):
        export(path, to="safetensors-encoder", out=tmp_path / "c.safetensors", include_fc=True)


# --- safetensors-encoder ----------------------------------------------------------------------------


def test_safetensors_encoder_any_variant_with_metadata(tmp_path):
    path, model = saved_encoder(tmp_path, width=0.25, stem="small", image_size=16)
    out = tmp_path / "bare.safetensors"
    result = export(path, to="safetensors-encoder", out=out)

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata == {
        "exported_by": "simclr-cli", "source": "encoder.safetensors", "architecture": "resnet18", "width": "0.25",
        "stem": "small", "sk_ratio": "0", "feature_dim": "128", "image_size": "16", "mean": "[0.5, 0.4, 0.3]",
        "std": "[0.2, 0.25, 0.3]", "interpolation": "bilinear", "epoch": "2", "step": "30",
        "preprocessing": "RGB images, resize to 16 x 16 (bilinear); scale pixels to [0, 1], then per channel (R, G, B) "
                         "subtract mean [0.5, 0.4, 0.3] and divide by std [0.2, 0.25, 0.3]; input float32 (B, 3, 16, 16), "
                         "channels first",
    }
    assert result.metadata == metadata
    assert json.loads(metadata["mean"]) == list(MEAN)

    state = load_file(str(out))
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(state[name], tensor), name
    net = ResNet(arch="resnet18", width=0.25, stem="small")
    net.load_state_dict(state, strict=True)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), model.encoder(x))
    # not a simclr checkpoint: the tool's own loaders refuse it rather than misread it
    with pytest.raises(CheckpointError, match="not a simclr checkpoint"):
        load(out, kind="encoder")


def test_safetensors_encoder_of_a_selective_kernel_encoder_rebuilds_it(tmp_path):
    path, model = saved_encoder(tmp_path, arch="resnet50", width=0.25, stem="standard", sk_ratio=0.0625, image_size=40)
    out = tmp_path / "bare.safetensors"
    result = export(path, to="safetensors-encoder", out=out)
    assert result.metadata["sk_ratio"] == "0.0625"
    assert "sk_ratio=0.0625)" in result.usage
    net = ResNet(arch="resnet50", width=0.25, stem="standard", sk_ratio=0.0625)
    net.load_state_dict(load_file(str(out)), strict=True)
    net.eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(net(x), model.encoder(x))


# --- onnx ---------------------------------------------------------------------------------------------


def test_onnx_without_the_onnx_package_says_how_to_install_it(tmp_path, monkeypatch):
    path, _ = saved_encoder(tmp_path, width=0.25, stem="small", image_size=16)
    monkeypatch.setattr(export_module, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"install onnx \(pip install onnx\)"):
        export(path, to="onnx", out=tmp_path / "f.onnx")
    assert not (tmp_path / "f.onnx").exists()


def test_onnx_export_has_a_dynamic_batch_axis(tmp_path):
    onnx = pytest.importorskip("onnx")
    path, model = saved_encoder(tmp_path, width=0.25, stem="small", image_size=16)
    out = tmp_path / "f.onnx"
    result = export(path, to="onnx", out=out)
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # symbolic, not fixed to the example's 2
    assert {p.key: p.value for p in graph.metadata_props}["architecture"] == "resnet18"
    assert result.bytes == out.stat().st_size
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(3, 3, 16, 16)
    (h,) = ort.InferenceSession(str(out)).run(["h"], {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(h), model.encoder(x), rtol=1e-4, atol=1e-4)


def test_onnx_through_the_cli_names_the_file_counts_its_tensors_and_states_the_preprocessing(tmp_path):
    onnx = pytest.importorskip("onnx")
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    path, _ = saved_encoder(tmp_path, width=0.25, stem="small", image_size=16)
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--to", "onnx"])  # the run folder stands for its encoder
    assert result.exit_code == 0, result.output
    out = tmp_path / "encoder.onnx"
    initializers = len(onnx.load(str(out)).graph.initializer)
    said = " ".join(result.output.split())
    assert "[torch.onnx]" not in result.output  # the exporter's narration stays out of the summary
    assert initializers > 0 and re.search(rf"│ tensors │ {initializers} │", said)
    preprocessing = ("RGB images, resize to 16 x 16 (bilinear); scale pixels to [0, 1], then per channel (R, G, B) subtract "
                     "mean [0.5, 0.4, 0.3] and divide by std [0.2, 0.25, 0.3]; input float32 (B, 3, 16, 16), channels first")
    assert f"preprocess images: {preprocessing}" in said
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["preprocessing"] == preprocessing
    info = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert json.loads(info.stdout)["preprocessing"] == preprocessing


def test_the_preprocessing_of_large_images_is_resize_then_centre_crop():
    from simclr_cli.engine.augment import describe_eval_transform

    assert describe_eval_transform(image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                   interpolation="bicubic") == (
        "RGB images, resize the short side to 256 (bicubic), centre-crop 224 x 224; scale pixels to [0, 1], then per "
        "channel (R, G, B) subtract mean [0.485, 0.456, 0.406] and divide by std [0.229, 0.224, 0.225]; input float32 "
        "(B, 3, 224, 224), channels first"
    )


def test_onnx_export_of_a_selective_kernel_encoder(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path, model = saved_encoder(tmp_path, arch="resnet50", width=0.25, stem="standard", sk_ratio=0.0625, image_size=40)
    out = tmp_path / "sk.onnx"
    export(path, to="onnx", out=out)
    x = torch.randn(3, 3, 40, 40)
    (h,) = ort.InferenceSession(str(out)).run(["h"], {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(h), model.encoder(x), rtol=1e-4, atol=1e-4)


# --- refusals -----------------------------------------------------------------------------------------


def test_refuses_to_overwrite_unless_asked(tmp_path):
    path, _ = saved_encoder(tmp_path, width=0.25, stem="small", image_size=16)
    out = tmp_path / "bare.safetensors"
    out.write_text("keep me")
    with pytest.raises(ConfigError) as err:
        export(path, to="safetensors-encoder", out=out)
    assert str(err.value) == f"{out} already exists; pass --overwrite to replace it, or choose another --out"
    assert out.read_text() == "keep me"
    export(path, to="safetensors-encoder", out=out, overwrite=True)
    assert load_file(str(out)).keys() and sorted(p.name for p in tmp_path.iterdir()) == ["bare.safetensors", "encoder.safetensors"]


def test_refuses_to_replace_the_checkpoint_itself(tmp_path):
    path, _ = saved_encoder(tmp_path, width=0.25, stem="small", image_size=16)
    with pytest.raises(ConfigError, match="is the checkpoint being exported"):
        export(path, to="safetensors-encoder", out=path, overwrite=True)


def test_unknown_target_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError) as err:
        export(tmp_path / "encoder.safetensors", to="tflite", out=tmp_path / "x")
    assert str(err.value) == "--to 'tflite' is not a known export target; choose one of torchvision, safetensors-encoder, onnx"
    assert TARGETS == ("torchvision", "safetensors-encoder", "onnx")


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "nope.safetensors", to="torchvision", out=tmp_path / "x.safetensors")


def test_default_out_sits_beside_the_checkpoint():
    assert default_out(Path("runs/a/encoder.safetensors"), to="torchvision") == Path("runs/a/encoder-torchvision.safetensors")
    assert default_out(Path("runs/a/encoder.safetensors"), to="onnx") == Path("runs/a/encoder.onnx")  # the suffix says it
