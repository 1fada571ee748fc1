"""Errors the CLI shows as one line naming the problem and the fix (no traceback), and the checks behind them."""

import errno
import math
import numbers


class SimCLRError(Exception):
    """Base of every error caused by the user's input or environment, not by a bug."""


class ConfigError(SimCLRError):
    """An invalid option, preset or config value."""


class DataError(SimCLRError):
    """Data that is missing, empty or unreadable."""


class BadImage(DataError):
    """One image file that cannot be used (empty, truncated, not an image, a format we do not read, too many
    pixels, corrupt). The message is the short reason alone; callers name the file (`path`, when known)."""

    def __init__(self, reason: str, *, path: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path


class CheckpointError(SimCLRError):
    """A checkpoint that is missing, malformed or does not match what is asked of it."""


class NonFiniteLoss(SimCLRError):
    """A loss became NaN or inf; nothing from that step on is saved."""

    def __init__(self, step: int, *, what: str = "the loss"):
        super().__init__(
            f"{what} became NaN/inf at step {step}; stopped before saving anything from that step on. "
            "Lower --lr, try --precision fp32, or check the data"
        )
        self.step = step


class Stopped(SimCLRError):
    """A run stopped on request (SIGTERM, SIGINT) after saving a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, *, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class OutputError(SimCLRError):
    """A file that cannot be written because of the machine: disk full, over quota, read-only, no permission, I/O."""

    # errno -> (the cause in words, the fix); console.py words an OSError that escapes unwrapped from this table too
    CAUSES = {
        errno.ENOSPC: ("no space left on device", "free space or pass another --out"),
        errno.EDQUOT: ("disk quota exceeded", "free space or pass another --out"),
        errno.EROFS: ("read-only file system", "pass an --out on a writable disk"),
        errno.EACCES: ("permission denied", "check the permissions or pass another --out"),
        errno.EPERM: ("operation not permitted", "check the permissions or pass another --out"),
        errno.EIO: ("input/output error", "check the disk (dmesg) or pass another --out"),
    }

    def __init__(self, path: object, code: int, *, kept: str):
        cause, fix = self.CAUSES[code]
        super().__init__(f"cannot write {path}: {cause}; {fix} ({kept})")
        self.path, self.errno = path, code


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def is_whole_number(value: object) -> bool:
    """An int (NumPy's too) that is not a bool: what a config's counts and sizes must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite: what a config's rates and fractions must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
