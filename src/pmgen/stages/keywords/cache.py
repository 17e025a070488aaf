"""The keyword record (:class:`Keywords`) and its SQLite store (:class:`KeywordCache`).

A cache key is the verbalized input and ``k``, the model (:func:`model_id`: name + content hash), the
prompt version and a hash of the settings: change any of them and the old rows are never read.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from pmgen.paths import cache_dir
from pmgen.stages.keywords.parse import keyword_key

# ------------------------------------------------------------------------------------- records


@dataclass
class Keywords:
    """The result of one keyword request.

    Attributes:
        keywords: the clean keywords (``len <= k``; ``k`` whenever a history fallback can fill it).
        raw: the model's raw output (``""`` when no model ran).
        fallback: ``None`` when every keyword came from the model (or no model was asked, see
            ``model``); otherwise why and how other keywords were used, starting with one of
            ``"history:"``/``"deterministic:"`` (the model gave nothing usable; e.g.
            ``"history: model output had no usable keywords; 8 history keywords used instead"``),
            ``"padded:"`` (the model gave fewer than ``k``; the rest were added) or ``"short:"``
            (fewer than ``k`` and nothing left to add).
        n_from_model: how many of ``keywords`` came from the model output.
        n_events: events in the history; ``n_kept``: events the model saw (newest first, budget).
        history_tokens: tokens of the verbalized history the model saw.
        model: the model's name (``""`` for the deterministic path).
        prompt_version: the prompt version (``"none"`` for the deterministic path).
        timings_s: seconds per step (``verbalize``, ``llm``, ``parse``, ``cache``, ``total``).
        cached: ``True`` when the record came from the :class:`KeywordCache`.
        kind: ``"preference"`` or ``"target"``.
        dropped: model keywords removed because the history does not support them (grounding).
        n_renderings: how many renderings of the history the model read (permutation self-consistency).
    """

    keywords: list[str]
    raw: str = ""
    fallback: str | None = None
    n_from_model: int = 0
    n_events: int = 0
    n_kept: int = 0
    history_tokens: int = 0
    model: str = ""
    prompt_version: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    kind: str = "preference"
    dropped: list[str] = field(default_factory=list)
    n_renderings: int = 1

    @property
    def truncated(self) -> bool:
        """Whether the history was cut to fit the token budget."""
        return self.n_kept < self.n_events

    @property
    def text(self) -> str:
        """The keywords as one comma-separated string (what the text encoder reads)."""
        return ", ".join(self.keywords)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["truncated"] = self.truncated
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Keywords":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in obj.items() if k in names})


# --------------------------------------------------------------------------------------- cache


class KeywordCache:
    """Keyword records in an embedded SQLite database (stdlib ``sqlite3``).

    Keyed by ``(input_sha256, model, prompt, settings)``: the sha256 of the verbalized input and
    ``k``, the model name + content hash, the prompt version, and a hash of the decoding/parsing
    settings. Each call opens its own connection, so one cache object is safe across threads and
    processes; the database runs in WAL mode (readers never block on a writer) and every write is
    one transaction (``INSERT OR REPLACE``), so a crash never leaves a half-written row.

    Args:
        path: the database file (default ``<cache dir>/keywords.sqlite``); created when missing.
        timeout: seconds to wait for a lock held by another writer.
    """

    def __init__(self, path: str | Path | None = None, timeout: float = 30.0):
        self.path = Path(path) if path is not None else cache_dir() / "keywords.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        con = self._connect()
        try:
            con.execute("PRAGMA journal_mode=WAL")
            with con:
                con.execute(
                    "CREATE TABLE IF NOT EXISTS keywords ("
                    " input_sha256 TEXT NOT NULL, model TEXT NOT NULL, prompt TEXT NOT NULL,"
                    " settings TEXT NOT NULL, kind TEXT NOT NULL, record TEXT NOT NULL, created REAL NOT NULL,"
                    " PRIMARY KEY (input_sha256, model, prompt, settings))")
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=self.timeout)

    @staticmethod
    def key(input_text: str, k: int, model: str, prompt: str, settings: Mapping[str, Any] | None = None
            ) -> tuple[str, str, str, str]:
        """The cache key of one request (all four parts are plain strings)."""
        sha = hashlib.sha256(f"{input_text}\n\x00k={k}".encode("utf-8")).hexdigest()
        s = hashlib.sha256(json.dumps(settings or {}, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return sha, model, prompt, s

    def get(self, key: tuple[str, str, str, str]) -> Keywords | None:
        """The cached record for ``key`` (with ``cached=True``), or ``None``."""
        con = self._connect()
        try:
            row = con.execute("SELECT record FROM keywords WHERE input_sha256=? AND model=? AND prompt=? AND settings=?",
                              key).fetchone()
        finally:
            con.close()
        if row is None:
            return None
        return replace(Keywords.from_json(json.loads(row[0])), cached=True)

    def put(self, key: tuple[str, str, str, str], record: Keywords) -> None:
        """Store ``record`` under ``key`` in one transaction (replaces an existing row)."""
        data = json.dumps({**record.to_json(), "cached": False}, ensure_ascii=False)
        con = self._connect()
        try:
            with con:  # BEGIN … COMMIT (ROLLBACK on error)
                con.execute("INSERT OR REPLACE INTO keywords VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (*key, record.kind, data, time.time()))
        finally:
            con.close()

    def __len__(self) -> int:
        con = self._connect()
        try:
            return int(con.execute("SELECT COUNT(*) FROM keywords").fetchone()[0])
        finally:
            con.close()

    def clear(self) -> None:
        """Delete every row."""
        con = self._connect()
        try:
            with con:
                con.execute("DELETE FROM keywords")
        finally:
            con.close()


def model_id(llm: Any) -> str:
    """``name@content_hash`` of a chat model (``name`` alone when it has no hash)."""
    name = str(getattr(llm, "name", type(llm).__name__))
    h = str(getattr(llm, "content_hash", "") or "")
    return f"{name}@{h}" if h else name



def _with_fallback(from_model: list[str], k: int, pad: bool, raw: str, backup: Callable[[], list[str]],
                   source: str = "history") -> tuple[list[str], str | None]:
    """Combine model keywords with ``source`` (backup) keywords; the reason is returned, never silent."""
    if len(from_model) >= k:
        return from_model[:k], None
    if not from_model:
        why = "model output was empty" if not raw.strip() else "model output had no usable keywords"
        extra = backup()[:k]
        return extra, f"{source}: {why}; {len(extra)} {source} keywords used instead"
    if not pad:
        return from_model, None
    have = {keyword_key(x) for x in from_model}
    extra = [x for x in backup() if keyword_key(x) not in have][: k - len(from_model)]
    if not extra:
        return from_model, f"short: model gave {len(from_model)} of {k}; no {source} keywords left to add"
    return from_model + extra, f"padded: model gave {len(from_model)} of {k}; {len(extra)} {source} keywords added"
