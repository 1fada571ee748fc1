"""`simclr knn`: the task's config checks and its report on a tiny encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.engine import features
from simclr_cli.engine.checkpoint import EncoderInfo, save_encoder
from simclr_cli.engine.configs import KnnConfig
from simclr_cli.engine.datasets import LabelledImages
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.tasks import knn

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", (), "knn.k"),
        ("k", (0,), "knn.k"),
        ("k", (5, 5), "repeats"),
        ("temperature", 0.0, "knn.temperature"),
        ("temperature", float("nan"), "knn.temperature"),
        ("layer", "fc", "knn.layer"),
        ("batch_size", 0, "knn.batch_size"),
        ("chunk_size", 0, "knn.chunk_size"),
        ("workers", -1, "knn.workers"),
    ],
)
def test_config_validation(field, value, message):
    cfg = KnnConfig()
    cfg.validate()
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def tiny_checkpoint(path: Path, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16)
    info = EncoderInfo(model=cfg, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                       config={}, epoch=1, step=1)
    save_encoder(path, build_model(cfg), info=info)
    return path


def test_run_reports_accuracy_settings_and_counts(tmp_path, caplog):
    rng = np.random.default_rng(0)
    samples = [(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), i % 3) for i in range(9)]
    data = LabelledImages(samples, ["a", "b", "c"])
    path = tiny_checkpoint(tmp_path / "enc.safetensors")
    encoder = features.open_encoder(path)
    cfg = KnnConfig(k=(1, 50), batch_size=4)
    with caplog.at_level(logging.WARNING, logger="simclr"):
        result = knn.evaluate(cfg, encoder, data, data, rt=CPU)
    assert "k=50 is more than the 9 training images" in caplog.text
    assert result.top1 == 1.0  # k=1 and val == train: every image's nearest neighbour is itself
    d = result.to_dict()
    assert d["top1"] == 1.0 and d["top5"] is None  # 3 classes: no top-5
    assert d["k"] == [1, 50] and d["k_used"] == [1, 9]
    assert d["temperature"] == 0.1 and d["layer"] == "encoder"
    assert d["checkpoint"] == str(path) and d["random_init"] is False
    assert (d["train_images"], d["val_images"], d["num_classes"], d["feature_dim"]) == (9, 9, 3, 128)
    assert 0.0 <= d["per_k"][1]["top1"] <= 1.0
