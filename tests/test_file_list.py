"""Image lists: --file-list for pretrain and embed, the list a run saves (files.txt) and --resume reading it back."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import datasets
from simclr_cli.engine.errors import DataError
from simclr_cli.engine.images import find_images, read_file_list, write_file_list
from simclr_cli.engine.tasks import pretrain as task

from test_cli import one_line_error
from test_knn import tiny_checkpoint
from test_pretrain import CrashAt, tiny_config

runner = CliRunner()
TINY = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size", "8", "--device", "cpu",
        "--precision", "fp32", "--workers", "0"]


def test_a_list_reads_relative_and_absolute_paths_and_skips_blank_lines(image_folder, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text(f"b/c/img_001.JPG\n\n{image_folder / 'a' / 'img_002.png'}\r\na/img_000.png\n")
    assert read_file_list(listed, base=image_folder) == [
        image_folder / "b/c/img_001.JPG", image_folder / "a/img_002.png", image_folder / "a/img_000.png"]


def test_a_missing_listed_file_or_list_is_one_line_naming_it(image_folder, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("a/img_000.png\na/nope.png\n")
    with pytest.raises(DataError, match=r"list.txt line 2: .*images/a/nope.png does not exist; fix the list"):
        read_file_list(listed, base=image_folder)
    with pytest.raises(DataError, match=r"cannot read the file list .*absent.txt"):
        read_file_list(tmp_path / "absent.txt", base=image_folder)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"names no images"):
        read_file_list(tmp_path / "blank.txt", base=image_folder)


def test_a_saved_list_reads_back_as_it_was_written(tmp_path):
    base = tmp_path / "data"
    images = [base / "x.jpg", base / "sub" / "caf\udce9.png", tmp_path / "outside.png"]  # a non-UTF-8 name too
    assert write_file_list(tmp_path / "files.txt", images, base=base)
    assert (tmp_path / "files.txt").read_bytes().splitlines()[:2] == [b"x.jpg", b"sub/caf\xe9.png"]
    assert read_file_list(tmp_path / "files.txt", base=base, check=False) == images
    assert not write_file_list(tmp_path / "broken.txt", [base / "a\nb.jpg"], base=base)  # no list beats a wrong one
    assert not (tmp_path / "broken.txt").exists()


def test_pretrain_trains_on_the_listed_images_and_saves_the_list(image_folder, tmp_path):
    names = [p.relative_to(image_folder).as_posix() for p in find_images(image_folder)][::2]  # 12 of 24
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(names) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(image_folder), "--file-list", str(listed), "--max-steps", "1",
                                 "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert (out / "files.txt").read_text().splitlines() == names
    assert json.loads((out / "data.json").read_text())["count"] == 12


def test_pretrain_file_list_errors(image_folder, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("a/img_000.png\nmissing.jpg\n")
    line = one_line_error(runner.invoke(app, ["pretrain", str(image_folder), "--file-list", str(listed),
                                              "--out", str(tmp_path / "r"), *TINY]))
    assert "list.txt line 2:" in line and "missing.jpg does not exist" in line
    line = one_line_error(runner.invoke(app, ["pretrain", "--file-list", str(listed), "--out", str(tmp_path / "r")]))
    assert "--file-list needs DATA" in line
    assert not (tmp_path / "r").exists()


def test_resume_reads_the_saved_list_instead_of_searching_again(image_folder, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(image_folder, checkpoint_every=2), out=out, progress=CrashAt(3))
    assert (out / "files.txt").read_text().splitlines() == [
        p.relative_to(image_folder).as_posix() for p in find_images(image_folder)]

    def no_search(*args, **kwargs):
        raise AssertionError("the folder was searched again")

    monkeypatch.setattr(datasets, "scan_folder", no_search)
    with caplog.at_level(logging.INFO, logger="simclr"):
        result = task.run(tiny_config(image_folder, checkpoint_every=2), out=out, resume=True)
    assert result.resumed_from == 2 and result.steps == 6
    assert f"using the 24 images listed in {out / 'files.txt'}" in caplog.text


def test_resume_still_notices_images_that_changed_since(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(image_folder, checkpoint_every=2), out=out, progress=CrashAt(3))
    (image_folder / "a" / "img_000.png").write_bytes(b"changed")
    (image_folder / "a" / "new.png").write_bytes((image_folder / "a" / "img_001.png").read_bytes())
    result = runner.invoke(app, ["pretrain", "--resume", "--out", str(out), "--workers", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert "using the 24 images listed in" in lines[0]  # new.png, added since, is not one of them
    assert lines[-1].startswith("error: --resume: the data differs from what") and len(lines) == 2


def test_embed_file_list_rows_follow_the_list(image_folder, tmp_path):

    checkpoint = tiny_checkpoint(tmp_path / "enc.safetensors")
    listed = tmp_path / "list.txt"
    listed.write_text("b/c/img_003.JPG\na/img_001.png\n")
    out = tmp_path / "vecs.npy"
    result = runner.invoke(app, ["embed", str(image_folder), "--file-list", str(listed), "-o", str(out),
                                 "-c", str(checkpoint), "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "vecs.paths.txt").read_text().splitlines() == ["b/c/img_003.JPG", "a/img_001.png"]
    assert np.load(out).shape[0] == 2
    listed.write_text("a/img_001.png\na/gone.png\n")
    result = runner.invoke(app, ["embed", str(image_folder), "--file-list", str(listed), "-o", str(tmp_path / "v2.npy"),
                                 "-c", str(checkpoint), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # after the checkpoint's line
    assert len(errors) == 1 and "list.txt line 2:" in errors[0] and "gone.png does not exist" in errors[0]
    assert not (tmp_path / "v2.npy").exists()

