"""Verbalize behaviors: each event type becomes one natural-language line.

A user's history becomes ordered lines, **newest first**, cut to a token budget. Free text coming
from users (reviews, searches, conversation turns) is always quoted and flattened to one line, so
text that tries to instruct the LLM ("ignore previous instructions…") stays data inside quotes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from pmgen.data.schema import EVENT_TYPES, Event, Item, newest_first  # noqa: F401  (newest_first: part of this stage's API)

TokenCounter = Callable[[str], int]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def approx_token_count(text: str) -> int:
    """A tokenizer-free estimate: words and punctuation marks (BPE tokenizers give ~1–1.5× this)."""
    return len(_TOKEN_RE.findall(text))


TEXT_CHARS = 300
"""Characters of one review / conversation turn / note the LLM sees (longer texts are shortened)."""
SEARCH_CHARS = 160
"""Characters of one search query the LLM sees."""


def clean_text(text: str, max_chars: int = TEXT_CHARS) -> str:
    """One line, no control characters, straight quotes escaped, cut to ``max_chars``."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text)
    text = re.sub(r"\s+", " ", text).strip().replace('"', "'")
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return text


def describe_item(item: Item | None, item_id: str | None, detail_words: int = 0) -> str:
    """``"title"`` (quoted), optionally followed by the first ``detail_words`` words of its text."""
    if item is None:
        return f'item "{clean_text(item_id or "?", 80)}"'
    out = f'"{clean_text(item.title, 120)}"'
    if detail_words > 0 and item.text:
        words = clean_text(item.text, 400).split()
        # first clause only, without its field label: "genres: A, B; x: y" reads better as "(A, B)"
        first = re.sub(r"^[\w ]{1,20}: ", "", " ".join(words).split(";")[0])
        detail = " ".join(first.split()[:detail_words]).rstrip(",;:")
        if detail:
            out += f" ({detail})"
    return out


_SOCIAL_VERBS = {"like": "Liked", "share": "Shared", "comment": "Commented on", "send": "Sent"}


def _v_click(e: Event, it: str) -> str:
    return f"Clicked {it}."


def _v_view(e: Event, it: str) -> str:
    return f"Viewed {it}."


def _v_purchase(e: Event, it: str) -> str:
    return f"Bought {it}."


def _v_rating(e: Event, it: str) -> str:
    v = float(e.value) if isinstance(e.value, (int, float)) else None
    if v is None:
        return f"Rated {it}."
    return f"Rated {it} {v:g} out of 5."


def _v_review(e: Event, it: str) -> str:
    return f'Reviewed {it}: "{clean_text(e.text or "")}"'


def _v_search(e: Event, it: str) -> str:
    return f'Searched for "{clean_text(e.text or "", SEARCH_CHARS)}".'


def _v_conversation(e: Event, it: str) -> str:
    who = "User" if (e.speaker or "user").lower() in ("user", "me", "self") else clean_text(e.speaker or "", 40).capitalize()
    return f'{who} said: "{clean_text(e.text or "")}"'


def _v_social(e: Event, it: str) -> str:
    verb = _SOCIAL_VERBS.get(str(e.value), "Interacted with")
    target = it if e.item_id else "a post"
    extra = f': "{clean_text(e.text)}"' if e.text else "."
    return f"{verb} {target}{extra}"


def _v_note(e: Event, it: str) -> str:
    return f'Note: "{clean_text(e.text or "")}"'


VERBALIZERS: dict[str, Callable[[Event, str], str]] = {
    "click": _v_click,
    "view": _v_view,
    "purchase": _v_purchase,
    "rating": _v_rating,
    "review": _v_review,
    "search": _v_search,
    "conversation": _v_conversation,
    "social": _v_social,
    "note": _v_note,
}
assert set(VERBALIZERS) == set(EVENT_TYPES)


def shortened_texts(events: Sequence[Event]) -> int:
    """How many events carry a text longer than the verbalizer shows (the record warns about them)."""
    return sum(1 for e in events if e.text and len(e.text) > (SEARCH_CHARS if e.type == "search" else TEXT_CHARS))


def verbalize_event(event: Event, items: Mapping[str, Item], detail_words: int = 0) -> str:
    """One event → one line of text (``detail_words`` adds that many words of the item's text)."""
    it = describe_item(items.get(event.item_id) if event.item_id else None, event.item_id, detail_words)
    return VERBALIZERS[event.type](event, it)


@dataclass(frozen=True)
class History:
    """A verbalized history: ``lines`` newest first, and how much was cut to fit the budget."""

    lines: tuple[str, ...]
    n_events: int
    n_kept: int
    n_tokens: int

    @property
    def truncated(self) -> bool:
        return self.n_kept < self.n_events

    @property
    def text(self) -> str:
        return "\n".join(f"- {line}" for line in self.lines)


def verbalize_history(
    events: Sequence[Event],
    items: Mapping[str, Item],
    budget_tokens: int = 256,
    count_tokens: TokenCounter = approx_token_count,
    detail_words: int = 0,
) -> History:
    """Verbalize events newest first, keeping whole lines while they fit in ``budget_tokens``.

    ``count_tokens`` should be the LLM tokenizer's counter when one is at hand (each line is
    counted with its "- " prefix and newline); the default is :func:`approx_token_count`.
    """
    lines: list[str] = []
    used = 0
    ordered = newest_first(events)
    for e in ordered:
        line = verbalize_event(e, items, detail_words)
        cost = count_tokens(f"- {line}\n")
        if used + cost > budget_tokens:
            break
        lines.append(line)
        used += cost
    if not lines and ordered:  # the newest event alone is over the budget: keep a shortened line of it
        line = verbalize_event(ordered[0], items, detail_words)
        while len(line) > 16 and count_tokens(f"- {line}\n") > budget_tokens:
            line = line[: len(line) * 3 // 4].rstrip() + "…"
        cost = count_tokens(f"- {line}\n")
        if cost <= budget_tokens:
            lines, used = [line], cost
    return History(lines=tuple(lines), n_events=len(ordered), n_kept=len(lines), n_tokens=used)


# ------------------------------------------------------------------ order-invariant (aggregated) history

_GENERIC_TAGS = frozenset("face person people symbol sign object objects other".split())


def item_tags(item: Item) -> list[str]:
    """An item's tags/genres (``attributes``, else the ``tags:``/``genres:`` field of its text), lower-cased."""
    tags = item.attributes.get("tags") or item.attributes.get("genres")
    if isinstance(tags, (list, tuple)) and tags:
        raw = [str(t) for t in tags]
    else:
        fields = dict(re.findall(r"(\w[\w ]{0,20}):\s*([^;]*)", item.text))
        raw = re.split(r"[,;]", fields.get("tags") or fields.get("genres") or "")
    return [t for t in (clean_text(x, 40).lower() for x in raw) if t]


def _liked_event(e: Event, min_rating: float) -> bool:
    return not (e.type == "rating" and isinstance(e.value, (int, float)) and e.value < min_rating)


_AGG_VERBS = {"click": "Clicked", "view": "Viewed", "purchase": "Bought", "rating": "Rated", "review": "Reviewed"}


def _agg_verb(e: Event) -> str:
    if e.type == "social":
        return _SOCIAL_VERBS.get(str(e.value), "Interacted with")
    return _AGG_VERBS.get(e.type, "Interacted with")


def aggregate_lines(events: Sequence[Event], items: Mapping[str, Item], detail_words: int = 0,
                    min_rating: float = 3.0, max_tags: int = 10, recency_ties: bool = True
                    ) -> tuple[list[str], list[str]]:
    """The order-invariant lines of a history: ``(summary_lines, item_lines)``.

    * ``summary_lines``: one line of the most frequent item tags/genres over the liked items, with
      counts (``"Most frequent tags: cat (6), kitten (3), …"``; tags seen once are left out when
      enough repeat; generic tags such as "face" are skipped), first because it sums up the person.
    * ``item_lines``: one line per distinct item, action and rating, with its count
      (``'Sent "cat face" (3 times).'``, ``'Rated "Heat (1995)" (Action, …) 5 out of 5.'``), then one
      line per distinct free text (search, chat turn, review, note) with its count — sorted by count,
      then rating, then recency (``recency_ties``; else by text, fully order-invariant).

    Ratings below ``min_rating`` count neither for tags nor first places (their lines sort last).
    Nothing here depends on the order of ``events`` except ties broken by recency.
    """
    order = newest_first(events)
    rank = {id(e): i for i, e in enumerate(order)}  # 0 = newest
    groups: dict[tuple, dict] = {}
    tag_count: dict[str, int] = {}
    for e in events:
        it = items.get(e.item_id) if e.item_id else None
        liked = _liked_event(e, min_rating)
        if e.item_id and e.type != "review":
            v = float(e.value) if e.type == "rating" and isinstance(e.value, (int, float)) else None
            key = ("item", _agg_verb(e), e.item_id, v)
            g = groups.setdefault(key, {"n": 0, "rank": rank[id(e)], "rating": v if v is not None else 0.0,
                                        "liked": liked, "event": e})
            g["n"] += 1
            g["rank"] = min(g["rank"], rank[id(e)])
        if e.text and e.type in ("review", "search", "conversation", "note", "social"):
            line = verbalize_event(e, items, detail_words)
            key = ("text", line)
            g = groups.setdefault(key, {"n": 0, "rank": rank[id(e)], "rating": 0.0, "liked": liked, "event": e,
                                        "line": line})
            g["n"] += 1
            g["rank"] = min(g["rank"], rank[id(e)])
        if it is not None and liked and e.type != "review":
            for t in dict.fromkeys(item_tags(it)):
                if t not in _GENERIC_TAGS:
                    tag_count[t] = tag_count.get(t, 0) + 1
    item_lines: list[tuple[tuple, str]] = []
    for key, g in groups.items():
        e = g["event"]
        if key[0] == "item":
            it_text = describe_item(items.get(e.item_id), e.item_id, detail_words)
            if e.type == "rating" and key[3] is not None:
                line = f"{key[1]} {it_text} {key[3]:g} out of 5."
            else:
                line = f"{key[1]} {it_text}."
        else:
            line = g["line"]
        if g["n"] > 1:
            line = line[:-1] + f" ({g['n']} times)." if line.endswith(".") else line + f" ({g['n']} times)"
        tie = g["rank"] if recency_ties else 0
        item_lines.append(((not g["liked"], key[0] == "text", -g["n"], -g["rating"], tie, line), line))
    item_lines.sort(key=lambda x: x[0])
    tags = sorted(tag_count.items(), key=lambda kv: (-kv[1], kv[0]))
    repeated = [kv for kv in tags if kv[1] > 1]
    shown = (repeated if len(repeated) >= 3 else tags)[:max_tags]
    summary = [f"Most frequent tags: {', '.join(f'{t} ({n})' for t, n in shown)}."] if shown else []
    return summary, [line for _, line in item_lines]


def aggregate_history(events: Sequence[Event], items: Mapping[str, Item], budget_tokens: int = 256,
                      count_tokens: TokenCounter = approx_token_count, detail_words: int = 0,
                      min_rating: float = 3.0, max_tags: int = 10, recency_ties: bool = True,
                      item_order: Sequence[int] | None = None) -> History:
    """An order-invariant :class:`History`: the tag summary, then distinct items/texts with counts.

    Lines come from :func:`aggregate_lines` and are kept whole while they fit in ``budget_tokens``
    (so the least frequent items are the ones cut). ``item_order`` (a permutation of the item-line
    indices) renders the same lines in another order — what permutation self-consistency shuffles;
    the budget cut still drops the least frequent lines. ``n_kept`` counts kept *events*.
    """
    summary, item_lines = aggregate_lines(events, items, detail_words, min_rating, max_tags, recency_ties)
    lines: list[str] = []
    used = 0
    for line in summary:
        cost = count_tokens(f"- {line}\n")
        if used + cost <= budget_tokens:
            lines.append(line)
            used += cost
    kept: list[str] = []
    for line in item_lines:
        cost = count_tokens(f"- {line}\n")
        if used + cost > budget_tokens:
            break
        kept.append(line)
        used += cost
    if item_order is not None:
        idx = [i for i in item_order if i < len(kept)]
        kept = [kept[i] for i in idx] + [kept[i] for i in range(len(kept)) if i not in set(idx)]
    if len(kept) == len(item_lines):
        n_kept = len(events)
    else:  # events behind the kept lines (a line with a count stands for that many events)
        counts = [int(m.group(1)) if (m := re.search(r"\((\d+) times\)\.?$", x)) else 1 for x in kept]
        n_kept = min(len(events), sum(counts))
    return History(lines=tuple(lines + kept), n_events=len(events), n_kept=n_kept, n_tokens=used)
