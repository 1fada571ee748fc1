"""Checkpoints: atomic writes, the safetensors container and its header, strict loading, round trips."""

from __future__ import annotations

import errno
import os
import pickle
import re
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from simclr_cli.engine import checkpoint, files
from simclr_cli.engine.checkpoint import (
    EncoderInfo,
    check_state_dict,
    load,
    load_encoder,
    load_train_state,
    save,
    save_encoder,
    save_train_state,
)
from simclr_cli.engine.errors import CheckpointError, OutputError
from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.optim import OptimConfig, build_optimizer




def tiny(arch: str = "resnet18", **kwargs):
    torch.manual_seed(0)
    # as the encoder_info(...) configs below describe it: the small stem, BN on z (head_output_bn unset)
    return build_model(ModelConfig(arch=arch, width=0.25, stem="small", **kwargs))


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
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst)))
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
    assert str(err.value) == (
        f"{path} is not a safetensors file: it is a text file of 43 bytes; pass a checkpoint written by simclr"
    )


@pytest.mark.parametrize(
    ("keep", "problem"),
    [
        (0, r"is empty \(0 bytes\)"),
        (7, r"is not a safetensors file: it is only 7 bytes long"),
        (20, r"is not a readable safetensors file: it is cut short: its header announces \d+ bytes, only 12 follow"),
        (-5, r"is not a readable safetensors file: it is cut short: its tensors need 400 bytes of data, only 395 are there"),
    ],
)
def test_load_a_truncated_file(tmp_path, keep, problem):
    path = tmp_path / "c.safetensors"
    save(path, {"a": torch.arange(100.0)}, kind="encoder", meta={"epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    fix = "copy it again, or pass another checkpoint" if keep < 8 and keep >= 0 else "copy it again, or pass an earlier checkpoint"
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} {problem}; {fix}$"):
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
    with pytest.raises(CheckpointError, match="is not a safetensors file: it is a pickle file; simclr never unpickles"):
        load(path, kind="encoder")
    with pytest.raises(CheckpointError, match="is not a safetensors file: it is a pickle file; simclr never unpickles"):
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
    assert str(err.value) == (
        f"{path} is a training-state checkpoint (what --resume reads), not an encoder; pass the encoder.safetensors of its run"
    )
    with pytest.raises(CheckpointError) as err:
        load(path, kind="linear-classifier")
    assert str(err.value) == f"{path} holds a 'train-state' checkpoint where a 'linear-classifier' one is needed"


def test_a_training_state_given_for_an_encoder_names_its_run_s_encoder(tmp_path):
    run = tmp_path / "run"
    state = run / "checkpoints" / "step-000000010.safetensors"
    save(state, {"w": torch.zeros(2)}, kind="train-state", meta={})
    save(run / "encoder.safetensors", {"w": torch.zeros(2)}, kind="encoder", meta={})
    with pytest.raises(CheckpointError) as err:
        load(state, kind="encoder")
    assert str(err.value) == (
        f"{state} is a training-state checkpoint (what --resume reads), not an encoder; its run's encoder is "
        f"{run / 'encoder.safetensors'}"
    )


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
    optimizer = build_optimizer(model, OptimConfig().resolved(image_size=224), lr=0.1)
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
        "model": {"arch": "resnet18", "width": 0.25, "stem": "small", "head_layers": 2, "proj_dim": 128,
                  "zero_init_residual": False, "head_output_bn": None, "sk_ratio": 0.0},
        "transform": {"image_size": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"},
        "config": {"train": {"epochs": 2}, "augment": {"crop_scale": [0.3, 1.0]}},
        "epoch": 1,
        "step": 12,
        "extra": {},
    }


def test_an_encoder_file_from_before_selective_kernels_loads_without_them(tmp_path):
    path = tmp_path / "encoder.safetensors"
    cfg = ModelConfig(arch="resnet18", width=0.25, stem="small")
    save_encoder(path, tiny(), info=encoder_info(cfg))
    header, tensors = checkpoint.read_safetensors(path, fix="")
    meta = checkpoint.parse_json(header["model"])
    del meta["sk_ratio"]  # what a file written before sk_ratio existed says
    save_file(tensors, str(path), metadata=header | {"model": checkpoint.json.dumps(meta)})
    _, info = load_encoder(path)
    assert info.model.sk_ratio == 0.0


def test_load_encoder_refuses_a_train_state_file(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig().resolved(image_size=224), lr=0.1)
    path = tmp_path / "step.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=1, epoch=0, config={}, elapsed=0.0)
    with pytest.raises(CheckpointError, match=r"is a training-state checkpoint \(what --resume reads\), not an encoder; "):
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
        "model": {"arch": "resnet18", "width": 0.25, "stem": "small", "head_layers": 2, "proj_dim": 128,
                  "zero_init_residual": False, "sk_ratio": 0.0},
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
    optimizer = build_optimizer(model, OptimConfig(name="lars").resolved(image_size=224), lr=0.5)
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
    other_opt = build_optimizer(other, OptimConfig(name="lars").resolved(image_size=224), lr=0.5)
    meta = load_train_state(path, model=other, optimizer=other_opt, scaler=disabled_scaler())

    assert meta == {"step": 2, "epoch": 1, "elapsed": 4.5, "config": config, "scaler": {}}
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    assert_same_optimizer_state(model, optimizer, other, other_opt)
    assert torch.equal(torch.rand(8), expected_draw)  # the RNG continues where the save left it

    assert_same_next_step(model, optimizer, other, other_opt)


def test_train_state_round_trip_with_adamw(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3).resolved(image_size=224), lr=1e-3)
    train_steps(model, optimizer, steps=3)
    path = tmp_path / "state.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=3, epoch=0, config={}, elapsed=1.0)

    other = tiny()
    other_opt = build_optimizer(other, OptimConfig(name="adamw", lr=1e-3).resolved(image_size=224), lr=1e-3)
    load_train_state(path, model=other, optimizer=other_opt, scaler=disabled_scaler())
    assert_same_optimizer_state(model, optimizer, other, other_opt)
    some = next(other.parameters())
    assert set(other_opt.state[some]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(other_opt.state[some]["step"]) == 3.0

    assert_same_next_step(model, optimizer, other, other_opt)


def test_loading_replaces_existing_optimizer_state(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="lars").resolved(image_size=224), lr=0.5)
    path = tmp_path / "fresh.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=0, epoch=0, config={}, elapsed=0.0)
    train_steps(model, optimizer)
    assert len(optimizer.state) > 0
    load_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler())
    assert len(optimizer.state) == 0  # no stale momentum from after the save


def test_train_state_into_another_architecture_names_the_keys(tmp_path):
    model = tiny("resnet18")
    optimizer = build_optimizer(model, OptimConfig().resolved(image_size=224), lr=0.1)
    path = tmp_path / "r18.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=1, epoch=0, config={}, elapsed=0.0)

    bigger = tiny("resnet34")
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=bigger, optimizer=build_optimizer(bigger, OptimConfig().resolved(image_size=224), lr=0.1), scaler=disabled_scaler())
    assert str(err.value).startswith(
        f"{path} does not match the model it describes: missing encoder.layer1.2.bn1.bias, "
        "encoder.layer1.2.bn1.num_batches_tracked, encoder.layer1.2.bn1.running_mean (+"
    )

    bottleneck = tiny("resnet50")
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=bottleneck, optimizer=build_optimizer(bottleneck, OptimConfig().resolved(image_size=224), lr=0.1), scaler=disabled_scaler())
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
        load_train_state(path, model=model, optimizer=build_optimizer(model, OptimConfig().resolved(image_size=224), lr=0.1), scaler=disabled_scaler())
    assert str(err.value) == f"{path} has optimiser state for unknown parameter 'encoder.fc.weight'; it belongs to another model"


@pytest.mark.parametrize(("meta", "key"), [({"epoch": 0}, "step"), ({"step": 1, "epoch": "0"}, "epoch")])
def test_train_state_without_a_valid_position(tmp_path, meta, key):
    model = tiny()
    path = tmp_path / "state.safetensors"
    save(path, {f"model/{k}": v for k, v in model.state_dict().items()}, kind="train-state", meta=meta)
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=model, optimizer=build_optimizer(model, OptimConfig().resolved(image_size=224), lr=0.1), scaler=disabled_scaler())
    assert str(err.value) == f"{path} has no valid '{key}' in its metadata; the file is damaged"


def test_no_pickle_in_the_checkpoint_module():
    source = Path(checkpoint.__file__).read_text(encoding="utf-8")
    for forbidden in ("import pickle", "torch.save", "torch.load"):
        assert forbidden not in source


# --- a full disk, a quota, a read-only or forbidden folder -------------------------------------------


WRITE_ERRORS = [
    (errno.ENOSPC, "no space left on device; free space or pass another --out"),
    (errno.EDQUOT, "disk quota exceeded; free space or pass another --out"),
    (errno.EROFS, "read-only file system; pass an --out on a writable disk"),
    (errno.EACCES, "permission denied; check the permissions or pass another --out"),
    (errno.EPERM, "operation not permitted; check the permissions or pass another --out"),
]


def failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(("code", "words"), WRITE_ERRORS)
@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_atomic_write_refused_by_the_machine_keeps_the_old_file(tmp_path, monkeypatch, code, words, where):
    target = tmp_path / "checkpoints" / "step-000000010.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old checkpoint \x00\x01")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a new one")
        if where == "write":
            raise OSError(code, os.strerror(code))

    if where != "write":
        monkeypatch.setattr(files.os, where, failing(code))
    with pytest.raises(OutputError) as err:
        atomic_write(target, write)
    monkeypatch.undo()
    assert str(err.value) == f"cannot write {target}: {words} (the previous step-000000010.safetensors is intact)"
    assert err.value.errno == code and isinstance(err.value.__cause__, OSError)
    assert target.read_bytes() == b"old checkpoint \x00\x01"
    assert files_in(target.parent) == ["step-000000010.safetensors"]  # no temp file left


def test_atomic_write_of_a_new_file_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "fsync", failing(errno.ENOSPC))
    with pytest.raises(OutputError) as err:
        atomic_write(tmp_path / "metrics.jsonl", lambda tmp: tmp.write_text("x"))
    assert str(err.value) == (
        f"cannot write {tmp_path / 'metrics.jsonl'}: no space left on device; free space or pass another --out (nothing was written)"
    )
    assert files_in(tmp_path) == []


def test_atomic_write_into_a_read_only_folder(tmp_path, monkeypatch):
    # tests run as root, whom chmod does not stop: the read-only file system is simulated where the temp file is made
    monkeypatch.setattr(files.os, "open", failing(errno.EROFS))
    with pytest.raises(OutputError, match=r"read-only file system; pass an --out on a writable disk \(nothing was written\)$"):
        atomic_write(tmp_path / "f.txt", lambda tmp: tmp.write_text("x"))
    monkeypatch.undo()
    assert files_in(tmp_path) == []


def test_safetensors_running_out_of_space_is_an_output_error(tmp_path, monkeypatch):
    # safetensors' Rust writer reports ENOSPC as SafetensorError("... (os error 28)"), not as an OSError
    path = tmp_path / "encoder.safetensors"
    save(path, {"w": torch.ones(3)}, kind="encoder", meta={"step": 1})
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OutputError) as err:
        save(path, {"w": torch.zeros(3)}, kind="encoder", meta={"step": 2})
    assert str(err.value) == (
        f"cannot write {path}: no space left on device; free space or pass another --out (the previous encoder.safetensors is intact)"
    )
    assert path.read_bytes() == before and files_in(tmp_path) == ["encoder.safetensors"]


def test_other_write_errors_are_not_dressed_up(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "replace", failing(errno.EXDEV))
    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "f.txt", lambda tmp: tmp.write_text("x"))
    assert not isinstance(err.value, OutputError) and err.value.errno == errno.EXDEV
    assert files_in(tmp_path) == []


def test_writing_turns_a_full_disk_into_one_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    with pytest.raises(OutputError) as err, files.writing(log, kept="earlier lines are intact"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(err.value) == f"cannot write {log}: disk quota exceeded; free space or pass another --out (earlier lines are intact)"
    with pytest.raises(ValueError), files.writing(log, kept=""):
        raise ValueError("a bug stays a bug")


# --- hostile and damaged files -------------------------------------------------------------------------


def raw_safetensors(path: Path, header: bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file laid out as safetensors (8-byte little-endian header length, JSON header, data), any part forged."""
    size = len(header) if length is None else length
    path.write_bytes(size.to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize(
    ("header", "length", "problem"),
    [
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 10**6, r"is not a readable safetensors file: it is cut short: its header announces 1000000 bytes, only \d+ follow"),
        (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 2**63, r"is not a safetensors file: it does not start with a safetensors header \(another format, or damaged\)"),
        (b"{this is not json}", None, r"is not a readable safetensors file: its header is not valid JSON \(the file is damaged\)"),
        (b'{"a": \xff\xfe}', None, r"is not a readable safetensors file: its header is not valid JSON \(the file is damaged\)"),
        (b"[1, 2, 3]", None, r"is not a safetensors file: it does not start with a safetensors header \(another format, or damaged\)"),
        (b'{"a":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}', None, r"is not a readable safetensors file: it is cut short: its tensors need 4000 bytes of data, only 8 are there"),
    ],
)
def test_a_forged_header_is_refused_without_reading_what_it_claims(tmp_path, header, length, problem):
    path = raw_safetensors(tmp_path / "forged.safetensors", header, b"\0" * 8, length=length)
    with pytest.raises(CheckpointError, match=rf"{problem}; "):
        load(path, kind="encoder")


@pytest.mark.parametrize(
    "header",
    [
        b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}',  # shape and byte range disagree
        b'{"a":{"dtype":"Q99","shape":[2],"data_offsets":[0,8]}}',  # no such dtype
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',  # offsets leave a hole
        b'{"__metadata__":{"format":7},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',  # metadata not strings
    ],
)
def test_inconsistent_headers_are_refused_by_safetensors_itself(tmp_path, header):
    path = raw_safetensors(tmp_path / "odd.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"is not a readable safetensors file \(.+\); pass a checkpoint written by simclr$"):
        load(path, kind="encoder")


def test_a_torch_zip_archive_is_refused_as_pickled(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)  # tests only: what someone renaming a .pth would hand us
    with pytest.raises(CheckpointError) as err:
        load(path, kind="encoder")
    assert str(err.value) == (
        f"{path} is not a safetensors file: it is a PyTorch zip archive, whose contents are pickled; simclr never "
        "unpickles files (unpickling can run code): convert it to .safetensors where it was made (with the safetensors "
        "package), and pass that file"
    )


def encoder_payload(source, *, meta_model: dict | None = None, **changes) -> tuple[dict, dict]:
    tensors = dict(source.state_dict())
    meta = {
        "model": meta_model or {"arch": "resnet18", "width": 0.25, "stem": "small", "head_layers": 2, "proj_dim": 128},
        "transform": {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
        "config": {}, "epoch": 0, "step": 0,
    }
    meta.update(changes)
    return tensors, meta


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_load_encoder_refuses_non_finite_weights(tmp_path, bad):
    tensors, meta = encoder_payload(tiny())
    tensors["encoder.layer2.0.conv1.weight"] = tensors["encoder.layer2.0.conv1.weight"].clone()
    tensors["encoder.layer2.0.conv1.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "diverged.safetensors"
    save(path, tensors, kind="encoder", meta=meta)
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    assert str(err.value) == (
        f"{path} holds NaN/inf values in encoder.layer2.0.conv1.weight; the run that wrote it diverged — use an earlier checkpoint"
    )


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model": {"arch": "resnet19", "width": 0.25, "stem": "small", "head_layers": 2, "proj_dim": 128}}, "model.arch 'resnet19'"),
        ({"transform": {"image_size": 16, "mean": [0.5] * 2, "std": [0.5] * 3, "interpolation": "bicubic"}}, "augment.mean"),
        ({"transform": {"image_size": 16, "mean": [0.5] * 3, "std": [0.0] * 3, "interpolation": "bicubic"}}, "augment.std"),
        ({"transform": {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "magic"}}, "augment.interpolation"),
        ({"transform": {"image_size": "16", "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}}, "augment.image_size"),
        ({"config": {"augment": {"flip_p": 2}}}, "augment.flip_p 2"),  # what fine-tuning flips with
        ({"config": {"augment": {"flip_p": "often"}}}, "augment.flip_p 'often'"),
        ({"config": {"augment": [0.5]}}, "config.augment is a list"),
    ],
)
def test_load_encoder_refuses_invalid_metadata_values(tmp_path, change, words):
    tensors, meta = encoder_payload(tiny(), **change)
    path = tmp_path / "encoder.safetensors"
    save(path, tensors, kind="encoder", meta=meta)
    with pytest.raises(CheckpointError, match=rf"has invalid metadata \({re.escape(words)}.*\); the file is damaged or from another tool$"):
        load_encoder(path)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"epoch": -1}, "epoch -1 is not a whole number >= 0"),
        ({"step": 2.5}, "step 2.5 is not a whole number >= 0"),
        ({"config": [1, 2]}, "config is a list, not a mapping"),
        ({"model": "resnet18"}, "argument after ** must be a mapping"),
    ],
)
def test_load_encoder_refuses_metadata_of_the_wrong_type(tmp_path, change, words):
    tensors, meta = encoder_payload(tiny(), **change)
    path = tmp_path / "encoder.safetensors"
    save(path, tensors, kind="encoder", meta=meta)
    with pytest.raises(CheckpointError, match=rf"has incomplete metadata \(.*{re.escape(words)}.*\); the file is damaged"):
        load_encoder(path)


def test_metadata_describing_a_huge_model_allocates_nothing(tmp_path):
    # a ResNet-152 at 64x width would be ~16e9 parameters: the file is refused from shapes alone, at once
    huge = {"arch": "resnet152", "width": 64, "stem": "standard", "head_layers": 3, "proj_dim": 128}
    tensors, meta = encoder_payload(tiny(), meta_model=huge)
    path = tmp_path / "huge.safetensors"
    save(path, tensors, kind="encoder", meta=meta)
    with pytest.raises(CheckpointError, match="does not match the model it describes: missing encoder.layer1.0.bn3.bias"):
        load_encoder(path)


def snapshot(model, optimizer) -> tuple[dict, dict, torch.Tensor]:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: torch.as_tensor(v).clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return weights, state, torch.get_rng_state()


def assert_unchanged(model, optimizer, before) -> None:
    weights, state, rng = before
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name  # bit-identical: nothing half-loaded
    assert {id(p) for p in optimizer.state} == set(state)
    for param, buffers in optimizer.state.items():
        for key, value in buffers.items():
            assert torch.equal(torch.as_tensor(value), state[id(param)][key])
    assert torch.equal(torch.get_rng_state(), rng)


def damage_nan_weight(t, meta):
    t["model/encoder.layer4.1.bn2.weight"] = torch.full_like(t["model/encoder.layer4.1.bn2.weight"], float("nan"))
    return "holds NaN/inf values in encoder.layer4.1.bn2.weight; the run that wrote it diverged"


def damage_inf_momentum(t, meta):
    key = next(k for k in t if k.startswith("optim/") and k.endswith("momentum_buffer"))
    t[key] = torch.full_like(t[key], float("inf"))
    return "holds NaN/inf values in optim/"


def damage_optimizer_key(t, meta):
    t["optim/broken"] = torch.zeros(1)
    return "has a malformed optimiser entry 'optim/broken'; the file is damaged"


def damage_buffer_shape(t, meta):
    t["optim/encoder.conv1.weight/momentum_buffer"] = torch.zeros(7)
    return "has optimiser state optim/encoder.conv1.weight/momentum_buffer of shape (7,) for a parameter of shape"


def damage_rng(t, meta):
    t["rng/torch"] = torch.zeros(3)
    return "has a malformed rng/torch (torch.float32, shape (3,)); the file is damaged"


def damage_step(t, meta):
    meta["step"] = -4
    return "has no valid 'step' in its metadata; the file is damaged"


def damage_dtype(t, meta):
    t["model/encoder.bn1.running_mean"] = t["model/encoder.bn1.running_mean"].double()
    return "encoder.bn1.running_mean has dtype torch.float64, expected torch.float32"


@pytest.mark.parametrize(
    "damage", [damage_nan_weight, damage_inf_momentum, damage_optimizer_key, damage_buffer_shape, damage_rng, damage_step, damage_dtype]
)
def test_a_refused_train_state_changes_nothing(tmp_path, damage):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig(name="lars").resolved(image_size=224), lr=0.5)
    train_steps(model, optimizer)
    path = tmp_path / "state.safetensors"
    save_train_state(path, model=model, optimizer=optimizer, scaler=disabled_scaler(), step=2, epoch=0, config={}, elapsed=1.0)
    loaded = load(path, kind="train-state")
    words = damage(loaded.tensors, loaded.meta)
    save(path, loaded.tensors, kind="train-state", meta=loaded.meta)

    other = tiny()
    other_opt = build_optimizer(other, OptimConfig(name="lars").resolved(image_size=224), lr=0.5)
    torch.manual_seed(3)
    train_steps(other, other_opt)  # weights and momentum of its own, which a failed load must not touch
    before = snapshot(other, other_opt)
    with pytest.raises(CheckpointError) as err:
        load_train_state(path, model=other, optimizer=other_opt, scaler=disabled_scaler())
    assert words in str(err.value)
    assert "\n" not in str(err.value)
    assert_unchanged(other, other_opt, before)


def test_a_malformed_scaler_entry_changes_nothing(tmp_path):
    model = tiny()
    optimizer = build_optimizer(model, OptimConfig().resolved(image_size=224), lr=0.1)
    path = tmp_path / "state.safetensors"
    save(path, {f"model/{k}": v for k, v in model.state_dict().items()}, kind="train-state",
         meta={"step": 1, "epoch": 0, "scaler": {"scale": "big"}})
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    before = snapshot(model, optimizer)
    with pytest.raises(CheckpointError, match="has a malformed 'scaler' entry in its metadata; the file is damaged"):
        load_train_state(path, model=model, optimizer=optimizer, scaler=scaler)
    assert_unchanged(model, optimizer, before)
