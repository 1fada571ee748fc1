"""The evaluation and inference commands end to end through the CLI, on tiny generated data."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import checkpoint
from simclr_cli.engine.augment import IMAGENET_MEAN, IMAGENET_STD
from simclr_cli.engine.model import ModelConfig, build_model

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 210)}
COMMON = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "8"]


@pytest.fixture
def encoder_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16)
    info = checkpoint.EncoderInfo(
        model=cfg, image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
        config={"data": {"source": "somewhere"}}, epoch=1, step=10,
    )
    path = tmp_path / "run" / "encoder.safetensors"
    checkpoint.save_encoder(path, build_model(cfg), info=info)
    return path


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """Three solid-colour classes with a little noise: linearly separable for any encoder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "labelled"
    for split, count in (("train", 6), ("val", 3)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.integers(-20, 20, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def results_of(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("results: "))
    return json.loads(Path(line.removeprefix("results: ").strip()).read_text())


def test_knn_reports_fractions_and_writes_results(encoder_file, labelled, tmp_path):
    result = runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "-k", "3,5", *COMMON,
                                 "--out", str(tmp_path / "knn")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert saved["k"] == [3, 5] and saved["train_images"] == 18 and saved["val_images"] == 9
    assert 0.0 <= saved["top1"] <= 1.0 and saved["top5"] is None  # 3 classes: no top-5
    assert saved["checkpoint"] == str(encoder_file) and saved["data"] == str(labelled)


def test_eval_commands_choose_their_workers_when_none_are_given(encoder_file, labelled, tmp_path):
    no_workers = [a for a in COMMON if a not in ("--workers", "0")]
    result = runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "-k", "3", *no_workers,
                                 "--out", str(tmp_path / "knn")])
    assert result.exit_code == 0, result.output


def test_linear_eval_separates_colours_and_saves_the_classifier(encoder_file, labelled, tmp_path):
    out = tmp_path / ("a-results-folder-with-a-long-name-" * 3) / "lin"
    result = runner.invoke(app, ["linear-eval", str(encoder_file), "--data", str(labelled), *COMMON, "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["top1"] == 1.0 and saved["protocol"] == "cached"
    assert (out / "classifier.safetensors").is_file()
    # the table folds long paths instead of cutting them, and the log speaks the table's unit
    assert "…" not in result.output and str(out / "classifier.safetensors") in re.sub(r"[\s│]", "", result.output)
    said = " ".join(result.output.split())
    assert "linear eval (cached, encoder): top-1 100.00%" in said and re.search(r"│ top-1 │ 100\.00% │", said)


def test_imagenet_never_suggests_a_download(encoder_file, tmp_path):
    result = runner.invoke(app, ["linear-eval", str(encoder_file), "--data", "imagenet", "--data-root", str(tmp_path / "none"), *COMMON])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "--download" not in said and "cannot be downloaded for you" in said
    assert "train/ and val/ with one subfolder per class" in said


def test_random_init_baseline_is_labelled_as_such(encoder_file, labelled, tmp_path):
    result = runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "-k", "3", "--random-init", *COMMON,
                                 "--out", str(tmp_path / "knn")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert saved["random_init"] is True and saved["checkpoint"] is None
    assert saved["weights"].startswith("random init (torchvision's")
    beside = runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "-k", "3", "--random-init", *COMMON])
    assert beside.exit_code == 0, beside.output  # results.json beside the checkpoint, where info looks
    info = runner.invoke(app, ["info", str(encoder_file)])
    assert info.exit_code == 0, info.output
    assert "random-init baseline: top-1" in info.output


def test_a_trained_encoder_s_results_and_info_say_trained(encoder_file, labelled):
    result = runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "-k", "3", *COMMON])
    assert result.exit_code == 0, result.output
    (results,) = encoder_file.parent.glob("eval/knn-*/results.json")
    assert json.loads(results.read_text())["weights"] == "trained"
    info = runner.invoke(app, ["info", str(encoder_file), "--json"])
    assert [e["baseline"] for e in json.loads(info.output)["evaluations"]] == [False]


def test_the_random_init_baseline_is_torchvision_s_init_whatever_the_file_used(tmp_path):
    """A file trained from zero-initialised residual branches still gets the standard untrained ResNet as its baseline."""
    from simclr_cli.engine.features import open_encoder

    cfg = ModelConfig(arch="resnet18", width=0.25, zero_init_residual=True).resolved(image_size=16)
    info = checkpoint.EncoderInfo(model=cfg, image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  interpolation="bicubic", config={}, epoch=0, step=0)
    path = tmp_path / "encoder.safetensors"
    checkpoint.save_encoder(path, build_model(cfg), info=info)
    baseline = open_encoder(path, random_init=True, seed=0).model.encoder
    for block in (m for m in baseline.modules() if hasattr(m, "last_bn")):
        assert torch.all(block.last_bn.weight == 1)


def test_finetune_runs_on_a_label_fraction_and_its_model_is_accepted_by_embed(encoder_file, labelled, tmp_path):
    result = runner.invoke(app, ["finetune", str(encoder_file), "--data", str(labelled), "--label-fraction", "0.5",
                                 "--epochs", "1", *COMMON, "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved["labelled_images"] == 9 and 0.0 <= saved["top1"] <= 1.0  # 3 of 6 per class
    finetuned = tmp_path / "ft" / "finetuned.safetensors"
    embedded = runner.invoke(app, ["embed", str(labelled / "val"), "-o", str(tmp_path / "v.npy"), "-c", str(finetuned), *COMMON])
    assert embedded.exit_code == 0, embedded.output


def test_finetune_on_a_small_subset_takes_several_steps_an_epoch_and_min_steps_in_all(tmp_path, labelled):
    """18 labelled images: a batch of 4 (4 steps an epoch, not one step of 18), epochs raised until min_steps; the
    training flips as the encoder's pretraining did (here: never) and crops as the paper does."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16)
    info = checkpoint.EncoderInfo(model=cfg, image_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic",
                                  config={"augment": {"crop_scale": [0.3, 1.0], "flip_p": 0.0}}, epoch=1, step=10)
    encoder = tmp_path / "digits-like" / "encoder.safetensors"
    checkpoint.save_encoder(encoder, build_model(cfg), info=info)
    result = runner.invoke(app, ["finetune", str(encoder), "--data", str(labelled), "--set", "finetune.min_steps=200",
                                 "--device", "cpu", "--precision", "fp32", "--workers", "0", "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "batch 4, 50 epochs of 4 steps = 200 steps" in said
    assert "finetune epoch 2/50" in said and "finetune epoch 1/50" not in said  # the evaluated epochs are logged
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    settings = saved["settings"]
    assert (settings["batch_size"], settings["epochs"], settings["steps"], settings["min_steps"]) == (4, 50, 200, 200)
    assert settings["crop_scale"] == [0.08, 1.0] and settings["flip_p"] == 0.0
    evaluated = [h["epoch"] for h in saved["history"] if h["top1"] is not None]
    assert evaluated == list(range(2, 51, 2))  # every 2nd of 50 epochs: at most 30 evaluations, the last included


def test_embed_then_retrieve_finds_the_query_itself_first(encoder_file, labelled, tmp_path):
    out = tmp_path / "vecs.npy"
    result = runner.invoke(app, ["embed", str(labelled / "train"), "-o", str(out), "--checkpoint", str(encoder_file), *COMMON])
    assert result.exit_code == 0, result.output
    vectors = np.load(out, allow_pickle=False)
    paths = (tmp_path / "vecs.paths.txt").read_text().splitlines()
    assert vectors.shape == (18, 128) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    assert paths == sorted(paths) and paths[0] == "blue/0.png"
    assert json.loads((tmp_path / "vecs.json").read_text())["layer"] == "encoder"

    query = labelled / "train" / "green" / "2.png"
    matches = tmp_path / "matches.csv"
    result = runner.invoke(app, ["knn", "--index", str(out), "--query", str(query), "-k", "3", *COMMON, "-o", str(matches)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(matches.open()))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["path"] == "green/2.png" and float(rows[0]["similarity"]) == pytest.approx(1.0, abs=1e-5)


def test_retrieval_over_a_normalised_index_skips_the_row_norms(encoder_file, labelled, tmp_path, monkeypatch):
    from simclr_cli.engine.tasks import retrieval

    out = tmp_path / "vecs.npy"
    result = runner.invoke(app, ["embed", str(labelled / "train"), "-o", str(out), "-c", str(encoder_file), "--normalize", *COMMON])
    assert result.exit_code == 0, result.output
    asked = []
    real = retrieval.nearest
    monkeypatch.setattr(retrieval, "nearest", lambda *args, **kwargs: asked.append(kwargs["unit_rows"]) or real(*args, **kwargs))
    query = labelled / "train" / "green" / "2.png"
    result = runner.invoke(app, ["knn", "--index", str(out), "--query", str(query), "-k", "1", *COMMON])
    assert result.exit_code == 0, result.output
    assert asked == [True] and "green/2.png" in result.output


def test_default_checkpoint_is_runs_latest(encoder_file, labelled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["knn", "--data", str(labelled), *COMMON])
    assert result.exit_code == 2
    assert "runs/latest/encoder.safetensors does not exist" in result.output
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(encoder_file.parent)
    result = runner.invoke(app, ["knn", "--data", str(labelled), "-k", "3", *COMMON])
    assert result.exit_code == 0, result.output
    assert "checkpoint: runs/latest/encoder.safetensors" in result.output
    assert list((encoder_file.parent / "eval").glob("knn-*/results.json"))  # results beside the encoder


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["knn", "CKPT", "--data", "/no/such"], "neither a dataset name"),
        (["knn", "CKPT", "--data", "LABELLED", "--layer", "head2"], "--layer head2 needs a 3-layer head"),
        (["knn", "CKPT", "--data", "LABELLED", "-k", "ten"], "-k 'ten' is not a list of whole numbers"),
        (["knn", "--index", "x.npy"], "retrieval needs both --index"),
        (["linear-eval", "CKPT", "--data", "LABELLED", "--protocol", "magic"], "linear_eval.protocol 'magic' is not supported"),
        (["embed", "LABELLED", "-o", "vecs.txt", "-c", "CKPT"], "must end with .npy"),
        (["linear-eval", "/no/such.safetensors", "--data", "LABELLED"], "does not exist"),
    ],
)
def test_eval_bad_input_is_one_line(args, expected, encoder_file, labelled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(encoder_file) if a == "CKPT" else str(labelled) if a == "LABELLED" else a for a in args]
    result = runner.invoke(app, [*args, *COMMON])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output


def test_embed_and_knn_on_two_processes_match_one(encoder_file, labelled, tmp_path):
    import subprocess
    import sys

    result = runner.invoke(app, ["embed", str(labelled), "-o", str(tmp_path / "one.npy"), "-c", str(encoder_file), *COMMON])
    assert result.exit_code == 0, result.output
    two = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "embed", str(labelled), "-o", str(tmp_path / "two.npy"), "-c", str(encoder_file),
         *COMMON, "--gpus", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "two.npy").read_bytes()
    assert (tmp_path / "one.paths.txt").read_text() == (tmp_path / "two.paths.txt").read_text()

    runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "-k", "3", *COMMON, "--out", str(tmp_path / "k1")])
    two = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "knn", str(encoder_file), "--data", str(labelled), "-k", "3", *COMMON,
         "--gpus", "2", "--out", str(tmp_path / "k2")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_result, two_result = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("k1", "k2"))
    assert (one_result["top1"], one_result["train_images"]) == (two_result["top1"], two_result["train_images"])
    assert two.stdout.count("results:") == 1  # rank 0 alone reports

    runner.invoke(app, ["linear-eval", str(encoder_file), "--data", str(labelled), *COMMON, "--out", str(tmp_path / "l1")])
    two = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "linear-eval", str(encoder_file), "--data", str(labelled), *COMMON,
         "--gpus", "2", "--out", str(tmp_path / "l2")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_result, two_result = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("l1", "l2"))
    assert one_result["top1"] == two_result["top1"]
    weights = [load_file(str(tmp_path / k / "classifier.safetensors")) for k in ("l1", "l2")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_embed_plot_draws_a_map(encoder_file, labelled, tmp_path):
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["embed", str(labelled / "val"), "-o", str(tmp_path / "v.npy"), "-c", str(encoder_file),
                                 "--plot", *COMMON])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_info_and_export_through_the_cli(encoder_file, labelled, tmp_path):
    runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "-k", "3", *COMMON])
    shown = runner.invoke(app, ["info", str(encoder_file), "--json"])
    assert shown.exit_code == 0, shown.output
    described = json.loads(shown.stdout)
    assert described["architecture"] == "resnet18" and described["image_size"] == 16
    assert [e["command"] for e in described["evaluations"]] == ["knn"]
    table = runner.invoke(app, ["info", str(encoder_file)])
    assert table.exit_code == 0 and "eval: knn" in table.output

    refused = runner.invoke(app, ["export", str(encoder_file), "--to", "torchvision"])
    assert refused.exit_code == 2 and "--to safetensors-encoder" in refused.output  # width 0.25, small stem
    out = tmp_path / "bare.safetensors"
    exported = runner.invoke(app, ["export", str(encoder_file), "--to", "safetensors-encoder", "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    assert load_file(str(out)).keys() == {k.removeprefix("encoder.") for k in load_file(str(encoder_file)) if k.startswith("encoder.")}


def test_export_defaults_to_runs_latest_like_the_other_commands(encoder_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = runner.invoke(app, ["export", "--to", "safetensors-encoder"])
    assert missing.exit_code == 2 and "no CHECKPOINT given and runs/latest/encoder.safetensors does not exist" in missing.output
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "latest").symlink_to(encoder_file.parent)
    exported = runner.invoke(app, ["export", "--to", "safetensors-encoder"])
    assert exported.exit_code == 0, exported.output
    assert (encoder_file.parent / "encoder-safetensors-encoder.safetensors").is_file()


def test_finetune_init_loads_torchvision_weights(encoder_file, labelled, tmp_path):
    """--init puts another file's weights into the checkpoint's architecture before fine-tuning."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = {k.removeprefix("encoder."): v.clone() + 0.01 for k, v in load_file(str(encoder_file)).items() if k.startswith("encoder.")}
    weights_file = tmp_path / "resnet.safetensors"
    save_file(source, str(weights_file))
    result = runner.invoke(app, ["finetune", str(encoder_file), "--data", str(labelled), "--init", str(weights_file),
                                 "--epochs", "1", *COMMON, "--out", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    assert "initialised from" in result.output
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    refused = runner.invoke(app, ["finetune", str(encoder_file), "--data", str(labelled), "--init", str(bad), *COMMON])
    assert refused.exit_code == 2 and "refuses to load it" in refused.output


def test_info_names_the_method(encoder_file):
    table = runner.invoke(app, ["info", str(encoder_file)])
    assert table.exit_code == 0, table.output
    assert any("method" in line and "simclr" in line for line in table.output.splitlines())
    described = json.loads(runner.invoke(app, ["info", str(encoder_file), "--json"]).stdout)
    assert described["method"] == "simclr"


def test_knn_reads_its_section_of_a_preset(encoder_file, labelled, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("knn:\n  k: [4]\n  temperature: 0.2\n")
    result = runner.invoke(app, ["knn", str(encoder_file), "--data", str(labelled), "--preset", str(recipe),
                                 "--set", "knn.batch_size=3", *[a for a in COMMON if a not in ("--batch-size", "8")],
                                 "--out", str(tmp_path / "knn")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert saved["k"] == [4] and saved["temperature"] == 0.2
