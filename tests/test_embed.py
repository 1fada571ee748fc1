"""`embed`: rows and sidecar in the same order, undecodable files skipped and reported, safe outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multiprocess import run_on_two_processes
from simclr_cli.engine import embed, features
from simclr_cli.engine.checkpoint import EncoderInfo, save_encoder
from simclr_cli.engine.data import ImageFiles
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.model import ModelConfig, build_model

CPU = Runtime(device=torch.device("cpu"), precision="fp32")




@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> features.Encoder:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", width=0.25).resolved(image_size=16)
    info = EncoderInfo(model=cfg, image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                       config={}, epoch=1, step=1)
    path = tmp_path_factory.mktemp("ckpt") / "enc.safetensors"
    save_encoder(path, build_model(cfg), info=info)
    return features.open_encoder(path)


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (18, 18, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i, rel in enumerate(["b.png", "a/x.png", "a/y.jpg", "c/d/z.png", "a0.png"]):
        write_image(root / rel, seed=i)
    return root


def run(encoder, folder, out, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return embed.run(encoder, folder, out=out, layer=kwargs.pop("layer", "encoder"), rt=CPU, **kwargs)


def expected_rows(encoder, folder: Path, names: list[str]) -> torch.Tensor:
    return features.extract(encoder, ImageFiles([folder / n for n in names]), rt=CPU)


def test_rows_follow_the_sidecar_order(encoder, folder, tmp_path):
    out = tmp_path / "out" / "vecs.npy"
    result = run(encoder, folder, out)
    names = embed.read_paths(result.paths_file)
    assert result.paths_file == tmp_path / "out" / "vecs.paths.txt"
    assert names == ["a0.png", "b.png", "a/x.png", "a/y.jpg", "c/d/z.png"]  # find_images: a folder's files, then its subfolders
    rows = np.load(out)
    assert rows.dtype == np.float32 and rows.shape == (5, 128) and np.isfinite(rows).all()
    assert (result.rows, result.dim, result.skipped) == (5, 128, ())
    torch.testing.assert_close(torch.from_numpy(rows), expected_rows(encoder, folder, names), rtol=1e-4, atol=1e-5)
    d = result.to_dict()
    assert d["rows"] == 5 and d["dim"] == 128 and d["out"] == str(out) and d["paths_file"] == str(result.paths_file)
    assert d["skipped"] == [] and d["checkpoint"] == str(encoder.source) and d["layer"] == "encoder"
    assert sorted(os.listdir(out.parent)) == ["vecs.npy", "vecs.paths.txt"]  # no temp files left behind


def test_normalize_and_layer(encoder, folder, tmp_path):
    result = run(encoder, folder, tmp_path / "z.npy", layer="projection", normalize=True)
    rows = np.load(result.out)
    assert rows.shape == (5, 128) and result.normalize  # proj_dim 128
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)


def test_undecodable_files_are_skipped_and_reported(encoder, folder, tmp_path):
    (folder / "a" / "xx.png").write_bytes(np.random.default_rng(9).bytes(300))  # between a/x.png and a/y.jpg
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "c" / "d" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then garbage
    out = tmp_path / "vecs.npy"
    result = run(encoder, folder, out, batch_size=3)
    skipped = dict(result.skipped)
    assert set(skipped) == {"a/xx.png", "empty.jpg", "c/d/bad.png"}
    assert all(reason for reason in skipped.values())
    assert "UnidentifiedImageError" in skipped["empty.jpg"]
    names = embed.read_paths(result.paths_file)
    assert names == ["a0.png", "b.png", "a/x.png", "a/y.jpg", "c/d/z.png"]
    rows = np.load(out)
    assert rows.shape == (5, 128) and result.rows == 5
    torch.testing.assert_close(torch.from_numpy(rows), expected_rows(encoder, folder, names), rtol=1e-4, atol=1e-5)
    assert {e["path"] for e in result.to_dict()["skipped"]} == set(skipped)
    assert sorted(os.listdir(tmp_path)) == ["photos", "vecs.npy", "vecs.paths.txt"]  # the scratch file is gone


def test_a_folder_of_only_broken_files_is_an_error(encoder, tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="none of the 1 images"):
        run(encoder, root, tmp_path / "v.npy")
    assert not (tmp_path / "v.npy").exists() and os.listdir(tmp_path) == ["broken"]


def test_existing_output_is_refused_without_overwrite(encoder, folder, tmp_path):
    out = tmp_path / "vecs.npy"
    run(encoder, folder, out)
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="--overwrite"):
        run(encoder, folder, out)
    assert out.read_bytes() == before
    write_image(folder / "new.png", seed=42)
    result = run(encoder, folder, out, overwrite=True)
    assert result.rows == 6 and np.load(out).shape == (6, 128)
    out.unlink()  # a left-over sidecar alone is refused too
    with pytest.raises(ConfigError, match="vecs.paths.txt already exists; pass --overwrite"):
        run(encoder, folder, out)


def test_output_must_be_npy(encoder, folder, tmp_path):
    with pytest.raises(ConfigError, match=r"must end with \.npy"):
        run(encoder, folder, tmp_path / "vecs.txt")


def test_missing_layer_is_refused_before_any_work(encoder, folder, tmp_path):
    with pytest.raises(ConfigError, match="head2 needs a 3-layer head"):
        run(encoder, folder, tmp_path / "v.npy", layer="head2")
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.skipif(os.sys.getfilesystemencoding().lower() != "utf-8", reason="needs a POSIX bytes file system")
def test_odd_file_names_round_trip_or_are_reported(encoder, tmp_path):
    root = tmp_path / "odd"
    write_image(root / "plain.png", seed=1)
    latin1 = os.fsencode(root) + b"/caf\xe9.png"  # not valid UTF-8
    try:
        write_image(Path(os.fsdecode(latin1)), seed=2)
        write_image(root / "two\nlines.png", seed=3)
    except OSError:
        pytest.skip("this file system refuses such names")
    result = run(encoder, root, tmp_path / "v.npy")
    names = embed.read_paths(result.paths_file)
    assert [os.fsencode(n) for n in names] == [b"caf\xe9.png", b"plain.png"]
    assert (root / names[0]).is_file()  # the sidecar's name opens the original file
    assert b"caf\xe9.png\n" in result.paths_file.read_bytes()
    assert [name for name, _ in result.skipped] == ["two\nlines.png"] and "line break" in result.skipped[0][1]


def test_worker_processes_give_the_same_rows(encoder, folder, tmp_path):
    (folder / "broken.png").write_bytes(b"garbage")
    one = run(encoder, folder, tmp_path / "a.npy")
    two = run(encoder, folder, tmp_path / "b.npy", workers=1)
    assert one.skipped == two.skipped and len(one.skipped) == 1
    np.testing.assert_array_equal(np.load(one.out), np.load(two.out))


# ---------------------------------------------------------------------------------------------------------------
# two processes: each rank embeds its shard into the shared scratch file, rank 0 writes the one-process files


def _two_rank_worker(world, checkpoint: str, jobs: str) -> None:
    encoder = features.open_encoder(Path(checkpoint))
    for job in json.loads(jobs):
        if job["expected"] is None:  # nothing decodable: every rank stops with the one-process error
            with pytest.raises(DataError, match="none of the 2 images"):
                embed.run(encoder, Path(job["folder"]), out=Path(job["out"]), batch_size=2, rt=CPU)
            continue
        result = embed.run(encoder, Path(job["folder"]), out=Path(job["out"]), batch_size=2, rt=CPU)
        got = result.to_dict()
        for key in ("rows", "dim", "layer", "normalize", "checkpoint", "skipped"):
            assert got[key] == job["expected"][key], key  # on every rank, not only the one that wrote the files


def test_two_ranks_write_the_one_process_files_byte_for_byte(encoder, folder, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(folder, clean)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.png").write_bytes(b"garbage")
    (folder / "a.png").write_bytes(b"")  # row 0: rank 0's shard (rows 0-3, two batches of 2)
    (folder / "a" / "xx.png").write_bytes(b"not an image")  # row 4: rank 1's shard (rows 4-6)
    one = run(encoder, folder, tmp_path / "one" / "vecs.npy")
    assert [name for name, _ in one.skipped] == ["a.png", "a/xx.png"] and one.rows == 5
    one_clean = run(encoder, clean, tmp_path / "one" / "clean.npy")
    two = tmp_path / "two"
    jobs = [{"folder": str(folder), "out": str(two / "vecs.npy"), "expected": one.to_dict()},
            {"folder": str(clean), "out": str(two / "clean.npy"), "expected": one_clean.to_dict()},
            {"folder": str(broken), "out": str(two / "broken.npy"), "expected": None}]
    run_on_two_processes(_two_rank_worker, str(encoder.source), json.dumps(jobs), timeout_s=40)
    for result in (one, one_clean):
        out = two / result.out.name
        assert out.read_bytes() == result.out.read_bytes()  # fp32 on the CPU, same batches: identical rows
        assert embed.paths_file_for(out).read_bytes() == result.paths_file.read_bytes()
    # Only the outputs: no scratch .npy, no per-rank JSON, nothing from the failed run.
    assert sorted(os.listdir(two)) == ["clean.npy", "clean.paths.txt", "vecs.npy", "vecs.paths.txt"]
