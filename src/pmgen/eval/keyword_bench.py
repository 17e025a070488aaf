"""What the benchmarks of the preference-keyword stage share (no image is generated in any of them).

* :mod:`pmgen.eval.movielens` — do the keywords predict what a real user likes next?
  (``pmgen evaluate-movielens``);
* :mod:`pmgen.eval.stability` — are they a stable description of the person? (``pmgen evaluate-stability``);
* :mod:`pmgen.eval.leaks` — few-shot leaks, fallbacks and the hidden taste; non-English histories
  (``pmgen evaluate-leaks``).

Every core takes its models as plain functions (text → vectors, events → keywords), so tests run
them with a hashing bag-of-words encoder and a deterministic keyword function; the CLI passes the
preset's text encoder and LLM (keywords cached in the SQLite :class:`~pmgen.stages.keywords.KeywordCache`,
so reruns are free).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pmgen.data.schema import Dataset, Event, Item, User

__all__ = ["KeywordsFn", "Progress", "evaluation_users", "keywords_of", "md_table", "seeded_subset", "write_result"]

KeywordsFn = Callable[[Sequence[Event], Mapping[str, Item]], Any]
"""``(events, items)`` → keywords: a list of strings, or a :class:`~pmgen.stages.keywords.Keywords` record."""
Progress = Callable[[int, int], None]
"""``progress(done, total)``, called after each user."""


def keywords_of(result: Any) -> tuple[list[str], dict[str, Any]]:
    """A keyword function's result → (keywords, recorded details); accepts lists and ``Keywords`` records."""
    if hasattr(result, "keywords"):
        info = {"fallback": getattr(result, "fallback", None), "cached": bool(getattr(result, "cached", False)),
                "n_events": getattr(result, "n_events", None), "n_kept": getattr(result, "n_kept", None),
                "n_from_model": getattr(result, "n_from_model", None)}
        return [str(k) for k in result.keywords], info
    if isinstance(result, str):
        raise TypeError("the keyword function must return a list of keywords (or a Keywords record), not a string")
    return [str(k) for k in result], {}


def seeded_subset(users: Sequence[User], n_users: int | None, seed: int) -> list[User]:
    """A seeded random ``n_users`` of ``users``, in their order (all of them when ``n_users`` is ``None``
    or not smaller)."""
    if n_users is None or n_users >= len(users):
        return list(users)
    picked = set(random.Random(seed).sample([u.user_id for u in users], n_users))
    return [u for u in users if u.user_id in picked]


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
    return seeded_subset([ds.users[u] for u in ids], n_users, seed)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_result(result: Mapping[str, Any], out: str | Path, stem: str, markdown: str) -> tuple[Path, Path]:
    """``out/<stem>.json`` (the whole result, written temp + rename) and ``out/<stem>.md``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(js)
    md.write_text(markdown, encoding="utf-8")
    return js, md
