"""The statistics every evaluation reports: means with 95% bootstrap intervals over users.

A summary statistic is the dict ``{"mean", "ci95": [lo, hi], "n"}`` (:func:`mean_ci`); reports print
it as ``mean [lo, hi]`` (:func:`format_ci`).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["bootstrap_ci", "format_ci", "mean_ci", "mean_or_nan"]


def bootstrap_ci(values: Sequence[float], groups: Sequence[str] | None = None, n: int = 1000, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval, resampling ``groups`` (users) with replacement when given."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    keys = list(groups) if groups is not None else list(range(len(vals)))
    by: dict[Any, list[float]] = {}
    for k, v in zip(keys, vals):
        by.setdefault(k, []).append(v)
    units = list(by.values())
    rng = random.Random(seed)
    means = []
    for _ in range(n):
        pick = [units[rng.randrange(len(units))] for _ in units]
        flat = [v for u in pick for v in u]
        means.append(sum(flat) / len(flat))
    means.sort()
    return statistics.fmean(vals), means[int(0.025 * n)], means[int(0.975 * n) - 1]


def mean_ci(values: Sequence[float], groups: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """``{"mean", "ci95": [lo, hi], "n"}`` of ``values`` (:func:`bootstrap_ci` over ``groups``)."""
    mean, lo, hi = bootstrap_ci(values, groups, seed=seed)
    return {"mean": mean, "ci95": [lo, hi], "n": len(values)}


def mean_or_nan(xs: Sequence[float]) -> float:
    """The plain mean; NaN for no values."""
    return sum(xs) / len(xs) if xs else float("nan")


def format_ci(st: Mapping[str, Any], digits: int = 3) -> str:
    """``"mean [lo, hi]"`` of a :func:`mean_ci` dict."""
    lo, hi = st["ci95"]
    return f"{st['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
