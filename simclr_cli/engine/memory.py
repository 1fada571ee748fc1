"""Host memory: what is free (the decoded-image cache's budget) and what this process holds (reported per step)."""

from __future__ import annotations

import os
import resource
import sys

from simclr_cli.engine.errors import ConfigError

MB = 1024**2
GB = 1024**3
# Training in fp32 on the CPU holds each parameter four times: weight, gradient, momentum, and the update's temporaries.
TRAINING_COPIES = 4


def available() -> int:
    """Bytes of memory available now (MemAvailable), or total physical memory where /proc is missing."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def resident_mb() -> float:
    """This process's resident memory now, in MB (peak where the current value cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return peak_resident_mb()


def peak_resident_mb(*, children: bool = False) -> float:
    """The highest resident memory of this process (or of its largest finished child, e.g. a DataLoader worker)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS
    return usage.ru_maxrss / (MB if sys.platform == "darwin" else 1024)


def require_for_training(parameters: int, *, device_type: str, what: str) -> None:
    """ConfigError before anything is allocated when a model of `parameters` cannot fit in the memory available:
    on the CPU every copy of it lives in host memory, on an accelerator the host still builds its weights once."""
    needed = parameters * 4 * (TRAINING_COPIES if device_type == "cpu" else 1)
    free = available()
    if free and needed > free:
        raise ConfigError(
            f"{what} needs about {needed / GB:,.1f} GB of memory, only {free / GB:,.1f} GB is available; "
            "lower --width or choose a smaller --arch"
        )
