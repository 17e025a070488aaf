"""Verbalize behaviors: each event type becomes one natural-language line.

A user's history becomes ordered lines, **newest first**, cut to a token budget. Free text coming
from users (reviews, searches, conversation turns) is always quoted and flattened to one line, so
text that tries to instruct the LLM ("ignore previous instructions…") stays data inside quotes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from pmgen.data import EVENT_TYPES, Event, Item

TokenCounter = Callable[[str], int]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def approx_token_count(text: str) -> int:
    """A tokenizer-free estimate: words and punctuation marks (BPE tokenizers give ~1–1.5× this)."""
    return len(_TOKEN_RE.findall(text))


def clean_text(text: str, max_chars: int = 300) -> str:
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
    return f'Searched for "{clean_text(e.text or "", 160)}".'


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


def newest_first(events: Sequence[Event]) -> list[Event]:
    """Order events newest first: by ``time`` when every event has one, otherwise reverse file order."""
    if events and all(e.time is not None for e in events):
        order = sorted(range(len(events)), key=lambda i: (events[i].time, i), reverse=True)
        return [events[i] for i in order]
    return list(reversed(events))


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
    return History(lines=tuple(lines), n_events=len(ordered), n_kept=len(lines), n_tokens=used)
