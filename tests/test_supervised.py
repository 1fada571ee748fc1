"""The shared supervised loop: per-step schedule, per-epoch history, frozen features, top-k accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from simclr_cli.engine.device import runtime
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.report import StepStats
from simclr_cli.engine.errors import NonFiniteLoss
from simclr_cli.engine.supervised import (
    Backbone,
    Classifier,
    LinearClassifier,
    cosine_schedule,
    evaluate,
    train_classifier,
)

RT = runtime(device="cpu", precision="fp32")




class RecordingSGD(torch.optim.SGD):
    """SGD that remembers the lr of every step it took."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lrs: list[float] = []

    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


class RecordingProgress:
    def __init__(self):
        self.started, self.stopped, self.updates = [], 0, []

    def start(self, *, total_steps, completed, description):
        self.started.append((total_steps, completed, description))

    def update(self, stats: StepStats):
        self.updates.append(stats)

    def stop(self):
        self.stopped += 1


def blobs(n_per_class: int, num_classes: int, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated Gaussian clusters, one per class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 6
    x = torch.cat([centres[c] + 0.3 * torch.randn(n_per_class, dim, generator=g) for c in range(num_classes)])
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return x, y


def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16))


def naive_lr(step: int, *, peak: float, warmup: int, total: int) -> float:
    # SimCLR §3: linear warm-up from 0 over `warmup` steps, then cosine decay to 0 without restarts
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_follows_the_schedule_every_step_and_history_has_one_entry_per_epoch():
    x, y = blobs(8, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, drop_last=True)  # 6 steps an epoch
    head = LinearClassifier(6, 3)
    optimizer = RecordingSGD(head.parameters(), lr=123.0, momentum=0.9, nesterov=True)
    epochs, peak = 3, 0.4
    total = len(loader) * epochs
    progress = RecordingProgress()
    history = train_classifier(
        head, loader, DataLoader(TensorDataset(x, y), batch_size=5), epochs=epochs, optimizer=optimizer,
        lr_schedule=cosine_schedule(peak_lr=peak, total_steps=total, warmup_steps=2), rt=RT, progress=progress,
        log_every=4,
    )
    assert optimizer.lrs == pytest.approx([naive_lr(s, peak=peak, warmup=2, total=total) for s in range(total)])
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(set(h) >= {"epoch", "loss", "lr", "top1", "top5"} for h in history)
    assert history[-1]["top1"] == 1.0 and history[-1]["top5"] is None  # 3 classes: no top-5
    assert history[-1]["loss"] < history[0]["loss"]
    assert progress.started == [(total, 0, "train")] and progress.stopped == 1
    assert [u.step for u in progress.updates] == [4, 6, 8, 12, 16, 18]  # every 4 steps and at each epoch end
    assert all(u.loss is not None and u.total_steps == total for u in progress.updates)


def test_evaluate_only_after_the_last_epoch_when_asked():
    x, y = blobs(4, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    head = LinearClassifier(6, 2)
    history = train_classifier(
        head, loader, loader, epochs=2, optimizer=torch.optim.SGD(head.parameters(), lr=0.1),
        lr_schedule=lambda step: 0.1, rt=RT, evaluate_every=None,
    )
    assert history[0]["top1"] is None and history[1]["top1"] is not None


def test_frozen_features_stay_in_eval_mode_and_unchanged_while_the_head_trains():
    model = tiny_model()
    model.train()  # even a model handed over in train mode must be frozen by the classifier
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = Backbone(model)
    head = LinearClassifier(backbone.out_dim, 2)
    classifier = Classifier(backbone, head, frozen=True)
    classifier.train()
    assert classifier.training and head.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())

    x = torch.randn(8, 3, 16, 16)
    y = torch.tensor([0, 1] * 4)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    history = train_classifier(
        classifier, loader, loader, epochs=2, optimizer=torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9),
        lr_schedule=lambda step: 0.5, rt=RT,
    )
    assert len(history) == 2
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():  # weights AND BN running statistics (and their counters)
        assert torch.equal(value, after[name]), name
    assert head.fc.weight.abs().sum() > 0  # the head did learn
    assert all(p.grad is None for p in model.parameters())


def test_unfrozen_features_train_with_bn_in_train_mode():
    model = tiny_model()
    backbone = Backbone(model, depth=1)
    assert backbone.out_dim == model.head.in_dim
    classifier = Classifier(backbone, LinearClassifier(backbone.out_dim, 2), frozen=False)
    classifier.train()
    assert all(m.training for m in model.modules())
    x = torch.randn(8, 3, 16, 16)
    y = torch.tensor([0, 1] * 4)
    running_before = model.encoder.bn1.running_mean.clone()
    conv_before = model.encoder.conv1.weight.clone()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    train_classifier(classifier, loader, None, epochs=1, optimizer=torch.optim.SGD(classifier.parameters(), lr=0.1),
                     lr_schedule=lambda step: 0.1, rt=RT)
    assert not torch.equal(model.encoder.bn1.running_mean, running_before)
    assert not torch.equal(model.encoder.conv1.weight, conv_before)


def test_evaluate_matches_a_naive_topk_count():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(23, 7, generator=g)
    labels = torch.randint(0, 7, (23,), generator=g)

    class Fixed(nn.Module):
        def forward(self, index):
            return logits[index]

    loader = DataLoader(TensorDataset(torch.arange(23), labels), batch_size=5)
    top1, top5 = evaluate(Fixed(), loader, rt=RT)
    naive1 = naive5 = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(7), key=lambda c: -row[c])
        naive1 += order[0] == label
        naive5 += label in order[:5]
    assert top1 == pytest.approx(naive1 / 23) and top5 == pytest.approx(naive5 / 23)


def test_top5_is_none_with_fewer_than_five_classes():
    x, y = blobs(3, 4)
    top1, top5 = evaluate(LinearClassifier(6, 4), DataLoader(TensorDataset(x, y), batch_size=4), rt=RT)
    assert top5 is None and 0 <= top1 <= 1


def test_a_non_finite_loss_stops_training():
    x, y = blobs(4, 2)
    x[0, 0] = float("nan")
    head = LinearClassifier(6, 2)
    with pytest.raises(NonFiniteLoss, match="NaN"):
        train_classifier(head, DataLoader(TensorDataset(x, y), batch_size=8), None, epochs=1,
                         optimizer=torch.optim.SGD(head.parameters(), lr=0.1), lr_schedule=lambda s: 0.1, rt=RT)


def test_a_classifier_flips_as_the_encoder_was_pretrained():
    """The demo pretrains without flips (a mirrored digit is another symbol): its classifiers train without them too,
    with the paper's crop; a file that records nothing gets the paper's crop and flip."""
    from simclr_cli.engine.checkpoint import EncoderInfo
    from simclr_cli.engine.supervised import labelled_transforms, training_crops

    def info(config):
        return EncoderInfo(model=ModelConfig(), image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                           config=config, epoch=1, step=1)

    assert training_crops(info({})) == {"crop_scale": (0.08, 1.0), "flip_p": 0.5}
    digits = info({"augment": {"crop_scale": [0.3, 1.0], "flip_p": 0.0, "blur_p": 0.0}})
    assert training_crops(digits) == {"crop_scale": (0.08, 1.0), "flip_p": 0.0}
    train, _ = labelled_transforms(digits)
    steps = {type(t).__name__: t for t in train.transforms}
    assert tuple(steps["RandomResizedCrop"].scale) == (0.08, 1.0) and steps["RandomHorizontalFlip"].p == 0.0
