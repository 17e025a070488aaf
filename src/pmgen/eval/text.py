"""Does the personalized text speak to the user, and does it stay true to the item? (MovieLens-100k)

For held-out MovieLens users the target is a movie they rated 4–5 stars *after* their history. pmgen
writes a one-line pitch for it at weights ``0`` (plain: no preference) and ``w > 0`` (guided by the
user's preference keywords, :mod:`pmgen.stages.text`) and chooses one by ``z``. A scorer the selection
never uses grades the texts, by the words they contain:

* **taste**: the text names one of the genres the user's history over-represents (the user's top 3 by
  lift: share of the user's 4–5-star history ratings in the genre / the genre's share over all
  ratings, at least 2 such ratings), through a genre word list (:data:`GENRE_WORDS`);
* **faithful**: the title is kept, no other movie's title appears, no number the facts lack, and no
  genre word the movie does not have.

The gain is personalized − plain per user, paired, with a 95% bootstrap interval over users.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

from pmgen.data.schema import Dataset, Item, User
from pmgen.eval.keyword_bench import evaluation_users
from pmgen.eval.stats import mean_ci
from pmgen.stages.text import TitleIndex, faithfulness, mentions

GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "Action": ("action",), "Adventure": ("adventure", "adventures"), "Animation": ("animated", "animation"),
    "Children's": ("children", "kids", "family"), "Comedy": ("comedy", "comedic"), "Crime": ("crime",),
    "Documentary": ("documentary",), "Drama": ("drama", "dramatic"), "Fantasy": ("fantasy",),
    "Film-Noir": ("noir",), "Horror": ("horror",), "Musical": ("musical",), "Mystery": ("mystery",),
    "Romance": ("romance", "romantic", "love story"), "Sci-Fi": ("sci fi", "science fiction", "scifi"),
    "Thriller": ("thriller",), "War": ("war",), "Western": ("western",),
}
"""Words that name each MovieLens genre in a text (whole words, case-insensitive)."""
LIKED = 4.0


def genres_of(item: Item) -> list[str]:
    return list(item.attributes.get("genres") or [])


def named_genres(text: str) -> set[str]:
    """The genres a text names (:data:`GENRE_WORDS`)."""
    return {g for g, words in GENRE_WORDS.items() if any(mentions(text, w) for w in words)}


def genre_shares(users: Sequence[User], items: Mapping[str, Item]) -> dict[str, float]:
    """Each genre's share over all liked (4–5 star) history ratings of ``users``."""
    c: Counter[str] = Counter()
    for u in users:
        for e in u.events:
            if e.type == "rating" and (e.value or 0) >= LIKED and e.item_id in items:
                c.update(genres_of(items[e.item_id]))
    total = sum(c.values()) or 1
    return {g: n / total for g, n in c.items()}


def top_genres(user: User, items: Mapping[str, Item], shares: Mapping[str, float], k: int = 3,
               min_count: int = 2) -> list[str]:
    """The ``k`` genres the user's liked history over-represents most (lift over ``shares``)."""
    c: Counter[str] = Counter()
    for e in user.events:
        if e.type == "rating" and (e.value or 0) >= LIKED and e.item_id in items:
            c.update(genres_of(items[e.item_id]))
    total = sum(c.values()) or 1
    lift = {g: (n / total) / shares[g] for g, n in c.items() if n >= min_count and shares.get(g)}
    return sorted(lift, key=lambda g: (-lift[g], g))[:k]


def grade(text: str, item: Item, titles: TitleIndex, user_top: Sequence[str]) -> dict[str, Any]:
    """The independent grades of one text (see the module docstring)."""
    f = faithfulness(text, item, titles)
    named = named_genres(text)
    wrong = sorted(named - set(genres_of(item)))
    return {"taste": float(bool(named & set(user_top))), "title_kept": f.title_kept,
            "other_title": bool(f.other_titles), "invented_number": bool(f.invented_numbers),
            "wrong_genres": wrong,
            "faithful": float(f.title_kept and not f.other_titles and not f.invented_numbers and not wrong)}


def run_text_eval(pmg: Any, ds: Dataset, n_users: int = 100, split: str = "test",
                  weights: Sequence[float] = (0.0, 1.0, 2.0), alpha: float | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Plain vs. personalized pitches for ``n_users`` held-out MovieLens users (see the module docstring)."""
    first: dict[str, Any] = {}
    for s in ds.split(split):  # each user's first sample: its target is the user's first later like
        first.setdefault(s.user_id, s)
    users = [u for u in evaluation_users(ds, None, split) if u.user_id in first][:n_users]
    titles = TitleIndex(ds.items)
    shares = genre_shares([ds.users[u] for u in ds.user_split("train") if u in ds.users], ds.items)
    rows, t0 = [], time.perf_counter()
    for i, user in enumerate(users):
        target = ds.items[first[user.user_id].target_id]
        res = pmg.generate_text(user, target, ds.items, weights=weights, alpha=alpha, titles=titles)
        top = top_genres(user, ds.items, shares)
        plain, chosen = res.candidates[0], res.candidates[res.chosen]
        w1 = next((c for c in res.candidates if c.weight == 1.0), chosen)
        rows.append({"user_id": user.user_id, "target": target.title, "genres": genres_of(target),
                     "user_top_genres": top, "keywords": res.keywords,
                     "plain": {"text": plain.text, **grade(plain.text, target, titles, top)},
                     "chosen": {"text": chosen.text, "weight": chosen.weight,
                                **grade(chosen.text, target, titles, top)},
                     "w1": {"text": w1.text, **grade(w1.text, target, titles, top)},
                     "seconds": res.seconds})
        if progress:
            progress(i + 1, len(users))
    return {"dataset": ds.name, "split": split, "n_users": len(rows), "weights": list(weights),
            "summary": summarize(rows), "rows": rows, "seconds": time.perf_counter() - t0}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means with 95% CIs over users: taste and faithfulness of each text, the paired gains, and the
    faithfulness ratio personalized / plain."""
    ids = [r["user_id"] for r in rows]
    out: dict[str, Any] = {}
    for which in ("plain", "chosen", "w1"):
        for m in ("taste", "faithful"):
            out[f"{which}_{m}"] = mean_ci([r[which][m] for r in rows], ids)
    for which in ("chosen", "w1"):
        out[f"{which}_taste_gain"] = mean_ci([r[which]["taste"] - r["plain"]["taste"] for r in rows], ids)
        plain_f = out["plain_faithful"]["mean"]
        out[f"{which}_faithful_ratio"] = out[f"{which}_faithful"]["mean"] / plain_f if plain_f else float("nan")
    out["chosen_personalized_share"] = sum(r["chosen"]["weight"] > 0 for r in rows) / max(1, len(rows))
    return out
