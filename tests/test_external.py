"""External encoders (`torchvision:resnet18=PATH`): the same features as torchvision's own model, through the CLI."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import external, features
from simclr_cli.engine.errors import ConfigError
from test_cli_eval import labelled  # noqa: F401  (a fixture: three colour classes in train/ and val/)

runner = CliRunner()
COMMON = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def torchvision_resnet18() -> torch.nn.Module:
    """torchvision's resnet18 without fc, in eval mode, with BN statistics that are not the identity."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def weight_files(torchvision_resnet18, tmp_path_factory) -> dict[str, Path]:
    """Its state dict (fc included, as torchvision saves it) as .safetensors and as .pth."""
    folder = tmp_path_factory.mktemp("weights")
    state = torchvision_resnet18.state_dict()
    save_file(state, folder / "r18.safetensors")
    torch.save(state, folder / "r18.pth")
    return {"safetensors": folder / "r18.safetensors", "pth": folder / "r18.pth"}


def pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward minus fc: h (B, 512)."""
    headless = copy.deepcopy(model)
    headless.fc = torch.nn.Identity()
    with torch.no_grad():
        return headless(x)


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_features_are_torchvisions(kind, weight_files, torchvision_resnet18):
    encoder = features.open_encoder(f"torchvision:resnet18={weight_files[kind]}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = encoder.model.encoder(x)  # (2, 512)
    torch.testing.assert_close(ours, pooled(torchvision_resnet18, x), rtol=1e-5, atol=1e-5)
    assert encoder.source == weight_files[kind].resolve()
    assert encoder.spec == f"torchvision:resnet18={weight_files[kind].resolve()}"
    assert encoder.digest == "sha256:" + hashlib.sha256(weight_files[kind].read_bytes()).hexdigest()


def test_default_input_is_torchvisions_eval_transform(weight_files):
    """Resize 256, centre-crop 224, ImageNet mean/std, bilinear: what torchvision's ResNet weights ship with."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    theirs = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(image)  # (3, 224, 224)
    ours = features.transform_for(features.open_encoder(f"torchvision:resnet18={weight_files['pth']}"))(image)
    assert ours.shape == theirs.shape == (3, 224, 224)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.05)  # PIL vs tensor resize: a few grey levels apart
    timm = features.open_encoder(f"timm:resnet18@96={weight_files['pth']}")
    assert (timm.info.image_size, timm.info.interpolation) == (96, "bicubic")


def test_spec_parsing():
    spec = external.parse_spec("timm:resnet50@160=~/w.safetensors")
    assert (spec.kind, spec.arch, spec.image_size, spec.path) == ("timm", "resnet50", 160, Path("~/w.safetensors").expanduser())
    assert spec.name == "timm:resnet50@160" and external.parse_spec("runs/x/encoder.safetensors") is None


def test_an_existing_file_is_a_path_even_when_it_looks_like_a_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("torchvision:resnet18=w.pth").write_bytes(b"")
    assert external.parse_spec("torchvision:resnet18=w.pth") is None
    with pytest.raises(ConfigError, match="'foo' is not an external encoder kind"):
        external.parse_spec("foo:resnet18=w.pth")


def test_knn_through_the_cli_records_spec_and_hash(weight_files, labelled, tmp_path):
    spec = f"torchvision:resnet18@32={weight_files['safetensors']}"
    result = runner.invoke(app, ["knn", spec, "--data", str(labelled), "-k", "3", *COMMON, "--out", str(tmp_path / "knn")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert saved["encoder_spec"] == f"torchvision:resnet18@32={weight_files['safetensors'].resolve()}"
    assert saved["checkpoint"] == str(weight_files["safetensors"].resolve())
    assert saved["checkpoint_sha256"] == "sha256:" + hashlib.sha256(weight_files["safetensors"].read_bytes()).hexdigest()
    assert saved["feature_dim"] == 512 and saved["top1"] == 1.0  # solid colours: any ResNet separates them


def test_embed_through_the_cli_gives_torchvisions_features(weight_files, labelled, tmp_path, torchvision_resnet18):
    spec = f"torchvision:resnet18@32={weight_files['pth']}"
    out = tmp_path / "vecs.npy"
    result = runner.invoke(app, ["embed", str(labelled), "-o", str(out), "-c", spec, *COMMON])
    assert result.exit_code == 0, result.output
    vectors = np.load(out)  # (27, 512)
    names = (tmp_path / "vecs.paths.txt").read_text().split("\n")
    transform = features.transform_for(features.open_encoder(spec))
    x = torch.stack([transform(Image.open(labelled / names[i]).convert("RGB")) for i in (0, 7)])  # (2, 3, 32, 32)
    np.testing.assert_allclose(vectors[[0, 7]], pooled(torchvision_resnet18, x).numpy(), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "vecs.json").read_text())["encoder_spec"] == f"torchvision:resnet18@32={weight_files['pth'].resolve()}"
    # retrieval finds the index's external encoder from its metadata
    query = runner.invoke(app, ["knn", "--index", str(out), "--query", str(labelled / names[0]), "-k", "1", *COMMON])
    assert query.exit_code == 0 and names[0] in query.output, query.output


def test_cka_compares_an_external_encoder_with_its_untrained_twin(weight_files, labelled, tmp_path):
    spec = f"torchvision:resnet18@32={weight_files['safetensors']}"
    result = runner.invoke(app, ["cka", spec, "--random-init", "--data", str(labelled), *COMMON])
    assert result.exit_code == 0, result.output
    (saved,) = weight_files["safetensors"].parent.glob("eval/cka-*/cka.json")  # beside the weights file
    described = json.loads(saved.read_text())
    assert described["a"]["encoder_spec"] == spec.replace(str(weight_files["safetensors"]), str(weight_files["safetensors"].resolve()))
    assert described["a"]["file"] == str(weight_files["safetensors"].resolve()) and described["b"]["random_init"] is True
    assert described["a"]["image_size"] == 32 and described["a"]["feature_dims"]["h"] == 512


def test_a_file_finetuned_from_an_external_encoder_stays_headless(weight_files, labelled, tmp_path):
    spec = f"torchvision:resnet18@32={weight_files['pth']}"
    result = runner.invoke(app, ["finetune", spec, "--data", str(labelled), "--epochs", "1", *COMMON, "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["encoder_spec"] == spec.replace(
        str(weight_files["pth"]), str(weight_files["pth"].resolve()))
    finetuned = tmp_path / "ft" / "finetuned.safetensors"
    refused = runner.invoke(app, ["knn", str(finetuned), "--data", str(labelled), "--layer", "head1", *COMMON])
    assert refused.exit_code == 2 and "--layer head1 needs a projection head" in refused.output, refused.output


def test_info_describes_an_external_encoder(weight_files):
    result = runner.invoke(app, ["info", f"torchvision:resnet18={weight_files['pth']}", "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.output)
    assert described["method"] == "none: external torchvision:resnet18 weights" and described["head_layers"] == 0
    assert described["image_size"] == 224 and described["interpolation"] == "bilinear"
    assert described["file_bytes"] == weight_files["pth"].stat().st_size


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["knn", "resnet:resnet18=R18", "--data", "LABELLED"], "'resnet' is not an external encoder kind"),
        (["knn", "torchvision:vit_b_16=R18", "--data", "LABELLED"], "torchvision:vit_b_16 is not supported"),
        (["knn", "torchvision:resnet18", "--data", "LABELLED"], "names no weights file; write torchvision:resnet18=PATH"),
        (["knn", "torchvision:resnet18@2=R18", "--data", "LABELLED"], "@2 is not an input size"),
        (["knn", "torchvision:resnet18=/no/such.pth", "--data", "LABELLED"], "/no/such.pth does not exist"),
        (["knn", "torchvision:resnet34@32=R18", "--data", "LABELLED"], "does not fit torchvision:resnet34@32: missing layer1.2.bn1.bias"),
        (["knn", "torchvision:resnet18@32=R18", "--data", "LABELLED", "--layer", "projection"], "--layer projection needs a projection head"),
        (["embed", "LABELLED", "-o", "v.npy", "-c", "torchvision:resnet18@32=R18", "--layer", "head1"], "--layer head1 needs a projection head"),
        (["finetune", "torchvision:resnet18@32=R18", "--data", "LABELLED", "--from-head-layer", "1"], "--from-head-layer 1 needs a projection head"),
    ],
)
def test_bad_specs_are_one_line(args, expected, weight_files, labelled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("R18", str(weight_files["pth"])) if "R18" in a else str(labelled) if a == "LABELLED" else a for a in args]
    result = runner.invoke(app, [*args, *COMMON])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output


def test_compare_takes_external_rows_and_one_file_at_two_sizes_is_two_encoders(weight_files, labelled, tmp_path):
    """A comparison row per spec; the cache key holds the input transform, so `@32` never answers for `@48`."""
    out = tmp_path / "cmp"
    args = ["--data", str(labelled), "--tasks", "knn", *COMMON, "--out", str(out)]
    small, large = (f"torchvision:resnet18@{size}={weight_files['safetensors']}" for size in (32, 48))
    assert runner.invoke(app, ["compare", small, *args]).exit_code == 0
    result = runner.invoke(app, ["compare", small, large, *args])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["computed"] for row in rows] == [[], ["knn"]]  # the second size was scored, not read from the cache
    assert [row["input"]["image_size"] for row in rows] == [32, 48]
    assert len(list((out / "cache").iterdir())) == 2
