"""Catalog search for the page, and the target of a chat message (as in ``pmgen demo``).

    hits = search(ds.items, "cat heart", limit=20)           # best first
    item = target_from_message(ds.items, "hahaha that's hilarious")   # → "face with tears of joy"

Scoring is plain word overlap: a query word in the title counts 3, in the tags or aliases 2, in
the rest of the text 1; an exact title match wins; ties go to the earlier item in the catalog.
Deterministic, no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from pmgen.data.schema import Event, Item

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


@dataclass(frozen=True)
class _Entry:
    item: Item
    title: str
    title_words: frozenset[str]
    tag_words: frozenset[str]
    text_words: frozenset[str]


class Catalog:
    """An index over a dataset's items for :meth:`search` (built once; read-only)."""

    def __init__(self, items: Mapping[str, Item]):
        self.items = items
        self._entries = []
        for it in items.values():
            attrs = it.attributes or {}
            tags = [str(t) for key in ("tags", "aliases", "genres") for t in (attrs.get(key) or [])
                    if isinstance(attrs.get(key), (list, tuple))]
            self._entries.append(_Entry(it, it.title.lower().strip(), frozenset(_words(it.title)),
                                        frozenset(_words(" ".join(tags))), frozenset(_words(it.text))))

    def search(self, q: str, limit: int = 24) -> list[Item]:
        """Items best matching ``q`` (all words scored; ties in catalog order); empty ``q`` → the first."""
        words = _words(q)
        if not words:
            return [e.item for e in self._entries[:limit]]
        phrase = q.lower().strip()
        scored = []
        for i, e in enumerate(self._entries):
            s = sum(3 * (w in e.title_words) + 2 * (w in e.tag_words) + (w in e.text_words) for w in words)
            if e.title == phrase:
                s += 100
            if s:
                scored.append((-s, i, e.item))
        scored.sort(key=lambda t: t[:2])
        return [t[2] for t in scored[:limit]]

    def target_from_message(self, message: str) -> Item | None:
        """The catalog item a chat message asks for: its emotion/action cues (the words the target
        keywords use, :func:`pmgen.stages.keywords.deterministic_target_keywords`), then its words."""
        from pmgen.stages.keywords import deterministic_target_keywords

        convo = [Event("conversation", text=message, speaker="user")]
        cues = deterministic_target_keywords(None, convo, k=8)
        for query in (" ".join(cues[:3]), " ".join(cues), message):
            hits = self.search(query, limit=1)
            if query.strip() and hits:
                return hits[0]
        return None
