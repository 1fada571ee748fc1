"""Linear evaluation: both protocols separate separable data, leave the encoder untouched, save a usable classifier."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.engine import checkpoint, features

from simclr_cli.engine.tasks import linear_eval
from simclr_cli.engine.augment import IMAGENET_MEAN, IMAGENET_STD
from simclr_cli.engine.datasets import LabelledImages
from simclr_cli.engine.device import runtime
from simclr_cli.engine.errors import CheckpointError, ConfigError
from simclr_cli.engine.configs import LinearEvalConfig
from simclr_cli.engine.tasks.linear_eval import fit_linear, load_classifier
from simclr_cli.engine.model import ModelConfig, build_model

RT = runtime(device="cpu", precision="fp32")
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230), (230, 20, 230)]




def solid_colours(num_classes: int, per_class: int, *, seed: int, size: int = 16) -> LabelledImages:
    """Images whose class is their (slightly noisy) solid colour: linearly separable for any sane encoder."""
    rng = np.random.default_rng(seed)
    samples = []
    for label in range(num_classes):
        for _ in range(per_class):
            pixels = np.clip(np.array(COLOURS[label]) + rng.integers(-15, 16, size=(size, size, 3)), 0, 255)
            samples.append((Image.fromarray(pixels.astype(np.uint8)), label))
    return LabelledImages(samples, [f"c{i}" for i in range(num_classes)])


@pytest.fixture
def encoder_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    # zero-initialised residual branches (the official init) keep this untrained encoder's features tame, which
    # the protocol tests' short, high-lr schedules were tuned on
    cfg = ModelConfig(arch="resnet18", width=0.25, zero_init_residual=True).resolved(image_size=16)
    info = checkpoint.EncoderInfo(model=cfg, image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  interpolation="bilinear", config={}, epoch=1, step=1)
    path = tmp_path / "encoder.safetensors"
    checkpoint.save_encoder(path, build_model(cfg), info=info)
    return path


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert any("running_mean" in k for k in before)  # the check covers BN statistics too
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed"


def naive_objective(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean multinomial cross-entropy, -log softmax written out, plus 0.5 * l2 * |W|^2."""
    total = 0.0
    for xi, yi in zip(x, y):
        scores = W @ xi + b
        total = total - (scores[yi] - torch.log(torch.exp(scores).sum()))
    return total / len(y) + 0.5 * l2 * (W**2).sum()


def test_fit_linear_separates_separable_features_and_reaches_the_optimum():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 10, generator=g) * 3
    labels = torch.arange(4).repeat_interleave(15)
    h = centres[labels] + 0.5 * torch.randn(60, 10, generator=g) + 5.0  # offset: standardisation must cope
    head, fit = fit_linear(h, labels, num_classes=4, l2=1e-2, max_iter=500)
    assert (head(h).argmax(1) == labels).all()
    val_labels = torch.arange(4).repeat_interleave(5)
    val = centres[val_labels] + 0.5 * torch.randn(20, 10, generator=g) + 5.0
    assert (head(val).argmax(1) == val_labels).all()
    assert fit["iterations"] >= 1

    # stationary point of the naive objective on the standardised features
    x = (h - h.mean(0)) / h.std(0, unbiased=False)
    W = head.fc.weight.detach().clone().requires_grad_(True)
    b = head.fc.bias.detach().clone().requires_grad_(True)
    objective = naive_objective(W, b, x, labels, 1e-2)
    objective.backward()
    assert float(objective.detach()) == pytest.approx(fit["loss"], rel=1e-4)
    assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4
    assert torch.allclose(head.mean, h.mean(0)) and torch.allclose(head.std, h.std(0, unbiased=False))


def test_constant_feature_dimensions_do_not_break_standardisation():
    h = torch.cat([torch.randn(20, 3), torch.zeros(20, 2)], dim=1)
    labels = (h[:, 0] > 0).long()
    head, _ = fit_linear(h, labels, num_classes=2)
    assert torch.isfinite(head(h)).all() and (head.std[3:] == 1).all()


def test_cached_protocol_end_to_end(tmp_path: Path, encoder_file: Path):
    encoder = features.open_encoder(encoder_file)
    before = snapshot(encoder.model)
    train, val = solid_colours(3, 8, seed=1), solid_colours(3, 4, seed=2)
    result = linear_eval.evaluate(LinearEvalConfig(), encoder, train, val, num_classes=3, rt=RT, out_dir=tmp_path / "out")
    assert result.top1 == 1.0 and result.top5 is None  # separable colours; < 5 classes: no top-5
    assert_unchanged(before, encoder.model)
    d = result.to_dict()
    assert d["checkpoint"] == str(encoder_file) and d["train_images"] == 24 and d["val_images"] == 12
    assert d["protocol"] == "cached" and d["settings"]["optimizer"] == "lbfgs" and len(d["history"]) == 1
    assert Path(d["classifier"]) == tmp_path / "out" / "classifier.safetensors"

    # the saved classifier, applied to freshly extracted features, reproduces the predictions
    head, meta = load_classifier(result.classifier)
    assert meta["layer"] == "encoder" and meta["classes"] == ["c0", "c1", "c2"] and meta["protocol"] == "cached"
    assert meta["num_classes"] == 3 and len(meta["feature_mean"]) == features.layer_dim(encoder, "encoder")
    val_h = features.extract(encoder, val, rt=RT)
    predictions = head(val_h).argmax(1)
    assert (predictions == features.labels_of(val)).all()
    assert result.confusion == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]


def naive_confusion(labels: list[int], predicted: list[int], num_classes: int) -> list[list[int]]:
    counts = [[0] * num_classes for _ in range(num_classes)]
    for true, guess in zip(labels, predicted):
        counts[true][guess] += 1
    return counts


def test_confusion_matrix_counts_every_true_predicted_pair():
    g = torch.Generator().manual_seed(0)
    labels, predicted = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (200,), generator=g)
    matrix = linear_eval.confusion_matrix(labels, predicted, num_classes=5)
    assert matrix.tolist() == naive_confusion(labels.tolist(), predicted.tolist(), 5)
    # classes absent from both labels and predictions still get their (zero) row and column
    assert linear_eval.confusion_matrix(torch.tensor([0]), torch.tensor([2]), num_classes=4).tolist() == [
        [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_cached_confusion_matches_the_classifiers_predictions(tmp_path: Path, encoder_file: Path):
    encoder = features.open_encoder(encoder_file)
    train, val = solid_colours(4, 6, seed=1), solid_colours(4, 5, seed=2)
    # 6 val images relabelled as the next class, so the matrix has off-diagonal cells and uneven rows
    val = LabelledImages([(image, (label + 1) % 4) for image, label in val.samples[:6]] + val.samples[6:], val.classes)
    result = linear_eval.evaluate(LinearEvalConfig(), encoder, train, val, num_classes=4, rt=RT, out_dir=tmp_path)
    head, _ = load_classifier(result.classifier)
    labels = features.labels_of(val).tolist()
    predicted = head(features.extract(encoder, val, rt=RT)).argmax(1).tolist()
    assert result.confusion == naive_confusion(labels, predicted, 4)
    assert [sum(row) for row in result.confusion] == [labels.count(c) for c in range(4)]
    assert sum(result.confusion[i][i] for i in range(4)) / len(labels) == pytest.approx(result.top1)
    assert result.top1 < 1.0  # the wrong labels show up off the diagonal
    assert result.to_dict()["confusion"] == result.confusion


def test_confusion_png_is_written_when_matplotlib_is_installed(tmp_path: Path, encoder_file: Path):
    pytest.importorskip("matplotlib")
    encoder = features.open_encoder(encoder_file)
    result = linear_eval.evaluate(LinearEvalConfig(), encoder, solid_colours(3, 4, seed=1), solid_colours(3, 2, seed=2),
                             num_classes=3, rt=RT, out_dir=tmp_path / "out")
    assert result.confusion_plot == tmp_path / "out" / "confusion.png"
    assert result.confusion_plot.read_bytes().startswith(b"\x89PNG")
    assert result.to_dict()["confusion_plot"] == str(result.confusion_plot)


def test_no_confusion_png_without_matplotlib(tmp_path: Path, encoder_file: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(linear_eval.plots, "available", lambda: False)
    encoder = features.open_encoder(encoder_file)
    result = linear_eval.evaluate(LinearEvalConfig(), encoder, solid_colours(2, 4, seed=1), solid_colours(2, 2, seed=2),
                             num_classes=2, rt=RT, out_dir=tmp_path)
    assert result.confusion_plot is None and result.to_dict()["confusion_plot"] is None
    assert not (tmp_path / "confusion.png").exists() and result.confusion == [[2, 0], [0, 2]]


def test_cached_protocol_reports_top5_with_five_or_more_classes(tmp_path: Path, encoder_file: Path):
    encoder = features.open_encoder(encoder_file)
    train, val = solid_colours(6, 4, seed=1), solid_colours(6, 2, seed=2)
    result = linear_eval.evaluate(LinearEvalConfig(), encoder, train, val, num_classes=6, rt=RT, out_dir=tmp_path)
    assert result.top1 == 1.0 and result.top5 == 1.0


def test_paper_protocol_end_to_end_keeps_the_encoder_frozen(tmp_path: Path, encoder_file: Path):
    encoder = features.open_encoder(encoder_file)
    encoder.model.train()  # the protocol itself must put (and keep) the encoder in eval mode
    before = snapshot(encoder.model)
    train, val = solid_colours(3, 8, seed=1), solid_colours(3, 4, seed=2)
    cfg = LinearEvalConfig(protocol="paper", epochs=3, batch_size=8, lr=20.0)  # big lr: 3 short epochs
    result = linear_eval.evaluate(cfg, encoder, train, val, num_classes=3, rt=RT, out_dir=tmp_path)
    assert_unchanged(before, encoder.model)
    assert result.top1 == 1.0 and result.top5 is None
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    s = result.settings
    assert s["optimizer"] == "sgd-nesterov" and s["peak_lr"] == pytest.approx(20.0 * 8 / 256)
    assert s["weight_decay"] == 0.0 and s["augmentation"] == "crop+flip" and s["epochs"] == 3
    assert s["crop_scale"] == (0.08, 1.0) and s["flip_p"] == 0.5  # the file records no pretraining crops: the paper's

    head, meta = load_classifier(result.classifier)
    assert meta["protocol"] == "paper" and meta["feature_mean"] is None
    assert (head.mean == 0).all() and (head.std == 1).all()
    assert (head(features.extract(encoder, val, rt=RT)).argmax(1) == features.labels_of(val)).all()
    assert result.confusion == [[4, 0, 0], [0, 4, 0], [0, 0, 4]]  # rows: the 4 val images of each class


def test_paper_epochs_default_to_100_for_small_images_and_90_above():
    assert LinearEvalConfig(protocol="paper").resolved(image_size=32).epochs == 100
    assert LinearEvalConfig(protocol="paper").resolved(image_size=224).epochs == 90
    assert LinearEvalConfig(protocol="paper", epochs=7).resolved(image_size=224).epochs == 7
    assert LinearEvalConfig().resolved(image_size=224).epochs is None  # cached has no epochs


@pytest.mark.parametrize(
    "change, field",
    [({"protocol": "svm"}, "protocol"), ({"layer": "h"}, "layer"), ({"epochs": 0}, "epochs"),
     ({"lr": -1.0}, "lr"), ({"l2": float("nan")}, "l2"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_config_values_are_named(change, field):
    with pytest.raises(ConfigError, match=f"linear_eval.{field}"):
        replace(LinearEvalConfig(), **change).validate()


def test_head2_is_refused_for_a_two_layer_head(tmp_path: Path, encoder_file: Path):
    encoder = features.open_encoder(encoder_file)
    with pytest.raises(ConfigError, match="head2"):
        linear_eval.evaluate(LinearEvalConfig(layer="head2"), encoder, solid_colours(2, 2, seed=0),
                        solid_colours(2, 1, seed=1), num_classes=2, rt=RT, out_dir=tmp_path)


def test_load_classifier_refuses_another_kind(encoder_file: Path):
    with pytest.raises(CheckpointError, match="linear-classifier"):
        load_classifier(encoder_file)
