"""Benchmarks of the preference-extraction stage on its own (no image is generated).

Two questions about the keywords :class:`~pmgen.stages.keywords.PreferenceExtractor` writes:

**1. Do they predict what a real user likes next?** — :func:`movielens_benchmark`
(``pmgen evaluate-movielens``). On MovieLens-100k (dataset ``movielens``) each user's earliest 80%
of ratings are the history and the later 4–5★ movies are the held-out likes (``Sample.heldout``).
For every **test-split** user with a sample, the candidates are all catalog movies not in the
user's history; they are ranked by cosine similarity between a *profile vector* and each movie's
text vector (``"title (year): genres"``, e.g. ``"Toy Story (1995): Animation, Children's, Comedy"``;
sentence vectors of the preset's text encoder, all-MiniLM-L6-v2 for ``sticker-tiny``). Metrics are
HR@k (a held-out like in the top k) and NDCG@k (binary relevance; ideal DCG has
``min(#likes, k)`` ones), averaged over users with 95% bootstrap intervals
(:func:`pmgen.eval.evaluate.bootstrap_ci`). Methods (profile vectors):

* ``random`` — a seeded random order (per user, from ``seed`` and the user id);
* ``popularity`` — the number of history events per movie over **all** users' histories (every
  split). Held-out ratings are never counted. Not personalized; ties in catalog order;
* ``history-embedding`` — mean text vector of the history movies rated ≥ 4 (all history movies
  when there are none);
* ``keywords`` — the LLM's preference keywords joined by ``", "`` and embedded as one text;
* ``keywords+history`` — the normalized sum of the two (unit) vectors above;
* ``popularity+keywords`` / ``popularity+history`` — the personalized score re-ranking the
  popular: ``z(log(1 + popularity)) + z(cosine)``, each standardized over the catalog, equal weights
  (fixed, not tuned on these users);
* ``popularity>keywords`` — recommender-style re-ranking: popularity's top ``N`` candidates are
  re-scored by ``w·z(log(1 + popularity)) + (1 − w)·z(keyword cosine)`` (standardized over those
  ``N``), the rest keep popularity order below them. ``N`` and ``w`` are chosen on **val** users
  (:func:`tune_rerank`, grids :data:`RERANK_TOP_N` × :data:`RERANK_WEIGHTS`, best mean NDCG@k; ties
  go to the larger ``w``), never on the test users reported.

Ties in cosine similarity keep catalog order (a stable sort). The held-out likes never reach any
method: histories come from ``users.jsonl`` only.

**2. Are the keywords a stable description of the person?** — :func:`keyword_stability`
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

Both cores take their models as plain functions (text → vectors, events → keywords), so tests run
them with a hashing bag-of-words encoder and a deterministic keyword function; the CLI passes the
preset's text encoder and LLM (keywords cached in the SQLite :class:`~pmgen.stages.keywords.KeywordCache`,
so reruns are free).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pmgen.data.schema import Dataset, Event, Item, Sample, User
from pmgen.eval.evaluate import bootstrap_ci

__all__ = [
    "MOVIELENS_METHODS",
    "encoder_text_vectors",
    "evaluation_users",
    "hr_ndcg_at_k",
    "jaccard",
    "keyword_stability",
    "movie_text",
    "movielens_benchmark",
    "movielens_markdown",
    "movielens_table",
    "rerank_scores",
    "tune_rerank",
    "leak_check",
    "leak_markdown",
    "leak_table",
    "multilingual_check",
    "multilingual_users",
    "taste_hit",
    "write_leak_outputs",
    "popularity_counts",
    "shuffled_order",
    "stability_markdown",
    "stability_table",
    "write_movielens_outputs",
    "write_stability_outputs",
]

TextVectorsFn = Callable[[Sequence[str]], Any]
"""Texts → ``[len(texts), d]`` vectors (a tensor or anything ``torch.as_tensor`` takes)."""
KeywordsFn = Callable[[Sequence[Event], Mapping[str, Item]], Any]
"""``(events, items)`` → keywords: a list of strings, or a :class:`~pmgen.stages.keywords.Keywords` record."""
Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each user."""

MOVIELENS_METHODS = ("random", "popularity", "history-embedding", "keywords", "keywords+history",
                     "popularity+history", "popularity+keywords", "popularity>keywords")
RERANK_TOP_N = (20, 50, 100, 200)
"""Grid of ``N`` (popularity's top-N re-ranked by the keywords) tried on val users."""
RERANK_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
"""Grid of the popularity weight ``w`` of the re-ranking blend tried on val users (1.0 = popularity)."""
LIKED_MIN_RATING = 4.0
PAIRED = (("keywords", "history-embedding"), ("keywords+history", "history-embedding"), ("keywords", "popularity"),
          ("popularity+keywords", "popularity"), ("popularity+keywords", "popularity+history"),
          ("popularity>keywords", "popularity"))


# -------------------------------------------------------------------------------------- metrics


def hr_ndcg_at_k(ranked_ids: Sequence[str], relevant_ids: Collection[str], k: int) -> tuple[float, float]:
    """Hit rate and NDCG at ``k`` of one ranking with binary relevance.

    ``HR@k`` is 1 when any relevant id is among the first ``k`` ranked ids. ``NDCG@k`` is
    ``DCG / IDCG`` with ``DCG = Σ_{i<k, ranked[i] relevant} 1 / log2(i + 2)`` (rank 1 counts 1) and
    ``IDCG`` the same sum over ``min(len(relevant), k)`` leading ones. No relevant ids → ``(0, 0)``.

    Raises:
        ValueError: when ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    relevant = set(relevant_ids)
    if not relevant:
        return 0.0, 0.0
    top = list(ranked_ids[:k])
    gains = [1.0 / math.log2(i + 2) for i, rid in enumerate(top) if rid in relevant]
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return (1.0 if gains else 0.0), sum(gains) / ideal


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard similarity of two keyword sets, compared lower-cased and stripped (two empty sets → 1)."""
    sa = {x.strip().lower() for x in a if x.strip()}
    sb = {x.strip().lower() for x in b if x.strip()}
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _stat(values: Sequence[float], groups: Sequence[str], seed: int) -> dict[str, Any]:
    mean, lo, hi = bootstrap_ci(values, groups, seed=seed)
    return {"mean": mean, "ci95": [lo, hi], "n": len(values)}


# ------------------------------------------------------------------------------------- helpers


def movie_text(item: Item) -> str:
    """``"title (year): genres"`` — the text a movie is embedded as (the title already holds the year)."""
    genres = item.attributes.get("genres")
    if not isinstance(genres, (list, tuple)):
        text = item.text.split(";")[0]
        genres = [g.strip() for g in (text.split(":", 1)[1] if ":" in text else text).split(",") if g.strip()]
    return f"{item.title}: {', '.join(str(g) for g in genres)}" if genres else item.title


def encoder_text_vectors(encoder: Any, batch_size: int = 64) -> TextVectorsFn:
    """A :data:`TextVectorsFn` from a text encoder with ``pooled(texts)`` (unit sentence vectors), batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def fn(texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, int(getattr(encoder, "hidden_size", 1)))
        return torch.cat([encoder.pooled(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])

    return fn


def _vectors(fn: TextVectorsFn, texts: Sequence[str]) -> torch.Tensor:
    """Unit-normalized ``[N, d]`` float32 vectors of ``texts`` (zero vectors stay zero)."""
    v = torch.as_tensor(fn(list(texts)), dtype=torch.float32)
    if v.ndim != 2 or v.shape[0] != len(texts):
        raise ValueError(f"the text-vector function returned shape {tuple(v.shape)} for {len(texts)} texts; "
                         f"expected [{len(texts)}, d]")
    return torch.nn.functional.normalize(v, dim=-1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(v, dim=-1)


def _standardize(v: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation (a constant vector stays zero)."""
    return (v - v.mean()) / v.std().clamp(min=1e-8)


def _keywords_of(result: Any) -> tuple[list[str], dict[str, Any]]:
    """A keyword function's result → (keywords, recorded details); accepts lists and ``Keywords`` records."""
    if hasattr(result, "keywords"):
        info = {"fallback": getattr(result, "fallback", None), "cached": bool(getattr(result, "cached", False)),
                "n_events": getattr(result, "n_events", None), "n_kept": getattr(result, "n_kept", None)}
        return [str(k) for k in result.keywords], info
    if isinstance(result, str):
        raise TypeError("the keyword function must return a list of keywords (or a Keywords record), not a string")
    return [str(k) for k in result], {}


def popularity_counts(users: Iterable[User]) -> Counter[str]:
    """Number of history events per item over ``users`` (their ``events`` only — never held-out data)."""
    counts: Counter[str] = Counter()
    for u in users:
        counts.update(e.item_id for e in u.events if e.item_id)
    return counts


def evaluation_users(ds: Dataset, n_users: int | None = None, split: str = "test", seed: int = 0) -> list[User]:
    """Users of ``split`` that have a sample, sorted by id; a seeded random ``n_users`` of them when given.

    Raises:
        ValueError: when the split has no such users, or ``n_users < 1``.
    """
    if n_users is not None and n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    ids = [u for u in ds.user_split(split) if u in ds.users]
    if not ids:
        raise ValueError(f"dataset {ds.name!r} has no {split!r} users with a sample")
    ids = sorted(ids, key=lambda u: (len(u), u))  # numeric-looking ids in numeric order
    if n_users is not None and n_users < len(ids):
        picked = set(random.Random(seed).sample(ids, n_users))
        ids = [u for u in ids if u in picked]
    return [ds.users[u] for u in ids]


# ------------------------------------------------------------------------- MovieLens benchmark


def rerank_scores(pop_scores: torch.Tensor, sims: torch.Tensor, cand_mask: torch.Tensor, top_n: int,
                  w: float) -> torch.Tensor:
    """Scores of ``popularity>keywords``: popularity's ``top_n`` candidates re-scored by the blend.

    ``w·z(log(1 + pop)) + (1 − w)·z(sims)`` over the top ``top_n`` candidates (``cand_mask``), each
    standardized over them, placed above every other candidate (which keep popularity order).
    ``w = 1`` reproduces popularity's top ``top_n`` order exactly.
    """
    pop = pop_scores.masked_fill(~cand_mask, float("-inf"))
    top = torch.argsort(pop, descending=True, stable=True)[: min(top_n, int(cand_mask.sum()))]
    out = torch.log1p(pop_scores.clamp(min=0)) / 1e6 - 1e3  # below the re-ranked block, popularity order
    lp, sm = torch.log1p(pop_scores[top]), sims[top]
    blend = w * _standardize(lp) + (1 - w) * _standardize(sm) if len(top) > 1 else lp
    out[top] = blend
    return out


def _user_parts(u: User, index: Mapping[str, int], n_items: int, sample: Sample) -> tuple[torch.Tensor, list[str]]:
    seen = {e.item_id for e in u.events if e.item_id in index}
    cand_mask = torch.ones(n_items, dtype=torch.bool)
    if seen:
        cand_mask[torch.tensor([index[i] for i in seen], dtype=torch.long)] = False
    relevant = [i for i in sample.heldout if i in index and i not in seen]
    return cand_mask, relevant


def tune_rerank(ds: Dataset, text_vectors_fn: TextVectorsFn, keywords_fn: KeywordsFn, k: int = 10,
                split: str = "val", n_users: int | None = None, seed: int = 0,
                item_vecs: torch.Tensor | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Choose ``(N, w)`` of ``popularity>keywords`` on ``split`` users (best mean NDCG@k; ties → larger ``w``).

    Returns ``{"split", "n_users", "top_n", "w", "ndcg", "grid"}`` (``grid``: ``"N,w" → mean NDCG@k``).

    Raises:
        ValueError: when the split has no users with held-out likes.
    """
    samples: dict[str, Sample] = {}
    for s_ in ds.split(split):
        if s_.heldout:
            samples.setdefault(s_.user_id, s_)
    users = [u for u in evaluation_users(ds, None, split) if u.user_id in samples] if samples else []
    if not users:
        raise ValueError(f"dataset {ds.name!r} has no {split!r} users with held-out likes to tune the re-ranking on")
    if n_users is not None and n_users < len(users):
        picked = set(random.Random(seed).sample([u.user_id for u in users], n_users))
        users = [u for u in users if u.user_id in picked]
    ids = list(ds.items)
    index = {iid: i for i, iid in enumerate(ids)}
    if item_vecs is None:
        item_vecs = _vectors(text_vectors_fn, [movie_text(ds.items[i]) for i in ids])
    pop = popularity_counts(ds.users.values())
    pop_scores = torch.tensor([float(pop.get(i, 0)) for i in ids])
    kws = []
    for n, u in enumerate(users):
        kws.append(_keywords_of(keywords_fn(u.events, ds.items))[0])
        if progress is not None:
            progress(n + 1, len(users))
    kw_vecs = _vectors(text_vectors_fn, [", ".join(x) for x in kws])
    grid: dict[str, float] = {}
    parts = [_user_parts(u, index, len(ids), samples[u.user_id]) for u in users]
    sims = [item_vecs @ kw_vecs[n] for n in range(len(users))]
    for top_n in RERANK_TOP_N:
        for w in RERANK_WEIGHTS:
            vals = []
            for (mask, relevant), sim in zip(parts, sims):
                sc = rerank_scores(pop_scores, sim, mask, top_n, w).masked_fill(~mask, float("-inf"))
                order = torch.argsort(sc, descending=True, stable=True)[:k].tolist()
                vals.append(hr_ndcg_at_k([ids[i] for i in order], relevant, k)[1])
            grid[f"{top_n},{w}"] = _mean(vals)
    best = max(grid, key=lambda key: (round(grid[key], 12), float(key.split(",")[1]), -int(key.split(",")[0])))
    top_n, w = best.split(",")
    return {"split": split, "n_users": len(users), "top_n": int(top_n), "w": float(w), "ndcg": grid[best],
            "popularity_ndcg": grid[f"{RERANK_TOP_N[0]},1.0"], "grid": grid}


def movielens_benchmark(ds: Dataset, text_vectors_fn: TextVectorsFn, keywords_fn: KeywordsFn,
                        n_users: int | None = None, k: int = 10, seed: int = 0,
                        progress: Progress | None = None,
                        rerank: tuple[int, float] | str | None = "tune",
                        tune_users: int | None = None) -> dict[str, Any]:
    """Rank held-out likes of MovieLens test users with each profile method (see the module docstring).

    Args:
        ds: the ``movielens`` dataset (samples carry ``heldout``; users hold the histories).
        text_vectors_fn: texts → ``[N, d]`` vectors (normalized here); e.g. :func:`encoder_text_vectors`.
        keywords_fn: ``(events, items)`` → preference keywords (a list, or a ``Keywords`` record whose
            ``fallback`` / ``cached`` / ``n_kept`` are recorded per user).
        n_users: evaluate a seeded random subset of this many users (default: every test user with a sample).
        k: the cut-off of HR@k and NDCG@k.
        seed: the user subset, the ``random`` method and the bootstrap.
        progress: called as ``progress(done, total)`` after each user's keywords.
        rerank: ``(N, w)`` of ``popularity>keywords``; ``"tune"`` (default) chooses them on val users
            with :func:`tune_rerank` (their keywords come from ``keywords_fn`` too); ``None`` leaves the
            method out.
        tune_users: tune on a seeded subset of this many val users (default: all of them).

    Returns:
        ``{"protocol", "dataset", "n_users", "k", "seed", "methods", "summary", "paired", "counts",
        "timing_s", "users"}``; ``summary[method]`` holds ``"hr@k"`` and ``"ndcg@k"`` as
        ``{"mean", "ci95": [lo, hi], "n"}``; ``paired["a - b"]`` the same for per-user differences.

    Raises:
        ValueError: on ``k < 1``, a dataset without held-out likes, or a user whose keywords fail.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    samples: dict[str, Sample] = {}
    for s in ds.split("test"):
        if s.heldout:
            samples.setdefault(s.user_id, s)
    if not samples:
        raise ValueError(f"dataset {ds.name!r} has no test samples with held-out likes (`heldout`); "
                         "the benchmark needs the `movielens` dataset")
    users = [u for u in evaluation_users(ds, None, "test") if u.user_id in samples]
    if n_users is not None:
        if n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {n_users}")
        if n_users < len(users):
            picked = set(random.Random(seed).sample([u.user_id for u in users], n_users))
            users = [u for u in users if u.user_id in picked]

    ids = list(ds.items)
    index = {iid: i for i, iid in enumerate(ids)}
    t0 = time.perf_counter()
    item_vecs = _vectors(text_vectors_fn, [movie_text(ds.items[i]) for i in ids])
    t_items = time.perf_counter() - t0

    pop = popularity_counts(ds.users.values())  # histories of every split; samples are never read
    pop_scores = torch.tensor([float(pop.get(i, 0)) for i in ids])
    pop_z = _standardize(torch.log1p(pop_scores))
    tuned: dict[str, Any] | None = None
    rerank_note = None
    if rerank == "tune":
        try:
            tuned = tune_rerank(ds, text_vectors_fn, keywords_fn, k=k, split="val", n_users=tune_users, seed=seed,
                                item_vecs=item_vecs)
            rerank = (tuned["top_n"], tuned["w"])
        except ValueError as e:  # no val users with held-out likes: the method is left out, and it says why
            rerank, rerank_note = None, str(e)
    methods = [m for m in MOVIELENS_METHODS if rerank is not None or m != "popularity>keywords"]

    # keywords first (the slow part, cached by the extractor), then one batched encoder call
    keywords: list[list[str]] = []
    infos: list[dict[str, Any]] = []
    t_kw: list[float] = []
    for n, u in enumerate(users):
        t = time.perf_counter()
        try:
            kws, info = _keywords_of(keywords_fn(u.events, ds.items))
        except ValueError as e:
            raise ValueError(f"keywords of user {u.user_id} failed: {e}") from e
        t_kw.append(time.perf_counter() - t)
        keywords.append(kws)
        infos.append(info)
        if progress is not None:
            progress(n + 1, len(users))
    t1 = time.perf_counter()
    kw_vecs = _vectors(text_vectors_fn, [", ".join(kws) for kws in keywords]) if users else item_vecs[:0]
    t_kw_embed = time.perf_counter() - t1

    rows: list[dict[str, Any]] = []
    for n, u in enumerate(users):
        hist_items = [e.item_id for e in u.events if e.item_id in index]
        seen = set(hist_items)
        cand_mask = torch.ones(len(ids), dtype=torch.bool)
        cand_mask[torch.tensor([index[i] for i in seen], dtype=torch.long)] = False
        relevant = [i for i in samples[u.user_id].heldout if i in index and i not in seen]
        liked = [e.item_id for e in u.events if e.item_id in index and e.type == "rating"
                 and isinstance(e.value, (int, float)) and e.value >= LIKED_MIN_RATING]
        hist_vec = _unit(item_vecs[[index[i] for i in (liked or hist_items)]].mean(0)) if hist_items \
            else torch.zeros(item_vecs.shape[1])
        kw_vec = kw_vecs[n]
        rng = random.Random(f"{seed}-{u.user_id}")
        scores = {
            "random": torch.tensor([rng.random() for _ in ids]),
            "popularity": pop_scores,
            "history-embedding": item_vecs @ hist_vec,
            "keywords": item_vecs @ kw_vec,
            "keywords+history": item_vecs @ _unit(kw_vec + hist_vec),
            "popularity+history": pop_z + _standardize(item_vecs @ hist_vec),
            "popularity+keywords": pop_z + _standardize(item_vecs @ kw_vec),
        }
        if rerank is not None:
            scores["popularity>keywords"] = rerank_scores(pop_scores, item_vecs @ kw_vec, cand_mask, *rerank)
        metrics: dict[str, dict[str, float]] = {}
        for method in methods:
            s = scores[method].masked_fill(~cand_mask, float("-inf"))
            order = torch.argsort(s, descending=True, stable=True)[: int(cand_mask.sum())]
            hr, ndcg = hr_ndcg_at_k([ids[i] for i in order[:k].tolist()], relevant, k)
            metrics[method] = {f"hr@{k}": hr, f"ndcg@{k}": ndcg}
        rows.append({"user_id": u.user_id, "n_history": len(u.events), "n_history_liked": len(liked),
                     "n_heldout": len(relevant), "n_candidates": int(cand_mask.sum()), "keywords": keywords[n],
                     **({"keyword_info": infos[n]} if infos[n] else {}), "keyword_s": t_kw[n], "metrics": metrics})

    names = (f"hr@{k}", f"ndcg@{k}")
    uids = [r["user_id"] for r in rows]
    summary = {m: {name: _stat([r["metrics"][m][name] for r in rows], uids, seed) for name in names}
               for m in methods}
    paired = {f"{a} - {b}": {name: _stat([r["metrics"][a][name] - r["metrics"][b][name] for r in rows], uids, seed)
                             for name in names} for a, b in PAIRED if a in methods and b in methods}
    n_fallback = sum(1 for i in infos if i.get("fallback"))
    n_cached = sum(1 for i in infos if i.get("cached"))
    fresh = [t for t, i in zip(t_kw, infos) if not i.get("cached")]
    return {
        "benchmark": "movielens-preferences",
        "protocol": ("MovieLens-100k test users with a sample; history = earliest 80% of ratings, relevant = later "
                     f"ratings >= 4 stars; candidates = every movie not in the history; ranked by cosine similarity "
                     f"of a profile vector to 'title (year): genres' text vectors; HR@{k} and NDCG@{k} (binary "
                     "relevance), means with 95% bootstrap intervals over users"),
        "dataset": ds.name, "n_users": len(rows), "k": k, "seed": seed, "methods": methods,
        "rerank": {"skipped": rerank_note} if rerank is None and rerank_note else None if rerank is None else {"top_n": rerank[0], "w": rerank[1],
                                                **({"tuned_on": {x: tuned[x] for x in ("split", "n_users", "ndcg",
                                                                                        "popularity_ndcg")}}
                                                   if tuned else {})},
        "summary": summary, "paired": paired,
        "counts": {"items": len(ids),
                   "mean_candidates": _mean([r["n_candidates"] for r in rows]),
                   "mean_heldout": _mean([r["n_heldout"] for r in rows]),
                   "mean_history": _mean([r["n_history"] for r in rows]),
                   "keyword_fallbacks": n_fallback, "keywords_cached": n_cached},
        "timing_s": {"item_vectors": t_items, "keywords_total": sum(t_kw), "keyword_vectors": t_kw_embed,
                     "keywords_per_user": _mean(t_kw), "keywords_per_uncached_user": _mean(fresh)},
        "users": rows,
    }


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _ci(st: Mapping[str, Any], digits: int = 3) -> str:
    lo, hi = st["ci95"]
    return f"{st['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def movielens_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the summary table: method, HR@k, NDCG@k (mean [95% CI])."""
    k = result["k"]
    header = ["method", f"HR@{k}", f"NDCG@{k}"]
    rows = [[m, _ci(st[f"hr@{k}"]), _ci(st[f"ndcg@{k}"])] for m, st in result["summary"].items()]
    rows += [[f"Δ {name}", _ci(st[f"hr@{k}"], 3), _ci(st[f"ndcg@{k}"], 3)] for name, st in result["paired"].items()]
    return header, rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def movielens_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report of :func:`movielens_benchmark` (with the models in ``result["models"]`` if set)."""
    header, rows = movielens_table(result)
    c, t = result["counts"], result["timing_s"]
    models = result.get("models", {})
    lines = [
        "# Preference keywords vs. real MovieLens users",
        "",
        result["protocol"] + ".",
        "",
        (f"{result['n_users']} users, {c['items']} movies, {c['mean_candidates']:.0f} candidates and "
        f"{c['mean_heldout']:.1f} held-out likes per user on average; seed {result['seed']}."),
    ]
    if models:
        lines.append("Models: " + ", ".join(f"{k} `{v}`" for k, v in models.items()) + ".")
    lines += [(f"Keyword fallbacks (model output padded or replaced by history words): {c['keyword_fallbacks']} of "
              f"{result['n_users']} users; served from cache: {c['keywords_cached']}; "
              f"{t['keywords_per_user']:.2f} s per user."), "", _md_table(header, rows), "",
              "Δ rows: per-user paired differences (first − second) with 95% bootstrap intervals.", ""]
    credit = result.get("credit")
    if credit:
        lines += [f"_{credit}_", ""]
    return "\n".join(lines)


def write_movielens_outputs(result: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out/movielens.json`` (everything, per user too) and ``out/movielens.md``; returns both paths."""
    return _write(result, Path(out), "movielens", movielens_markdown(result))


def _write(result: Mapping[str, Any], out: Path, stem: str, markdown: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(js)
    md.write_text(markdown, encoding="utf-8")
    return js, md


# --------------------------------------------------------------------------- keyword stability


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
                kws, info = _keywords_of(extract_fn(events, items))
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
        return _stat(vals, [g for _, g in got], seed)

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
        "counts": {"mean_events": _mean([r["n_events"] for r in rows]), "histories_truncated": truncated,
                   "keyword_fallbacks": sum(1 for r in rows for v in ("original", "shuffled", "dropped")
                                            if (r.get(f"{v}_info") or {}).get("fallback"))},
        "timing_s": {"total": elapsed, "per_user": elapsed / len(rows), "per_extraction": elapsed / max(n_calls, 1)},
        "users": rows,
    }


def stability_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the stability summary: perturbation, mean Jaccard, share identical."""
    s = result["summary"]
    header = ["perturbation", "Jaccard vs. original", "identical keyword set", "users"]
    rows = [["shuffled order", _ci(s["jaccard_shuffled"]), _ci(s["identical_shuffled"]), str(s["jaccard_shuffled"]["n"])],
            ["one event dropped", _ci(s["jaccard_dropped"]), _ci(s["identical_dropped"]), str(s["jaccard_dropped"]["n"])]]
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
              f"{result['timing_s']['per_user']:.2f} s per user."), "", _md_table(header, rows), ""]
    return "\n".join(lines)


def write_stability_outputs(result: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out/stability.json`` and ``out/stability.md``; returns both paths."""
    return _write(result, Path(out), "stability", stability_markdown(result))


# ------------------------------------------------------------------ leak check and taste hits (sticker users)

TASTE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "cats": ("cat", "kitten", "kitty", "feline", "cat face"),
    "dogs": ("dog", "puppy", "pup", "doggy", "canine", "dog face"),
    "hearts": ("heart", "love", "romance", "romantic", "valentine"),
    "food": ("food", "fruit", "snack", "dessert", "sweets", "dish", "meal", "cooking", "cuisine", "foodie"),
    "space": ("space", "outer space", "rocket", "planet", "astronomy", "cosmos", "galaxy", "universe", "spaceship"),
    "sports": ("sport", "athletics", "athlete", "ball game", "fitness", "workout"),
    "plants": ("plant", "flower", "garden", "gardening", "botany", "tree"),
    "ocean": ("ocean", "sea", "marine", "sea life", "sea animal", "underwater"),
    "music": ("music", "musical", "musician", "musical instrument", "instrument", "song"),
    "weather": ("weather", "sky", "climate", "rain", "cloud", "sun"),
    "spooky": ("spooky", "halloween", "ghost", "horror", "scary", "creepy", "monster"),
    "vehicles": ("vehicle", "car", "transport", "transportation", "automobile"),
}
"""Each hidden sticker-user taste → its direct synonyms (the taste word itself included by :func:`taste_hit`).
Compared by :func:`pmgen.stages.keywords.keyword_key` (plural/case-insensitive) against whole keywords and their words."""


def taste_hit(keywords: Sequence[str], taste: str) -> bool:
    """Whether a keyword (or one word of a keyword) is the hidden taste word or a direct synonym of it."""
    from pmgen.stages.keywords import keyword_key

    wanted = {keyword_key(x) for x in (taste, *TASTE_SYNONYMS.get(taste, ()))}
    for kw in keywords:
        if keyword_key(kw) in wanted or any(keyword_key(w) in wanted for w in kw.split()):
            return True
    return False


def leak_check(users: Sequence[User], items: Mapping[str, Item], extract_fn: KeywordsFn,
               shot_keywords: Iterable[str], seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Keywords of each user's history checked for few-shot leaks, fallbacks and the hidden taste.

    A *leak* is a keyword equal (:func:`~pmgen.stages.keywords.keyword_key`) to a few-shot answer keyword
    (``shot_keywords``) that the user's history does not support (:func:`~pmgen.stages.keywords.is_grounded`
    over :func:`~pmgen.stages.keywords.history_vocabulary`). A *fallback* is a record whose ``fallback`` is
    set (``padded``/``short``: the model gave fewer than ``k``; ``history``: it gave none). A *taste hit*
    is :func:`taste_hit` with the user's hidden ``attributes.taste`` (users without one are not counted).

    Returns:
        ``{"benchmark", "protocol", "n_users", "seed", "summary", "counts", "timing_s", "users"}``;
        ``summary`` holds ``leak_rate``, ``fallback_rate``, ``replaced_rate`` (no model keyword at all)
        and ``taste_hit_rate`` as ``{"mean", "ci95", "n"}``.
    """
    from pmgen.stages.keywords import history_vocabulary, is_grounded, keyword_key

    if not users:
        raise ValueError("leak_check needs at least one user")
    shots = {keyword_key(s) for s in shot_keywords}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n, u in enumerate(users):
        try:
            kws, info = _keywords_of(extract_fn(u.events, items))
        except ValueError as e:
            raise ValueError(f"keywords of user {u.user_id} failed: {e}") from e
        vocab = history_vocabulary(u.events, items)
        leaked = [kw for kw in kws if keyword_key(kw) in shots and not is_grounded(kw, vocab)]
        fb = info.get("fallback") or None
        taste = u.attributes.get("taste")
        rows.append({"user_id": u.user_id, "taste": taste, "keywords": kws, "leaked": leaked, "fallback": fb,
                     "taste_hit": taste_hit(kws, taste) if taste else None})
        if progress is not None:
            progress(n + 1, len(users))
    elapsed = time.perf_counter() - t0
    uids = [r["user_id"] for r in rows]
    tasted = [r for r in rows if r["taste_hit"] is not None]
    summary = {
        "leak_rate": _stat([float(bool(r["leaked"])) for r in rows], uids, seed),
        "fallback_rate": _stat([float(r["fallback"] is not None) for r in rows], uids, seed),
        "replaced_rate": _stat([float(str(r["fallback"] or "").startswith("history:")) for r in rows], uids, seed),
        "taste_hit_rate": _stat([float(r["taste_hit"]) for r in tasted], [r["user_id"] for r in tasted], seed)
        if tasted else {"mean": float("nan"), "ci95": [float("nan")] * 2, "n": 0},
    }
    leaked_words = Counter(w for r in rows for w in r["leaked"])
    return {
        "benchmark": "keyword-leaks",
        "protocol": ("keywords of each user's full history; leak = a few-shot answer keyword the history does not "
                     "support; fallback = keywords padded or replaced by history words; taste hit = the hidden taste "
                     "word or a direct synonym among the keywords; rates with 95% bootstrap intervals over users"),
        "n_users": len(rows), "seed": seed, "summary": summary,
        "counts": {"leaked_words": dict(leaked_words.most_common()),
                   "users_with_leaks": sum(1 for r in rows if r["leaked"])},
        "timing_s": {"total": elapsed, "per_user": elapsed / len(rows)},
        "users": rows,
    }


def leak_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leak-check summary: measure, rate (mean [95% CI]), users."""
    s = result["summary"]
    names = (("few-shot leak (users)", "leak_rate"), ("fallback used (users)", "fallback_rate"),
             ("model gave no keyword (users)", "replaced_rate"), ("hidden taste in keywords", "taste_hit_rate"))
    return ["measure", "rate", "users"], [[label, _ci(s[key]), str(s[key]["n"])] for label, key in names]


def leak_markdown(result: Mapping[str, Any]) -> str:
    """The Markdown report of :func:`leak_check`."""
    header, rows = leak_table(result)
    models = result.get("models", {})
    lines = ["# Preference keywords: few-shot leaks, fallbacks, hidden taste", "", result["protocol"] + ".", "",
             f"{result['n_users']} users of `{result.get('dataset', '?')}` ({result.get('split', '?')} split); "
             f"seed {result['seed']}; {result['timing_s']['per_user']:.2f} s per user."]
    if models:
        lines.append("Models: " + ", ".join(f"{k} `{v}`" for k, v in models.items()) + ".")
    leaked = result["counts"]["leaked_words"]
    lines += ["", _md_table(header, rows), "",
              "Leaked words: " + (", ".join(f"{w} ({n})" for w, n in leaked.items()) if leaked else "none") + ".", ""]
    return "\n".join(lines)


def write_leak_outputs(result: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out/leaks.json`` and ``out/leaks.md``; returns both paths."""
    return _write(result, Path(out), "leaks", leak_markdown(result))


# ------------------------------------------------------------------ non-English histories → English keywords

_MULTILINGUAL: tuple[tuple[str, str, str, tuple[str, str, str]], ...] = (
    # (user id, hidden taste, language, (a chat turn, a search, another chat turn))
    ("ml-es-dogs", "dogs", "es", ("perrito feliz", "pegatinas de perros", "me encantan los perros")),
    ("ml-zh-dogs", "dogs", "zh", ("我非常喜欢小狗的表情包", "小狗", "狗狗太可爱了")),
    ("ml-fr-cats", "cats", "fr", ("j'adore les chats", "chat mignon", "mon chat dort")),
    ("ml-de-cats", "cats", "de", ("Ich liebe Katzen", "Katze Sticker", "meine Katze ist süß")),
    ("ml-ja-cats", "cats", "ja", ("猫が大好き", "猫", "子猫かわいい")),
    ("ml-es-food", "food", "es", ("me encanta la comida", "pastel de chocolate", "tengo hambre, quiero pizza")),
    ("ml-it-food", "food", "it", ("amo la pizza e la pasta", "gelato", "che fame!")),
    ("ml-pt-music", "music", "pt", ("adoro música", "guitarra", "vamos dançar")),
    ("ml-fr-space", "space", "fr", ("j'adore les fusées et les planètes", "fusée", "la lune est belle")),
    ("ml-de-plants", "plants", "de", ("ich liebe Blumen", "Blume", "mein Garten blüht")),
    ("ml-es-ocean", "ocean", "es", ("me encanta el mar", "pez", "ballenas y delfines")),
    ("ml-zh-space", "space", "zh", ("我喜欢火箭和月亮", "火箭", "太空很酷")),
)


def multilingual_users(generic_items: Sequence[str] = ("1F600", "1F44D")) -> list[User]:
    """A small hand-written set of 12 users whose taste is written only in another language.

    Spanish, French, German, Italian, Portuguese, Chinese and Japanese; each user has two chat turns
    and a search in that language (the taste: dogs, cats, food, music, space, plants, ocean) and
    sent two generic stickers (``generic_items``: grinning face, thumbs up), so only the
    non-English text says what the person likes. ``attributes``: ``taste``, ``language``.
    """
    users = []
    for uid, taste, lang, (chat1, search, chat2) in _MULTILINGUAL:
        events = [Event("social", item_id=generic_items[0], value="send", time=1.0),
                  Event("conversation", speaker="user", text=chat1, time=2.0),
                  Event("search", text=search, time=3.0),
                  Event("social", item_id=generic_items[-1], value="send", time=4.0),
                  Event("conversation", speaker="user", text=chat2, time=5.0)]
        users.append(User(uid, events, attributes={"taste": taste, "language": lang}))
    return users


def is_english_keyword(keyword: str, english: Collection[str]) -> bool:
    """Whether every word of a keyword is an English word (``english``: catalog and emoji-name words)."""
    from pmgen.stages.keywords import STOPWORDS, keyword_key

    words = [w for w in keyword.lower().replace("-", " ").split() if w]
    return bool(words) and all(w in STOPWORDS or w in english or keyword_key(w) in english for w in words)


def multilingual_check(items: Mapping[str, Item], extract_fn: KeywordsFn, users: Sequence[User] | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """Keywords of :func:`multilingual_users`: are they English, and do they name the taste?

    English words: every word of the catalog (titles, texts) and of the ``emoji`` package's English
    names, keyed with :func:`~pmgen.stages.keywords.keyword_key`. Reported per user and as
    ``english_rate`` (mean share of a user's keywords that are English) and ``taste_hit_rate``
    (:func:`taste_hit`), with 95% bootstrap intervals over users.
    """
    from pmgen.stages.keywords import _TOKEN, english_words, keyword_key

    users = list(users) if users is not None else multilingual_users()
    english = {keyword_key(w) for it in items.values() for w in _TOKEN.findall(f"{it.title} {it.text}".lower())}
    english |= {keyword_key(w) for w in english_words()}
    rows = []
    for u in users:
        kws, info = _keywords_of(extract_fn(u.events, items))
        eng = [k for k in kws if is_english_keyword(k, english)]
        rows.append({"user_id": u.user_id, "language": u.attributes.get("language"), "taste": u.attributes["taste"],
                     "keywords": kws, "non_english": [k for k in kws if k not in eng],
                     "english_share": len(eng) / len(kws) if kws else 0.0,
                     "taste_hit": taste_hit(kws, u.attributes["taste"]), "fallback": info.get("fallback")})
    uids = [r["user_id"] for r in rows]
    return {"benchmark": "multilingual-keywords", "n_users": len(rows), "seed": seed,
            "summary": {"english_rate": _stat([r["english_share"] for r in rows], uids, seed),
                        "taste_hit_rate": _stat([float(r["taste_hit"]) for r in rows], uids, seed)},
            "users": rows}
