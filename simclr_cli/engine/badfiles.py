"""The bad-image policy of one run: what happens to files that cannot be decoded, and the report that lists them.

One `BadFiles` lives in the main process of a command that reads a folder (`embed`; `pretrain` next) and is told
about each bad file as it is found, whichever process or DataLoader worker found it. It holds no global state.

- `--on-bad-image skip` (default) leaves the file out and names it once in a warning; `error` stops at the first.
- `--max-bad-fraction F` stops the run when more than F of the images seen so far are bad: a folder that is
  mostly unreadable is the wrong folder (or a broken disk), not noise to train around.
- `--max-image-pixels N` is the decoder's decompression-bomb limit (0 turns it off, with a warning).
- The report (`bad_files.jsonl`) gets one JSON line per bad file or skipped folder, appended as each is found,
  so a run that crashes or stops still leaves the list of what it had found. Several processes each append to
  their own report, which `merge` makes one at the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.images import DEFAULT_MAX_PIXELS, printable_path
from simclr_cli.engine.errors import ConfigError, DataError

log = logging.getLogger("simclr")

POLICIES = ("skip", "error")
DEFAULT_MAX_BAD_FRACTION = 0.5
# The fraction is first judged after this many images (or all of them, when fewer): a few bad files at the start
# of a large, mostly good folder must not stop it.
MIN_SEEN = 100
REPORT_NAME = "bad_files.jsonl"
SHOWN = 3  # bad files an error names before "and N more"


def report_for(out: Path) -> Path:
    """The bad-files report beside an output file: vecs.npy -> vecs.bad_files.jsonl."""
    return out.with_suffix(f".{REPORT_NAME}")


class BadFiles:
    """Bad files and skipped folders of one run: each logged once, appended to `report`, and judged by the policy.

    `report` is appended to (a resumed run continues its list); it is created only when there is something to
    list. Paths are kept as given (str, undecodable bytes as surrogates, so `os.fsencode` restores them exactly).
    """

    def __init__(
        self, *, on_bad_image: str = "skip", max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        max_image_pixels: int = DEFAULT_MAX_PIXELS, report: Path | None = None,
    ) -> None:
        if on_bad_image not in POLICIES:
            raise ConfigError(f"--on-bad-image {on_bad_image!r} is not supported; choose one of {', '.join(POLICIES)}")
        self.check_settings(max_bad_fraction=max_bad_fraction, max_image_pixels=max_image_pixels)
        self.on_bad_image = on_bad_image
        self.max_bad_fraction = max_bad_fraction
        self.report = report
        self.max_pixels: int | None = max_image_pixels or None  # what decode_image takes; None: no limit
        if self.max_pixels is None:
            log.warning("--max-image-pixels 0: the decompression-bomb limit is off, so one hostile image can exhaust memory")
        self._files: dict[str, str] = {}  # path -> reason, in the order found
        self._folders: dict[str, str] = {}

    @staticmethod
    def check_settings(*, max_bad_fraction: float, max_image_pixels: int) -> None:
        """Raise ConfigError naming the flag when a limit is out of range."""
        if isinstance(max_bad_fraction, bool) or not isinstance(max_bad_fraction, (int, float)):
            raise ConfigError(f"--max-bad-fraction {max_bad_fraction!r} is not a number; give a fraction in (0, 1], e.g. 0.5")
        if not 0.0 < max_bad_fraction <= 1.0:
            raise ConfigError(
                f"--max-bad-fraction {max_bad_fraction:g} is outside (0, 1]; e.g. 0.5 stops when over half the images "
                "are bad, 1 never stops"
            )
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int):
            raise ConfigError(f"--max-image-pixels {max_image_pixels!r} is not a whole number; give a pixel count, or 0 for no limit")
        if max_image_pixels < 0:
            raise ConfigError(f"--max-image-pixels {max_image_pixels} is negative; give a pixel count, or 0 for no limit")

    @property
    def files(self) -> list[tuple[str, str]]:
        """(path, reason) of every bad file so far, in the order found."""
        return list(self._files.items())

    @property
    def folders(self) -> list[tuple[str, str]]:
        """(path, reason) of every folder the walk skipped."""
        return list(self._folders.items())

    def add(self, path: str | os.PathLike, reason: str) -> None:
        """A file that cannot be used: listed and skipped, or (policy "error") the run stops here, naming it."""
        key = os.fspath(path)
        if key in self._files:
            return
        self._files[key] = reason
        self._write(key, reason, kind="file")
        if self.on_bad_image == "error":
            raise DataError(f"cannot decode {printable_path(key)} ({reason}); fix or remove it, or pass --on-bad-image skip")
        log.warning("skipping %s: %s", printable_path(key), reason)

    def add_known(self, path: str | os.PathLike, reason: str) -> None:
        """A bad file that the run this one resumes already listed in the report: counted, not warned or listed again."""
        self._files.setdefault(os.fspath(path), reason)

    def add_folder(self, path: str | os.PathLike, reason: str) -> None:
        """A folder the walk skipped (unreadable, a symlink loop); already logged by the walk, so only listed."""
        key = os.fspath(path)
        if key not in self._folders:
            self._folders[key] = reason
            self._write(key, reason, kind="folder")

    def check(self, *, seen: int, total: int) -> None:
        """Stop when more than max_bad_fraction of the `seen` images are bad, once min(total, MIN_SEEN) are seen."""
        bad = len(self._files)
        if seen < max(1, min(total, MIN_SEEN)) or bad <= self.max_bad_fraction * seen:
            return
        raise DataError(
            f"{bad} of {seen} images could not be decoded ({100 * bad / seen:.3g}% > --max-bad-fraction "
            f"{self.max_bad_fraction:g}); the folder is mostly unreadable: check DATA or raise --max-bad-fraction"
        )

    def none_usable(self, failures: list[tuple[str, str]]) -> DataError:
        """Every image failed: each (path, reason) listed in the report (not warned one by one: the error says it),
        and the error naming the first few and why, to raise."""
        for path, reason in failures:
            key = os.fspath(path)
            if key not in self._files:
                self._files[key] = reason
                self._write(key, reason, kind="file")
        shown = "; ".join(f"{printable_path(path)} ({reason})" for path, reason in failures[:SHOWN])
        more = f" and {len(failures) - SHOWN} more" if len(failures) > SHOWN else ""
        listed = f", all listed in {printable_path(self.report)}" if self.report is not None else ""
        return DataError(f"none of the {len(failures)} images can be decoded: {shown}{more}{listed}; check DATA")

    def summary(self) -> str:
        """One line for the end of a run."""
        return summary(files=len(self._files), folders=len(self._folders), report=self.report)

    def _write(self, path: str, reason: str, *, kind: str) -> None:
        if self.report is None:
            return
        # ensure_ascii escapes lone surrogates (\udcff), so json.loads + os.fsencode gives the exact bytes back.
        line = json.dumps({"path": path, "reason": reason, "kind": kind}, ensure_ascii=True)
        self.report.parent.mkdir(parents=True, exist_ok=True)
        with open(self.report, "a", encoding="ascii") as handle:  # one open per line: nothing buffered at a crash
            handle.write(line + "\n")


def summary(*, files: int, folders: int, report: Path | None) -> str:
    """"3 bad file(s) skipped, 1 folder(s) skipped; listed in REPORT"."""
    if not files and not folders:
        return "no bad files"
    parts = [f"{files} bad file(s) skipped"] if files else []
    parts += [f"{folders} folder(s) skipped"] if folders else []
    listed = f"; listed in {printable_path(report)}" if report is not None else ""
    return ", ".join(parts) + listed


def merge(report: Path, parts: Sequence[Path]) -> tuple[int, int]:
    """Make `report` the one list of a run: its entries, then those of `parts` (the other processes' reports, in rank
    order), each file or folder once; `parts` are removed. Returns how many files and folders it lists."""
    entries: dict[tuple[str, str], str] = {}  # (kind, path) -> its line, the first one seen
    lines = 0
    for path in [report, *parts]:
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            try:
                item = json.loads(line)
                key = (str(item["kind"]), str(item["path"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            entries.setdefault(key, line)
            lines += 1
    if parts or lines != len(entries):
        if entries:
            text = "".join(line + "\n" for line in entries.values())
            atomic_write(report, lambda tmp: tmp.write_text(text, encoding="ascii"))
        for part in parts:
            part.unlink(missing_ok=True)
    files = sum(kind == "file" for kind, _ in entries)
    return files, len(entries) - files
