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
from typer.testing import CliRunner

from conftest import write_hostile_folder
from multiprocess import run_on_two_processes
from simclr_cli.cli import app
from simclr_cli.engine import features, images, index
from simclr_cli.engine.tasks import embed
from simclr_cli.engine.badfiles import MIN_SEEN, BadFiles
from simclr_cli.engine.checkpoint import EncoderInfo, save_encoder
from simclr_cli.engine.images import DEFAULT_MAX_PIXELS, ImageFiles, decode_image
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.model import ModelConfig, build_model

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
COMMON = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "8"]
runner = CliRunner()
needs_bytes_names = pytest.mark.skipif(os.sys.getfilesystemencoding().lower() != "utf-8", reason="needs a POSIX bytes file system")


def read_report(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


def squeezed(text: str) -> str:
    """The terminal output without its whitespace: rich wraps long log lines and indents the continuations."""
    return "".join(text.split())


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
    return embed.embed_folder(encoder, folder, out=out, layer=kwargs.pop("layer", "encoder"), rt=CPU, **kwargs)


def expected_rows(encoder, folder: Path, names: list[str]) -> torch.Tensor:
    return features.extract(encoder, ImageFiles([folder / n for n in names]), rt=CPU)


def test_rows_follow_the_sidecar_order(encoder, folder, tmp_path):
    out = tmp_path / "out" / "vecs.npy"
    result = run(encoder, folder, out)
    names = index.read_paths(result.paths_file)
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
    assert skipped["empty.jpg"] == "empty file (0 bytes)" and skipped["a/xx.png"] == "not an image"
    names = index.read_paths(result.paths_file)
    assert names == ["a0.png", "b.png", "a/x.png", "a/y.jpg", "c/d/z.png"]
    rows = np.load(out)
    assert rows.shape == (5, 128) and result.rows == 5
    torch.testing.assert_close(torch.from_numpy(rows), expected_rows(encoder, folder, names), rtol=1e-4, atol=1e-5)
    assert {e["path"] for e in result.to_dict()["skipped"]} == set(skipped)
    # the scratch file is gone; the bad files are listed beside the output
    assert sorted(os.listdir(tmp_path)) == ["photos", "vecs.bad_files.jsonl", "vecs.npy", "vecs.paths.txt"]
    assert result.bad_files == tmp_path / "vecs.bad_files.jsonl" == embed.report_for(out)
    listed = {Path(e["path"]).relative_to(folder).as_posix(): e["reason"] for e in read_report(result.bad_files)}
    assert listed == skipped


def test_a_folder_of_only_broken_files_is_an_error(encoder, tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"1 of 1 images could not be decoded \(100% > --max-bad-fraction 0.5\)"):
        run(encoder, root, tmp_path / "v.npy")
    # no outputs, only the list of what was found
    assert sorted(os.listdir(tmp_path)) == ["broken", "v.bad_files.jsonl"]
    with pytest.raises(DataError, match="none of the 1 images"):  # --max-bad-fraction 1 never stops; nothing to write
        run(encoder, root, tmp_path / "v.npy", max_bad_fraction=1.0)
    assert sorted(os.listdir(tmp_path)) == ["broken", "v.bad_files.jsonl"]
    assert [e["path"] for e in read_report(tmp_path / "v.bad_files.jsonl")] == [str(root / "a.png")]  # this run's list


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


@needs_bytes_names
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
    names = index.read_paths(result.paths_file)
    assert [os.fsencode(n) for n in names] == [b"caf\xe9.png", b"plain.png"]
    assert (root / names[0]).is_file()  # the sidecar's name opens the original file
    assert b"caf\xe9.png\n" in result.paths_file.read_bytes()
    assert [name for name, _ in result.skipped] == ["two\nlines.png"] and "line break" in result.skipped[0][1]
    assert [e["path"] for e in read_report(result.bad_files)] == [str(root / "two\nlines.png")]


@needs_bytes_names
def test_a_non_utf8_bad_file_round_trips_through_the_report_and_the_log(encoder, tmp_path, caplog):
    root = tmp_path / "odd"
    write_image(root / "plain.png", seed=1)
    raw = os.fsencode(root) + b"/\xff\xfe.jpg"
    try:
        Path(os.fsdecode(raw)).write_bytes(b"not a jpeg")
    except OSError:
        pytest.skip("this file system refuses such names")
    with caplog.at_level("WARNING", logger="simclr"):
        result = run(encoder, root, tmp_path / "v.npy")
    (entry,) = read_report(result.bad_files)
    assert os.fsencode(entry["path"]) == raw and entry["reason"] == "not an image"  # the exact bytes, from JSON
    assert "\\xff\\xfe.jpg: not an image" in caplog.text  # shown as escapes, not a surrogate that breaks the log
    assert index.read_paths(result.paths_file) == ["plain.png"]


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
            with pytest.raises(DataError, match="2 of 2 images could not be decoded"):
                embed.embed_folder(encoder, Path(job["folder"]), out=Path(job["out"]), batch_size=2, rt=CPU)
            continue
        result = embed.embed_folder(encoder, Path(job["folder"]), out=Path(job["out"]), batch_size=2, rt=CPU)
        got = result.to_dict()
        for key in ("rows", "dim", "layer", "normalize", "checkpoint", "skipped", "skipped_folders"):
            assert got[key] == job["expected"][key], key  # on every rank, not only the one that wrote the files
        assert got["bad_files"] == (str(embed.report_for(Path(job["out"]))) if got["skipped"] else None)


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
    run_on_two_processes(_two_rank_worker, str(encoder.source), json.dumps(jobs), timeout_s=120)
    for result in (one, one_clean):
        out = two / result.out.name
        assert out.read_bytes() == result.out.read_bytes()  # fp32 on the CPU, same batches: identical rows
        assert index.paths_file_for(out).read_bytes() == result.paths_file.read_bytes()
    # rank 0 lists the other rank's bad files too, in the one-process order
    assert (two / "vecs.bad_files.jsonl").read_bytes() == one.bad_files.read_bytes()
    assert [e["path"] for e in read_report(two / "broken.bad_files.jsonl")] == [str(broken / "a.png"), str(broken / "b.png")]
    # Only the outputs and the bad-file lists: no scratch .npy, no per-rank JSON, nothing else from the failed run.
    assert sorted(os.listdir(two)) == ["broken.bad_files.jsonl", "clean.npy", "clean.paths.txt", "vecs.bad_files.jsonl",
                                       "vecs.npy", "vecs.paths.txt"]


# ---------------------------------------------------------------------------------------------------------------
# the bad-image policy (badfiles.BadFiles): embed uses it now, pretrain next


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"on_bad_image": "ignore"}, "--on-bad-image 'ignore' is not supported"),
     ({"max_bad_fraction": 0.0}, r"--max-bad-fraction 0 is outside \(0, 1\]"),
     ({"max_bad_fraction": 1.5}, r"--max-bad-fraction 1.5 is outside \(0, 1\]"),
     ({"max_bad_fraction": float("nan")}, "--max-bad-fraction nan is outside"),
     ({"max_image_pixels": -1}, "--max-image-pixels -1 is negative")],
)
def test_bad_files_policy_values_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BadFiles(**kwargs)


def test_each_bad_file_is_logged_and_listed_once(tmp_path, caplog):
    report = tmp_path / "out" / "v.bad_files.jsonl"
    bad = BadFiles(report=report)
    assert bad.max_pixels == DEFAULT_MAX_PIXELS and bad.summary() == "no bad files"
    assert not report.exists()  # created only when there is something to list
    with caplog.at_level("WARNING", logger="simclr"):
        bad.add(tmp_path / "a.jpg", "truncated file")
        bad.add(tmp_path / "a.jpg", "truncated file")  # another worker, another epoch: still once
        bad.add(str(tmp_path / "b.png"), "not an image")
        bad.add_folder(tmp_path / "locked", "cannot read the folder (Permission denied)")
    assert caplog.text.count("skipping") == 2 and f"skipping {tmp_path / 'a.jpg'}: truncated file" in caplog.text
    assert read_report(report) == [
        {"path": str(tmp_path / "a.jpg"), "reason": "truncated file", "kind": "file"},
        {"path": str(tmp_path / "b.png"), "reason": "not an image", "kind": "file"},
        {"path": str(tmp_path / "locked"), "reason": "cannot read the folder (Permission denied)", "kind": "folder"},
    ]
    assert bad.files == [(str(tmp_path / "a.jpg"), "truncated file"), (str(tmp_path / "b.png"), "not an image")]
    assert bad.summary() == f"2 bad file(s) skipped, 1 folder(s) skipped; listed in {report}"
    BadFiles(report=report).add(tmp_path / "c.gif", "truncated file")  # a resumed run appends to its list
    assert len(read_report(report)) == 4


def test_the_error_policy_stops_at_the_first_bad_file_naming_it(tmp_path):
    bad = BadFiles(on_bad_image="error", report=tmp_path / "r.jsonl")
    with pytest.raises(DataError) as info:
        bad.add(tmp_path / "x.jpg", "truncated file")
    assert str(info.value) == f"cannot decode {tmp_path / 'x.jpg'} (truncated file); fix or remove it, or pass --on-bad-image skip"
    assert [e["path"] for e in read_report(tmp_path / "r.jsonl")] == [str(tmp_path / "x.jpg")]  # listed before stopping


def test_the_bad_fraction_is_judged_once_enough_images_are_seen():
    bad = BadFiles(max_bad_fraction=0.5)
    for i in range(60):
        bad.add(f"f{i}.jpg", "not an image")
    bad.check(seen=MIN_SEEN - 1, total=10_000)  # too early to judge a big folder
    bad.check(seen=120, total=10_000)  # 50%: not more than the limit
    with pytest.raises(DataError) as info:
        bad.check(seen=MIN_SEEN, total=10_000)
    assert str(info.value) == ("60 of 100 images could not be decoded (60% > --max-bad-fraction 0.5); the folder is "
                               "mostly unreadable: check DATA or raise --max-bad-fraction")
    small = BadFiles(max_bad_fraction=0.5)
    for name in ("a", "b", "c"):
        small.add(name, "empty file (0 bytes)")
    small.check(seen=3, total=4)  # a small folder is judged once all of it is seen
    with pytest.raises(DataError, match=r"3 of 4 images could not be decoded \(75% > --max-bad-fraction 0.5\)"):
        small.check(seen=4, total=4)
    never = BadFiles(max_bad_fraction=1.0)
    never.add("a", "x")
    never.check(seen=1, total=1)


def test_turning_the_pixel_limit_off_is_never_silent(caplog):
    with caplog.at_level("WARNING", logger="simclr"):
        bad = BadFiles(max_image_pixels=0)
    assert bad.max_pixels is None and "--max-image-pixels 0: the decompression-bomb limit is off" in caplog.text
    assert BadFiles(max_image_pixels=1000).max_pixels == 1000


@needs_bytes_names
def test_the_report_keeps_non_utf8_names_byte_exact(tmp_path, caplog):
    raw = b"/data/caf\xe9/\xff.jpg"
    bad = BadFiles(report=tmp_path / "r.jsonl")
    with caplog.at_level("WARNING", logger="simclr"):
        bad.add(os.fsdecode(raw), "truncated file")
    text = (tmp_path / "r.jsonl").read_bytes().decode("ascii")  # plain ASCII: any JSON reader takes it
    assert os.fsencode(json.loads(text)["path"]) == raw
    assert "skipping /data/caf\\xe9/\\xff.jpg: truncated file" in caplog.text


def test_skipped_folders_go_to_the_report(encoder, folder, tmp_path):
    (folder / "a" / "loop").symlink_to(folder, target_is_directory=True)
    result = run(encoder, folder, tmp_path / "v.npy")
    assert result.rows == 5 and result.skipped == ()
    assert result.skipped_folders == (("a/loop", f"symlink loop back to {folder}"),)
    assert read_report(result.bad_files) == [{"path": str(folder / "a" / "loop"), "reason": f"symlink loop back to {folder}",
                                              "kind": "folder"}]
    assert result.to_dict()["skipped_folders"] == [{"path": "a/loop", "reason": f"symlink loop back to {folder}"}]


# ---------------------------------------------------------------------------------------------------------------
# `simclr embed` on hostile data, through the CLI


def test_embed_completes_on_a_hostile_folder_and_names_every_skipped_file(encoder, tmp_path):
    root = tmp_path / "hostile"
    decoded, skipped = write_hostile_folder(root)
    out = tmp_path / "out" / "v.npy"
    result = runner.invoke(app, ["embed", str(root), "-o", str(out), "-c", str(encoder.source), *COMMON])
    assert result.exit_code == 0, result.output
    assert index.read_paths(index.paths_file_for(out)) == decoded  # rows only for decoded images, in walk order
    assert np.load(out).shape == (len(decoded), 128)
    output = squeezed(result.output)
    for name, reason in skipped.items():
        assert squeezed(f"skipping {root / name}: {reason}") in output
    report = read_report(out.with_suffix(".bad_files.jsonl"))
    assert {Path(e["path"]).name: e["reason"] for e in report} == skipped and len(report) == len(skipped)
    assert json.loads(out.with_suffix(".json").read_text())["skipped"] == [
        {"path": name, "reason": reason} for name, reason in sorted(skipped.items())]
    assert sorted(os.listdir(out.parent)) == ["v.bad_files.jsonl", "v.json", "v.npy", "v.paths.txt"]


def test_embed_on_bad_image_error_stops_cleanly_naming_the_file(encoder, tmp_path):
    root = tmp_path / "hostile"
    write_hostile_folder(root)
    out = tmp_path / "out" / "v.npy"
    result = runner.invoke(app, ["embed", str(root), "-o", str(out), "-c", str(encoder.source), "--on-bad-image", "error", *COMMON])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot decode {root / 'bomb.png'} (20000x20000 = 400.0 Mpx exceeds the 179.0 Mpx limit; "
                      "raise --max-image-pixels); fix or remove it, or pass --on-bad-image skip"]
    assert "Traceback" not in result.output
    assert os.listdir(out.parent) == ["v.bad_files.jsonl"]  # no .npy (nor a scratch file), only what was found


def test_embed_stops_when_most_files_are_garbage(encoder, tmp_path):
    root = tmp_path / "junk"
    for i in range(2):
        write_image(root / f"good{i}.png", seed=i)
    for i in range(5):
        (root / f"junk{i}.jpg").write_bytes(b"garbage " * (i + 1))
    args = ["embed", str(root), "-c", str(encoder.source), *COMMON]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "a.npy")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors == ["error: 5 of 7 images could not be decoded (71.4% > --max-bad-fraction 0.5); the folder is mostly "
                      "unreadable: check DATA or raise --max-bad-fraction"]
    assert not (tmp_path / "a.npy").exists()
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "b.npy"), "--max-bad-fraction", "0.8"]).exit_code == 0
    assert np.load(tmp_path / "b.npy").shape == (2, 128)
    refused = runner.invoke(app, [*args, "-o", str(tmp_path / "c.npy"), "--max-bad-fraction", "0"])
    assert refused.exit_code == 2 and "--max-bad-fraction 0 is outside (0, 1]" in refused.output


def test_embed_max_image_pixels(encoder, tmp_path):
    root = tmp_path / "sizes"
    write_image(root / "big.png", seed=1)  # 18 x 18 = 324 px
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "small.png")  # 256 px
    args = ["embed", str(root), "-c", str(encoder.source), *COMMON]
    limited = runner.invoke(app, [*args, "-o", str(tmp_path / "a.npy"), "--max-image-pixels", "300"])
    assert limited.exit_code == 0, limited.output
    assert squeezed(f"skipping {root / 'big.png'}: 18x18 = 324 px exceeds the 300 px limit") in squeezed(limited.output)
    assert index.read_paths(tmp_path / "a.paths.txt") == ["small.png"]
    unlimited = runner.invoke(app, [*args, "-o", str(tmp_path / "b.npy"), "--max-image-pixels", "0"])
    assert unlimited.exit_code == 0, unlimited.output
    assert squeezed("the decompression-bomb limit is off") in squeezed(unlimited.output)
    assert index.read_paths(tmp_path / "b.paths.txt") == ["big.png", "small.png"]


def test_embed_decodes_jpegs_only_as_large_as_the_eval_resize(encoder, folder, tmp_path, monkeypatch):
    from simclr_cli.engine.augment import eval_resize_side

    asked = []

    def recording(path, **kwargs):
        asked.append(kwargs.get("min_side"))
        return decode_image(path, **kwargs)

    monkeypatch.setattr(images, "decode_image", recording)  # what ImageFiles, which embed reads through, calls
    run(encoder, folder, tmp_path / "vecs.npy")
    assert asked and set(asked) == {eval_resize_side(encoder.info.image_size)} == {16}  # 16 px: resized to 16 x 16
