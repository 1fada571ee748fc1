"""The run directory: layout, unique default names, refusing to clobber, and the `latest` link."""

from __future__ import annotations

import calendar
import contextlib
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simclr_cli.engine import rundir
from simclr_cli.engine.errors import ConfigError, OutputError
from simclr_cli.engine.rundir import RunDir, default_run_dir, point_latest, prepare

FIXED = time.struct_time((2024, 3, 5, 7, 8, 9, 1, 65, 0))


def fill_run(root: Path, steps=(1, 2)) -> RunDir:
    """The files a finished run leaves behind."""
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    run.config.write_text("train: {}\n")
    run.metrics.write_text('{"step": 1}\n')
    run.encoder.write_bytes(b"weights")
    run.checkpoints.mkdir()
    for step in steps:
        run.checkpoint(step).write_bytes(b"state")
    return run


# --- layout ----------------------------------------------------------------------------------------


def test_layout(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config == tmp_path / "r" / "config.yaml"
    assert run.metrics == tmp_path / "r" / "metrics.jsonl"
    assert run.encoder == tmp_path / "r" / "encoder.safetensors"
    assert run.train_log == tmp_path / "r" / "train.log"
    assert run.checkpoints == tmp_path / "r" / "checkpoints"
    assert run.checkpoint(42) == tmp_path / "r" / "checkpoints" / "step-000000042.safetensors"
    assert run.owned() == [run.config, run.metrics, run.train_log, run.encoder, run.checkpoints]


def test_saved_checkpoints_newest_first_by_step_not_by_text(tmp_path):
    run = fill_run(tmp_path / "r", steps=(9, 10, 100, 2))
    (run.checkpoints / "notes.txt").write_text("not a checkpoint")
    (run.checkpoints / ".step-000000200.safetensors.123.tmp").write_bytes(b"half-written")
    assert run.saved_checkpoints() == [run.checkpoint(100), run.checkpoint(10), run.checkpoint(9), run.checkpoint(2)]


def test_saved_checkpoints_of_a_new_run_is_empty(tmp_path):
    assert RunDir(tmp_path / "absent").saved_checkpoints() == []


# --- default_run_dir -------------------------------------------------------------------------------


def test_default_run_dir_is_a_utc_timestamp_under_runs(tmp_path):
    assert default_run_dir().parent == Path("runs")
    stamp = time.strptime(default_run_dir(tmp_path).name, "%Y%m%d-%H%M%S")
    assert abs(calendar.timegm(stamp) - time.time()) < 5  # read as UTC, it is now


def test_default_run_dir_is_unique_within_a_second(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "gmtime", lambda *args: FIXED)
    first = default_run_dir(tmp_path)
    assert first == tmp_path / "20240305-070809"
    first.mkdir()
    second = default_run_dir(tmp_path)
    assert second == tmp_path / "20240305-070809-2"
    second.mkdir()
    assert default_run_dir(tmp_path) == tmp_path / "20240305-070809-3"
    assert not (tmp_path / "20240305-070809-3").exists()  # naming creates nothing


def test_default_run_dir_skips_a_file_with_the_same_name(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "gmtime", lambda *args: FIXED)
    (tmp_path / "20240305-070809").write_text("a file")
    assert default_run_dir(tmp_path) == tmp_path / "20240305-070809-2"


# --- prepare ---------------------------------------------------------------------------------------


def test_prepare_creates_a_new_folder(tmp_path):
    root = tmp_path / "runs" / "a"
    run = prepare(root, resume=False, overwrite=False)
    assert run == RunDir(root)
    assert root.is_dir() and list(root.iterdir()) == []


def test_prepare_accepts_an_existing_empty_folder(tmp_path):
    assert prepare(tmp_path, resume=False, overwrite=False).root == tmp_path


def test_prepare_refuses_a_non_empty_folder(tmp_path):
    fill_run(tmp_path / "r")
    with pytest.raises(ConfigError) as err:
        prepare(tmp_path / "r", resume=False, overwrite=False)
    assert str(err.value) == (
        f"{tmp_path / 'r'} already holds a run; pass --resume to continue it, --overwrite to start over, or another --out"
    )
    assert RunDir(tmp_path / "r").encoder.read_bytes() == b"weights"


def test_prepare_refuses_a_folder_holding_only_foreign_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare(tmp_path, resume=False, overwrite=False)


def test_resume_and_overwrite_contradict(tmp_path):
    fill_run(tmp_path / "r")
    with pytest.raises(ConfigError) as err:
        prepare(tmp_path / "r", resume=True, overwrite=True)
    assert str(err.value) == "--resume and --overwrite contradict each other; pass one of them"
    assert RunDir(tmp_path / "r").saved_checkpoints() != []


@pytest.mark.parametrize(("resume", "overwrite"), [(False, False), (True, False), (False, True)])
def test_a_file_as_out_is_refused(tmp_path, resume, overwrite):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    with pytest.raises(ConfigError) as err:
        prepare(out, resume=resume, overwrite=overwrite)
    assert str(err.value) == f"--out {out} is a file, not a folder; choose another --out"
    assert out.read_text() == "keep me"


def test_resume_needs_checkpoints(tmp_path):
    run = fill_run(tmp_path / "r", steps=())
    with pytest.raises(ConfigError) as err:
        prepare(run.root, resume=True, overwrite=False)
    assert str(err.value) == (
        f"nothing to resume in {run.root}: it holds no checkpoints/step-*.safetensors; drop --resume to start a new run"
    )


def test_resume_of_a_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"^nothing to resume in "):
        prepare(tmp_path / "absent", resume=True, overwrite=False)
    assert not (tmp_path / "absent").exists()


def test_resume_keeps_everything(tmp_path):
    run = fill_run(tmp_path / "r")
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    assert prepare(run.root, resume=True, overwrite=False) == run
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    run = fill_run(tmp_path / "r")
    (run.root / "notes.md").write_text("mine")
    (run.root / "plots").mkdir()
    (run.root / "plots" / "loss.png").write_bytes(b"png")
    prepare(run.root, resume=False, overwrite=True)
    assert sorted(p.relative_to(run.root).as_posix() for p in run.root.rglob("*")) == ["notes.md", "plots", "plots/loss.png"]
    assert (run.root / "notes.md").read_text() == "mine"


def test_overwrite_of_a_partial_run(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    RunDir(root).config.write_text("x: 1\n")  # crashed before the first checkpoint
    prepare(root, resume=False, overwrite=True)
    assert list(root.iterdir()) == []


def test_overwrite_of_a_missing_folder_creates_it(tmp_path):
    prepare(tmp_path / "new", resume=False, overwrite=True)
    assert (tmp_path / "new").is_dir()


# --- point_latest ----------------------------------------------------------------------------------


def test_point_latest_makes_a_relative_symlink(tmp_path):
    root = tmp_path / "runs" / "20240305-070809"
    root.mkdir(parents=True)
    point_latest(root)
    link = tmp_path / "runs" / "latest"
    assert link.is_symlink()
    assert os.readlink(link) == "20240305-070809"  # relative: survives moving the runs folder
    assert link.resolve() == root.resolve()


def test_point_latest_survives_moving_the_parent(tmp_path):
    root = tmp_path / "runs" / "a"
    root.mkdir(parents=True)
    (root / "encoder.safetensors").write_bytes(b"w")
    point_latest(root)
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert (tmp_path / "moved" / "latest" / "encoder.safetensors").read_bytes() == b"w"


def test_point_latest_replaces_an_old_link_atomically(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "b").mkdir()
    point_latest(runs / "a")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(rundir.os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst)))
    point_latest(runs / "b")
    assert os.readlink(runs / "latest") == "b"
    assert len(replaced) == 1 and replaced[0][1] == runs / "latest" and replaced[0][0].parent == runs  # one rename
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "latest"]  # no temp link left, old run untouched


def test_point_latest_replaces_a_dangling_link(tmp_path):
    runs = tmp_path / "runs"
    (runs / "new").mkdir(parents=True)
    os.symlink("deleted-run", runs / "latest")
    point_latest(runs / "new")
    assert os.readlink(runs / "latest") == "new"


def test_point_latest_never_replaces_a_real_folder(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "latest").mkdir()
    (runs / "latest" / "mine.txt").write_text("mine")
    point_latest(runs / "a")
    assert not (runs / "latest").is_symlink()
    assert (runs / "latest" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in runs.iterdir()) == ["a", "latest"]


def test_point_latest_never_replaces_a_real_file(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "latest").write_text("mine")
    point_latest(runs / "a")
    assert not (runs / "latest").is_symlink() and (runs / "latest").read_text() == "mine"


# --- the lock: one live run per folder -----------------------------------------------------------------

HOLD = """
import sys
from pathlib import Path
from simclr_cli.engine import rundir
with rundir.lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
"""


@contextlib.contextmanager
def held_by_another_process(root: Path):
    """A real second process holding `root`'s lock until the block ends; yields it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        if holder.poll() is None:
            holder.stdin.close()
            holder.wait(timeout=30)


def in_use(root: Path, pid: int) -> str:
    return f"{root} is in use by another simclr run (pid {pid} on {socket.gethostname()}); wait for it to finish or choose another --out"


def test_a_second_lock_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    root = tmp_path / "r"
    with rundir.lock(root):
        # flock belongs to an open file: a second open, even in this process, is a second run
        with pytest.raises(ConfigError) as err, rundir.lock(root):
            pass
        assert str(err.value) == in_use(root, os.getpid())
        assert json.loads((root / ".lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    with rundir.lock(root):  # released at the end of the block
        pass


def test_another_process_holding_the_lock_stops_a_run_and_its_overwrite(tmp_path):
    run = fill_run(tmp_path / "r")
    before = sorted((p.relative_to(run.root), p.read_bytes() if p.is_file() else None) for p in run.root.rglob("*"))
    with held_by_another_process(run.root) as holder:
        with pytest.raises(ConfigError) as err, rundir.lock(run.root):
            pass
        assert str(err.value) == in_use(run.root, holder.pid)
        for resume, overwrite in [(False, True), (True, False), (False, False)]:  # checked before anything is read or deleted
            with pytest.raises(ConfigError) as err:
                prepare(run.root, resume=resume, overwrite=overwrite)
            assert str(err.value) == in_use(run.root, holder.pid)
        assert sorted((p.relative_to(run.root), p.read_bytes() if p.is_file() else None)
                      for p in run.root.rglob("*") if p.name != ".lock") == before
    with rundir.lock(run.root):  # the holder ended: the folder is free again
        prepare(run.root, resume=False, overwrite=True)


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    root = tmp_path / "r"
    with held_by_another_process(root) as holder:
        holder.kill()  # SIGKILL: no cleanup code of its runs
        holder.wait(timeout=30)
    assert (root / ".lock").exists()  # the file stays, harmless: the kernel dropped the flock with the process
    with rundir.lock(root):
        prepare(root, resume=False, overwrite=False)


def test_prepare_inside_its_own_lock(tmp_path):
    run = fill_run(tmp_path / "r")
    with rundir.lock(run.root):
        assert prepare(run.root, resume=True, overwrite=False) == run
        prepare(run.root, resume=False, overwrite=True)
    assert sorted(p.name for p in run.root.iterdir()) == [".lock"]


def test_an_overwrite_never_deletes_a_folder_another_open_file_holds(tmp_path):
    # the fast twin of the two-process test: a lock taken through another open file of this process
    run = fill_run(tmp_path / "r")
    fd = os.open(run.root / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=r"is in use by another simclr run \(pid unknown\)"):
            prepare(run.root, resume=False, overwrite=True)
        assert run.encoder.read_bytes() == b"weights" and len(run.saved_checkpoints()) == 2
    finally:
        os.close(fd)


def test_a_lock_file_alone_is_not_a_run(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / ".lock").write_text('{"pid": 1, "host": "elsewhere"}\n')  # left by a finished or crashed run
    assert prepare(root, resume=False, overwrite=False) == RunDir(root)
    with rundir.lock(root):
        assert prepare(root, resume=False, overwrite=False) == RunDir(root)


def test_the_lock_creates_the_folder_and_removes_it_if_nothing_was_written(tmp_path):
    with rundir.lock(tmp_path / "never"):
        assert (tmp_path / "never" / ".lock").is_file()
    assert not (tmp_path / "never").exists()  # a run that failed before writing leaves nothing
    with rundir.lock(tmp_path / "wrote"):
        (tmp_path / "wrote" / "config.yaml").write_text("x: 1\n")
    assert sorted(p.name for p in (tmp_path / "wrote").iterdir()) == [".lock", "config.yaml"]
    (tmp_path / "existing").mkdir()
    with rundir.lock(tmp_path / "existing"):
        pass
    assert (tmp_path / "existing").is_dir()  # the user's folder is never removed


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    os.symlink(precious, root / ".lock")
    with pytest.raises(ConfigError) as err, rundir.lock(root):
        pass
    assert str(err.value) == f"{root / '.lock'} is a symbolic link, not simclr's lock file; remove it"
    assert precious.read_text() == "keep me"


def test_the_lock_of_a_file_is_refused(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    with pytest.raises(ConfigError, match=r"is a file, not a folder; choose another --out$"), rundir.lock(out):
        pass
    assert out.read_text() == "keep me"


def test_the_lock_in_a_read_only_place(tmp_path, monkeypatch):
    # root ignores chmod, so the read-only file system is simulated where the lock file is created
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rundir.os, "open", read_only)
    with pytest.raises(OutputError) as err, rundir.lock(tmp_path):
        pass
    assert str(err.value) == (
        f"cannot write {tmp_path / '.lock'}: read-only file system; pass an --out on a writable disk (nothing was written)"
    )


def test_without_file_locks_the_run_goes_on_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="simclr"), rundir.lock(tmp_path / "r"):
        prepare(tmp_path / "r", resume=False, overwrite=False)
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text


def test_prepare_can_keep_the_lock_for_the_whole_run(tmp_path):
    run = fill_run(tmp_path / "r")
    with contextlib.ExitStack() as held:
        assert prepare(run.root, resume=False, overwrite=True, hold=held) == run
        with pytest.raises(ConfigError, match="is in use by another simclr run"), rundir.lock(run.root):
            pass
        with pytest.raises(ConfigError, match="is in use by another simclr run"):
            prepare(run.root, resume=False, overwrite=True, hold=contextlib.ExitStack())
    with rundir.lock(run.root):  # released with the stack
        pass


def test_prepare_refusing_a_run_releases_the_lock_it_took(tmp_path):
    run = fill_run(tmp_path / "r")
    with contextlib.ExitStack() as held, pytest.raises(ConfigError, match="already holds a run"):
        prepare(run.root, resume=False, overwrite=False, hold=held)
    with rundir.lock(run.root):
        pass
    with contextlib.ExitStack() as held, pytest.raises(ConfigError, match="nothing to resume"):
        prepare(tmp_path / "absent", resume=True, overwrite=False, hold=held)
    assert not (tmp_path / "absent").exists()
