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
    """The candidates at one preference weight started from the target (no selection; exemplars' left out)."""
    return [r for r in rows if abs(r["weight"] - weight) < 1e-9 and "start" not in r]


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


def candidate_ceiling(rows: list[dict[str, Any]], baseline: str = "none", keep: float = 0.95,
                      gain: str = "pers_taste", cost: str = "acc_text",
                      by: tuple[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per method: what an **oracle** selection could get from the candidates it generated — the most
    ``gain`` (mean over samples) while the mean ``cost`` metric stays ≥ ``keep`` × the baseline's.

    The oracle sees the evaluator's grades of every candidate (per sample it keeps the argmax of
    ``gain + λ·cost``, with the smallest λ that meets the accuracy floor, found by bisection). It is
    not a method: it tells how much of a shortfall is the selector's (the candidates hold better
    choices) and how much the generator's (they do not). It is optimistic: choosing by the grader
    also picks the grader's noise.

    ``by = (gain key, cost key)`` chooses with another judge's scores instead (e.g. the selector's
    similarity to the hidden taste and to the target's name, :func:`pmgen.eval.evaluate.run_methods`):
    λ is still set by the evaluator's accuracy floor, and the evaluator's grades are reported. The
    gap between the two oracles is the evaluator's own noise, which no other model can find.
    """
    pick_gain, pick_cost = by or (gain, cost)
    base = {r["sample_id"]: r for r in rows if r["method"] == baseline and r["chosen"] and cost in r}
    if not base:
        return {}
    floor = keep * statistics.fmean(r[cost] for r in base.values())
    out: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        if m == baseline:
            continue
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["method"] == m and r["sample_id"] in base and all(k in r for k in (gain, cost, pick_gain, pick_cost)):
                groups.setdefault(r["sample_id"], []).append(r)
        if not groups:
            continue

        def pick(lam: float) -> list[dict[str, Any]]:
            return [max(sorted(c, key=lambda r: r["weight"]), key=lambda r: r[pick_gain] + lam * r[pick_cost])
                    for c in groups.values()]

        def meets(p: list[dict[str, Any]]) -> bool:
            return statistics.fmean(r[cost] for r in p) >= floor

        lo, hi = 0.0, 1e4
        if meets(pick(lo)):
            hi = lo
        elif not meets(pick(hi)):
            continue  # the candidates cannot keep the accuracy floor at all
        for _ in range(60):
            if hi - lo < 1e-6:
                break
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if meets(pick(mid)) else (mid, hi)
        chosen = pick(hi)
        out[m] = {"lambda": hi, "n": len(chosen), "keep": keep,
                  "mean_weight": statistics.fmean(r["weight"] for r in chosen)}
        for metric in (cost, gain, "gt_hit", "lpips_history"):
            vals = [r[metric] for r in chosen if metric in r]
            bvals = [base[r["sample_id"]][metric] for r in chosen if metric in r and metric in base[r["sample_id"]]]
            if vals:
                out[m][metric] = statistics.fmean(vals)
                if bvals and statistics.fmean(bvals) != 0:
                    out[m][metric + "_gain"] = statistics.fmean(vals) / statistics.fmean(bvals) - 1
        pers = [r for r in chosen if r["weight"] > 0 and "both" in r]
        out[m]["both_personalized"] = statistics.fmean(r["both"] for r in pers) if pers else float("nan")
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
