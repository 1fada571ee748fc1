"""Ranks of encoders within a task, and Spearman's rank correlation between two tasks across encoders (ViRB's
figure of which tasks agree on the order of the encoders)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def ranks(values: Sequence[float]) -> list[float]:
    """Rank 1 for the largest value (the best score), tied values sharing the mean of their ranks (1, 2.5, 2.5, 4)."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            out[order[position]] = (start + end) / 2 + 1  # the mean of ranks start+1 .. end+1
        start = end + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho of paired scores: Pearson's correlation of their (tie-averaged) ranks; NaN with fewer than two
    pairs or when either side ranks every encoder equal."""
    if len(a) != len(b):
        raise ValueError(f"rank correlation needs paired scores; got {len(a)} and {len(b)}")
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    var_a = sum((x - mean_a) ** 2 for x in ra)
    var_b = sum((y - mean_b) ** 2 for y in rb)
    if var_a == 0 or var_b == 0:
        return float("nan")
    return cov / math.sqrt(var_a * var_b)
