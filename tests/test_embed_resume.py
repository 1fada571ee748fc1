"""`simclr embed --resume`: a run killed with SIGKILL part-way continues from the rows it recorded and ends with
exactly the array, sidecar and bad-files report of an uninterrupted run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import torch

from multiprocess import run_on_two_processes
from simclr_cli.cli import app
from simclr_cli.engine import features, index
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.tasks import embed
from simclr_cli.engine import partial
from simclr_cli.engine.partial import PartialRows, merge_runs, missing, runs_of
from test_hostile import the_error as one_line_error
from test_shards import shard
from test_knn import tiny_checkpoint

runner = CliRunner()
# batches of 2, a progress record after every batch: the kill lands between records, deterministically
OPTIONS = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "2", "--set", "embed.chunk_rows=2"]

# Runs `simclr embed ARGS` and kills itself with SIGKILL when it is about to record its progress for the third time:
# two chunks are recorded, the third chunk's rows are in the file but not in any record (written again on resume).
KILLED_AT_THE_THIRD_RECORD = """
import os, signal, sys
import torch
torch.set_num_threads(1)  # as the suite's own process (conftest): the rows are compared bit for bit with its run
from simclr_cli.engine import partial
from simclr_cli.cli import app
record, calls = partial.PartialRows.record, []
def record_or_die(self, rank, **kwargs):
    calls.append(rank)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    record(self, rank, **kwargs)
partial.PartialRows.record = record_or_die
app(sys.argv[1:], prog_name="simclr")
"""


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return tiny_checkpoint(tmp_path / "enc.safetensors")


def shard_source(image_folder: Path, tmp_path: Path) -> str:
    shard(image_folder, tmp_path / "shards", "--shard-size", "5")
    return f"{tmp_path / 'shards'}/shard-{{000000..000004}}.tar"


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_an_embed_killed_with_sigkill_resumes_to_the_uninterrupted_array(image_folder, checkpoint, tmp_path, kind):
    if kind == "folder":  # row 0: a bad file found and recorded before the kill
        (image_folder / "a" / "000_broken.png").write_bytes(b"not an image")
        source, bad_row = str(image_folder), 0
    else:  # row 5, in the chunk the kill cuts off: found twice, listed once
        source, bad_row = shard_source(image_folder, tmp_path), 5
        with tarfile.open(tmp_path / "shards" / "shard-000000.tar", "a") as tar:
            member = tarfile.TarInfo("000_broken.png")
            member.size = 12
            tar.addfile(member, io.BytesIO(b"not an image"))
    whole = tmp_path / "whole" / "vecs.npy"
    result = runner.invoke(app, ["embed", source, "-o", str(whole), "-c", str(checkpoint), *OPTIONS])
    assert result.exit_code == 0, result.output
    expected = np.load(whole)  # (24, D): the bad file has no row

    out = tmp_path / "killed" / "vecs.npy"
    args = ["embed", source, "-o", str(out), "-c", str(checkpoint), *OPTIONS]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_THIRD_RECORD, *args], capture_output=True, text=True,
                            timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    rows = PartialRows(out)
    unfinished = np.load(rows.rows_file, allow_pickle=False)  # a valid .npy, its header for the final row count
    assert unfinished.shape == (25, expected.shape[1])  # a row for every image, the bad one included
    done, unreadable = rows.progress()
    assert done == [[0, 4]] and [i for i, _ in unreadable] == ([0] if bad_row == 0 else [])
    good = [i for i in range(4) if i != bad_row]
    np.testing.assert_array_equal(unfinished[good], expected[[i - (i > bad_row) for i in good]])

    again = runner.invoke(app, args)  # without --resume the unfinished run is not thrown away
    assert one_line_error(again) == (f"error: an unfinished embed to {out} is there ({rows.rows_file.name}); pass --resume "
                                     "to continue it, or --overwrite to start again")
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "".join(f"resuming the embed to {out}: 4 of 25 rows were written, 21 to go".split()) in "".join(resumed.output.split())
    np.testing.assert_array_equal(np.load(out), np.load(whole))  # the same rows, bit for bit
    for sidecar in ("vecs.paths.txt", "vecs.bad_files.jsonl"):  # the broken file listed once, as in one run
        assert (out.parent / sidecar).read_bytes() == (whole.parent / sidecar).read_bytes(), sidecar
    assert sorted(os.listdir(out.parent)) == ["vecs.bad_files.jsonl", "vecs.json", "vecs.npy", "vecs.paths.txt"]


def test_resume_refuses_what_it_cannot_continue(image_folder, checkpoint, tmp_path):
    out = tmp_path / "vecs.npy"
    args = ["embed", str(image_folder), "-o", str(out), "-c", str(checkpoint), *OPTIONS]
    assert one_line_error(runner.invoke(app, [*args, "--resume"])) == (
        f"error: {out} there is no unfinished embed to resume; run without --resume")
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_THIRD_RECORD, *args], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    message = one_line_error(runner.invoke(app, [*args, "--resume", "--layer", "projection"]))
    assert message.startswith("error: the --layer of this run differ from those of the unfinished embed to")
    # --overwrite without --resume starts again, and leaves nothing of the unfinished run behind
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["enc.safetensors", "images", "vecs.json", "vecs.npy", "vecs.paths.txt"]
    assert one_line_error(runner.invoke(app, [*args, "--resume"])) == (
        f"error: {out} is complete, so there is no unfinished embed to resume; run without --resume and with "
        "--overwrite to embed again")


def test_row_runs():
    assert runs_of([0, 1, 2, 5, 6, 9]) == [[0, 3], [5, 7], [9, 10]]
    assert merge_runs([[0, 3], [8, 9]], [[3, 5], [6, 7], [2, 4]]) == [[0, 5], [6, 7], [8, 9]]
    assert missing(10, [[0, 3], [5, 7]]).tolist() == [3, 4, 7, 8, 9]


def test_a_resumed_run_on_two_processes_after_one_gathers_every_record(tmp_path):
    """A record of a rank the resumed run no longer has is folded into rank 0's, so no stale file is read later."""
    rows = PartialRows(tmp_path / "vecs.npy")
    rows.create(rows=10, dim=2, settings={}, write_listing=lambda: None)
    rows.record(0, done=[[0, 2]], unreadable=[(1, "bad")], handle=None)
    rows.record(1, done=[[5, 7]], unreadable=[], handle=None)
    rows.record(2, done=[[7, 8]], unreadable=[(7, "worse")], handle=None)
    rows.gather_progress()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vecs.npy.partial.json", ".vecs.npy.partial.npy",
                                                          ".vecs.npy.partial.rank0.json"]
    assert rows.progress() == ([[0, 2], [5, 8]], [(1, "bad"), (7, "worse")])
    assert partial.FORMAT == rows.settings()["format"]


def test_a_second_embed_to_the_same_out_is_refused_while_the_first_runs(image_folder, checkpoint, tmp_path):
    out = tmp_path / "vecs.npy"
    with PartialRows(out).locked():  # what a running `simclr embed -o vecs.npy` holds
        for extra in ([], ["--overwrite"], ["--resume"]):
            message = one_line_error(runner.invoke(app, ["embed", str(image_folder), "-o", str(out), "-c", str(checkpoint),
                                                         *OPTIONS, *extra]))
            assert message == f"error: another simclr embed is writing to {out}; wait for it to finish or choose another --out"
    result = runner.invoke(app, ["embed", str(image_folder), "-o", str(out), "-c", str(checkpoint), *OPTIONS])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / ".vecs.npy.partial.lock").exists()


def _resume_on_two_ranks(world, checkpoint: str, folder: str, out: str) -> None:
    encoder = features.open_encoder(Path(checkpoint))
    embed.embed_folder(encoder, Path(folder), out=Path(out), batch_size=2, rt=Runtime(device=torch.device("cpu"), precision="fp32"),
                       resume=True, chunk_rows=2)


def test_a_run_killed_on_one_process_resumes_on_two(image_folder, checkpoint, tmp_path):
    """The rows still to do are shared out batch-aligned, so each rank runs the batches one process would."""
    whole = tmp_path / "whole.npy"
    result = runner.invoke(app, ["embed", str(image_folder), "-o", str(whole), "-c", str(checkpoint), *OPTIONS])
    assert result.exit_code == 0, result.output
    out = tmp_path / "two" / "vecs.npy"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_THIRD_RECORD, "embed", str(image_folder), "-o", str(out),
                             "-c", str(checkpoint), *OPTIONS], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    run_on_two_processes(_resume_on_two_ranks, str(checkpoint), str(image_folder), str(out), timeout_s=180)
    assert out.read_bytes() == whole.read_bytes()
    assert index.paths_file_for(out).read_bytes() == index.paths_file_for(whole).read_bytes()
    # no record of either rank left; the killed run's lock file stays (only `simclr embed`, not embed_folder, locks)
    assert sorted(os.listdir(out.parent)) == [".vecs.npy.partial.lock", "vecs.npy", "vecs.paths.txt"]


def test_an_unfinished_embed_exists_only_once_its_image_list_is_saved(tmp_path):
    rows = PartialRows(tmp_path / "vecs.npy")

    def stopped():
        assert not rows.exists()  # a stop here leaves nothing to resume, and a new run clears the files
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rows.create(rows=4, dim=2, settings={}, write_listing=stopped)
    assert not rows.exists()
