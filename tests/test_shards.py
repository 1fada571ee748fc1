"""Tar shards: `simclr shard` writes them, pretrain and embed read them (brace patterns, a folder, one .tar), the saved
index on --resume, the split over processes and workers, and bad members named shard.tar:key."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from conftest import write_images
from simclr_cli.cli import app
from simclr_cli.engine import datasets, shards
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.images import ImageFiles, find_images
from simclr_cli.engine.pipeline import PixelDataset
from simclr_cli.engine.sampler import EpochSampler
from simclr_cli.engine.tasks import pretrain as task

from test_cli import one_line_error
from test_file_list import TINY
from test_knn import tiny_checkpoint
from test_pretrain import CrashAt, encoder_weights, tiny_config

runner = CliRunner()


def shard(folder: Path, out: Path, *args: str) -> None:
    result = runner.invoke(app, ["shard", str(folder), "-o", str(out), *args])
    assert result.exit_code == 0, result.output


def members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def write_tar(path: Path, items: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def classed(tmp_path: Path) -> Path:
    """Two class folders: 3 large PNGs (60 x 40) and 4 small JPEGs (20 x 20), one with dots in its name."""
    root = tmp_path / "classed"
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "cat" / f"big{i}.png")
    write_images(root / "dog", 3, suffix=".jpg")
    (root / "dog" / "img.v2.jpg").write_bytes((root / "dog" / "img_000.jpg").read_bytes())
    return root


def test_shard_writes_keyed_members_with_the_size_capped(classed, tmp_path):
    out = tmp_path / "shards"
    shard(classed, out, "--shard-size", "3", "--max-side", "32")
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert (out / "classes.txt").read_text().splitlines() == ["cat", "dog"]
    first, second, last = (members(out / f"shard-{n:06d}.tar") for n in range(3))
    assert [name for name, _ in first] == ["cat/big0.png", "cat/big0.cls", "cat/big1.png", "cat/big1.cls",
                                           "cat/big2.png", "cat/big2.cls"]
    assert [name for name, _ in second + last] == ["dog/img_v2.jpg", "dog/img_v2.cls", "dog/img_000.jpg", "dog/img_000.cls",
                                                   "dog/img_001.jpg", "dog/img_001.cls", "dog/img_002.jpg", "dog/img_002.cls"]
    for name, data in first:
        if name.endswith(".png"):
            assert Image.open(io.BytesIO(data)).size == (32, 21)  # 60 x 40 shrunk: the longer side is 32
        else:
            assert data == b"0"
    assert second[2][1] == (classed / "dog" / "img_000.jpg").read_bytes()  # 20 px: copied as it is
    assert second[3][1] == b"1"
    before = [(out / f"shard-{n:06d}.tar").read_bytes() for n in range(3)]
    line = one_line_error(runner.invoke(app, ["shard", str(classed), "-o", str(out), "--shard-size", "3"]))
    assert "already holds shards" in line and "--overwrite" in line
    shard(classed, out, "--shard-size", "3", "--max-side", "32", "--overwrite")
    assert [(out / f"shard-{n:06d}.tar").read_bytes() for n in range(3)] == before  # deterministic, byte for byte
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_shard_option_errors_are_one_line(classed, tmp_path):
    assert "--shard-size 0 must be >= 1" in one_line_error(
        runner.invoke(app, ["shard", str(classed), "-o", str(tmp_path / "s"), "--shard-size", "0"]))
    assert "does not exist" in one_line_error(
        runner.invoke(app, ["shard", str(tmp_path / "absent"), "-o", str(tmp_path / "s")]))


def test_sharded_pretrain_data_is_exactly_the_folders_pixels(image_folder, tmp_path):
    out = tmp_path / "shards"
    shard(image_folder, out, "--shard-size", "5")
    folder = PixelDataset(ImageFiles(find_images(image_folder)), max_side=None)
    for source in (out, f"{out}/shard-{{000000..000004}}.tar", f"{out}/shard-{{000000,000001,000002,000003,000004}}.tar"):
        sharded = PixelDataset(datasets.pretrain_dataset(str(source), root=None, download=False), max_side=None)
        assert len(sharded) == len(folder) == 24
        for i in range(len(folder)):
            assert torch.equal(sharded.pixels(i), folder.pixels(i))
    one = datasets.pretrain_dataset(str(out / "shard-000001.tar"), root=None, download=False)
    assert one.keys == ["a/img_005", "a/img_006", "a/img_007", "a/img_008", "a/img_009"]


def test_a_folder_of_images_with_an_archive_beside_stays_a_folder(image_folder, tmp_path):
    shard(image_folder, tmp_path / "s", "--shard-size", "24")
    (image_folder / "backup.tar").write_bytes((tmp_path / "s" / "shard-000000.tar").read_bytes())
    assert not shards.is_shard_source(image_folder)  # class subfolders: the images, not the archive
    assert shards.is_shard_source(tmp_path / "s") and shards.is_shard_source(image_folder / "backup.tar")


def test_brace_patterns():
    assert shards.expand_braces("s-{000008..000011}.tar") == ["s-000008.tar", "s-000009.tar", "s-000010.tar", "s-000011.tar"]
    assert shards.expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert shards.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ConfigError, match="runs backwards"):
        shards.expand_braces("x-{3..1}.tar")


def test_a_missing_or_compressed_shard_is_one_line(image_folder, tmp_path):
    out = tmp_path / "shards"
    shard(image_folder, out, "--shard-size", "12")
    line = one_line_error(runner.invoke(app, ["pretrain", f"{out}/shard-{{000000..000002}}.tar", "--out", str(tmp_path / "r"), *TINY]))
    assert "shard-000002.tar does not exist" in line
    (tmp_path / "z.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    line = one_line_error(runner.invoke(app, ["pretrain", str(tmp_path / "z.tar"), "--out", str(tmp_path / "r"), *TINY]))
    assert "cannot read the shard" in line and "uncompressed .tar" in line


def test_a_corrupt_member_is_skipped_and_named_shard_key(image_folder, tmp_path):
    good = [(f"k{i}.png", p.read_bytes()) for i, p in enumerate(find_images(image_folder)[:11])]
    tar = tmp_path / "mixed.tar"
    write_tar(tar, good[:5] + [("broken.jpg", b"not a jpeg at all"), ("notes.txt", b"no image")] + good[5:])
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(tar), "--max-steps", "2", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert f"{tar}:broken" in result.output.replace("\n", "")
    assert [json.loads(line)["path"] for line in (out / "bad_files.jsonl").read_text().splitlines()] == [f"{tar}:broken"]
    assert json.loads((out / "data.json").read_text())["count"] == 12  # notes has no image member
    stopped = runner.invoke(app, ["pretrain", str(tar), "--max-steps", "2", "--out", str(tmp_path / "r2"),
                                  "--on-bad-image", "error", *TINY])
    assert stopped.exit_code != 0 and "Traceback" not in stopped.output
    assert f"cannot decode {tar}:broken" in stopped.output.replace("\n", "")


def test_resume_on_shards_reads_the_saved_index_and_matches_an_unbroken_run(image_folder, tmp_path, monkeypatch, caplog):
    out_dir = tmp_path / "shards"
    shards.write_shards(image_folder, out_dir, shard_size=7)  # not through the CLI, whose log setup caplog would miss
    source = f"{out_dir}/shard-{{000000..000003}}.tar"
    whole = task.run(tiny_config(source, checkpoint_every=2), out=tmp_path / "whole")
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        task.run(tiny_config(source, checkpoint_every=2), out=broken, progress=CrashAt(3))
    assert (broken / "shards.tsv").read_text().splitlines()[1] == f"shard\t{out_dir / 'shard-000000.tar'}"

    def no_index(*args, **kwargs):
        raise AssertionError("the tar headers were read again")

    monkeypatch.setattr(shards, "index_shards", no_index)
    with caplog.at_level(logging.INFO, logger="simclr"):
        resumed = task.run(tiny_config(source, checkpoint_every=2), out=broken, resume=True)
    assert f"using the 24 samples indexed in {broken / 'shards.tsv'}" in caplog.text
    assert resumed.resumed_from == 2 and resumed.steps == whole.steps == 6
    for name, tensor in encoder_weights(tmp_path / "whole").items():
        assert torch.equal(tensor, encoder_weights(broken)[name]), name


def test_open_shard_files_are_capped(image_folder, tmp_path, monkeypatch):
    shards.write_shards(image_folder, tmp_path / "s", shard_size=1)  # 24 shards of one sample
    monkeypatch.setattr(shards, "OPEN_SHARDS", 5)
    images = shards.open_shards(tmp_path / "s")
    first = np.asarray(images[0])
    for i in [*range(24), 0, 3]:
        images[i].load()
        assert len(images._open) <= 5
    assert np.array_equal(np.asarray(images[0]), first)  # reopened after it was closed


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 1)])
def test_samples_split_over_processes_and_workers_once_each(image_folder, tmp_path, world_size, workers):
    out = tmp_path / "shards"
    shard(image_folder, out, "--shard-size", "5")
    images = shards.open_shards(out)
    seen = []
    for rank in range(world_size):
        sampler = EpochSampler(len(images), global_batch_size=6, seed=0, rank=rank, world_size=world_size)
        keys = _Keys(images)
        seen += [key for batch in DataLoader(keys, sampler=sampler, batch_size=6 // world_size, num_workers=workers)
                 for key in batch]
    assert sorted(seen) == sorted(images.keys)  # 24 samples, 4 full batches of 6: none twice, none lost


class _Keys(torch.utils.data.Dataset):
    """Item i: sample i's key, after reading its image (each worker through its own file handle)."""

    def __init__(self, images: shards.ShardImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> str:
        self.images[index].load()
        return self.images.keys[index]


def test_embed_on_shards_keys_rows_by_sample_key(image_folder, tmp_path):
    out_dir = tmp_path / "shards"
    shard(image_folder, out_dir, "--shard-size", "10")
    checkpoint = tiny_checkpoint(tmp_path / "enc.safetensors")
    vecs = tmp_path / "vecs.npy"
    result = runner.invoke(app, ["embed", f"{out_dir}/shard-{{000000..000002}}.tar", "-o", str(vecs), "-c", str(checkpoint),
                                 "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    keys = [p.relative_to(image_folder).with_suffix("").as_posix() for p in find_images(image_folder)]
    assert (tmp_path / "vecs.paths.txt").read_text().splitlines() == keys
    assert np.load(vecs).shape[0] == 24
    folder_vecs = tmp_path / "folder.npy"
    result = runner.invoke(app, ["embed", str(image_folder), "-o", str(folder_vecs), "-c", str(checkpoint),
                                 "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(vecs), np.load(folder_vecs))  # the same pixels, the same rows


def test_two_processes_on_shards_log_the_losses_of_one(image_folder, tmp_path):
    """--gpus 2 --device cpu on tar shards: each gloo process reads its own share through its own tar handles, and
    the global batch gives the one-process losses (and those of the same images as a folder)."""
    import subprocess
    import sys

    from test_cli import _losses

    shard(image_folder, tmp_path / "shards", "--shard-size", "5")
    source = f"{tmp_path / 'shards'}/shard-{{000000..000004}}.tar"
    args = ["--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size", "8", "--max-steps", "4",
            "--device", "cpu", "--precision", "fp32", "--workers", "0", "--set", "train.log_every=1",
            "--optimizer", "lars"]  # small steps: see test_cli's test_two_processes_log_the_same_losses_as_one
    for name, data in (("folder", str(image_folder)), ("one", source)):
        result = runner.invoke(app, ["pretrain", data, *args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    two = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", source, *args, "--gpus", "2", "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    folder, single, double = (_losses(tmp_path / name) for name in ("folder", "one", "two"))
    assert len(single) == len(double) == 4
    assert single == folder  # the same pixels in the same order: the same losses
    assert all(abs(a - b) / abs(a) < 1e-3 for a, b in zip(single, double))
