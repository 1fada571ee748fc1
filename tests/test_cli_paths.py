"""The paths commands take and write, through the command line: `runs/latest` moves only to a run with an encoder,
a run folder stands for its encoder, results and indexes name the exact encoder file (resolved, with its SHA-256),
and every output is checked before any work starts."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import checkpoint, features
from test_cli_eval import COMMON, encoder_file, labelled  # noqa: F401  (fixtures)

runner = CliRunner()
TINY = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size", "8", "--epochs", "1",
        "--device", "cpu", "--precision", "fp32", "--workers", "0"]


def the_error(result) -> str:
    """The one line a refused command prints (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- runs/latest -----------------------------------------------------------------------------------------------


def test_a_run_that_fails_before_its_encoder_never_takes_over_runs_latest(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = runner.invoke(app, ["pretrain", str(image_folder), *TINY])
    assert good.exit_code == 0, good.output
    good_run = (tmp_path / "runs" / "latest").resolve()
    assert (good_run / "encoder.safetensors").is_file()

    text = tmp_path / "text"
    text.mkdir()
    for i in range(10):
        (text / f"f{i}.jpg").write_text(f"hello {i}\n")
    line = the_error(runner.invoke(app, ["pretrain", "text", *TINY]))
    failed_run = next(p for p in (tmp_path / "runs").iterdir() if p.name not in ("latest", good_run.name))
    report = failed_run / "bad_files.jsonl"
    named = "; ".join(f"text/f{i}.jpg (not an image)" for i in range(3))
    assert line == f"error: none of the 10 images can be decoded: {named} and 7 more, all listed in {report.relative_to(tmp_path)}; check DATA"
    assert [json.loads(entry) for entry in report.read_text().splitlines()] == [
        {"path": f"text/f{i}.jpg", "reason": "not an image", "kind": "file"} for i in range(10)
    ]
    assert (tmp_path / "runs" / "latest").resolve() == good_run  # the failed run left the shortcut alone
    shown = runner.invoke(app, ["info"])
    assert shown.exit_code == 0, shown.output
    assert "runs/latest/encoder.safetensors" in shown.output


# --- a run folder stands for its encoder; a training state names the encoder to use --------------------------


def test_a_run_folder_is_accepted_wherever_an_encoder_is(encoder_file, labelled, tmp_path):
    run = encoder_file.parent
    shown = runner.invoke(app, ["info", str(run), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["path"] == str(encoder_file)
    knn = runner.invoke(app, ["knn", str(run), "--data", str(labelled), "-k", "3", *COMMON])
    assert knn.exit_code == 0, knn.output
    assert list((run / "eval").glob("knn-*/results.json"))  # beside the encoder, as for the file itself
    exported = runner.invoke(app, ["export", str(run), "--to", "safetensors-encoder"])
    assert exported.exit_code == 0, exported.output
    assert (run / "encoder-safetensors-encoder.safetensors").is_file()
    embedded = runner.invoke(app, ["embed", str(labelled / "val"), "-o", str(tmp_path / "v.npy"), "-c", str(run), *COMMON])
    assert embedded.exit_code == 0, embedded.output

    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert "is a folder without an encoder.safetensors" in the_error(runner.invoke(app, ["info", str(empty)]))


def test_a_training_state_given_as_an_encoder_names_the_run_s_encoder(encoder_file, tmp_path):
    run = encoder_file.parent
    state = run / "checkpoints" / "step-000000010.safetensors"
    checkpoint.save(state, {"w": checkpoint.torch.zeros(2)}, kind=checkpoint.TRAIN_STATE, meta={"step": 10, "epoch": 1})
    line = the_error(runner.invoke(app, ["info", str(state)]))
    assert line == (f"error: {state} is a training-state checkpoint (what --resume reads), not an encoder; "
                    f"its run's encoder is {encoder_file}")


def test_a_small_text_file_given_as_a_checkpoint_is_not_a_safetensors_file(tmp_path):
    notes = tmp_path / "encoder.safetensors"
    notes.write_text("hello\n")
    line = the_error(runner.invoke(app, ["info", str(notes)]))
    assert line == f"error: {notes} is not a safetensors file: it is a text file of 6 bytes; pass a checkpoint written by simclr"


# --- results and indexes name the exact encoder ---------------------------------------------------------------


def test_embed_and_results_record_the_resolved_encoder_and_its_hash(encoder_file, labelled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(encoder_file.parent)
    embedded = runner.invoke(app, ["embed", str(labelled / "train"), "-o", "vecs.npy", *COMMON])
    assert embedded.exit_code == 0, embedded.output
    made_with = json.loads((tmp_path / "vecs.json").read_text())
    assert made_with["checkpoint"] == str(encoder_file.resolve())  # not the moving runs/latest/...
    assert made_with["checkpoint_sha256"] == sha256(encoder_file)
    knn = runner.invoke(app, ["knn", "--data", str(labelled), "-k", "3", *COMMON, "--out", "knn"])
    assert knn.exit_code == 0, knn.output
    results = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert (results["checkpoint"], results["checkpoint_sha256"]) == (str(encoder_file.resolve()), sha256(encoder_file))
    baseline = runner.invoke(app, ["knn", "--data", str(labelled), "-k", "3", "--random-init", *COMMON, "--out", "base"])
    assert baseline.exit_code == 0, baseline.output
    results = json.loads((tmp_path / "base" / "results.json").read_text())
    assert (results["checkpoint"], results["checkpoint_sha256"]) == (None, None)  # no file's weights were measured


def test_retrieval_keeps_the_index_s_encoder_and_refuses_another(encoder_file, labelled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(encoder_file.parent)
    assert runner.invoke(app, ["embed", str(labelled / "train"), "-o", "vecs.npy", *COMMON]).exit_code == 0
    other_run = tmp_path / "runs" / "other"
    other_run.mkdir()
    other = other_run / "encoder.safetensors"
    model, info = checkpoint.load_encoder(encoder_file)
    with checkpoint.torch.no_grad():
        next(model.parameters()).add_(0.5)
    checkpoint.save_encoder(other, model, info=info)
    (tmp_path / "runs" / "latest").unlink()
    (tmp_path / "runs" / "latest").symlink_to("other")  # a newer run took over the shortcut

    query = labelled / "train" / "green" / "2.png"
    found = runner.invoke(app, ["knn", "--index", "vecs.npy", "--query", str(query), "-k", "1", *COMMON, "-o", "m.csv"])
    assert found.exit_code == 0, found.output
    row = next(csv.DictReader((tmp_path / "m.csv").open()))
    assert row["path"] == "green/2.png" and float(row["similarity"]) == pytest.approx(1.0, abs=1e-5)

    line = the_error(runner.invoke(app, ["knn", "runs/latest", "--index", "vecs.npy", "--query", str(query), *COMMON]))
    assert line == (f"error: vecs.npy was embedded with {encoder_file.resolve()}, not {other.resolve()} (their SHA-256 "
                    f"differ); query with the index's encoder, or rebuild the index with simclr embed -c {other.resolve()}")

    shutil.copyfile(other, encoder_file)  # the index's own file, changed in place
    line = the_error(runner.invoke(app, ["knn", "--index", "vecs.npy", "--query", str(query), *COMMON]))
    assert line == (f"error: {encoder_file.resolve()} has changed since vecs.npy was embedded with it (its SHA-256 "
                    "differs); re-run simclr embed to rebuild the index")


def test_the_encoder_is_hashed_once_in_chunks(encoder_file, monkeypatch):
    reads = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if str(path) == str(encoder_file.resolve()) and "b" in mode:
            reads.append(path)
        return handle

    encoder = features.open_encoder(encoder_file)
    monkeypatch.setattr("builtins.open", counting_open)
    assert encoder.digest == encoder.digest == sha256(encoder_file)
    assert len(reads) == 1
    assert checkpoint.DIGEST_CHUNK <= 1 << 24  # streamed, never the whole file at once


# --- outputs are checked before the work ----------------------------------------------------------------------


def test_an_evaluation_out_that_is_a_file_is_refused_before_the_evaluation(encoder_file, labelled, tmp_path, monkeypatch):
    from simclr_cli.engine.tasks import knn

    monkeypatch.setattr(knn, "evaluate", lambda *a, **k: pytest.fail("the evaluation ran"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    line = the_error(runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), *COMMON, "-o", str(notes)]))
    assert line == f"error: --out {notes} is a file, not a folder; choose another --out"
    assert notes.read_text() == "mine\n"
    inside = notes / "results"
    line = the_error(runner.invoke(app, ["linear-eval", str(encoder_file), "--data", str(labelled), *COMMON, "-o", str(inside)]))
    assert line == f"error: {notes} is a file, so {inside} cannot be created in it; choose another --out"


def test_an_unwritable_output_folder_is_refused_before_the_work(encoder_file, labelled, tmp_path, monkeypatch):
    from simclr_cli.engine.tasks import embed

    monkeypatch.setattr(embed, "_write_rows", lambda *a, **k: pytest.fail("the embedding ran"))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw))
    out = locked / "vecs.npy"
    line = the_error(runner.invoke(app, ["embed", str(labelled), "-o", str(out), "-c", str(encoder_file), *COMMON]))
    assert line == f"error: cannot write {out}: permission denied; check the permissions or pass another --out (nothing was written)"
    line = the_error(runner.invoke(app, ["finetune", str(encoder_file), "--data", str(labelled), *COMMON, "-o", str(locked / "ft")]))
    assert line.startswith(f"error: cannot write {locked / 'ft'}: permission denied")


def test_retrieval_output_is_checked_before_the_queries_are_embedded(encoder_file, labelled, tmp_path, monkeypatch):
    from simclr_cli.engine.tasks import retrieval

    out = tmp_path / "vecs.npy"
    assert runner.invoke(app, ["embed", str(labelled / "train"), "-o", str(out), "-c", str(encoder_file), *COMMON]).exit_code == 0
    monkeypatch.setattr(retrieval, "search", lambda *a, **k: pytest.fail("the search ran"))
    query = ["--index", str(out), "--query", str(labelled / "val"), *COMMON]
    assert re.search(r"--out .*notes\.txt must end with \.csv or \.json",
                     the_error(runner.invoke(app, ["knn", *query, "-o", str(tmp_path / "notes.txt")])))
    folder = tmp_path / "matches.csv"
    folder.mkdir()
    assert the_error(runner.invoke(app, ["knn", *query, "-o", str(folder)])) == (
        f"error: --out {folder} is a folder; give the path of the file to write"
    )
