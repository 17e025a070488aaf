"""Are the preference keywords a stable description of the person? — :func:`keyword_stability`
(``pmgen evaluate-stability``). For each user, keywords are extracted from (a) the history as it
is, (b) the same events in a different order — the sorted list of timestamps is assigned to a
shuffled list of events, since verbalization sorts newest first by ``time`` (events without
timestamps are simply shuffled) — and (c) the history with one random event dropped. Reported:
mean Jaccard similarity of the lower-cased keyword sets, original vs. shuffled and original vs.
dropped, with 95% bootstrap intervals over users, and the share of users whose set is unchanged.
A persona-consistent extractor scores close to 1 on both. Note that the extractor keeps only the
newest events that fit its token budget: on long histories (MovieLens) a shuffle or a drop also
changes *which* events the model sees, not only their order (``n_kept`` is recorded per variant
when the extractor returns :class:`~pmgen.stages.keywords.Keywords` records).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pmgen.data.schema import Event, Item, User
from pmgen.eval.keyword_bench import (
    KeywordsFn,
    Progress,
    keywords_of,
    md_table,
    write_result,
)
from pmgen.eval.stats import format_ci, mean_ci, mean_or_nan

__all__ = ["jaccard", "keyword_stability", "shuffled_order", "stability_markdown", "stability_table",
           "write_stability_outputs"]


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard similarity of two keyword sets, compared lower-cased and stripped (two empty sets → 1)."""
    sa = {x.strip().lower() for x in a if x.strip()}
    sb = {x.strip().lower() for x in b if x.strip()}
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def shuffled_order(events: Sequence[Event], rng: random.Random) -> list[Event]:
    """The same events in another order, as the verbalizer will see it.

    With a ``time`` on every event, the sorted timestamps are handed to a shuffled list of the
    events (so "newest first" follows the new order); otherwise the list itself is shuffled. With
    two or more events the new order differs from the original one (unless all events are equal).
    """
    events = list(events)
    timed = bool(events) and all(e.time is not None for e in events)
    original = sorted(events, key=lambda e: e.time) if timed else events  # type: ignore[arg-type, return-value]
    perm = list(original)
    for _ in range(100):
        rng.shuffle(perm)
        if len(perm) < 2 or perm != original:
            break
    if not timed:
        return perm
    times = sorted(e.time for e in events)  # type: ignore[type-var]
    return [dataclasses.replace(e, time=t) for e, t in zip(perm, times)]


def keyword_stability(users: Sequence[User], items: Mapping[str, Item], extract_fn: KeywordsFn, seed: int = 0,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Keywords of each user's history vs. the same history shuffled and with one event dropped.

    Args:
        users: the users (each needs at least one event; the drop variant needs two).
        items: the catalog the events refer to.
        extract_fn: ``(events, items)`` → keywords (a list, or a ``Keywords`` record).
        seed: the perturbations (per user, from ``seed`` and the user id) and the bootstrap.
        progress: called as ``progress(done, total)`` after each user.

    Returns:
        ``{"protocol", "n_users", "seed", "summary", "timing_s", "users"}``; ``summary`` holds
        ``jaccard_shuffled``, ``jaccard_dropped``, ``identical_shuffled`` and ``identical_dropped``
        as ``{"mean", "ci95": [lo, hi], "n"}`` (users with a single event have no drop variant).

    Raises:
        ValueError: when ``users`` is empty or a user has no events.
    """
    if not users:
        raise ValueError("keyword_stability needs at least one user")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    n_calls = 0
    for n, u in enumerate(users):
        if not u.events:
            raise ValueError(f"user {u.user_id} has no events")
        rng = random.Random(f"{seed}-{u.user_id}")
        variants: dict[str, list[Event]] = {"original": list(u.events), "shuffled": shuffled_order(u.events, rng)}
        dropped_at = None
        if len(u.events) >= 2:
            dropped_at = rng.randrange(len(u.events))
            variants["dropped"] = [e for i, e in enumerate(u.events) if i != dropped_at]
        row: dict[str, Any] = {"user_id": u.user_id, "n_events": len(u.events)}
        for name, events in variants.items():
            try:
                kws, info = keywords_of(extract_fn(events, items))
            except ValueError as e:
                raise ValueError(f"keywords of user {u.user_id} ({name} history) failed: {e}") from e
            n_calls += 1
            row[name] = kws
            if info:
                row[f"{name}_info"] = info
        row["jaccard_shuffled"] = jaccard(row["original"], row["shuffled"])
        if dropped_at is not None:
            e = u.events[dropped_at]
            row["dropped_event"] = {"index": dropped_at, "type": e.type, "item_id": e.item_id}
            row["jaccard_dropped"] = jaccard(row["original"], row["dropped"])
        rows.append(row)
        if progress is not None:
            progress(n + 1, len(users))
    elapsed = time.perf_counter() - t0

    def stat(key: str, identical: bool = False) -> dict[str, Any]:
        got = [(r[key], r["user_id"]) for r in rows if key in r]
        vals = [float(v == 1.0) if identical else v for v, _ in got]
        return mean_ci(vals, [g for _, g in got], seed)

    summary = {"jaccard_shuffled": stat("jaccard_shuffled"), "jaccard_dropped": stat("jaccard_dropped"),
               "identical_shuffled": stat("jaccard_shuffled", True), "identical_dropped": stat("jaccard_dropped", True)}
    truncated = sum(1 for r in rows if (r.get("original_info") or {}).get("n_kept") is not None
                    and r["original_info"]["n_kept"] < r["original_info"]["n_events"])
    return {
        "benchmark": "keyword-stability",
        "protocol": ("keywords of the history vs. the same events in a shuffled order (sorted timestamps re-assigned "
                     "to shuffled events) and vs. the history with one random event dropped; Jaccard similarity of "
                     "lower-cased keyword sets and share of identical sets, means with 95% bootstrap intervals over "
                     "users"),
        "n_users": len(rows), "seed": seed, "summary": summary,
        "counts": {"mean_events": mean_or_nan([r["n_events"] for r in rows]), "histories_truncated": truncated,
                   "keyword_fallbacks": sum(1 for r in rows for v in ("original", "shuffled", "dropped")
                                            if (r.get(f"{v}_info") or {}).get("fallback"))},
        "timing_s": {"total": elapsed, "per_user": elapsed / len(rows), "per_extraction": elapsed / max(n_calls, 1)},
        "users": rows,
    }


def stability_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the stability summary: perturbation, mean Jaccard, share identical."""
    s = result["summary"]
    header = ["perturbation", "Jaccard vs. original", "identical keyword set", "users"]
    rows = [["shuffled order", format_ci(s["jaccard_shuffled"]), format_ci(s["identical_shuffled"]),
             str(s["jaccard_shuffled"]["n"])],
            ["one event dropped", format_ci(s["jaccard_dropped"]), format_ci(s["identical_dropped"]),
             str(s["jaccard_dropped"]["n"])]]
    return header, rows


def stability_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report of :func:`keyword_stability` (dataset and models from ``result`` when set)."""
    header, rows = stability_table(result)
    c = result["counts"]
    models = result.get("models", {})
    lines = ["# Preference keyword stability (persona consistency)", "", result["protocol"] + ".", "",
             (f"{result['n_users']} users of `{result.get('dataset', '?')}` ({c['mean_events']:.1f} events on average, "
             f"{c['histories_truncated']} histories cut to the token budget); seed {result['seed']}.")]
    if models:
        lines.append("Models: " + ", ".join(f"{k} `{v}`" for k, v in models.items()) + ".")
    lines += [(f"Keyword fallbacks (padded or replaced by history words): {c['keyword_fallbacks']} of "
              f"{sum(1 for r in result['users'] for v in ('original', 'shuffled', 'dropped') if v in r)} extractions; "
              f"{result['timing_s']['per_user']:.2f} s per user."), "", md_table(header, rows), ""]
    return "\n".join(lines)


def write_stability_outputs(result: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out/stability.json`` and ``out/stability.md``; returns both paths."""
    return write_result(result, out, "stability", stability_markdown(result))
