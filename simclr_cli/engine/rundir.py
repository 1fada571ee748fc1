"""The run directory: its layout, the `runs/latest` link, its lock, and refusing to clobber a previous run."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simclr_cli.engine import metrics
from simclr_cli.engine.errors import CheckpointError, ConfigError, OutputError
from simclr_cli.engine.files import TEMP_FILE, atomic_write

log = logging.getLogger("simclr")

RUNS = Path("runs")
LATEST = "latest"
CHECKPOINT_GLOB = "step-*.safetensors"
LOCK = ".lock"
ENCODER_FILE = "encoder.safetensors"
# What a folder given as CHECKPOINT may hold, in the order looked for: a run's encoder, a fine-tuning's result.
FOLDER_CHECKPOINTS = (ENCODER_FILE, "finetuned.safetensors")
# Run dirs this process holds through `lock`, by real path, so `prepare` inside the lock does not refuse its own run.
_held: set[str] = set()


@dataclass(frozen=True)
class RunDir:
    """The files a pretraining run writes, all below `root`."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def data(self) -> Path:
        """The fingerprint of the images the run trains on (datasets.fingerprint), checked by --resume."""
        return self.root / "data.json"

    @property
    def files(self) -> Path:
        """The images the run trains on, one path a line relative to DATA: --resume reads it instead of searching DATA."""
        return self.root / "files.txt"

    @property
    def shard_index(self) -> Path:
        """The samples of tar shards the run trains on (shards.write_index): --resume reads it instead of the tar headers."""
        return self.root / "shards.tsv"

    @property
    def encoder(self) -> Path:
        return self.root / ENCODER_FILE

    @property
    def train_log(self) -> Path:
        """The run's log lines (rank 0's), step lines included, appended across resumes."""
        return self.root / "train.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def bad_files(self, rank: int = 0) -> Path:
        """The images a run skipped, one JSON line each; each process lists what it drew itself, and rank 0 merges
        the others' lists into its own at the end (`badfiles.merge`)."""
        return self.root / ("bad_files.jsonl" if rank == 0 else f"bad_files.rank{rank}.jsonl")

    def other_ranks_bad_files(self) -> list[Path]:
        """The lists of ranks 1, 2, ... not merged yet (this run's, or an interrupted one's), in rank order."""
        ranked = []
        for path in self.root.glob("bad_files.rank*.jsonl"):
            number = path.name[len("bad_files.rank"):-len(".jsonl")]
            if number.isdigit():
                ranked.append((int(number), path))
        return [path for _, path in sorted(ranked)]

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:09d}.safetensors"

    def saved_checkpoints(self) -> list[Path]:
        """Training-state files, newest (highest step) first."""
        return sorted(self.checkpoints.glob(CHECKPOINT_GLOB), reverse=True)

    def owned(self) -> list[Path]:
        return [self.config, self.metrics, self.train_log, self.encoder, self.checkpoints,
                *sorted(self.root.glob("bad_files*.jsonl"))]


def default_run_dir(base: Path = RUNS, *, prefix: str = "") -> Path:
    """`runs/<prefix><UTC timestamp>`, suffixed when two runs start in the same second."""
    stamp = prefix + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = base / stamp
    n = 1
    while candidate.exists():
        n += 1
        candidate = base / f"{stamp}-{n}"
    return candidate


def prepare(root: Path, *, resume: bool, overwrite: bool, hold: contextlib.ExitStack | None = None) -> RunDir:
    """Create or reopen a run dir; a non-empty one needs `resume` (continue) or `overwrite` (start over).

    A dir another live run holds is refused before anything in it is read or deleted. With `hold`, `lock(root)`
    is taken first and kept in that stack, so the run owns the folder until the stack closes.
    """
    run = RunDir(root)
    _check_options(root, resume=resume, overwrite=overwrite)
    if hold is not None:
        hold.enter_context(lock(root))
    if root.is_dir():
        _refuse_if_in_use(root)
        if resume or overwrite:
            _remove_stale_temp_files(run)
    _check_contents(run, resume=resume, overwrite=overwrite)
    if resume:
        return run
    if _holds_run(root):
        for path in [*run.owned(), run.data, run.files, run.shard_index]:  # and the old data's fingerprint and list, which no new run may inherit
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    return run


def check(root: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise the ConfigError `prepare` would for `root`, changing nothing: for a check before any process starts."""
    _check_options(root, resume=resume, overwrite=overwrite)
    if root.is_dir():
        _refuse_if_in_use(root)
    _check_contents(RunDir(root), resume=resume, overwrite=overwrite)


def _check_options(root: Path, *, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file, not a folder; choose another --out")


def _check_contents(run: RunDir, *, resume: bool, overwrite: bool) -> None:
    """A resume needs checkpoints; a new run an empty folder, or --overwrite."""
    if resume and not run.saved_checkpoints():
        raise ConfigError(f"nothing to resume in {run.root}: it holds no checkpoints/step-*.safetensors; drop --resume to start a new run")
    if not resume and not overwrite and _holds_run(run.root):
        raise ConfigError(f"{run.root} already holds a run; pass --resume to continue it, --overwrite to start over, or another --out")


def _holds_run(root: Path) -> bool:
    return root.is_dir() and any(path.name != LOCK for path in root.iterdir())  # a lock file alone is no run


@contextlib.contextmanager
def lock(root: Path) -> Iterator[None]:
    """Hold `<root>/.lock` for the block: a second simclr run on `root` stops with ConfigError naming this one.

    An exclusive `flock`, not the file's existence, is the lock: the kernel drops it however the holder ends
    (crash, kill -9, power loss), so no stale lock is ever left to clean up; the file only tells the next run
    who holds it (pid and host). Locks belong to an open file, so a second `lock(root)` in this same process
    is refused too. Creates `root`; removes it again if it is still empty when the block ends.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file, not a folder; choose another --out")
    created = not root.exists()
    fd = _acquire(root)
    if fd is None:
        yield
        return
    key = os.path.realpath(root)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        if created:  # a run that never wrote anything leaves no folder behind
            with contextlib.suppress(OSError):
                if [p.name for p in root.iterdir()] == [LOCK]:
                    (root / LOCK).unlink()  # while still held: `_acquire` notices a lock file replaced under it
                    root.rmdir()
        os.close(fd)


def _acquire(root: Path) -> int | None:
    """The open, exclusively locked `.lock` of `root` with our pid and host in it (None where the file system
    has no locks: the run goes on unguarded, with a warning)."""
    path = root / LOCK
    for _ in range(100):
        try:
            root.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a `.lock` symlinked to some other file must not get that file truncated
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            continue  # a finishing run removed the empty folder between our mkdir and open
        except OSError as exc:
            if exc.errno in OutputError.CAUSES:
                raise OutputError(path, exc.errno, kept="nothing was written") from exc
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"{path} is a symbolic link, not simclr's lock file; remove it") from exc
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{root} is in use by another simclr run ({_holder(path)}); wait for it to finish or choose another --out"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: e.g. an NFS mount without a lock daemon
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing stops a second run from writing to it at the same time",
                        root, exc.strerror)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed (and maybe recreated) after we opened it: lock the one others will open
    else:
        raise ConfigError(f"{root} keeps changing under simclr (its lock file is removed as it is taken); choose another --out")
    with contextlib.suppress(OSError):  # only the message needs this; the flock is the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode(), 0)
    return fd


def _remove_stale_temp_files(run: RunDir) -> None:
    """Remove the temp files of saves cut short (kill -9, power loss) in `run`, which no live run is using (its lock
    was checked): each can be as large as a checkpoint, and nothing else would ever remove them."""
    stale = [p for folder in (run.root, run.checkpoints) if folder.is_dir() for p in folder.iterdir()
             if TEMP_FILE.fullmatch(p.name) and p.is_file()]
    size = 0
    for path in stale:
        with contextlib.suppress(OSError):
            size += path.stat().st_size
            path.unlink()
    if stale:
        log.info("removed %d temp file(s) of an interrupted save (%.1f MB): %s", len(stale), size / 1e6,
                 ", ".join(p.name for p in stale[:3]) + (f" (+{len(stale) - 3} more)" if len(stale) > 3 else ""))


def _refuse_if_in_use(root: Path) -> None:
    """ConfigError when another process holds `root`'s lock (this process's own `lock(root)` is fine)."""
    if os.path.realpath(root) in _held:
        return
    path = root / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: no run has ever held this folder
    try:
        # shared: enough to see an exclusive holder, and allowed on a read-only descriptor (NFS wants that)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"{root} is in use by another simclr run ({_holder(path)}); wait for it to finish or choose another --out"
        ) from None
    except OSError:
        pass  # no locks on this file system: nothing to check against
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    """"pid N on HOST" from a lock file, as its holder wrote it."""
    try:
        with open(path, "rb") as handle:
            holder = json.loads(handle.read(4096))
        return f"pid {int(holder['pid'])} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # a lock file someone wrote into
        return "pid unknown"  # taken a moment ago: the holder has not written its pid yet


def start(run_dir: RunDir, config: dict[str, Any], *, resumed_from: int | None, data: dict[str, Any] | None = None) -> None:
    """Rank 0's bookkeeping before the first step: the config and data fingerprint of a new run, or the metrics a
    resume replays (`check_same_data` has checked its images first). `runs/latest` waits for `publish`."""
    if resumed_from is None:
        text = yaml.safe_dump(config, sort_keys=False)
        atomic_write(run_dir.config, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if data is not None:
            atomic_write(run_dir.data, lambda tmp: tmp.write_text(json.dumps(data) + "\n", encoding="utf-8"))
    else:
        metrics.truncate(run_dir.metrics, after_step=resumed_from)


def publish(run_dir: RunDir) -> None:
    """Point `runs/latest` at a run under `runs/` once it has written its encoder: the commands that default to it
    must never land on a run that failed before it had one."""
    if run_dir.root.parent.name == RUNS.name:
        point_latest(run_dir.root)


def check_same_data(run_dir: RunDir, data: dict[str, Any]) -> None:
    """ConfigError when the images differ from those the run started on (its data.json; a run from before simclr
    recorded one is not checked)."""
    try:
        with open(run_dir.data, encoding="utf-8") as handle:
            saved = json.loads(handle.read(10_000))
    except FileNotFoundError:
        log.info("%s has no %s (an older run): the data cannot be checked against it", run_dir.root, run_dir.data.name)
        return
    except (OSError, ValueError, RecursionError):
        saved = None
    if not isinstance(saved, dict):
        raise ConfigError(f"{run_dir.data} is damaged, so the data cannot be checked; delete it to resume unchecked, or start a new run")
    if saved != data:
        was, now = saved.get("count"), data.get("count")
        what = (f"{str(was)[:20]} images, now {now}" if was != now
                else f"{now} images then and now, but with other names or sizes")
        raise ConfigError(
            f"--resume: the data differs from what {run_dir.root} trained on ({what}); "
            "resume with the original data, or start a new run"
        )


def point_latest(root: Path) -> None:
    """Make `<parent>/latest` a relative symlink to `root`, replaced atomically."""
    link = root.parent / LATEST
    if link.exists() and not link.is_symlink():
        return  # a real file or folder of the user's is never replaced
    tmp = root.parent / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(root.name, tmp)
    os.replace(tmp, link)


def default_checkpoint(base: Path = RUNS) -> Path:
    """The newest run's encoder: what evaluation commands use when no CHECKPOINT is given."""
    return base / LATEST / ENCODER_FILE


def encoder_file(path: Path) -> Path:
    """An encoder path as given, or, for a folder (a run, a fine-tuning's eval folder), the encoder file inside it."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    for name in FOLDER_CHECKPOINTS:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} is a folder without an {ENCODER_FILE}; pass a run folder that has finished its first checkpoint, "
        "or the .safetensors file of an encoder"
    )


def run_encoder_for(path: Path) -> Path:
    """The encoder file of the run a training-state checkpoint (`<run>/checkpoints/step-*.safetensors`) belongs to."""
    path = Path(path)
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return RunDir(run).encoder


def resolve_checkpoint(path: Path | None) -> Path:
    """CHECKPOINT as an encoder file: as given, a folder's encoder (`encoder_file`), or without one
    `runs/latest/encoder.safetensors`, with the fix when it is not there."""
    if path is not None:
        return encoder_file(path)
    latest = default_checkpoint()
    if not latest.is_file():
        raise ConfigError(
            f"no CHECKPOINT given and {latest} does not exist; pass the encoder.safetensors of a run, "
            "or run `simclr pretrain` first"
        )
    return latest


def default_eval_dir(checkpoint: Path | None, command: str) -> Path:
    """`<checkpoint's folder>/eval/<command>-<UTC timestamp>`: results stay beside the encoder they judge."""
    base = Path(checkpoint).parent if checkpoint is not None else RUNS
    return default_run_dir(base / "eval", prefix=f"{command}-")
