"""The **preference background** of a preset: other users' preference texts, the reference against
which the selection's ``contrast`` measures a user's fit (:func:`pmgen.stages.select.select`).

It is built from the *training* users of a dataset (never the val/test users that are evaluated):
their preference keywords, extracted by the preset's own LLM exactly as at generation time, joined
the way the selector reads them. The file is plain JSON (``{"format", "texts", ...}``); written to a
temporary file and renamed into place, and only over a file that is itself a pmgen background.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, TYPE_CHECKING

from pmgen.paths import write_text_atomically

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

FORMAT = "pmgen-preference-background"


def preference_texts(pmg: PMG, ds: Any, split: str = "train", n_users: int = 240, seed: int = 0,
                     batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """The joined preference keywords of ``n_users`` users of ``split`` (a fixed random choice by ``seed``),
    extracted in batches (:func:`preference_keywords_by_user`, cached); users whose history yields no
    keywords are skipped."""
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    users = sorted({s.user_id for s in ds.split(split)})
    if not users:
        raise ValueError(f"dataset {ds.name!r} has no {split} users")
    random.Random(seed).shuffle(users)
    by_user = preference_keywords_by_user(pmg.extractor(), ds, users[:n_users], batch_size, progress)
    return [text for text in by_user.values() if text]


def preference_keywords_by_user(extractor: Any, ds: Any, users: list[str], batch_size: int = 8,
                                progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """``{user id: joined preference keywords}`` of ``users`` (in their order) of dataset ``ds``, extracted from
    each user's whole history by ``extractor`` (a :class:`pmgen.stages.keywords.PreferenceExtractor`) in
    batches of ``batch_size`` (its ``extract_many``, cached); ``""`` where a history yields none."""
    from pmgen.stages.condition import keywords_text

    out: dict[str, str] = {}
    for i in range(0, len(users), batch_size):
        chunk = users[i:i + batch_size]
        results = extractor.extract_many([(ds.users[u].events, ds.items) for u in chunk])
        for u, res in zip(chunk, results):
            out[u] = "" if isinstance(res, Exception) else keywords_text(res.keywords)
        if progress is not None:
            progress(min(i + batch_size, len(users)), len(users))
    return out


def write_background(out: str | os.PathLike[str], texts: list[str], about: dict[str, Any]) -> Path:
    """Write ``{"format", "texts", **about}`` to ``out`` atomically. An existing ``out`` is replaced only
    if it is a pmgen preference background (anything else raises ``FileExistsError``, untouched)."""
    out = Path(out)
    if out.exists():
        try:
            ok = out.is_file() and json.loads(out.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise FileExistsError(f"{out} exists and is not a pmgen preference background; not overwritten")
    return write_text_atomically(out, json.dumps({"format": FORMAT, **about, "texts": texts}, indent=1,
                                                 ensure_ascii=False) + "\n")
