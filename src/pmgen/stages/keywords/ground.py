"""What a history supports: the non-LLM fallback keywords, the history vocabulary, grounding, voting.

* :func:`history_keywords` — the most distinctive item words of a history (tf-idf against the catalog),
  used, and stated in the record, when the model gives fewer than ``k`` usable keywords.
* :func:`history_vocabulary`, :func:`is_grounded` — drop keywords the history does not support.
* :func:`support_counts`, :func:`keyword_support` — how many liked items back a keyword (ranking).
* :func:`vote_keywords`, :func:`votes_of` — aggregate the keyword lists of several renderings.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

from pmgen.data.schema import Event, Item
from pmgen.stages.keywords.parse import (
    _TOKEN,
    STOPWORDS,
    _content_words,
    _echoes_instructions,
    keyword_key,
)
from pmgen.stages.verbalize import item_tags, newest_first


def _liked(event: Event) -> bool:
    """Events that count as positive evidence: everything except ratings below 3 (of 5)."""
    return not (event.type == "rating" and isinstance(event.value, (int, float)) and event.value < 3)


_DF_CACHE: list[tuple[Mapping[str, Item], int, Counter[str]]] = []


def catalog_df(items: Mapping[str, Item]) -> tuple[Counter[str], int]:
    """Document frequencies of the word keys over a catalog (title + text of each item), and its size.

    The last catalog's counts are kept (same mapping object and size: ~0.1 s saved per call on the
    4,500 stickers); treat the returned counter as read-only.
    """
    if _DF_CACHE and _DF_CACHE[0][0] is items and _DF_CACHE[0][1] == len(items):
        return _DF_CACHE[0][2], len(items)
    df: Counter[str] = Counter()
    for it in items.values():
        df.update({keyword_key(w) for w in _content_words(f"{it.title} {it.text}")})
    _DF_CACHE[:] = [(items, len(items), df)]
    return df, len(items)


def keyword_idf(keyword: str, df: Mapping[str, int], n: int) -> float:
    """How distinctive a keyword is in the catalog: the largest ``log((n + 1) / (df + 1)) + 1`` of its words.

    A fixed, history-independent tie-breaker: between equally supported keywords the rarer one ranks
    first, whatever order the LLM named them in.
    """
    words = [keyword_key(w) for w in re.split(r"[\s\-]+", keyword.lower()) if w and w not in STOPWORDS]
    return max([_idf(w, df, n) for w in words] or [0.0])


def _idf(key: str, df: Mapping[str, int], n: int) -> float:
    """``log((n + 1) / (df + 1)) + 1`` of one word key over a catalog of ``n`` items."""
    return math.log((n + 1) / (df.get(key, 0) + 1)) + 1


def history_keywords(events: Sequence[Event], items: Mapping[str, Item], k: int = 8,
                     exclude: Iterable[str] = (), free_text: bool = False) -> list[str]:
    """The non-LLM keywords of a history: its most distinctive item words, up to ``k``.

    Each word is scored ``count × idf``: ``count`` = number of (positive) events whose item title /
    text (tags) contains it; ``idf = log((N + 1) / (df + 1)) + 1`` with ``df`` the number of
    catalog items (``items``) containing it, so catalog-wide words ("face", "drama") rank below
    distinctive ones ("cat", "rocket"). Free user text (searches, reviews, chat, notes) is **not**
    read unless ``free_text=True`` — words a user typed can never become keywords by padding — and
    even then only words some catalog item contains count. Words that only echo instructions
    (:data:`INSTRUCTION_WORDS`) never count. Ratings below 3 are ignored. Ties: newest first.
    """
    df, n = catalog_df(items)
    count: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    surface: dict[str, Counter[str]] = {}
    for rank, e in enumerate(newest_first(events)):
        if not _liked(e):
            continue
        words: list[str] = []
        it = items.get(e.item_id) if e.item_id else None
        if it is not None:
            words += _content_words(f"{it.title} {it.text}")
        if e.text and free_text:
            words += [w for w in _content_words(e.text) if df.get(keyword_key(w), 0) > 0 or not items]
        for w in dict.fromkeys(words):
            if _echoes_instructions(w):
                continue
            key = keyword_key(w)
            count[key] += 1
            first_seen.setdefault(key, rank)
            surface.setdefault(key, Counter())[w] += 1
    banned = {keyword_key(x) for x in exclude}
    scored = sorted(count, key=lambda key: (-count[key] * _idf(key, df, n), first_seen[key]))
    out = []
    for key in scored:
        if key in banned:
            continue
        out.append(surface[key].most_common(1)[0][0])
        if len(out) >= k:
            break
    return out



# category words over the catalog's own groups (a keyword may name the category of what was seen)
_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "animal": ("animals", "pets", "wildlife", "creatures"), "mammal": ("animals",), "marine": ("sea", "ocean"),
    "food": ("food", "cooking", "snacks", "eating", "cuisine"), "drink": ("drinks", "beverages"),
    "fruit": ("fruits",), "sweet": ("sweets", "desserts", "candy"), "plant": ("plants", "nature", "gardening"),
    "flower": ("flowers", "gardening"), "sky": ("sky", "weather"), "weather": ("weather", "climate"),
    "transport": ("vehicles", "transportation", "travel"), "sport": ("sports", "athletics", "fitness"),
    "music": ("music", "musical", "songs"), "instrument": ("instruments", "music"), "heart": ("love", "romance"),
    "kiss": ("love", "romance"), "halloween": ("spooky", "scary"), "ghost": ("spooky",), "skull": ("spooky",),
    "space": ("space", "astronomy", "universe"), "planet": ("space", "astronomy"), "rocket": ("space",),
    "cat": ("cats", "kittens", "pets"), "dog": ("dogs", "puppies", "pets"), "face": ("emotions", "faces"),
    "emotion": ("emotions", "feelings"), "smiley": ("emotions",), "person": ("people",), "travel": ("travel",),
    "place": ("places", "travel"), "activity": ("activities", "hobbies"), "object": ("objects",),
}


def history_vocabulary(events: Sequence[Event], items: Mapping[str, Item], extra: Iterable[str] = ()) -> set[str]:
    """The keys (:func:`keyword_key`) of every word the history supports.

    Item titles, tags/genres, group/subgroup words, the text of searches, reviews, chat turns and
    notes, and category words over the items' groups and tags (:data:`_CATEGORY_WORDS`, e.g. a
    "cat face" supports "pets", a "rocket" supports "space").
    """
    words: list[str] = [w for x in extra for w in _TOKEN.findall(x.lower())]
    for e in events:
        it = items.get(e.item_id) if e.item_id else None
        if it is not None:
            words += _TOKEN.findall(f"{it.title} {it.text}".lower())
            words += [w for t in item_tags(it) for w in _TOKEN.findall(t)]
            for field_ in ("group", "subgroup"):
                words += _TOKEN.findall(str(it.attributes.get(field_, "")).replace("-", " ").lower())
        if e.text:
            words += _TOKEN.findall(e.text.lower())
    keys = {keyword_key(w) for w in words if len(w) >= 2}
    keys |= {_stem(k) for k in keys}
    for base in list(keys):
        for cat in _CATEGORY_WORDS.get(base, ()):
            keys.update(keyword_key(w) for w in cat.split())
    return keys


def support_counts(events: Sequence[Event], items: Mapping[str, Item], min_rating: float = 3.0) -> Counter[str]:
    """How many liked item events support each word key (its title, tags/genres, group words; per event once).

    The order-invariant evidence behind a keyword: dropping or reordering one event changes a count
    by at most one.
    """
    counts: Counter[str] = Counter()
    for e in events:
        it = items.get(e.item_id) if e.item_id else None
        if it is None or (e.type == "rating" and isinstance(e.value, (int, float)) and e.value < min_rating):
            continue
        words = _TOKEN.findall(f"{it.title} {' '.join(item_tags(it))}".lower())
        for field_ in ("group", "subgroup"):
            words += _TOKEN.findall(str(it.attributes.get(field_, "")).replace("-", " ").lower())
        keys = {keyword_key(w) for w in words}
        counts.update(keys | {_stem(k) for k in keys})
    return counts


def keyword_support(keyword: str, counts: Mapping[str, int]) -> int:
    """The support of a keyword: the largest :func:`support_counts` entry among its words (key or stem)."""
    best = 0
    for w in re.split(r"[\s\-]+", keyword.lower()):
        if w and w not in STOPWORDS:
            key = keyword_key(w)
            best = max(best, counts.get(key, 0), counts.get(_stem(key), 0))
    return best


def is_grounded(keyword: str, vocabulary: set[str]) -> bool:
    """Whether a keyword is supported by a history vocabulary (:func:`history_vocabulary`).

    Supported when one of its content words has its key or its light stem in the vocabulary
    ("kittens" ↔ "kitten", "singing" ↔ "singer", "musical" ↔ "music"); shared prefixes alone do not
    count ("animation" is not "animals").
    """
    for w in re.split(r"[\s\-]+", keyword.lower()):
        if not w or w in STOPWORDS:
            continue
        key = keyword_key(w)
        if key in vocabulary or _stem(key) in vocabulary:
            return True
    return False


def _stem(key: str) -> str:
    """A light English stem of a key: ``singing``/``singer`` → ``sing``, ``musical`` → ``music``."""
    for suffix in ("ing", "ers", "er", "ed", "al", "y"):
        if key.endswith(suffix) and len(key) - len(suffix) >= 3:
            return key[: -len(suffix)]
    return key


def vote_keywords(lists: Sequence[Sequence[str]], k: int) -> list[str]:
    """Aggregate the keyword lists of several renderings: by frequency, then mean rank, then first seen.

    A keyword's votes are the number of lists holding it (compared by :func:`keyword_key`); ties go
    to the one ranked higher on average (a list's first keyword counts most), then to the one the
    first list named first. The first surface form wins.
    """
    votes: Counter[str] = Counter()
    rank_sum: dict[str, float] = {}
    first: dict[str, tuple[int, int]] = {}
    surface: dict[str, str] = {}
    for li, kws in enumerate(lists):
        for r, kw in enumerate(kws):
            key = keyword_key(kw)
            votes[key] += 1
            rank_sum[key] = rank_sum.get(key, 0.0) + r
            first.setdefault(key, (li, r))
            surface.setdefault(key, kw)
    n = max(len(lists), 1)
    order = sorted(votes, key=lambda key: (-votes[key], (rank_sum[key] + (n - votes[key]) * k) / n, first[key]))
    return [surface[key] for key in order[:k]]



def votes_of(keyword: str, lists: Sequence[Sequence[str]]) -> int:
    """In how many keyword lists ``keyword`` appears (compared by :func:`keyword_key`)."""
    key = keyword_key(keyword)
    return sum(1 for li in lists if any(keyword_key(x) == key for x in li))
