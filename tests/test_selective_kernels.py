"""Selective-kernel encoders (SimCLRv2) through the command line: pretrain builds them, the file rebuilds them,
`info` names them, `export` writes them (or says in one line why torchvision cannot hold them), `--init` reads a
converted official sk1 checkpoint."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine.checkpoint import load_encoder
from simclr_cli.engine.model import ModelConfig, build_model
from tests.test_cli import one_line_error
from tests.test_weights import to_simclrv2_sk_names

runner = CliRunner()
TINY = ["--width", "0.25", "--image-size", "16", "--batch-size", "8", "--device", "cpu", "--precision", "fp32",
        "--workers", "0"]


def test_pretrain_with_sk_ratio_then_info_and_export(image_folder, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet50", "--sk-ratio", "0.0625",
                                 "--max-steps", "2", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    encoder = out / "encoder.safetensors"
    model, info = load_encoder(encoder)
    assert info.model.sk_ratio == 0.0625
    assert hasattr(model.encoder.layer1[0].conv2, "attn_reduce")

    described = runner.invoke(app, ["info", str(encoder)])
    assert described.exit_code == 0, described.output
    assert "selective kernels 0.0625" in described.output

    refused = one_line_error(runner.invoke(app, ["export", str(encoder), "--to", "torchvision"]))
    assert "selective kernels (sk_ratio 0.0625; torchvision's ResNets have none)" in refused
    bare = runner.invoke(app, ["export", str(encoder), "--to", "safetensors-encoder"])
    assert bare.exit_code == 0, bare.output


def test_pretrain_inits_from_a_converted_sk1_checkpoint(image_folder, tmp_path):
    torch.manual_seed(3)
    cfg = ModelConfig(arch="resnet50", width=0.25, stem="standard", sk_ratio=0.0625)
    source = {k: v.clone() for k, v in build_model(cfg).encoder.state_dict().items()}
    path = tmp_path / "r50_1x_sk1.pth"
    torch.save({"resnet": {to_simclrv2_sk_names(k): v for k, v in source.items()}}, path)  # as convert.py writes it

    refused = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet50", "--init", str(path),
                                  "--set", "model.stem=standard", "--max-steps", "1", *TINY, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    (error,) = [line for line in refused.output.splitlines() if line.startswith("error: ")]  # after the data's INFO line
    assert "selective-kernel (sk1)" in error and "--sk-ratio 0.0625" in error

    out = tmp_path / "b"
    result = runner.invoke(app, ["pretrain", str(image_folder), "--arch", "resnet50", "--sk-ratio", "0.0625",
                                 "--init", str(path), "--set", "model.stem=standard", "--max-steps", "1",
                                 "--set", "optim.lr=1e-12", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    model, _ = load_encoder(out / "encoder.safetensors")
    weight = model.encoder.layer2[0].conv2.attn_expand.weight
    torch.testing.assert_close(weight, source["layer2.0.conv2.attn_expand.weight"], rtol=1e-4, atol=1e-6)
