"""Fine-tuning: class-balanced label subsets, label files, and the whole run down to a reloadable file."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.engine import checkpoint, features, supervised

from simclr_cli.engine.tasks import finetune
from simclr_cli.engine.augment import IMAGENET_MEAN, IMAGENET_STD
from simclr_cli.engine.datasets import LabelledImages, labelled_folder
from simclr_cli.engine.device import runtime
from simclr_cli.engine.errors import CheckpointError, ConfigError, DataError
from simclr_cli.engine.configs import FinetuneConfig
from simclr_cli.engine.labelsets import class_balanced_subset, label_file_subset
from simclr_cli.engine.tasks.finetune import load_finetuned
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.supervised import evaluate, eval_loader

RT = runtime(device="cpu", precision="fp32")
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]




def solid_colours(per_class: int, *, seed: int, size: int = 16) -> LabelledImages:
    rng = np.random.default_rng(seed)
    samples = []
    for label, colour in enumerate(COLOURS):
        for _ in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-15, 16, size=(size, size, 3)), 0, 255)
            samples.append((Image.fromarray(pixels.astype(np.uint8)), label))
    return LabelledImages(samples, ["red", "green", "blue"])


@pytest.fixture
def encoder_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    # zero-initialised residual branches (the official init) keep this untrained encoder's features tame, which
    # the protocol tests' short, high-lr schedules were tuned on
    cfg = ModelConfig(arch="resnet18", width=0.25, zero_init_residual=True).resolved(image_size=16)
    info = checkpoint.EncoderInfo(model=cfg, image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  interpolation="bilinear", config={"note": "pretrained"}, epoch=3, step=30)
    path = tmp_path / "encoder.safetensors"
    checkpoint.save_encoder(path, build_model(cfg), info=info)
    return path


# --- label subsets ---------------------------------------------------------------------------------------

LABELS = [0] * 10 + [1] * 20 + [2] * 7 + [3] * 3  # unbalanced on purpose, classes interleaved below
INTERLEAVED = [LABELS[i] for i in np.random.default_rng(5).permutation(len(LABELS))]


@pytest.mark.parametrize("fraction, expected", [(0.3, {0: 3, 1: 6, 2: 2, 3: 1}), (0.01, {0: 1, 1: 1, 2: 1, 3: 1}),
                                                (0.6, {0: 6, 1: 12, 2: 4, 3: 2}), (1.0, {0: 10, 1: 20, 2: 7, 3: 3})])
def test_subset_has_round_fraction_of_every_class_at_least_one(fraction, expected):
    subset = class_balanced_subset(INTERLEAVED, fraction, seed=0)
    assert Counter(INTERLEAVED[i] for i in subset) == expected
    assert subset == sorted(set(subset))


def test_subset_is_deterministic_in_the_seed():
    a = class_balanced_subset(INTERLEAVED, 0.3, seed=1)
    assert a == class_balanced_subset(INTERLEAVED, 0.3, seed=1)
    assert a != class_balanced_subset(INTERLEAVED, 0.3, seed=2)


def test_subset_rejects_bad_fractions():
    with pytest.raises(ValueError):
        class_balanced_subset(LABELS, 0.0, seed=0)


@pytest.fixture
def train_folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for name, colour in zip(("blue", "red"), ((0, 0, 255), (255, 0, 0))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(root / name / f"{i}.png")
    return root


def test_label_file_selects_the_listed_images(tmp_path: Path, train_folder: Path):
    train = labelled_folder(train_folder)
    listed = tmp_path / "labels.txt"
    listed.write_text("# one image per class\nred/2.png\n\nblue/0.png\n./red/2.png\n", encoding="utf-8")
    paths = finetune.image_paths(train)
    subset = label_file_subset(listed, paths, root=train_folder)
    assert [paths[i].relative_to(train_folder).as_posix() for i in subset] == ["blue/0.png", "red/2.png"]


def test_label_file_errors_name_the_bad_lines(tmp_path: Path, train_folder: Path):
    train = labelled_folder(train_folder)
    listed = tmp_path / "labels.txt"
    listed.write_text("red/0.png\nred/9.png\nblue/0.png\ngreen/1.png\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 'red/9.png', line 4 'green/1.png'"):
        label_file_subset(listed, finetune.image_paths(train), root=train_folder)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match="lists no images"):
        label_file_subset(empty, finetune.image_paths(train), root=train_folder)
    with pytest.raises(DataError, match="cannot read"):
        label_file_subset(tmp_path / "missing.txt", finetune.image_paths(train), root=train_folder)


def test_label_file_needs_images_on_disk():
    with pytest.raises(DataError, match="file paths"):
        finetune.image_paths(solid_colours(1, seed=0))


def test_run_with_a_label_file(tmp_path: Path, encoder_file: Path, train_folder: Path):
    train = labelled_folder(train_folder)
    listed = tmp_path / "labels.txt"
    listed.write_text("blue/0.png\nblue/1.png\nred/0.png\nred/2.png\n", encoding="utf-8")
    cfg = FinetuneConfig(label_file=listed, epochs=1, batch_size=4)
    result = finetune.evaluate(cfg, features.open_encoder(encoder_file), train, train, num_classes=2, rt=RT,
                          out_dir=tmp_path / "out")  # train_root defaults to the images' common folder
    assert result.labelled_images == 4 and result.train_images == 6 and result.label_fraction == pytest.approx(4 / 6)
    assert result.settings["label_file"] == str(listed) and result.settings["label_fraction"] is None


# --- the whole run ---------------------------------------------------------------------------------------

def test_finetune_end_to_end_saves_a_file_that_reloads_with_the_same_predictions(tmp_path, encoder_file, monkeypatch):
    trained = {}
    real_train = supervised.train_classifier

    def spy(classifier, *args, **kwargs):
        trained["classifier"] = classifier
        return real_train(classifier, *args, **kwargs)

    monkeypatch.setattr(supervised, "train_classifier", spy)
    encoder = features.open_encoder(encoder_file)
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    train, val = solid_colours(4, seed=1), solid_colours(2, seed=2)
    cfg = FinetuneConfig(label_fraction=0.5, epochs=2, batch_size=3, lr=0.5)
    result = finetune.evaluate(cfg, encoder, train, val, num_classes=3, rt=RT, out_dir=tmp_path / "out")

    d = result.to_dict()
    assert d["train_images"] == 12 and d["labelled_images"] == 6 and d["val_images"] == 6
    assert d["label_fraction"] == 0.5 and d["checkpoint"] == str(encoder_file)
    assert d["top5"] is None and 0.0 <= d["top1"] <= 1.0 and [h["epoch"] for h in d["history"]] == [1, 2]
    assert d["settings"]["optimizer"] == "sgd" and d["settings"]["nesterov"] is True
    assert d["settings"]["peak_lr"] == pytest.approx(0.5 * 3 / 256)
    for name, value in before.items():  # the caller's encoder is not the one fine-tuned
        assert torch.equal(value, encoder.model.state_dict()[name]), name

    model, info = checkpoint.load_encoder(result.finetuned)  # embed / linear-eval can read it
    assert set(info.extra_tensors) == {"classifier.weight", "classifier.bias"}
    assert info.extra["num_classes"] == 3 and info.extra["classes"] == ["red", "green", "blue"]
    assert info.extra["from_head_layer"] == 0 and info.extra["subset_size"] == 6 and info.extra["label_fraction"] == 0.5
    assert info.config == {"note": "pretrained"} and info.image_size == 16
    assert features.open_encoder(result.finetuned).model is not None

    original = trained["classifier"].eval()
    reloaded, _ = load_finetuned(result.finetuned)
    x = torch.stack([features.transform_for(encoder)(image) for image, _ in val])  # (6, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(original(x), reloaded(x), atol=1e-5)
    loader = eval_loader(val, transform=features.transform_for(encoder), batch_size=5, workers=0, rt=RT)
    assert evaluate(reloaded, loader, rt=RT) == (result.top1, result.top5)


def test_finetune_from_head_layer_1_with_lars_learns_the_colours(tmp_path, encoder_file):
    train, val = solid_colours(4, seed=1), solid_colours(2, seed=2)
    cfg = FinetuneConfig(from_head_layer=1, optimizer="lars", lr=0.1, epochs=3, batch_size=6)
    result = finetune.evaluate(cfg, features.open_encoder(encoder_file), train, val, num_classes=3, rt=RT, out_dir=tmp_path)
    assert result.settings["peak_lr"] == pytest.approx(0.1 * 6**0.5)  # v2 scaling: lr x sqrt(B)
    assert result.top1 == 1.0
    assert load_finetuned(result.finetuned)[1].extra["from_head_layer"] == 1


def test_default_epochs_follow_the_label_fraction_on_large_subsets():
    """ImageNet's 1% and 10% (12,811 and 128,116 images): the papers' epochs at batch 256, far past min_steps."""
    one, ten = FinetuneConfig().resolved(labelled_images=12_811, labelled_fraction=0.01), \
        FinetuneConfig().resolved(labelled_images=128_116, labelled_fraction=0.1)
    assert (one.batch_size, one.epochs) == (256, 60) and (ten.batch_size, ten.epochs) == (256, 30)
    assert FinetuneConfig().resolved(labelled_images=50_000, labelled_fraction=1.0).epochs == 30
    assert FinetuneConfig(epochs=5).resolved(labelled_images=12_811, labelled_fraction=0.01).epochs == 5
    assert FinetuneConfig().resolved(labelled_images=1000, labelled_fraction=1.0).lr == 0.05
    assert FinetuneConfig(optimizer="lars").resolved(labelled_images=1000, labelled_fraction=1.0).lr == 0.005


def test_a_small_labelled_subset_gets_several_steps_an_epoch_and_min_steps_in_all():
    """The demo's 10% of the digits: 143 images made one step an epoch, 30 steps in all."""
    demo = FinetuneConfig().resolved(labelled_images=143, labelled_fraction=0.1)
    assert demo.batch_size == 35 and demo.epochs == 75  # 143 // 35 = 4 steps an epoch, 75 x 4 = 300 = min_steps
    fewer = FinetuneConfig(min_steps=40).resolved(labelled_images=143, labelled_fraction=0.1)
    assert fewer.epochs == 30  # the paper's 30 epochs already make 120 steps
    # what the user sets stays: the batch capped at the subset only, the epochs as given
    asked = FinetuneConfig(batch_size=200, epochs=2).resolved(labelled_images=143, labelled_fraction=0.1)
    assert (asked.batch_size, asked.epochs) == (143, 2)
    assert FinetuneConfig().resolved(labelled_images=5, labelled_fraction=0.5).batch_size == 2


@pytest.mark.parametrize(
    "change, field",
    [({"label_fraction": 0.0}, "label_fraction"), ({"label_fraction": 1.5}, "label_fraction"),
     ({"optimizer": "adam"}, "optimizer"), ({"from_head_layer": -1}, "from_head_layer"), ({"epochs": 0}, "epochs"),
     ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay")],
)
def test_bad_config_values_are_named(change, field):
    with pytest.raises(ConfigError, match=f"finetune.{field}"):
        replace(FinetuneConfig(), **change).validate()


def test_from_head_layer_past_the_hidden_layers_is_refused(tmp_path, encoder_file):
    with pytest.raises(ConfigError, match="from_head_layer 2"):
        finetune.evaluate(FinetuneConfig(from_head_layer=2), features.open_encoder(encoder_file), solid_colours(2, seed=0),
                     solid_colours(1, seed=1), num_classes=3, rt=RT, out_dir=tmp_path)


def test_load_finetuned_refuses_a_plain_encoder(encoder_file):
    with pytest.raises(CheckpointError, match="no fine-tuned classifier"):
        load_finetuned(encoder_file)
