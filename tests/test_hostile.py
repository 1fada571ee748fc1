"""Hostile, damaged and unwritable files, end to end: every command that reads a checkpoint refuses a bad one with
one line naming the problem (exit 2, no traceback), runs no code from it, uses none of it and writes nothing;
a full disk or an escaping OSError is one line too; `--resume` steps over a damaged newest checkpoint."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from conftest import write_images
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import checkpoint, files, weights
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.model import ModelConfig, build_model

runner = CliRunner()
COMMON = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "8"]
TINY = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--epochs", "1"]
DIVERGED = "the run that wrote it diverged — use an earlier checkpoint"
PICKLE_FIX = "simclr never unpickles files (unpickling can run code)"


class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a malicious pickled checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists(), "the payload must really run when unpickled, or these tests prove nothing"
    return tmp_path / "pwned"


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A valid tiny encoder file: resnet18 at width 0.25 with the small stem, as `pretrain` TINY builds."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16)
    info = checkpoint.EncoderInfo(model=cfg, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                                  config={}, epoch=1, step=3)
    path = tmp_path / "good" / "encoder.safetensors"
    checkpoint.save_encoder(path, build_model(cfg), info=info)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder / "a", 8, size=16, seed=1)
    write_images(folder / "b", 8, size=16, seed=2)
    return folder


# --- the bad files -------------------------------------------------------------------------------------


def rewritten(good: Path, dst: Path, change: Callable[[dict, dict], None]) -> Path:
    """`good` with its tensors and header metadata edited by `change`, as a well-formed safetensors file."""
    with safe_open(str(good), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def set_tensor(name: str, value: Callable[[torch.Tensor], torch.Tensor]):
    def change(tensors, meta):
        tensors[name] = value(tensors[name]).contiguous()

    return change


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def header_length_past_end(good: Path, dst: Path) -> Path:
    data = good.read_bytes()
    dst.write_bytes((len(data) + 1000).to_bytes(8, "little") + data[8:])
    return dst


def header_not_json(good: Path, dst: Path) -> Path:
    data = bytearray(good.read_bytes())
    length = int.from_bytes(data[:8], "little")
    data[9:8 + length] = b"\x00garbage" * (length // 8) + b"!" * (length - 1 - 8 * (length // 8))
    dst.write_bytes(bytes(data))
    return dst


@dataclass(frozen=True)
class Bad:
    name: str
    make: Callable[[Path, Path, Path], Path]  # (good file, destination, marker) -> the bad file
    message: str  # regex the error line must match, from `checkpoint.load_encoder`'s side
    init_message: str | None = None  # the same, where --init (weights.init_encoder) words it differently


FIX = "pass a checkpoint written by simclr"
BAD_FILES = [
    Bad("empty", lambda g, d, m: (d.write_bytes(b""), d)[1], r"is empty \(0 bytes\); copy it again"),
    Bad("text", lambda g, d, m: (d.write_text("hello\n"), d)[1], r"is not a safetensors file: it is a text file of 6 bytes; "),
    Bad("truncated", lambda g, d, m: (d.write_bytes(g.read_bytes()[:-100]), d)[1],
        r"is not a readable safetensors file: it is cut short: its tensors need \d+ bytes of data, only \d+ are there; "
        r"copy it again, or pass an earlier checkpoint$"),
    Bad("garbage", lambda g, d, m: (d.write_bytes(os.urandom(3000)), d)[1],
        r"is not a safetensors file: it does not start with a safetensors header \(another format, or damaged\)"),
    Bad("header-past-end", lambda g, d, m: header_length_past_end(g, d),
        r"is not a readable safetensors file: it is cut short: its header announces \d+ bytes, only \d+ follow"),
    Bad("header-not-json", lambda g, d, m: header_not_json(g, d),
        r"is not a readable safetensors file: its header is not valid JSON \(the file is damaged\)"),
    Bad("pickle", lambda g, d, m: (d.write_bytes(pickle.dumps({"state_dict": Payload(m)})), d)[1],
        rf"is not a safetensors file: it is a pickle file; {re.escape(PICKLE_FIX)}"),
    Bad("torch-save", lambda g, d, m: (torch.save({"conv1.weight": torch.zeros(1), "x": Payload(m)}, d), d)[1],
        rf"is not a safetensors file: it is a PyTorch zip archive, whose contents are pickled; {re.escape(PICKLE_FIX)}"),
    Bad("not-simclr", lambda g, d, m: (save_file({"w": torch.zeros(2)}, str(d), metadata={"framework": "pt"}), d)[1],
        r"is a safetensors file but not a simclr checkpoint \(no 'simclr-cli' header\)$",
        r"\(torchvision layout\) does not fit this encoder: missing bn1\.bias"),
    Bad("future-version", lambda g, d, m: rewritten(g, d, lambda t, meta: meta.update(format_version="7")),
        r"has checkpoint format version 7; this simclr reads version 1 — upgrade simclr$"),
    Bad("metadata-not-json", lambda g, d, m: rewritten(g, d, lambda t, meta: meta.update(transform="{oops")),
        r"has corrupt metadata \(.+\); the file is damaged$"),
    Bad("wrong-kind", lambda g, d, m: rewritten(g, d, lambda t, meta: meta.update(kind="train-state")),
        r"is a training-state checkpoint \(what --resume reads\), not an encoder; pass the encoder\.safetensors of its run$"),
    Bad("nan", lambda g, d, m: rewritten(g, d, set_tensor("encoder.layer3.0.conv2.weight", with_nan)),
        rf"holds NaN/inf values in (encoder\.)?layer3\.0\.conv2\.weight; {DIVERGED}$"),
    Bad("inf", lambda g, d, m: rewritten(g, d, set_tensor("head.layers.0.linear.weight", lambda t: torch.full_like(t, float("inf")))),
        rf"holds NaN/inf values in head\.layers\.0\.linear\.weight; {DIVERGED}$"),
    Bad("wrong-shape", lambda g, d, m: rewritten(g, d, set_tensor("encoder.conv1.weight", lambda t: torch.zeros(8, 3, 5, 5))),
        r"conv1\.weight has shape \(8, 3, 5, 5\), expected \(16, 3, 3, 3\)"),
    Bad("wrong-dtype", lambda g, d, m: rewritten(g, d, set_tensor("encoder.conv1.weight", lambda t: t.to(torch.int32))),
        r"conv1\.weight has dtype torch\.int32, expected torch\.float32"),
    Bad("missing-key", lambda g, d, m: rewritten(g, d, lambda t, meta: t.pop("encoder.layer4.1.bn2.bias")),
        r"missing (encoder\.)?layer4\.1\.bn2\.bias"),
    Bad("extra-key", lambda g, d, m: rewritten(g, d, lambda t, meta: t.update({"encoder.layer9.0.conv1.weight": torch.zeros(2)})),
        r"unexpected (encoder\.)?layer9\.0\.conv1\.weight"),
]


def make_bad(bad: Bad, good: Path, marker: Path) -> Path:
    folder = good.parent.parent / "bad"
    folder.mkdir(exist_ok=True)
    return bad.make(good, folder / f"{bad.name}.safetensors", marker)


def the_error(result) -> str:
    """The one error line a user sees for a bad input: exit 2, no traceback, nothing after it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert result.output.rstrip().endswith(errors[0])
    return errors[0]


def files_under(folder: Path) -> list[str]:
    """Every file below `folder` (an empty folder is not an output)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


# --- every command that reads a checkpoint ---------------------------------------------------------------


COMMANDS = {
    "embed": lambda bad, images, out: ["embed", str(images), "-c", str(bad), "-o", str(out / "vecs.npy"), *COMMON],
    "knn": lambda bad, images, out: ["knn", str(bad), "--data", str(images), "--out", str(out / "knn"), *COMMON],
    "info": lambda bad, images, out: ["info", str(bad)],
    "export": lambda bad, images, out: ["export", str(bad), "--to", "safetensors-encoder", "-o", str(out / "e.safetensors")],
    "pretrain --init": lambda bad, images, out: ["pretrain", str(images), "--init", str(bad), *TINY, *COMMON, "--out", str(out / "run")],
}


@pytest.mark.parametrize("bad", BAD_FILES, ids=lambda b: b.name)
def test_every_command_refuses_a_bad_checkpoint_in_one_line(bad, good, images, marker, tmp_path):
    path = make_bad(bad, good, marker)
    content = path.read_bytes()
    for command, args in COMMANDS.items():
        out = tmp_path / "out" / command.replace(" ", "")
        line = the_error(runner.invoke(app, args(path, images, out)))
        expected = bad.init_message if command == "pretrain --init" and bad.init_message else bad.message
        assert re.search(expected, line), f"{command}: {line}"
        assert str(path) in line, f"{command}: {line}"
        assert files_under(out) == [], f"{command} wrote {files_under(out)}"  # no output, no partial file
    assert not (path.parent / "eval").exists()  # no results beside the bad file either
    assert path.read_bytes() == content
    assert not marker.exists()  # no code from the file ran


@pytest.mark.parametrize("bad", BAD_FILES, ids=lambda b: b.name)
def test_init_from_a_bad_file_leaves_the_model_bit_identical(bad, good, marker):
    path = make_bad(bad, good, marker)
    torch.manual_seed(5)
    model = build_model(ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=bad.init_message or bad.message):
        weights.init_encoder(model, path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not marker.exists()


def test_init_refuses_non_finite_weights_from_any_source(tmp_path):
    # a torchvision-named file, where the NaN sits in the head-less encoder tensors only
    torch.manual_seed(1)
    source = build_model(ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16)).encoder.state_dict()
    tensors = {k: v.clone().contiguous() for k, v in source.items()}
    tensors["layer1.0.bn1.running_var"][0] = float("inf")
    path = tmp_path / "tv.safetensors"
    save_file(tensors, str(path))
    model = build_model(ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        weights.init_encoder(model, path)
    assert str(err.value) == f"{path} holds NaN/inf values in layer1.0.bn1.running_var; {DIVERGED}"
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_init_accepts_half_precision_weights_but_not_integers(tmp_path):
    torch.manual_seed(1)
    source = build_model(ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16)).encoder.state_dict()
    # fp16 weights, and BN counters saved as floats (as some converters do): harmless casts
    half = {k: (v.half() if v.is_floating_point() else v.float()).contiguous() for k, v in source.items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    model = build_model(ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16))
    assert weights.init_encoder(model, tmp_path / "half.safetensors").loaded == len(source)
    assert model.encoder.conv1.weight.dtype == torch.float32
    ints = dict(half, **{"bn1.weight": torch.ones(16, dtype=torch.int64)})
    save_file(ints, str(tmp_path / "ints.safetensors"))
    with pytest.raises(CheckpointError, match=r"bn1\.weight has dtype torch\.int64, expected torch\.float32"):
        weights.init_encoder(model, tmp_path / "ints.safetensors")


# --- --resume steps over a damaged newest checkpoint ---------------------------------------------------------


def pretrain(images: Path, out: Path, *extra: str):
    return runner.invoke(app, ["pretrain", str(images), *TINY, *COMMON, "--checkpoint-every", "1", "--out", str(out), *extra])


def test_resume_falls_back_to_the_previous_checkpoint_and_says_why(images, tmp_path, marker):
    out = tmp_path / "run"
    assert pretrain(images, out).exit_code == 0
    newest, previous = out / "checkpoints" / "step-000000002.safetensors", out / "checkpoints" / "step-000000001.safetensors"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [previous.name, newest.name]
    newest.write_bytes(newest.read_bytes()[:-64])  # a torn write

    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())
    assert "skipping step-000000002.safetensors" in said and "it is cut short" in said
    assert "(step 1, epoch 1)" in said  # resumed from the previous one
    checkpoint.load(newest, kind=checkpoint.TRAIN_STATE)  # step 2 ran again and was saved whole

    # every checkpoint damaged: one error line after the reasons, and nothing of the run touched
    newest.write_bytes(pickle.dumps(Payload(marker)))
    previous.write_bytes(b"\0" * 10)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    failed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    line = the_error(failed)
    assert line == f"error: no valid checkpoint to resume in {out / 'checkpoints'}; start a new run with --overwrite"
    said = " ".join(failed.output.split())
    assert "it is a pickle file" in said and "it does not start with a safetensors header" in said
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not marker.exists()


# --- a full disk -------------------------------------------------------------------------------------------


def test_a_full_disk_mid_run_stops_in_one_line_and_resume_continues(images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save_file = checkpoint.save_file

    def disk_fills_at_step_2(tensors, filename, metadata=None):
        if ".step-000000002.safetensors." in filename:
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", disk_fills_at_step_2)
    line = the_error(pretrain(images, out))
    step2 = out / "checkpoints" / "step-000000002.safetensors"
    assert line == f"error: cannot write {step2}: no space left on device; free space or pass another --out (nothing was written)"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000001.safetensors"]  # no temp file
    checkpoint.load(out / "checkpoints" / "step-000000001.safetensors", kind=checkpoint.TRAIN_STATE)  # intact

    monkeypatch.undo()  # space freed
    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert "(step 1, epoch 1)" in " ".join(resumed.output.split())


def test_export_to_a_full_disk_writes_nothing(good, tmp_path, monkeypatch):
    out = tmp_path / "exports" / "e.safetensors"
    out.parent.mkdir()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    line = the_error(runner.invoke(app, ["export", str(good), "--to", "safetensors-encoder", "-o", str(out)]))
    assert line == f"error: cannot write {out}: no space left on device; free space or pass another --out (nothing was written)"
    assert files_under(out.parent) == []


# --- an OSError that escapes unwrapped ----------------------------------------------------------------------


def raising(exc: BaseException):
    def run(*args, **kwargs):
        raise exc

    return run


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl"),
         "error: runs/x/metrics.jsonl: No space left on device (ENOSPC); free space or pass another --out"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"),
         "error: /mnt/ro/run: Read-only file system (EROFS); pass an --out on a writable disk"),
        (OSError(errno.EIO, "Input/output error"), "error: Input/output error (EIO); check the disk (dmesg) or pass another --out"),
    ],
)
def test_an_escaping_os_error_is_one_line_naming_the_path(good, monkeypatch, exc, expected):
    from simclr_cli.engine.tasks import info

    monkeypatch.setattr(info, "describe", raising(exc))
    assert the_error(runner.invoke(app, ["info", str(good)])) == expected


def test_verbose_shows_the_traceback_of_an_escaping_os_error(good, monkeypatch):
    from simclr_cli.engine.tasks import info

    monkeypatch.setattr(info, "describe", raising(OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")))
    result = runner.invoke(app, ["info", str(good), "--verbose"])
    assert result.exit_code == 2
    assert "Traceback" in result.output
    assert "error: runs/x/metrics.jsonl: No space left on device (ENOSPC)" in result.output


def test_verbose_shows_the_traceback_of_a_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")
    result = runner.invoke(app, ["info", str(bad), "--verbose"])
    assert result.exit_code == 2
    assert "Traceback" in result.output and "CheckpointError" in result.output


def test_other_os_errors_are_still_reported_as_bugs(good, monkeypatch):
    from simclr_cli.engine.tasks import info

    monkeypatch.setattr(info, "describe", raising(OSError(errno.EBADF, "Bad file descriptor")))
    result = runner.invoke(app, ["info", str(good)])
    assert result.exit_code == 1
    assert "internal error: OSError" in result.output and "Traceback" not in result.output


# --- crafted files: nesting, huge integers, wrong types, absurd sizes (issue 18, items 3 and 4) ---------------

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit
HUGE_INT = "9" * 5000  # past Python's 4,300-digit limit for int('...')


def with_header(good: Path, dst: Path, key: str, raw_json: str) -> Path:
    """`good` with an extra top-level entry `key: raw_json` in its safetensors header (written as raw text)."""
    data = good.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].rstrip(b" ")
    header = header[:-1] + f',"{key}":{raw_json}}}'.encode()
    dst.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length:])
    return dst


def meta_set(**raw: str):
    """A `rewritten` change setting header metadata entries to raw JSON text."""
    return lambda tensors, meta: meta.update(raw)


def meta_edit(field: str, edit: Callable[[dict], None]):
    """A `rewritten` change editing one JSON metadata entry as data."""
    import json

    def change(tensors, meta):
        value = json.loads(meta[field])
        edit(value)
        meta[field] = json.dumps(value)

    return change


CRAFTED = [
    Bad("header-deeply-nested", lambda g, d, m: with_header(g, d, "x", DEEP),
        r"is not a readable safetensors file: its header cannot be read \(it is nested too deeply\); "),
    Bad("header-huge-integer", lambda g, d, m: with_header(g, d, "x", HUGE_INT),
        r"is not a readable safetensors file: its header cannot be read \(it holds a number of more than 4300 digits\); "),
    Bad("metadata-deeply-nested", lambda g, d, m: rewritten(g, d, meta_set(config=DEEP)),
        r"has corrupt metadata \(config: it is nested too deeply\); the file is damaged$"),
    Bad("metadata-nested-past-the-limit", lambda g, d, m: rewritten(g, d, meta_set(config="[" * 200 + "]" * 200)),
        r"has corrupt metadata \(config: it nests deeper than 32 levels\); the file is damaged$"),
    Bad("metadata-huge-integer", lambda g, d, m: rewritten(g, d, meta_set(step=HUGE_INT)),
        r"has corrupt metadata \(step: it holds a number of more than 4300 digits\); the file is damaged$"),
    Bad("metadata-nan", lambda g, d, m: rewritten(g, d, meta_set(step="NaN")),
        r"has corrupt metadata \(step: NaN is not JSON\); the file is damaged$"),
]


@pytest.mark.parametrize("bad", CRAFTED, ids=lambda b: b.name)
def test_every_command_refuses_a_crafted_checkpoint_in_one_line(bad, good, images, marker, tmp_path):
    path = make_bad(bad, good, marker)
    for command, args in COMMANDS.items():
        out = tmp_path / "out" / command.replace(" ", "")
        line = the_error(runner.invoke(app, args(path, images, out)))
        assert re.search(bad.message, line), f"{command}: {line}"
        assert str(path) in line and len(line) < 400, f"{command}: {line[:400]}"
        assert files_under(out) == [], f"{command} wrote {files_under(out)}"


# Values that parse but are wrong: each read by some command, each refused by every command that opens the file.
WRONG_VALUES = {
    "step-past-any-run": (meta_set(step=str(10**30)), r"step 10{30} is not a whole number between 0 and"),
    "image-size-30000": (meta_edit("transform", lambda t: t.update(image_size=30000)),
                         r"augment\.image_size 30000 is not valid; .*at most 1024"),
    "width-1000": (meta_edit("model", lambda m: m.update(width=1000)), r"model\.width 1000 is not valid; .*at most 64"),
    "proj-dim-huge": (meta_edit("model", lambda m: m.update(proj_dim=10**9)), r"model\.proj_dim 1000000000 is not valid"),
    "config-not-a-mapping": (meta_set(config="[1, 2]"), r"config is a list, not a mapping"),
    "config-data-not-a-mapping": (meta_set(config='{"data": "cifar10"}'), r"config\.data is a str, not a mapping"),
    "config-data-source-a-list": (meta_set(config='{"data": {"source": [1]}}'), r"config\.data\.source is a list, not text"),
    "extra-not-a-mapping": (meta_set(extra='"abc"'), r"extra is a str, not a mapping"),
    "extra-task-a-list": (meta_set(extra='{"task": [1]}'), r"extra\.task is a list, not text"),
    "mean-no-float-holds": (meta_edit("transform", lambda t: t.update(mean=[10**400, 0, 0])), r"augment\.mean \(1000+, 0, 0\) is not valid"),
    "width-no-float-holds": (meta_edit("model", lambda m: m.update(width=10**400)), r"model\.width 1000"),
}


@pytest.mark.parametrize("change", WRONG_VALUES.values(), ids=WRONG_VALUES.keys())
@pytest.mark.parametrize("command", ["embed", "knn", "info", "export"])
def test_a_wrong_metadata_value_is_refused_in_one_line(change, command, good, images, tmp_path):
    edit, message = change
    path = rewritten(good, tmp_path / "bad.safetensors", edit)
    out = tmp_path / "out"
    line = the_error(runner.invoke(app, COMMANDS[command](path, images, out)))
    # "incomplete" for a value of the wrong type, as the older checks word it; "invalid" for a value out of range
    assert re.match(rf"error: {re.escape(str(path))} has (incomplete|invalid) metadata \(", line), line
    assert line.endswith("; the file is damaged or from another tool"), line
    assert re.search(message, line), line
    assert files_under(out) == []


def finetuned(good: Path, dst: Path, **extra) -> Path:
    """`good` as `simclr finetune` writes it (a classifier on h), with `extra` metadata values overriding."""
    import json

    def change(tensors, meta):
        tensors["extra/classifier.weight"] = torch.zeros(3, 128)
        tensors["extra/classifier.bias"] = torch.zeros(3)
        meta["extra"] = json.dumps({"task": "finetune", "num_classes": 3, "from_head_layer": 0, **extra})

    return rewritten(good, dst, change)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"from_head_layer": "abc"}, r"extra\.from_head_layer 'abc' is not a whole number between 0 and 1"),
        ({"from_head_layer": 7}, r"extra\.from_head_layer 7 is not a whole number between 0 and 1"),
        ({"num_classes": "many"}, r"extra\.num_classes 'many' is not the classifier's 3 classes"),
        ({"num_classes": 5}, r"extra\.num_classes 5 is not the classifier's 3 classes"),
    ],
)
def test_export_include_fc_refuses_bad_classifier_metadata(extra, message, good, tmp_path):
    path = finetuned(good, tmp_path / "finetuned.safetensors", **extra)
    out = tmp_path / "out" / "tv.safetensors"
    line = the_error(runner.invoke(app, ["export", str(path), "--to", "torchvision", "--include-fc", "-o", str(out)]))
    assert re.search(message, line), line
    assert files_under(out.parent) == []


def test_a_fine_tuned_file_without_its_classifier_bias_is_refused(good, tmp_path):
    path = rewritten(finetuned(good, tmp_path / "f.safetensors"), tmp_path / "nobias.safetensors",
                     lambda tensors, meta: tensors.pop("extra/classifier.bias"))
    line = the_error(runner.invoke(app, ["info", str(path)]))
    assert "a fine-tuned file needs extra/classifier.weight (classes x features) and extra/classifier.bias" in line, line


def train_state_meta(path: Path, **raw: str) -> None:
    rewritten(path, path, meta_set(**raw))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"elapsed": '"abc"'}, "elapsed 'abc' is not a number of seconds >= 0"),
        ({"elapsed": "-5"}, "elapsed -5 is not a number of seconds >= 0"),
        ({"config": '"abc"'}, "config is a str, not a mapping"),
        ({"config": DEEP}, "config: it is nested too deeply"),
        ({"step": HUGE_INT}, "step: it holds a number of more than 4300 digits"),
        ({"step": str(10**9)}, "step 1000000000 is past the end of this run's schedule (2 steps)"),
        ({"elapsed": str(10**400)}, "elapsed a 1329-bit integer is not a number of seconds >= 0"),
        ({"elapsed": "1e999"}, "elapsed inf is not a number of seconds >= 0"),
    ],
    ids=["elapsed-text", "elapsed-negative", "config-text", "config-deep", "step-huge-int", "step-past-schedule",
         "elapsed-no-float-holds", "elapsed-inf"],
)
def test_resume_steps_over_a_crafted_newest_checkpoint(raw, reason, images, tmp_path):
    out = tmp_path / "run"
    assert pretrain(images, out).exit_code == 0
    newest = out / "checkpoints" / "step-000000002.safetensors"
    train_state_meta(newest, **raw)
    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())
    assert "skipping step-000000002.safetensors" in said and reason in said, said
    assert "(step 1, epoch 1)" in said  # resumed from the valid one beside it
    assert checkpoint.load(newest, kind=checkpoint.TRAIN_STATE).meta["step"] == 2  # step 2 ran again, saved whole


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image-size", "20000"], "augment.image_size 20000 is not valid; use a whole number of pixels >= 8 and at most 1024"),
        (["--width", "1000"], "model.width 1000.0 is not valid; use at most 64 (SimCLR's widest is 4)"),
        (["--set", "model.proj_dim=100000000"], "model.proj_dim 100000000 is not valid; use a whole number >= 1 and at most 16384"),
        (["--preset", "PRESET"], "model.proj_dim 100000000 is not valid"),
        # within the bounds, but no machine this runs on holds 4 x 255e9 fp32 parameters: refused before allocating
        (["--arch", "resnet152", "--width", "64"], "resnet152 at width 64 needs about 3,"),
    ],
    ids=["image-size", "width", "proj-dim", "preset", "memory"],
)
def test_absurd_sizes_are_refused_before_anything_is_allocated(args, message, images, tmp_path):
    preset = tmp_path / "huge.yaml"
    preset.write_text("model:\n  proj_dim: 100000000\n")
    args = [str(preset) if a == "PRESET" else a for a in args]
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), *TINY, *COMMON, "--out", str(out), *args])
    line = the_error(result)
    assert message in line, line
    assert files_under(out) == []


# --- hostile YAML: alias bombs, undecodable presets, huge echoed values (issue 18, items 5 and 7) -------------

# 8 levels of 8 aliases each: 8**8 (16.8 million) elements once expanded, in under 250 characters
ALIAS_BOMB = "[" + ",".join(["&a [1,1,1,1,1,1,1,1]"] + [f"&{b} [{','.join([f'*{a}'] * 8)}]" for a, b in zip("abcdefg", "bcdefgh")]) + "]"


def pretrain_config_error(images: Path, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "run"
    line = the_error(runner.invoke(app, ["pretrain", str(images), *TINY, *COMMON, "--out", str(out), *args]))
    assert files_under(out) == []
    return line


def test_an_alias_bomb_in_a_set_value_is_refused_in_one_short_line(images, tmp_path):
    assert len(ALIAS_BOMB) < 250
    line = pretrain_config_error(images, tmp_path, "--set", f"model.proj_dim={ALIAS_BOMB}")
    assert len(line) < 400, line[:400]
    assert line.endswith("YAML aliases (*a) are not accepted; write the value out in full"), line


def test_an_alias_bomb_in_a_preset_is_refused_in_one_short_line(images, tmp_path):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(f"model:\n  proj_dim: {ALIAS_BOMB}\n")
    line = pretrain_config_error(images, tmp_path, "--preset", str(preset))
    assert line == f"error: {preset}: YAML aliases (*a) are not accepted; write the value out in full", line


def test_a_preset_that_is_not_utf8_is_refused_in_one_line(images, tmp_path):
    preset = tmp_path / "latin1.yaml"
    preset.write_bytes("# caf\xe9\nmodel:\n  arch: resnet18\n".encode("latin-1"))
    line = pretrain_config_error(images, tmp_path, "--preset", str(preset))
    assert line == f"error: {preset} is not UTF-8 text (byte 5 is 0xe9); save it as UTF-8", line


def test_a_huge_value_is_echoed_cut_short(images, tmp_path):
    line = pretrain_config_error(images, tmp_path, "--set", "augment.interpolation=" + "x" * 100_000)
    assert line.startswith("error: augment.interpolation 'xxxx")
    assert len(line) < 1100 and line.endswith(" more characters)"), len(line)


def test_a_seed_past_64_bits_is_refused(images, tmp_path):
    line = pretrain_config_error(images, tmp_path, "--set", f"train.seed={10**23}")
    assert line == "error: train.seed 100000000000000000000000 must be a whole number from 0 to 2**63 - 1"
    result = runner.invoke(app, ["pretrain", str(images), *TINY, *COMMON, "--out", str(tmp_path / "run"), "--seed", str(10**23)])
    assert result.exit_code == 2 and "internal error" not in result.output
    assert "Invalid value for '--seed'" in result.output


# --- what kill -9, SIGTERM and a second run leave behind (issue 18, item 7) ------------------------------------


def test_resume_removes_the_temp_files_of_a_save_cut_short(images, tmp_path):
    out = tmp_path / "run"
    assert pretrain(images, out).exit_code == 0
    # what kill -9 during a save leaves: atomic_write's temp files, named .<file>.<pid>.<8 hex>.tmp
    stale = [out / "checkpoints" / ".step-000000003.safetensors.4242.0badf00d.tmp", out / ".encoder.safetensors.4242.deadbeef.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 100_000)
    kept = [out / "notes.tmp", out / "checkpoints" / ".step-1.safetensors.tmp"]  # not atomic_write's names: not ours
    for path in kept:
        path.write_text("mine")
    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert "removed 2 temp file(s) of an interrupted save (0.2 MB)" in " ".join(resumed.output.split())
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "mine" for p in kept)


def test_two_embeds_to_one_file_the_second_is_refused_and_the_first_kept(good, images, tmp_path, monkeypatch):
    from simclr_cli.engine.tasks import embed

    out = tmp_path / "vecs.npy"
    real = embed._write_rows

    def another_run_finishes_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        out.write_bytes(b"the other run's embeddings")  # it passed the same existence check and finished first
        return result

    monkeypatch.setattr(embed, "_write_rows", another_run_finishes_meanwhile)
    line = the_error(runner.invoke(app, ["embed", str(images), "-c", str(good), "-o", str(out), *COMMON]))
    assert line == (f"error: {out} was created by another run while this one was embedding; it is kept as it is. "
                    "Pass --overwrite to replace it, or choose another --out")
    assert out.read_bytes() == b"the other run's embeddings"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch or temp file left


def test_sigterm_during_embed_keeps_the_rows_so_far_for_resume_and_says_so(good, images, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out" / "vecs.npy"
    # each batch takes a second, so the signal arrives mid-run, with the full-size unfinished file on disk
    slow = ("import sys, time; from simclr_cli.engine.tasks import embed; encode = embed.encode; "
            "embed.encode = lambda *a, **k: (time.sleep(1), encode(*a, **k))[1]; "
            "from simclr_cli.cli import app; sys.argv[0] = 'simclr'; app()")
    args = ["embed", str(images), "-c", str(good), "-o", str(out), *COMMON[:-1], "4"]
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    unfinished = out.parent / ".vecs.npy.partial.npy"
    settings = out.parent / ".vecs.npy.partial.json"  # written last: from then on the unfinished run can be resumed
    deadline = time.monotonic() + 60
    while not settings.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert unfinished.exists() and settings.exists(), "the unfinished file never appeared"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    said = " ".join(output.split())
    assert ("embed stopped by SIGTERM: the rows written so far are kept in .vecs.npy.partial.npy; run the same command "
            "with --resume to continue") in said
    assert "Traceback" not in output
    assert not out.exists() and unfinished.exists()
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert files_under(out.parent) == ["vecs.json", "vecs.npy", "vecs.paths.txt"]


def test_sigterm_before_the_unfinished_embed_is_whole_says_there_is_nothing_to_resume(good, images, tmp_path, monkeypatch):
    """The window between the unfinished .npy and its settings (written last): no --resume advice that --resume
    would then refuse, and nothing of the unfinished run left behind."""
    import signal

    from simclr_cli.engine import partial
    from simclr_cli.engine.tasks import embed

    create = partial.PartialRows.create

    def terminated_while_listing(self, *, write_listing, **kwargs):
        def listing_then_sigterm():
            write_listing()
            raise embed._Terminated(signal.SIGTERM)

        create(self, write_listing=listing_then_sigterm, **kwargs)

    monkeypatch.setattr(partial.PartialRows, "create", terminated_while_listing)
    out = tmp_path / "out" / "vecs.npy"
    result = runner.invoke(app, ["embed", str(images), "-c", str(good), "-o", str(out), *COMMON])
    assert result.exit_code != 0
    assert "embed stopped by SIGTERM before it had rows to keep; run the same command again" in " ".join(result.output.split())
    assert "--resume" not in result.output
    assert not [p for p in out.parent.glob(".vecs.npy.partial*") if not p.name.endswith(".lock")]


def test_an_image_too_large_for_memory_with_the_pixel_limit_off_is_one_line(good, images, tmp_path, monkeypatch):
    import struct
    import zlib

    from PIL import PngImagePlugin

    bomb = images / "a" / "zz_bomb.png"
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    real_load = PngImagePlugin.PngImageFile.load

    def load(self):  # what decoding 40000 x 40000 x 3 bytes does on a machine without 4.8 GB to spare
        if self.size == (40000, 40000):
            raise MemoryError
        return real_load(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    out = tmp_path / "out" / "vecs.npy"
    line = the_error(runner.invoke(app, ["embed", str(images), "-c", str(good), "-o", str(out), *COMMON, "--max-image-pixels", "0"]))
    assert line == (f"error: decoding {bomb} ran out of memory (its 40000x40000 = 1600.0 Mpx); the pixel limit is off "
                    "(--max-image-pixels 0): set a limit to skip such images, or remove the file")
    assert files_under(out.parent) == []


def test_a_worker_count_past_any_machine_is_refused_before_a_process_starts(good, images, tmp_path):
    line = pretrain_config_error(images, tmp_path, "--workers", "100000")
    assert line == "error: data.workers 100000 is more than 256; use about one per CPU core"
    out = tmp_path / "out" / "vecs.npy"
    embed = ["embed", str(images), "-c", str(good), "-o", str(out), *COMMON, "--workers", "100000"]
    assert the_error(runner.invoke(app, embed)) == "error: --workers 100000 is more than 256; use about one per CPU core"
    assert files_under(out.parent) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  proj_dim: " + "[" * 5000 + "]" * 5000 + "\n", "the YAML is nested too deeply to read; a config nests a few levels"),
        ("model:\n  proj_dim: " + "9" * 5000 + "\n", "Exceeds the limit (4300 digits) for integer string conversion"),
    ],
    ids=["deeply-nested", "huge-integer"],
)
def test_a_crafted_preset_is_refused_in_one_line(text, message, images, tmp_path):
    preset = tmp_path / "crafted.yaml"
    preset.write_text(text)
    line = pretrain_config_error(images, tmp_path, "--preset", str(preset))
    assert line.startswith(f"error: {preset}: {message}") and len(line) < 400, line[:400]


def test_resume_refuses_a_crafted_config_yaml_in_one_line(images, tmp_path):
    out = tmp_path / "run"
    assert pretrain(images, out).exit_code == 0
    (out / "config.yaml").write_text(f"model:\n  proj_dim: {ALIAS_BOMB}\n")
    line = the_error(runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"]))
    assert line == f"error: {out / 'config.yaml'}: YAML aliases (*a) are not accepted; write the value out in full"


def test_info_lists_crafted_evaluation_results_without_crashing(good):
    for name, text in [("deep", "[" * 100_000), ("big", '{"top1": ' + "9" * 400 + "}"), ("huge", '{"top1": ' + "9" * 5000 + "}")]:
        folder = good.parent / "eval" / f"knn-{name}-20261206-100000"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(text)
    result = runner.invoke(app, ["info", str(good), "--json"])
    assert result.exit_code == 0, result.output
    import json

    records = {Path(e["path"]).parent.name.split("-")[1]: e for e in json.loads(result.output)["evaluations"]}
    assert records["deep"]["error"] == "nested too deeply"
    assert records["big"]["top1"] is None and records["big"]["error"] is None
    assert "4300 digits" in records["huge"]["error"]


def test_a_number_no_float_holds_is_refused_in_one_line(images, tmp_path):
    line = pretrain_config_error(images, tmp_path, "--set", f"train.temperature={10**400}")
    assert line == "error: 'train.temperature' must be a number, got <a 1329-bit integer> (int), too large for a float"


def test_a_batch_too_large_for_memory_is_one_line_with_the_fix(good, images, tmp_path, monkeypatch):
    from simclr_cli.engine.model import ResNet

    def no_memory(self, x):  # what a 1024 px batch of 256 does on a machine without the memory for it
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                           "allocate 103079215104 bytes.")

    monkeypatch.setattr(ResNet, "forward", no_memory)
    out = tmp_path / "out" / "vecs.npy"
    line = the_error(runner.invoke(app, ["embed", str(images), "-c", str(good), "-o", str(out), *COMMON]))
    assert line == "error: encoding a batch of 8 images of 16 px ran out of memory; lower --batch-size"
    assert files_under(out.parent) == []


def test_a_preset_past_1_mb_is_refused_unread(images, tmp_path):
    preset = tmp_path / "big.yaml"
    preset.write_text("# padding\n" * 100_001)
    line = pretrain_config_error(images, tmp_path, "--preset", str(preset))
    assert line == f"error: {preset} is larger than 1,000,000 bytes; a preset is a short YAML file"


# --- a crafted retrieval index: its settings file and its array ---------------------------------------------


def crafted_index(folder: Path, vectors, settings: str | None) -> Path:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "vecs.npy"
    np.save(index, vectors)
    (folder / "vecs.paths.txt").write_text("".join(f"img_{i}.png\n" for i in range(len(vectors))))
    if settings is not None:
        (folder / "vecs.json").write_text(settings)
    return index


@pytest.mark.parametrize(
    ("shape", "dtype", "settings", "message"),
    [
        ((4, 128), "float32", "[" * 100_000, r"vecs\.json is not valid JSON \(.*\); re-run `simclr embed` or delete it$"),
        ((4, 128), "float32", '{"n": ' + "9" * 5000 + "}", r"vecs\.json is not valid JSON \(Exceeds the limit"),
        ((4, 128), "float32", "[1, 2]", r"vecs\.json is not a JSON object of settings"),
        ((4, 128), "float32", '{"checkpoint": [1]}', r"vecs\.json has a 'checkpoint' that is not text"),
    ],
    ids=["settings-deep", "settings-huge-int", "settings-list", "settings-checkpoint-list"],
)
def test_retrieval_refuses_a_crafted_index_in_one_line(shape, dtype, settings, message, good, images, tmp_path):
    import numpy as np

    index = crafted_index(tmp_path / "index", np.zeros(shape, dtype=dtype), settings)
    query = next((images / "a").iterdir())
    line = the_error(runner.invoke(app, ["knn", str(good), "--index", str(index), "--query", str(query), *COMMON]))
    assert re.search(message, line), line


@pytest.mark.parametrize("content", ["[" * 4000, '{"pid": ' + "9" * 4090 + "}", '{"pid": [1], "host": 2}'])
def test_a_crafted_lock_file_still_gives_the_in_use_line(content, tmp_path):
    from simclr_cli.engine import rundir
    from simclr_cli.engine.errors import ConfigError

    root = tmp_path / "r"
    with rundir.lock(root):
        (root / ".lock").write_text(content)  # the holder's own words overwritten
        with pytest.raises(ConfigError) as err, rundir.lock(root):
            pass
    assert str(err.value) == f"{root} is in use by another simclr run (pid unknown); wait for it to finish or choose another --out"


# --- non-finite values are never saved (issue 18, item 1) ----------------------------------------------------


def non_finite_tensors(folder: Path) -> dict[str, int]:
    """For every safetensors file below `folder`, how many of its float tensors hold NaN/inf."""
    from safetensors.torch import load_file

    return {str(p.relative_to(folder)): sum(1 for t in load_file(str(p)).values()
                                            if t.is_floating_point() and not bool(torch.isfinite(t).all()))
            for p in sorted(folder.rglob("*.safetensors"))}


def test_on_nonfinite_skip_with_a_huge_lr_saves_only_finite_files(images, tmp_path):
    """The report's command: the dropped steps' forward passes wrote NaN into the BN running statistics."""
    out = tmp_path / "run"
    result = pretrain(images, out, "--epochs", "3", "--max-steps", "6", "--lr", "1e8", "--on-nonfinite", "skip")
    said = " ".join(result.output.split())
    assert "update dropped" in said  # the case the report hit: updates were dropped ...
    assert result.exit_code == 0, result.output
    assert "done 6 steps" in said
    found = non_finite_tensors(out)
    assert found and set(found.values()) == {0}, found  # ... and still every file is finite
    # and every command accepts the files: --resume of the finished run and info on the encoder
    assert runner.invoke(app, ["info", str(out / "encoder.safetensors")]).exit_code == 0


def test_a_dropped_update_leaves_the_bn_statistics_exactly_as_they_were(images, tmp_path, monkeypatch):
    """on_nonfinite=skip: a step whose forward pass poisoned the BN buffers is undone, buffers and all."""
    from simclr_cli.engine import trainer as trainer_module

    real_forward_backward = trainer_module.forward_backward
    calls = []

    def poisoned_at_step_3(method, net, views, **kwargs):
        calls.append(1)
        loss = real_forward_backward(method, net, views, **kwargs)
        if len(calls) == 3:  # what a diverged forward pass does: NaN in every running statistic
            for name, buffer in method.modules.named_buffers():
                if buffer.is_floating_point():
                    buffer.fill_(float("nan"))
        return loss

    monkeypatch.setattr(trainer_module, "forward_backward", poisoned_at_step_3)
    out = tmp_path / "run"
    result = pretrain(images, out, "--epochs", "2", "--max-steps", "3", "--on-nonfinite", "skip")
    assert result.exit_code == 0, result.output
    assert "step 3: the loss or gradients are NaN/inf; update dropped" in " ".join(result.output.split())
    from safetensors.torch import load_file

    before = load_file(str(out / "checkpoints" / "step-000000002.safetensors"))
    after = load_file(str(out / "checkpoints" / "step-000000003.safetensors"))
    model = [k for k in before if k.startswith("model/")]
    assert any("running_var" in k for k in model) and any("num_batches_tracked" in k for k in model)
    assert all(torch.equal(before[k], after[k]) for k in model)  # weights, BN statistics and counters alike


def test_a_run_refuses_to_save_non_finite_tensors_and_does_not_report_success(images, tmp_path, monkeypatch):
    """Whatever made a tensor non-finite with a finite loss, the save refuses in one line instead of writing it."""
    from simclr_cli.engine import trainer as trainer_module

    real_step = trainer_module.Trainer.step

    def step(self, batch, *, lr, step, epoch):
        loss = real_step(self, batch, lr=lr, step=step, epoch=epoch)
        if step == 1:  # the second step: a BN statistic overflows, the loss stays finite
            next(b for n, b in self.method.modules.named_buffers() if n.endswith("running_var")).fill_(float("inf"))
        return loss

    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    out = tmp_path / "run"
    line = the_error(pretrain(images, out))
    assert re.fullmatch(r"error: the model's tensors \(.*running_var.*\) became NaN/inf at step 2; stopped before "
                        r"saving anything from that step on\. Lower --lr, try --precision fp32, or check the data", line), line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000001.safetensors"]
    assert set(non_finite_tensors(out).values()) == {0}


# --- a full disk while appending to metrics.jsonl (issue 18, item 2) -------------------------------------------


def test_a_full_disk_mid_line_leaves_metrics_jsonl_whole_and_resume_continues(images, tmp_path, monkeypatch):
    """The disk fills in the middle of the step-3 line: the half written is cut off again, so the message's
    "the lines already logged are intact" is true, and --resume continues once space is freed."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    real_write = os.write

    def disk_fills_in_the_step_3_line(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}") == str(metrics) and data.startswith(b'{"step": 3,'):
            real_write(fd, data[: len(data) // 2])  # what a full disk does: part of the line lands
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_fills_in_the_step_3_line)
    line = the_error(pretrain(images, out, "--epochs", "2", "--set", "train.log_every=1"))
    monkeypatch.undo()  # space freed
    assert line == (f"error: cannot write {metrics}: no space left on device; free space or pass another --out "
                    "(the lines already logged are intact)")
    text = metrics.read_text()
    assert text.endswith("\n") and [json.loads(x)["step"] for x in text.splitlines()] == [1, 2]

    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_drops_a_torn_last_line_of_metrics_jsonl_with_a_warning(images, tmp_path):
    """A log torn before this fix (or by a crash mid-write) no longer makes --resume an internal error."""
    out = tmp_path / "run"
    assert pretrain(images, out, "--epochs", "2", "--set", "train.log_every=1").exit_code == 0
    (out / "checkpoints" / "step-000000004.safetensors").unlink()  # as if the run had stopped after step 3
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{\"step\": 2, \"ep", *lines[2:3]]) + '\n{"step": 3, "epoch": 0, "loss": 6.265164')

    resumed = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    said = " ".join(resumed.output.split())
    assert "dropped 2 torn or unreadable line(s) (line 2, 4)" in said
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 3, 4]


# --- --resume checks the data (issue 18, item 6) -------------------------------------------------------------


def interrupted_run(images: Path, out: Path) -> None:
    """A finished 4-step run whose newest checkpoint is gone: --resume has steps 3 and 4 left to train."""
    assert pretrain(images, out, "--epochs", "2").exit_code == 0
    (out / "checkpoints" / "step-000000004.safetensors").unlink()


def resume(out: Path):
    return runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])


def test_resume_trains_on_its_saved_list_and_a_new_search_refuses_added_images(images, tmp_path):
    listed, searched = tmp_path / "listed", tmp_path / "searched"
    interrupted_run(images, listed)
    interrupted_run(images, searched)
    write_images(images / "later", 7, size=16, seed=3)
    resumed = resume(listed)  # its files.txt: the 16 images it started on; the 7 added since are never searched for
    assert resumed.exit_code == 0, resumed.output
    assert "using the 16 images listed in" in resumed.output and "(step 3, epoch 2)" in " ".join(resumed.output.split())
    (searched / "files.txt").unlink()  # no list: DATA is searched again, and the fingerprint tells
    assert the_error(resume(searched)) == (f"error: --resume: the data differs from what {searched} trained on (16 images, "
                                           "now 23); resume with the original data, or start a new run")
    for path in (images / "later").iterdir():
        path.unlink()  # the original data again
    resumed = resume(searched)
    assert resumed.exit_code == 0, resumed.output
    assert "(step 3, epoch 2)" in " ".join(resumed.output.split())


def test_resume_refuses_a_replaced_image_of_another_size(images, tmp_path):
    out = tmp_path / "run"
    interrupted_run(images, out)
    write_images(images / "a", 1, size=24, seed=9)  # img_000.png replaced: same count, same names
    assert the_error(resume(out)) == (f"error: --resume: the data differs from what {out} trained on (16 images then "
                                      "and now, but with other names or sizes); resume with the original data, or start a new run")


def test_a_run_folder_inside_the_data_folder_is_never_training_data(images, tmp_path):
    """With --out inside DATA, the run's own loss.png must not become a training image when it resumes."""
    pytest.importorskip("matplotlib")
    out = images / "run"
    interrupted_run(images, out)
    assert list(out.rglob("*.png")), "the run draws its plots, or this test proves nothing"
    resumed = resume(out)
    assert resumed.exit_code == 0, resumed.output
    assert "on 16 images" in " ".join(resumed.output.split())


def test_a_damaged_data_fingerprint_is_one_line_and_overwrite_starts_afresh(images, tmp_path):
    out = tmp_path / "run"
    interrupted_run(images, out)
    (out / "data.json").write_text("[" * 5000)
    assert the_error(resume(out)) == (f"error: {out / 'data.json'} is damaged, so the data cannot be checked; "
                                      "delete it to resume unchecked, or start a new run")
    write_images(images / "later", 7, size=16, seed=3)
    assert pretrain(images, out, "--epochs", "2", "--overwrite").exit_code == 0  # a new run records the new data
    assert json.loads((out / "data.json").read_text())["count"] == 23
