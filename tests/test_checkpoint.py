"""Checkpoints: atomic writes, the safetensors container and its header, strict loading, round trips."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from simclr_cli.engine import checkpoint
from simclr_cli.engine.checkpoint import (
    EncoderInfo,
    atomic_write,
    check_state_dict,
    load,
    load_encoder,
    load_train_state,
    save,
    save_encoder,
    save_train_state,
)
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.optim import OptimConfig, build_optimizer




def tiny(arch: str = "resnet18", **kwargs):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, width=0.25, **kwargs).resolved(image_size=16))


def train_steps(model, optimizer, steps: int = 2) -> None:
    """A few real updates so every parameter has optimiser state and BN running stats move."""
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16)
        _, z = model(x)
        optimizer.zero_grad()
        z.square().mean().backward()
        optimizer.step()


def disabled_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic_write ----------------------------------------------------------------------------------


def test_atomic_write_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write(target, lambda tmp: tmp.write_text("one"))
    assert target.read_text() == "one"
    atomic_write(target, lambda tmp: tmp.write_text("two"))
    assert target.read_text() == "two"
    assert files_in(target.parent) == ["f.txt"]


def test_atomic_write_goes_through_a_temp_file_in_the_same_folder(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")
    seen = {}

    def write(tmp: Path) -> None:
        seen["tmp"] = tmp
        assert tmp.parent == target.parent  # same file system, so the rename is atomic
        assert tmp != target
        assert target.read_text() == "old"  # the target is untouched while writing
        tmp.write_text("new")

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst)))
    atomic_write(target, write)
    assert replaced == [(seen["tmp"], target)]
    assert target.read_text() == "new"
    assert not seen["tmp"].exists()


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, write)
    assert target.read_text() == "old"
    assert files_in(tmp_path) == ["f.txt"]


def test_atomic_write_interrupt_leaves_no_temp(tmp_path):
    def write(tmp: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.txt", write)
    assert files_in(tmp_path) == []


def test_atomic_write_file_mode_follows_the_umask(tmp_path):
    # a checkpoint is as readable as any other file the user writes (mkstemp's 0600 would survive the rename)
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", lambda tmp: tmp.write_text("x"))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_saved_checkpoints_follow_the_umask_too(tmp_path):
    # safetensors writes through a file of its own, so the mode must be restored after it
    old = os.umask(0o022)
    try:
        save(tmp_path / "c.safetensors", {"w": torch.zeros(2)}, kind=checkpoint.ENCODER, meta={})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.safetensors").stat().st_mode) == 0o644


# --- save / load: the container and its header -----------------------------------------------------


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "c.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64), "s": torch.tensor(3.5)}
    meta = {"epoch": 3, "config": {"model": {"arch": "resnet18"}, "lst": [1, 2]}, "name": "x", "none": None}
    save(path, tensors, kind="encoder", meta=meta)
    loaded = load(path, kind="encoder")
    assert loaded.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded.tensors[name], tensor) and loaded.tensors[name].dtype == tensor.dtype
    assert loaded.meta == meta


def test_save_accepts_non_contiguous_and_shared_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "c.safetensors"
    save(path, {"t": base.t(), "row": base[1], "same": base}, kind="encoder", meta={})
    loaded = load(path, kind="encoder").tensors
    assert torch.equal(loaded["t"], base.t()) and torch.equal(loaded["row"], base[1]) and torch.equal(loaded["same"], base)


def test_header_records_format_version_and_kind(tmp_path):
    path = tmp_path / "c.safetensors"
    save(path, {"a": torch.zeros(1)}, kind="train-state", meta={"step": 1})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "simclr-cli", "format_version": "1", "kind": "train-state", "step": "1"}


def test_load_missing_file(tmp_path):
    path = tmp_path / "none.safetensors"
    with pytest.raises(CheckpointError) as err:
        load(path, kind="encoder")
    assert str(err.value) == f"checkpoint {path} does not exist; pass the path of a .safetensors file written by simclr"


def test_load_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("just some text, certainly not a checkpoint\n")
    with pytest.raises(CheckpointError) as err:
        load(path, kind="encoder")
    assert str(err.value).startswith(f"{path} is not a readable safetensors file (")
    assert str(err.value).endswith("); pass a checkpoint written by simclr")


@pytest.mark.parametrize("keep", [0, 7, 20, -5])
def test_load_a_truncated_file(tmp_path, keep):
    path = tmp_path / "c.safetensors"
    save(path, {"a": torch.arange(100.0)}, kind="encoder", meta={"epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"is not a readable safetensors file \(.*\); pass a checkpoint written by simclr$"):
        load(path, kind="encoder")


class _Payload:
    """Unpickling this creates `marker`: what a malicious pickled checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_file_is_refused_without_running_it(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists(), "the payload must really act when unpickled, or this test proves nothing"

    marker = tmp_path / "marker"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load(path, kind="encoder")
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_encoder(path)
    assert not marker.exists()


def test_load_a_safetensors_file_from_another_tool(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"framework": "pt"})
    with pytest.raises(CheckpointError) as err:
        load(path, kind="encoder")
    assert str(err.value) == f"{path} is a safetensors file but not a simclr checkpoint (no 'simclr-cli' header)"


def test_load_a_safetensors_file_without_metadata(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=r"is a safetensors file but not a simclr checkpoint \(no 'simclr-cli' header\)$"):
        load(path, kind="encoder")


def test_load_a_newer_format_version(tmp_path):
    path = tmp_path / "new.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "simclr-cli", "format_version": "2", "kind": "encoder"})
    with pytest.raises(CheckpointError) as err:
        load(path, kind="encoder")
    assert str(err.value) == f"{path} has checkpoint format version 2; this simclr reads version 1 — upgrade simclr"


def test_load_without_a_format_version(tmp_path):
    path = tmp_path / "nov.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "simclr-cli", "kind": "encoder"})
    with pytest.raises(CheckpointError, match=r"has checkpoint format version \?; this simclr reads version 1"):
        load(path, kind="encoder")


def test_load_the_wrong_kind(tmp_path):
    path = tmp_path / "state.safetensors"
    save(path, {"w": torch.zeros(2)}, kind="train-state", meta={})
    with pytest.raises(CheckpointError) as err:
        load(path, kind="encoder")
    assert str(err.value) == f"{path} holds a 'train-state' checkpoint where a 'encoder' one is needed"


def test_load_corrupt_json_metadata(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = {"format": "simclr-cli", "format_version": "1", "kind": "encoder", "epoch": "{not json"}
    save_file({"w": torch.zeros(2)}, str(path), metadata=header)
    with pytest.raises(CheckpointError) as err:
        load(path, kind="encoder")
    assert str(err.value) == f"{path} has corrupt metadata (Expecting property name enclosed in double quotes); the file is damaged"


# --- check_state_dict ------------------------------------------------------------------------------


def test_check_state_dict_accepts_a_match():
    sd = {"a": torch.zeros(2, 3), "b": torch.zeros(1, dtype=torch.int64)}
    check_state_dict(sd, {"a": torch.ones(2, 3), "b": torch.ones(1, dtype=torch.int64)}, source=Path("x"))


def test_check_state_dict_names_missing_unexpected_shape_and_dtype():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1), "d": torch.zeros(1)}
    found = {"a": torch.zeros(3, 2), "b": torch.zeros(4, dtype=torch.float16), "c": torch.zeros(1), "e": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        check_state_dict(expected, found, source=Path("ck.safetensors"))
    assert str(err.value) == (
        "ck.safetensors does not match the model it describes: missing d; unexpected e; "
        "a has shape (3, 2), expected (2, 3); b has dtype torch.float16, expected torch.float32"
    )


def test_check_state_dict_abbreviates_long_key_lists():
    expected = {f"k{i}": torch.zeros(1) for i in range(5)}
    with pytest.raises(CheckpointError) as err:
        check_state_dict(expected, {}, source=Path("ck"))
    assert str(err.value) == "ck does not match the model it describes: missing k0, k1, k2 (+2 more)"


# --- encoder files ---------------------------------------------------------------------------------


def encoder_info(model_cfg: ModelConfig) -> EncoderInfo:
    return EncoderInfo(
        model=model_cfg,
        image_size=16,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        interpolation="bilinear",
        config={"train": {"epochs": 2}, "augment": {"crop_scale": [0.3, 1.0]}},
        epoch=1,
        step=12,
    )


def test_encoder_round_trip_rebuilds_the_model_from_the_file_alone(tmp_path):
    model = tiny(head_layers=3, proj_dim=32)
    optimizer = build_optimizer(model, OptimConfig(), lr=0.1)
    train_steps(model, optimizer)  # weights and BN running stats away from their init
    info = encoder_info(ModelConfig(arch="resnet18", width=0.25, stem="small", head_layers=3, proj_dim=32))
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, model, info=info)

    loaded, loaded_info = load_encoder(path)
    assert loaded_info == info
    assert type(loaded_info.mean) is tuple and type(loaded_info.std) is tuple
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    model.eval()
    loaded.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        (h, z), (h2, z2) = model(x), loaded(x)
    assert h.shape == (3, 128) and z.shape == (3, 32)
    assert torch.equal(h, h2) and torch.equal(z, z2)


def test_encoder_metadata_fields(tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, tiny(), info=encoder_info(ModelConfig(arch="resnet18", width=0.25, stem="small")))
    meta = load(path, kind="encoder").meta
    assert meta == {
        "model": {"arch": "resnet18", "width": 0.25, "stem": "small", "head_layers": 2, "proj_dim": 128},
        "transform": {"image_size": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"},
        "config": {"train": {"epochs": 2}, "augment": {"crop_scale": [0.3, 1.0]}},
        "epoch": 1,
        "step": 12,
        "extra": {},
    }


def test_load_encoder_refuses_a_train_state_file(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(), lr=0.1)
    path = tmp_path / "step.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=1, epoch=0, config={}, elapsed=0.0)
    with pytest.raises(CheckpointError, match=r"holds a 'train-state' checkpoint where a 'encoder' one is needed$"):
        load_encoder(path)


def test_load_encoder_with_incomplete_metadata(tmp_path):
    path = tmp_path / "encoder.safetensors"
    save(path, tiny().state_dict(), kind="encoder", meta={"model": {"arch": "resnet18", "width": 0.25}})
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    assert str(err.value) == f"{path} has incomplete metadata (KeyError('transform')); the file is damaged or from another tool"


def test_load_encoder_with_invalid_model_metadata(tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, tiny(), info=encoder_info(ModelConfig(arch="resnet18", width=0.25, stem="small")))
    loaded = load(path, kind="encoder")
    loaded.meta["model"]["depth"] = 3
    save(path, loaded.tensors, kind="encoder", meta=loaded.meta)
    with pytest.raises(CheckpointError, match=r"has incomplete metadata \(TypeError\(.*depth.*\)\); the file is damaged"):
        load_encoder(path)


def test_load_encoder_weights_that_do_not_match_the_metadata(tmp_path):
    path = tmp_path / "encoder.safetensors"
    weights = tiny().state_dict()
    weights["head.extra"] = torch.zeros(1)
    del weights["encoder.conv1.weight"]
    save(path, weights, kind="encoder", meta={
        "model": {"arch": "resnet18", "width": 0.25, "stem": "small", "head_layers": 2, "proj_dim": 128},
        "transform": {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
        "config": {}, "epoch": 0, "step": 0,
    })
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    assert str(err.value) == f"{path} does not match the model it describes: missing encoder.conv1.weight; unexpected head.extra"


# --- training state --------------------------------------------------------------------------------


def assert_same_optimizer_state(model_a, opt_a, model_b, opt_b) -> None:
    params_b = dict(model_b.named_parameters())
    assert len(opt_b.state) == len(opt_a.state) > 0
    for name, param in model_a.named_parameters():
        state_a, state_b = opt_a.state[param], opt_b.state[params_b[name]]
        assert state_a.keys() == state_b.keys(), name
        for key, value in state_a.items():
            assert torch.equal(torch.as_tensor(state_b[key]), torch.as_tensor(value)), f"{name}/{key}"



def assert_same_next_step(model, optimizer, other, other_opt) -> None:
    """The restored optimiser takes exactly the same next step as the original."""
    torch.manual_seed(5)
    train_steps(model, optimizer, steps=1)
    torch.manual_seed(5)
    train_steps(other, other_opt, steps=1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name

def test_train_state_round_trip_with_lars(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="lars"), lr=0.5)
    train_steps(model, optimizer)
    torch.manual_seed(123)
    torch.rand(5)  # an RNG state that is not a fresh seed's
    path = tmp_path / "step-000000002.safetensors"
    config = {"train": {"epochs": 3}, "augment": {"crop_scale": [0.2, 1.0]}}
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=2, epoch=1, config=config, elapsed=4.5)
    expected_draw = torch.rand(8)

    keys = load(path, kind="train-state").tensors.keys()
    names = [name for name, _ in model.named_parameters()]
    assert {k for k in keys if k.startswith("optim/")} == {f"optim/{n}/momentum_buffer" for n in names}
    assert "model/encoder.conv1.weight" in keys and "model/encoder.bn1.running_mean" in keys and "rng/torch" in keys

    torch.manual_seed(999)
    other = tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other_opt = build_optimizer(other, OptimConfig(name="lars"), lr=0.5)
    meta = load_train_state(path, model=other, optimizer=other_opt, scaler=disabled_scaler())

    assert meta == {"step": 2, "epoch": 1, "elapsed": 4.5, "config": config, "scaler": {}}
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    assert_same_optimizer_state(model, optimizer, other, other_opt)
    assert torch.equal(torch.rand(8), expected_draw)  # the RNG continues where the save left it

    assert_same_next_step(model, optimizer, other, other_opt)


def test_train_state_round_trip_with_adamw(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3), lr=1e-3)
    train_steps(model, optimizer, steps=3)
    path = tmp_path / "state.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=3, epoch=0, config={}, elapsed=1.0)

    other = tiny()
    other_opt = build_optimizer(other, OptimConfig(name="adamw", lr=1e-3), lr=1e-3)
    load_train_state(path, model=other, optimizer=other_opt, scaler=disabled_scaler())
    assert_same_optimizer_state(model, optimizer, other, other_opt)
    some = next(other.parameters())
    assert set(other_opt.state[some]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(other_opt.state[some]["step"]) == 3.0

    assert_same_next_step(model, optimizer, other, other_opt)


def test_loading_replaces_existing_optimizer_state(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="lars"), lr=0.5)
    path = tmp_path / "fresh.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=0, epoch=0, config={}, elapsed=0.0)
    train_steps(model, optimizer)
    assert len(optimizer.state) > 0
    load_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler())
    assert len(optimizer.state) == 0  # no stale momentum from after the save


def test_train_state_into_another_architecture_names_the_keys(tmp_path):
    model = tiny("resnet18")
    optimizer = build_optimizer(model, OptimConfig(), lr=0.1)
    path = tmp_path / "r18.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=1, epoch=0, config={}, elapsed=0.0)

    bigger = tiny("resnet34")
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=bigger, optimizer=build_optimizer(bigger, OptimConfig(), lr=0.1), scaler=disabled_scaler())
    assert str(err.value).startswith(
        f"{path} does not match the model it describes: missing encoder.layer1.2.bn1.bias, "
        "encoder.layer1.2.bn1.num_batches_tracked, encoder.layer1.2.bn1.running_mean (+"
    )

    bottleneck = tiny("resnet50")
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=bottleneck, optimizer=build_optimizer(bottleneck, OptimConfig(), lr=0.1), scaler=disabled_scaler())
    message = str(err.value)
    assert "missing encoder.layer1.0.bn3.bias" in message
    assert "encoder.layer1.0.conv1.weight has shape (16, 16, 3, 3), expected (16, 16, 1, 1)" in message


def test_train_state_with_optimizer_state_for_an_unknown_parameter(tmp_path):
    model = tiny()
    path = tmp_path / "state.safetensors"
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors["optim/encoder.fc.weight/momentum_buffer"] = torch.zeros(2)
    save(path, tensors, kind="train-state", meta={"step": 1, "epoch": 0})
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=model, optimizer=build_optimizer(model, OptimConfig(), lr=0.1), scaler=disabled_scaler())
    assert str(err.value) == f"{path} has optimiser state for unknown parameter 'encoder.fc.weight'; it belongs to another model"


@pytest.mark.parametrize(("meta", "key"), [({"epoch": 0}, "step"), ({"step": 1, "epoch": "0"}, "epoch")])
def test_train_state_without_a_valid_position(tmp_path, meta, key):
    model = tiny()
    path = tmp_path / "state.safetensors"
    save(path, {f"model/{k}": v for k, v in model.state_dict().items()}, kind="train-state", meta=meta)
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=model, optimizer=build_optimizer(model, OptimConfig(), lr=0.1), scaler=disabled_scaler())
    assert str(err.value) == f"{path} has no valid '{key}' in its metadata; the file is damaged"


def test_no_pickle_in_the_checkpoint_module():
    source = Path(checkpoint.__file__).read_text(encoding="utf-8")
    for forbidden in ("import pickle", "torch.save", "torch.load"):
        assert forbidden not in source
