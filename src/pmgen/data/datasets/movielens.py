"""``movielens``: MovieLens-100k real users, from the copy inside the PyPI ``recbole`` wheel.

Items are movies (``title (year)``, genres); each user's ratings are ``rating`` events in time
order. Users are split user-disjoint (80/10/10, fixed seed). Within every user, the earliest 80% of
ratings are the history (``users.jsonl``) and the later ratings of 4 or 5 stars are the user's
held-out set (``samples.jsonl``: ``heldout``; ``target_id`` is the first of them). Users with no later
high rating get no sample.

MovieLens is © GroupLens Research, University of Minnesota; its usage terms apply
(https://grouplens.org/datasets/movielens/100k/): research use, no redistribution, cite
F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 2015.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pmgen.data.datasets.base import build_atomically, is_built, user_disjoint_splits
from pmgen.data.schema import Event, Item, Sample, User, write_jsonl
from pmgen.paths import package_dir

VERSION = 1
CREDIT = ("MovieLens-100k © GroupLens Research (F. M. Harper, J. A. Konstan, ACM TiiS 2015); "
          "GroupLens usage terms apply.")
HISTORY_FRACTION = 0.8
LIKED_MIN_RATING = 4.0


def source_dir() -> Path:
    path = package_dir("recbole") / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise FileNotFoundError(f"MovieLens-100k not found at {path}; install `pip install --no-deps recbole`")
    return path


def _read_atomic(path: Path) -> list[dict[str, str]]:
    """Read a RecBole atomic file (TSV with ``name:type`` headers) into dicts keyed by ``name``."""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader)]
        return [dict(zip(header, row)) for row in reader if row]


def ratings() -> list[tuple[str, str, float, float]]:
    """Every rating of MovieLens-100k as shipped: ``(user_id, item_id, rating, timestamp)``, file order
    (100,000 rows; ids as in ``items.jsonl`` / ``users.jsonl``)."""
    return [(r["user_id"], r["item_id"], float(r["rating"]), float(r["timestamp"]))
            for r in _read_atomic(source_dir() / "ml-100k.inter")]


def build(data_root: Path, force: bool = False, seed: int = 0) -> Path:
    folder = data_root / "movielens"
    params = {"seed": seed}
    if not force and is_built(folder, VERSION, params):
        return folder
    src = source_dir()

    def write(tmp: Path) -> dict[str, Any]:
        items = []
        for r in _read_atomic(src / "ml-100k.item"):
            genres = r.get("class", "").split()
            year = r.get("release_year", "").strip()
            title = r["movie_title"].strip() + (f" ({year})" if year else "")
            items.append(Item(id=r["item_id"], title=title, text="genres: " + ", ".join(genres),
                              attributes={"year": int(year) if year.isdigit() else None, "genres": genres}))
        profiles = {r["user_id"]: r for r in _read_atomic(src / "ml-100k.user")}
        by_user: dict[str, list[tuple[float, str, float]]] = {}
        for r in _read_atomic(src / "ml-100k.inter"):
            by_user.setdefault(r["user_id"], []).append((float(r["timestamp"]), r["item_id"], float(r["rating"])))
        splits = user_disjoint_splits(list(by_user), seed)
        users, samples = [], []
        n_heldout = 0
        for uid in sorted(by_user, key=int):
            rows = sorted(by_user[uid])
            cut = max(1, int(len(rows) * HISTORY_FRACTION))
            hist, later = rows[:cut], rows[cut:]
            p = profiles.get(uid, {})
            users.append(User(uid, [Event("rating", item_id=i, value=v, time=t) for t, i, v in hist],
                              {"age": p.get("age"), "gender": p.get("gender"), "occupation": p.get("occupation"),
                               "split": splits[uid]}))
            liked = list(dict.fromkeys(i for _, i, v in later if v >= LIKED_MIN_RATING))
            if liked:
                n_heldout += len(liked)
                samples.append(Sample(sample_id=f"ml{uid}", user_id=uid, target_id=liked[0], split=splits[uid],
                                      heldout=liked))
        write_jsonl(tmp / "items.jsonl", items)
        write_jsonl(tmp / "users.jsonl", users)
        write_jsonl(tmp / "samples.jsonl", samples)
        return {"description": "MovieLens-100k: earlier ratings as history, later 4-5 star ratings held out",
                "license": CREDIT, "rating_scale": [1, 5], "seed": seed,
                "counts": {"items": len(items), "users": len(users), "ratings": sum(len(v) for v in by_user.values()),
                           "history_events": sum(len(u.events) for u in users), "samples": len(samples),
                           "heldout_likes": n_heldout,
                           "users_per_split": {s: sum(1 for u in users if u.attributes["split"] == s)
                                               for s in ("train", "val", "test")}}}

    return build_atomically(folder, write, VERSION, params)
