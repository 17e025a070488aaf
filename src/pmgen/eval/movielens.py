"""Do the preference keywords predict what a real user likes next? — :func:`movielens_benchmark`
(``pmgen evaluate-movielens``; the keywords :class:`~pmgen.stages.keywords.PreferenceExtractor` writes,
no image is generated).

On MovieLens-100k (dataset ``movielens``) each user's earliest 80% of ratings are the history and
the later 4–5★ movies are the held-out likes (``Sample.heldout``).
For every **test-split** user with a sample, the candidates are all catalog movies not in the
user's history; they are ranked by cosine similarity between a *profile vector* and each movie's
text vector (``"title (year): genres"``, e.g. ``"Toy Story (1995): Animation, Children's, Comedy"``;
sentence vectors of the preset's text encoder, all-MiniLM-L6-v2 for ``sticker-tiny``). Metrics are
HR@k (a held-out like in the top k) and NDCG@k (binary relevance; ideal DCG has
``min(#likes, k)`` ones), averaged over users with 95% bootstrap intervals
(:func:`pmgen.eval.stats.bootstrap_ci`). Methods (profile vectors):

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
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pmgen.data.schema import Dataset, Item, Sample, User
from pmgen.eval.keyword_bench import (
    KeywordsFn,
    Progress,
    evaluation_users,
    keywords_of,
    md_table,
    seeded_subset,
    write_result,
)
from pmgen.eval.stats import format_ci, mean_ci, mean_or_nan

__all__ = ["MOVIELENS_METHODS", "encoder_text_vectors", "hr_ndcg_at_k", "movie_text", "movielens_benchmark",
           "movielens_markdown", "movielens_table", "popularity_counts", "rerank_scores", "tune_rerank",
           "write_movielens_outputs"]

TextVectorsFn = Callable[[Sequence[str]], Any]
"""Texts → ``[len(texts), d]`` vectors (a tensor or anything ``torch.as_tensor`` takes)."""

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


def popularity_counts(users: Iterable[User]) -> Counter[str]:
    """Number of history events per item over ``users`` (their ``events`` only — never held-out data)."""
    counts: Counter[str] = Counter()
    for u in users:
        counts.update(e.item_id for e in u.events if e.item_id)
    return counts


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


def _heldout_users(ds: Dataset, split: str) -> tuple[list[User], dict[str, Sample]]:
    """Users of ``split`` with held-out likes (in :func:`evaluation_users` order) and each one's first such sample."""
    samples: dict[str, Sample] = {}
    for s in ds.split(split):
        if s.heldout:
            samples.setdefault(s.user_id, s)
    users = [u for u in evaluation_users(ds, None, split) if u.user_id in samples] if samples else []
    return users, samples


def _user_parts(u: User, index: Mapping[str, int], n_items: int, sample: Sample) -> tuple[torch.Tensor, list[str]]:
    """A user's candidates (every item not in the history: ``[n_items]`` bool) and held-out likes among them."""
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
    users, samples = _heldout_users(ds, split)
    if not users:
        raise ValueError(f"dataset {ds.name!r} has no {split!r} users with held-out likes to tune the re-ranking on")
    users = seeded_subset(users, n_users, seed)
    ids = list(ds.items)
    index = {iid: i for i, iid in enumerate(ids)}
    if item_vecs is None:
        item_vecs = _vectors(text_vectors_fn, [movie_text(ds.items[i]) for i in ids])
    pop = popularity_counts(ds.users.values())
    pop_scores = torch.tensor([float(pop.get(i, 0)) for i in ids])
    kws = []
    for n, u in enumerate(users):
        kws.append(keywords_of(keywords_fn(u.events, ds.items))[0])
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
            grid[f"{top_n},{w}"] = mean_or_nan(vals)
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
    users, samples = _heldout_users(ds, "test")
    if not samples:
        raise ValueError(f"dataset {ds.name!r} has no test samples with held-out likes (`heldout`); "
                         "the benchmark needs the `movielens` dataset")
    if n_users is not None and n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    users = seeded_subset(users, n_users, seed)

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
            kws, info = keywords_of(keywords_fn(u.events, ds.items))
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
        cand_mask, relevant = _user_parts(u, index, len(ids), samples[u.user_id])
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
    summary = {m: {name: mean_ci([r["metrics"][m][name] for r in rows], uids, seed) for name in names}
               for m in methods}
    paired = {f"{a} - {b}": {name: mean_ci([r["metrics"][a][name] - r["metrics"][b][name] for r in rows], uids, seed)
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
                                                                                        "popularity_ndcg", "grid")}}
                                                   if tuned else {})},
        "summary": summary, "paired": paired,
        "counts": {"items": len(ids),
                   "mean_candidates": mean_or_nan([r["n_candidates"] for r in rows]),
                   "mean_heldout": mean_or_nan([r["n_heldout"] for r in rows]),
                   "mean_history": mean_or_nan([r["n_history"] for r in rows]),
                   "keyword_fallbacks": n_fallback, "keywords_cached": n_cached},
        "timing_s": {"item_vectors": t_items, "keywords_total": sum(t_kw), "keyword_vectors": t_kw_embed,
                     "keywords_per_user": mean_or_nan(t_kw), "keywords_per_uncached_user": mean_or_nan(fresh)},
        "users": rows,
    }


def movielens_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the summary table: method, HR@k, NDCG@k (mean [95% CI])."""
    k = result["k"]
    header = ["method", f"HR@{k}", f"NDCG@{k}"]
    rows = [[m, format_ci(st[f"hr@{k}"]), format_ci(st[f"ndcg@{k}"])] for m, st in result["summary"].items()]
    rows += [[f"Δ {name}", format_ci(st[f"hr@{k}"], 3), format_ci(st[f"ndcg@{k}"], 3)]
             for name, st in result["paired"].items()]
    return header, rows



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
              f"{t['keywords_per_user']:.2f} s per user."), "", md_table(header, rows), "",
              "Δ rows: per-user paired differences (first − second) with 95% bootstrap intervals.", ""]
    credit = result.get("credit")
    if credit:
        lines += [f"_{credit}_", ""]
    return "\n".join(lines)


def write_movielens_outputs(result: Mapping[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out/movielens.json`` (everything, per user too) and ``out/movielens.md``; returns both paths."""
    return write_result(result, out, "movielens", movielens_markdown(result))
