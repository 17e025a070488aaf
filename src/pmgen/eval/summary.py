"""Views of ``pmgen evaluate``'s candidate rows (one row per sample, method and candidate) and their
summaries: the **selected** candidate, the candidates at a **fixed weight**, the selection recomputed
for another α (the **α sweep**), per-method means with 95% intervals over users, and paired margins.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from pmgen.eval.grading import HIGHER_IS_BETTER
from pmgen.eval.stats import bootstrap_ci, mean_ci
from pmgen.stages.select import argmax_z, keeps_target, z_score


def selected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidate each method's selection kept."""
    return [r for r in rows if r["chosen"]]


def at_weight(rows: list[dict[str, Any]], weight: float) -> list[dict[str, Any]]:
    """The candidates at one preference weight (no selection)."""
    return [r for r in rows if abs(r["weight"] - weight) < 1e-9]


def reselect(rows: list[dict[str, Any]], alpha: float, min_accuracy: float = 0.0) -> list[dict[str, Any]]:
    """The candidate PMG's selection would keep at ``α`` (and ``min_accuracy``), recomputed from the
    recorded d_t and d_p with the pipeline's own rule (:func:`pmgen.stages.select.argmax_z`)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["sample_id"], r["method"]), []).append(r)
    out = []
    for cands in groups.values():
        cands = sorted(cands, key=lambda r: r["weight"])
        z = z_score(torch.tensor([c["d_t"] for c in cands]), torch.tensor([c["d_p"] for c in cands]), alpha)
        out.append(cands[argmax_z(z, keeps_target([c["d_t"] for c in cands], min_accuracy))])
    return out


def summarize(rows: list[dict[str, Any]], baseline: str | None = "none") -> dict[str, dict[str, Any]]:
    """Per method and metric: mean, 95% CI over users, n, and relative gain over ``baseline``."""
    out: dict[str, dict[str, Any]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        out[m] = {}
        for metric in HIGHER_IS_BETTER:
            vals = [(r[metric], r["user_id"]) for r in mr if metric in r]
            if not vals:
                continue
            out[m][metric] = mean_ci([v for v, _ in vals], [u for _, u in vals])
        if "weight" in mr[0]:
            out[m]["mean_weight"] = statistics.fmean(r["weight"] for r in mr)
    if baseline and baseline in out:
        for m in methods:
            for metric, st in out[m].items():
                if not isinstance(st, dict):
                    continue
                b = out[baseline].get(metric, {}).get("mean")
                if b not in (None, 0):
                    st["gain_vs_" + baseline] = (st["mean"] - b) / abs(b)
    return out


def both_at_once(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, over its *personalized* results (selected candidate with ``w > 0``): the share in
    which the evaluator finds the target in its top 5 of 100 names **and** the user's taste first of
    the 12 — with a 95% CI over users, and how many results were personalized at all."""
    out: dict[str, dict[str, Any]] = {}
    sel = selected(rows)
    for m in dict.fromkeys(r["method"] for r in sel):
        mine = [r for r in sel if r["method"] == m and "both" in r]
        pers = [r for r in mine if r["weight"] > 0]
        out[m] = {**mean_ci([r["both"] for r in pers], [r["user_id"] for r in pers]), "n_results": len(mine),
                  "personalized_share": len(pers) / len(mine) if mine else float("nan")}
    return out


def paired_margin(rows: list[dict[str, Any]], a: str, b: str, metric: str) -> tuple[float, float, float]:
    """Mean of (a − b) over samples both methods graded, with a 95% bootstrap CI over users."""
    by = {(r["sample_id"], r["method"]): r for r in rows}
    diffs, users = [], []
    for (sid, m), r in by.items():
        if m == a and (sid, b) in by and metric in r and metric in by[(sid, b)]:
            diffs.append(r[metric] - by[(sid, b)][metric])
            users.append(r["user_id"])
    return bootstrap_ci(diffs, users)


def alpha_sweep(rows: list[dict[str, Any]], method: str, alphas: Sequence[float] | None = None,
                min_accuracy: float = 0.0) -> list[dict[str, Any]]:
    """For each α: the selected candidates' mean accuracy and personalization metrics (one method)."""
    alphas = list(alphas) if alphas is not None else [i / 10 for i in range(11)]
    mr = [r for r in rows if r["method"] == method]
    curve = []
    for a in alphas:
        pick = reselect(mr, a, min_accuracy)
        point: dict[str, Any] = {"alpha": a, "mean_weight": statistics.fmean(r["weight"] for r in pick)}
        for metric in HIGHER_IS_BETTER:
            vals = [r[metric] for r in pick if metric in r]
            if vals:
                point[metric] = statistics.fmean(vals)
        curve.append(point)
    return curve
