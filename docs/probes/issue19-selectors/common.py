"""What the issue-19 selector probes share: the selector ensemble, the history-name d_p, and the
accuracy / taste change of a choice against none (imported by ensemble.py, guard.py, baseline_dt.py)."""
from __future__ import annotations

import statistics
from typing import Any

import torch

from pmgen.stages.select import to_unit


class EnsembleScorer:
    """Several selectors as one: every similarity is the mean of the members' cosine similarities. The
    embeddings are the members' unit embeddings side by side, each scaled by 1/sqrt(k), so any dot product
    (and a mean of embeddings, the preference background) is the mean of the members' dot products."""

    def __init__(self, members: list[Any]):
        self.members, self._scale = list(members), len(members) ** -0.5
        self.name = "+".join(m.name for m in self.members)

    def text_embeddings(self, texts):
        return torch.cat([m.text_embeddings(texts) for m in self.members], 1) * self._scale

    def image_embeddings(self, images):
        return torch.cat([m.image_embeddings(images) for m in self.members], 1) * self._scale

    def text_similarity(self, images, texts):
        return self.image_embeddings(images) @ self.text_embeddings(texts).T

    def image_similarity(self, images, others):
        return self.image_embeddings(images) @ self.image_embeddings(others).T


def load_selectors(refs: str) -> Any:
    """``ref`` or ``ref+ref+…`` (folders or zoo:…) → one selector, or their :class:`EnsembleScorer`."""
    from pmgen.presets import get_preset, load_scorer

    members = [load_scorer(get_preset("sticker-tiny", selector=r), "selector") for r in refs.split("+")]
    return members[0] if len(members) == 1 else EnsembleScorer(members)


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
