"""Pretraining-data experiments: `pretrain --subset N` and `--unbalanced ALPHA` (subsets.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import write_images
from simclr_cli.cli import app
from simclr_cli.engine import subsets
from simclr_cli.engine.datasets import LabelledImages, Unlabelled
from simclr_cli.engine.errors import DataError
from simclr_cli.engine.images import ImageFiles

runner = CliRunner()


def test_unbalanced_counts_by_hand():
    # ALPHA 16 over 5 classes of 100: fractions 16^(-r/4) = 1, 1/2, 1/4, 1/8, 1/16 -> 100, 50, 25, 12.5, 6.25 rounded
    assert subsets.unbalanced_counts([100] * 5, alpha=16, ranks=[0, 1, 2, 3, 4]) == [100, 50, 25, 13, 6]
    assert subsets.unbalanced_counts([100] * 5, alpha=16, ranks=[2, 0, 4, 1, 3]) == [25, 100, 6, 50, 13]
    # each class keeps a fraction of its own size, at least one image
    assert subsets.unbalanced_counts([40, 10, 3], alpha=100, ranks=[0, 1, 2]) == [40, 1, 1]  # 10/10 = 1, 3/100 -> 1
    assert subsets.unbalanced_counts([7], alpha=10, ranks=[0]) == [7]
    assert subsets.unbalanced_counts([9, 9], alpha=1, ranks=[1, 0]) == [9, 9]


def test_unbalanced_draw_keeps_the_counts_and_is_seed_deterministic():
    labels = [c for c in range(4) for _ in range(30)]  # 4 classes of 30
    drawn = subsets.unbalanced_indices(labels, alpha=8, seed=3)
    assert drawn == subsets.unbalanced_indices(labels, alpha=8, seed=3) and drawn == sorted(set(drawn))
    assert sorted(Counter(labels[i] for i in drawn).values()) == [4, 8, 15, 30]  # 30 x 8^(-r/3): 30, 15, 7.5, 3.75
    assert drawn != subsets.unbalanced_indices(labels, alpha=8, seed=4)


def test_subset_is_seed_deterministic_and_of_the_size_asked():
    drawn = subsets.subset_indices(100, 17, seed=0)
    assert len(drawn) == 17 and drawn == sorted(set(drawn)) and all(0 <= i < 100 for i in drawn)
    assert drawn == subsets.subset_indices(100, 17, seed=0) and drawn != subsets.subset_indices(100, 17, seed=1)


def test_draw_keeps_files_as_files_and_reads_classes_from_subfolders(tmp_path):
    paths = write_images(tmp_path / "data" / "cat", 6, size=8) + write_images(tmp_path / "data" / "dog" / "deep", 6, size=8, seed=1)
    images = ImageFiles(paths)
    drawn = subsets.draw(images, subset=4, unbalanced=3, seed=0, source=str(tmp_path / "data"))
    assert isinstance(drawn, ImageFiles) and len(drawn) == 4  # 6 + 2 kept, then 4 of those 8
    assert set(drawn.paths) <= set(paths)
    assert subsets.draw(images, subset=None, unbalanced=None, seed=0, source=None) is images


def test_named_labelled_data_is_drawn_by_its_labels():
    data = Unlabelled(LabelledImages([(None, i % 2) for i in range(20)], ["a", "b"]))  # items never read
    assert sorted(Counter(i % 2 for i in subsets.draw(data, subset=None, unbalanced=10, seed=0, source="x").indices).values()) == [1, 10]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda root: ImageFiles(write_images(root, 3, size=8)), "is not in one"),  # images directly in DATA
        (lambda root: Unlabelled(LabelledImages([(None, -1), (None, 0)], ["a"])), "1 images of"),  # STL-10's unlabelled part
    ],
)
def test_unbalanced_refuses_data_without_classes(make, expected, tmp_path):
    with pytest.raises(DataError, match=expected):
        subsets.draw(make(tmp_path), subset=None, unbalanced=2, seed=0, source=str(tmp_path))


COMMON = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size", "8", "--device", "cpu",
          "--precision", "fp32", "--workers", "0"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--subset", "0"], "data.subset (--subset) 0 must be a whole number of images >= 1"),
        (["--subset", "100"], "--subset 100 is more than the 24 images of the data"),
        (["--unbalanced", "0.5"], "data.unbalanced (--unbalanced) 0.5 must be a number >= 1"),
        (["--unbalanced", "2", "--subset", "20"], "--subset 20 is more than the 18 images the unbalanced draw keeps"),
    ],
)
def test_bad_values_are_one_line(args, expected, image_folder, tmp_path):
    result = runner.invoke(app, ["pretrain", str(image_folder), *COMMON, *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.output


def test_unbalanced_refuses_unlabelled_data_in_one_line(tmp_path):
    write_images(tmp_path / "flat", 10, size=8)
    result = runner.invoke(app, ["pretrain", str(tmp_path / "flat"), *COMMON, "--unbalanced", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--unbalanced needs one subfolder per class" in result.output, result.output


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_records_the_draw_and_resume_on_two_processes_keeps_it(image_folder, tmp_path):
    """image_folder: classes a (12 images) and b (12): --unbalanced 2 keeps 12 + 6, --subset 16 of those. A run cut
    after step 2 resumes on two processes with the same images, so the same losses."""
    args = ["pretrain", str(image_folder), *COMMON, "--subset", "16", "--unbalanced", "2", "--epochs", "2",
            "--checkpoint-every", "2", "--set", "train.log_every=1", "--set", "train.keep_checkpoints=3"]
    whole = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    saved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())
    assert saved["data"]["subset"] == 16 and saved["data"]["unbalanced"] == 2.0
    assert "on 16 images" in (tmp_path / "whole" / "train.log").read_text()
    assert len((tmp_path / "whole" / "files.txt").read_text().split()) == 24  # --resume re-draws from all of DATA

    part = tmp_path / "part"
    runner.invoke(app, [*args, "--out", str(part)])
    (part / "checkpoints" / "step-000000004.safetensors").unlink()  # as if the run had died after step 2
    resumed = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", "--resume", "--out", str(part), "--gpus", "2",
                              "--device", "cpu", "--workers", "0"], capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _losses(tmp_path / "whole"), _losses(part)
    assert len(a) == len(b) == 4  # 16 images, batch 8: 2 steps an epoch
    assert all(abs(x - y) / abs(x) < 1e-3 for x, y in zip(a, b))
