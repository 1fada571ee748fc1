"""`simclr benchmark` on a tiny model: every figure is measured, consistent with the others, and printed as JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import defaults
from simclr_cli.engine.configs import PretrainConfig
from simclr_cli.engine.tasks import benchmark

KEYS = {"model_images_per_s", "pretrain_images_per_s", "data_views_per_s_per_core", "data_wait_fraction", "peak_rss_mb"}
TINY = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size", "8", "--device", "cpu",
        "--precision", "fp32", "--workers", "0", "--steps", "2", "--warmup", "1"]


def test_benchmark_json_reports_every_figure(image_folder):
    result = CliRunner().invoke(app, ["benchmark", str(image_folder), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout[result.stdout.index("{"):])
    assert KEYS <= figures.keys()
    for key in ("model_images_per_s", "pretrain_images_per_s", "data_views_per_s_per_core", "peak_rss_mb",
                "baseline_pretrain_images_per_s", "baseline_data_views_per_s_per_core"):
        assert figures[key] > 0, key
    assert 0.0 <= figures["data_wait_fraction"] <= 1.0
    assert abs(figures["pretrain_vs_model"] - figures["pretrain_images_per_s"] / figures["model_images_per_s"]) < 0.01
    expected = figures["pretrain_images_per_s"] / figures["baseline_pretrain_images_per_s"]
    assert abs(figures["speedup_vs_baseline"] - expected) < 0.01 * expected
    assert figures["batch_size"] == 8 and figures["image_size"] == 16 and figures["images"] == 24


def test_benchmark_table_without_baseline(image_folder):
    result = CliRunner().invoke(app, ["benchmark", str(image_folder), *TINY, "--no-baseline", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    assert "model step (ready tensors)" in result.output and "baseline step" not in result.output
    assert "median of 2 round(s)" in result.output and "(round 2/2)" in result.output


def test_benchmark_refuses_zero_steps(image_folder):
    result = CliRunner().invoke(app, ["benchmark", str(image_folder), *TINY[:-4], "--steps", "0"])
    assert result.exit_code == 2 and "--steps 0" in result.output


def test_the_pretrain_measurement_leaves_no_files_behind(image_folder, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    cfg = PretrainConfig()
    cfg.data.source, cfg.data.workers = str(image_folder), 0
    cfg.model.arch, cfg.model.width, cfg.augment.image_size = "resnet18", 0.25, 16
    cfg.train.batch_size, cfg.train.device, cfg.train.precision = 8, "cpu", "fp32"
    rate, wait, growth = benchmark.pretrain_images_per_s(defaults.resolve_sizes(cfg), steps=2, warmup=1)
    assert rate > 0 and 0 <= wait <= 1
    assert list(scratch.iterdir()) == []
