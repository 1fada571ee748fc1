"""The Method seam: SimCLR as one method against its reference loss, and a toy method's after-step hook and extra
checkpoint state carried through the real trainer, checkpoints and --resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from simclr_cli.engine import checkpoint, methods
from simclr_cli.engine.configs import METHOD_SECTIONS, PretrainConfig
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.loss import nt_xent
from simclr_cli.engine.methods.base import Crops
from simclr_cli.engine.methods.simclr import SimCLRMethod
from simclr_cli.engine.model import ModelConfig
from simclr_cli.engine.tasks import pretrain

CPU = Runtime(device=torch.device("cpu"), precision="fp32")


def tiny_config(folder: Path, **train) -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.data.source, cfg.data.workers = str(folder), 0
    cfg.model.arch, cfg.model.width = "resnet18", 0.25
    cfg.augment.image_size = 16
    cfg.train.batch_size, cfg.train.epochs, cfg.train.log_every = 8, 2, 1
    cfg.train.device, cfg.train.precision = "cpu", "fp32"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_simclr_asks_for_two_crops_and_its_loss_is_nt_xent_of_the_projections():
    torch.manual_seed(0)
    method = SimCLRMethod(ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16), image_size=16, T=0.5)
    assert method.crops() == (Crops(count=2, size=16),)
    assert method.network is method.modules and method.extra_state() == {}
    x = torch.randn(8, 3, 16, 16)  # (2N, 3, S, S): views 1, then views 2
    loss = method.loss(method.modules, [x], rt=CPU)
    _, z = method.modules(x)
    assert torch.allclose(loss, nt_xent(z[:4], z[4:], 0.5))


class Counting(SimCLRMethod):
    """SimCLR plus a counter of applied updates: what a momentum encoder's or a queue's bookkeeping needs."""

    name = "counting"
    built: list[Counting] = []  # every instance, for the test to look into

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.updates = torch.zeros((), dtype=torch.long)
        self.seen: list[int] = []
        self.built.append(self)

    def after_step(self, *, step: int) -> None:
        self.updates += 1
        self.seen.append(step)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"updates": self.updates.clone()}

    def load_extra_state(self, tensors) -> None:
        self.updates = tensors["updates"].clone()


@pytest.fixture
def counting(monkeypatch):
    """`train.method: counting` selects Counting for this test."""
    monkeypatch.setitem(methods.METHODS, Counting.name, Counting)
    monkeypatch.setattr(Counting, "built", [])
    return Counting.built


def test_a_method_steps_saves_and_resumes_its_own_state_through_the_trainer(image_folder, tmp_path, counting):
    out = tmp_path / "run"
    result = pretrain.run(tiny_config(image_folder, method="counting", checkpoint_every=2), out=out)
    assert result.steps == 6 and counting[0].seen == [1, 2, 3, 4, 5, 6]
    state = checkpoint.load(out / "checkpoints" / "step-000000006.safetensors", kind=checkpoint.TRAIN_STATE)
    assert state.meta["config"]["train"]["method"] == "counting" and int(state.tensors["method/updates"]) == 6
    assert checkpoint.load_encoder(out / "encoder.safetensors")[1].method == "counting"
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["method"] == "counting"

    (out / "checkpoints" / "step-000000006.safetensors").unlink()  # as if the run had died after step 4
    pretrain.run(tiny_config(image_folder, method="counting", checkpoint_every=2), out=out, resume=True)
    resumed = counting[1]
    assert resumed.seen == [5, 6] and int(resumed.updates) == 6  # the counter came back from step 4's checkpoint


def test_the_saved_config_states_what_ran(image_folder, tmp_path):
    """Every auto value is resolved once and written back: the worker count included, not left as null."""
    out = tmp_path / "run"
    pretrain.run(tiny_config(image_folder), out=out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["workers"] == 0 and saved["data"]["decode_side"] == 32 and saved["train"]["batch_size"] == 8
    assert saved["train"]["method"] == "simclr"
    state = checkpoint.load(out / "checkpoints" / "step-000000006.safetensors", kind=checkpoint.TRAIN_STATE)
    assert state.meta["config"] == saved


def test_auto_workers_are_written_back_too(image_folder, tmp_path):
    cfg = tiny_config(image_folder)
    cfg.data.workers = None  # chosen from the machine
    pretrain.run(cfg, out=tmp_path / "run")
    workers = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["workers"]
    assert isinstance(workers, int) and workers >= 0


# Each method section's settings refused for the methods that do not read it, and NT-Xent's temperature refused for
# the methods that have their own: one mechanism (configs.METHOD_SECTIONS), every section's cases here.
@pytest.mark.parametrize(("method", "setting", "value", "message"), [
    ("simclr", "moco.K", 4096, r"^moco.K applies to --method moco-v1 or moco-v2 only, not simclr"),
    ("swav", "moco.K", 4096, r"^moco.K applies to --method moco-v1 or moco-v2 only, not swav"),
    ("pirl", "moco.K", 4096, r"^moco.K applies to --method moco-v1 or moco-v2 only, not pirl"),
    ("simclr", "swav.queue_length", 3840, r"^swav.queue_length applies to --method swav only, not simclr"),
    ("moco-v2", "pirl.lam", 0.9, r"^pirl.lam applies to --method pirl only, not moco-v2"),
    ("moco-v2", "train.temperature", 0.5, r"^train.temperature is NT-Xent's \(--method simclr\); moco-v2 reads moco.T"),
    ("swav", "train.temperature", 0.5, r"^train.temperature is NT-Xent's \(--method simclr\); swav reads swav.temperature"),
    ("pirl", "train.temperature", 0.5, r"^train.temperature is NT-Xent's \(--method simclr\); pirl reads pirl.T"),
])
def test_options_a_method_does_not_read_are_refused(method, setting, value, message):
    cfg = PretrainConfig()
    cfg.train.method = method
    section, name = setting.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_every_method_section_is_a_pretraining_config_section():
    assert all(hasattr(PretrainConfig(), section) for section in METHOD_SECTIONS)
    assert {m for readers in METHOD_SECTIONS.values() for m in readers} <= set(methods.METHODS)
