"""Counter-based random numbers: SplitMix64 (Steele, Lea & Flood 2014), the same in every process, worker and device.

A draw is a hash of what it belongs to (seed, epoch, image, view, ...), not a position in a generator's stream,
so it does not depend on who draws it, in what order, or how many draws came before.
"""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: SplitMix64's increment
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """One SplitMix64 step on a uint64 array: add the increment, then the finaliser (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + GOLDEN
        x = (x ^ (x >> _S30)) * _M1
        x = (x ^ (x >> _S27)) * _M2
        return x ^ (x >> _S31)


def mix(*values: int) -> int:
    """A 63-bit seed mixing several ints (any sign), stable across processes unlike hash()."""
    state = np.array([GOLDEN], dtype=np.uint64)
    for value in values:
        state = splitmix64(state ^ np.uint64(int(value) & _MASK64))
    return int(state[0]) >> 1
