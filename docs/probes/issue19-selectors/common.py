"""What the issue-19 selector probes share: loading a selector ensemble, the history-name d_p, and the
accuracy / taste change of a choice against none (imported by ensemble.py, guard.py, baseline_dt.py)."""
from __future__ import annotations

import statistics
from typing import Any

import torch

from pmgen.stages.select import to_unit


def load_selectors(refs: str) -> Any:
    """``ref`` or ``ref+ref+…`` (folders or zoo:…) → one selector, or their
    :class:`pmgen.models.scorer.EnsembleScorer` (the mean of the members' cosine similarities)."""
    from pmgen.presets import get_preset, load_scorer

    return load_scorer(get_preset("sticker-tiny", selector=refs), "selector")


def history_dp(sel: Any, emb: torch.Tensor, titles: list[str], pref_text: str,
               background: torch.Tensor) -> dict[str, torch.Tensor]:
    """d_p of candidate embeddings ``emb`` to the names of the user's history items: alone (``-hist``), and
    averaged with the keyword side, against the background (``-kw+hist``)."""
    hist = (emb @ sel.text_embeddings(titles).T).mean(1)
    kw = (emb @ sel.text_embeddings([pref_text])[0]) if pref_text else hist
    return {"-hist": to_unit(hist), "-kw+hist": to_unit((kw + hist) / 2 - emb @ background)}


METRICS = ("acc_text", "pers_taste")


def means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean evaluator accuracy and taste score of graded rows (or metric dicts)."""
    return {k: statistics.fmean(r[k] for r in rows) for k in METRICS}


def change(rows: list[dict[str, Any]], base: dict[str, float]) -> str:
    """``"accuracy%/taste%"``: the change of the rows' means against ``base`` (none), in percent."""
    m = means(rows)
    acc, taste = ((m[k] / base[k] - 1) * 100 for k in METRICS)
    return f"{acc:+.1f}/{taste:+.1f}"


def none_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The baseline: the means of the w = 0 rows of the set named "default"."""
    return means([r for r in rows if r["method"] == "default" and r["weight"] == 0])
