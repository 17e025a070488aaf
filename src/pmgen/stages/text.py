"""Personalized text: a one-line pitch (or a sticker's caption) for the target item, from the same
preference as the image.

The generator is the preset's frozen LLM. It gets the target item's facts (title and text, as data)
and, for the personalized candidates, the user's preference keywords; candidates at the request's
preference weights come from guided decoding between the prompt with and without the preference
(:func:`pmgen.models.guided.guided_replies`: ``w = 0`` is the plain text). Each candidate is scored
like an image candidate and the same rule chooses::

    d_t = faithfulness to the item  = s(text · facts) × 0.6 if the title is missing
                                                      × 0.5 if another item's title appears
                                                      × 0.8 if a number appears that the facts lack
    d_p = fit to the user           = s(text · preference keywords)
    z   = α·log d_p + (1 − α)·log d_t            (s(c) = (1 + c)/2; text embeddings: the preset's text encoder)

and, as the image's target guard does, a candidate that drops the item's title is chosen only when
none keeps it.

User text never becomes instructions: the prompt holds the item's facts and the keywords (already
parsed into a bounded list) as quoted data, neutralized against control tokens; replies are bounded
(:data:`MAX_CHARS`) and escaped wherever they are shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from pmgen.data.schema import Item
from pmgen.stages.select import to_unit, z_score

MAX_CHARS = 200
"""Longest text kept (a pitch or caption is one line)."""
FACT_CHARS = 300
"""Most characters of the item's text given to the LLM."""
KINDS = ("pitch", "caption")
SYSTEM = ("You write one short line of marketing copy about an item for one reader. Use only the facts "
          "given. Do not name any other item. Write a single sentence of at most 20 words.")
_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_NUMBER = re.compile(r"\b\d+\b")


def clean_title(title: str) -> str:
    """``"Toy Story (1995)"`` → ``"Toy Story"``; a trailing ``", The"`` moved to the front."""
    t = _TITLE_YEAR.sub("", title).strip()
    for art in ("The", "A", "An"):
        if t.endswith(f", {art}"):
            t = f"{art} {t[: -len(art) - 2]}"
    return t


def messages(item: Item, keywords: Sequence[str] | None, kind: str = "pitch") -> list[dict[str, str]]:
    """The chat prompt for ``item``, with the reader's preference keywords when given."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    facts = " ".join((item.text or "").split())[:FACT_CHARS]
    what = "a one-line pitch" if kind == "pitch" else "a short caption to send with it"
    lines = [f'Item: "{clean_title(item.title)}"', f'Facts: "{facts}"' if facts else "Facts: (none)"]
    if keywords:
        lines.append('The reader likes: "' + ", ".join(k.strip() for k in keywords if k.strip()) + '"')
        lines.append(f"Write {what} for this item that speaks to what this reader likes.")
    else:
        lines.append(f"Write {what} for this item.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def tidy(text: str) -> str:
    """One line: quotes around the whole reply removed, whitespace collapsed, at most :data:`MAX_CHARS`."""
    t = " ".join(text.split()).strip()
    if len(t) >= 2 and t[0] in "\"'“" and t[-1] in "\"'”":
        t = t[1:-1].strip()
    return t[:MAX_CHARS]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase``'s words appear in ``text`` in order, as whole words (case-insensitive)."""
    p, t = _words(phrase), _words(text)
    return bool(p) and any(t[i:i + len(p)] == p for i in range(len(t) - len(p) + 1))


@dataclass(frozen=True)
class Faithfulness:
    """What a text keeps of its item: the title, no other item's title, no number the facts lack."""

    title_kept: bool
    other_titles: tuple[str, ...]
    invented_numbers: tuple[str, ...]

    @property
    def factor(self) -> float:
        return (1.0 if self.title_kept else 0.6) * (0.5 if self.other_titles else 1.0) * \
            (0.8 if self.invented_numbers else 1.0)


class TitleIndex:
    """Catalog titles (cleaned) for "does this text name another item?" — titles of at least two words
    or eight characters, so common words are not taken for titles."""

    def __init__(self, items: Mapping[str, Item]):
        self.titles: dict[str, str] = {}
        for iid, it in items.items():
            t = clean_title(it.title)
            if len(_words(t)) >= 2 or len(t) >= 8:
                self.titles.setdefault(t.lower(), iid)
        self._first: dict[str, list[str]] = {}
        for t in self.titles:
            w = _words(t)
            if w:
                self._first.setdefault(w[0], []).append(t)

    def named(self, text: str, except_id: str) -> list[str]:
        words = set(_words(text))
        return sorted(t for first in words & self._first.keys() for t in self._first[first]
                      if self.titles[t] != except_id and mentions(text, t))


def faithfulness(text: str, item: Item, titles: TitleIndex) -> Faithfulness:
    facts = f"{item.title} {item.text or ''}"
    allowed = set(_NUMBER.findall(facts))
    return Faithfulness(title_kept=mentions(text, clean_title(item.title)),
                        other_titles=tuple(titles.named(text, item.id)),
                        invented_numbers=tuple(sorted(set(_NUMBER.findall(text)) - allowed)))


@dataclass
class TextCandidate:
    weight: float
    text: str
    d_t: float
    d_p: float
    z: float
    faithfulness: Faithfulness

    def to_json(self) -> dict[str, Any]:
        f = self.faithfulness
        return {"weight": self.weight, "text": self.text, "d_t": round(self.d_t, 6), "d_p": round(self.d_p, 6),
                "z": round(self.z, 6), "title_kept": f.title_kept, "other_titles": list(f.other_titles),
                "invented_numbers": list(f.invented_numbers)}


def score_texts(texts: Sequence[str], weights: Sequence[float], item: Item, keywords: Sequence[str],
                text_encoder: Any, titles: TitleIndex, alpha: float) -> tuple[list[TextCandidate], int]:
    """Score text candidates (see the module docstring) and choose one: ``(candidates, chosen index)``.
    Without keywords d_p is neutral (1.0) and the choice falls to d_t; ties go to the lower weight."""
    facts = f"{clean_title(item.title)}. {item.text or ''}".strip()
    pref = ", ".join(keywords)
    emb = text_encoder.pooled([*texts, facts, pref or facts])
    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
    sims_t, sims_p = emb[: len(texts)] @ emb[len(texts)], emb[: len(texts)] @ emb[len(texts) + 1]
    out = []
    for i, (t, w) in enumerate(zip(texts, weights)):
        f = faithfulness(t, item, titles)
        d_t = float(to_unit(sims_t[i])) * f.factor
        d_p = float(to_unit(sims_p[i])) if pref else 1.0
        z = float(z_score(torch.tensor(d_t), torch.tensor(d_p), alpha))
        out.append(TextCandidate(float(w), t, d_t, d_p, z, f))
    # like the image's target guard: a text that drops the item's title is not chosen while another keeps it
    # (SmolLM2 at w ≥ 1 sometimes just repeats the keyword list, which d_p alone would reward)
    eligible = [i for i, c in enumerate(out) if c.faithfulness.title_kept] or list(range(len(out)))
    chosen = max(eligible, key=lambda i: (round(out[i].z, 9), -i))
    return out, chosen


@dataclass
class TextResult:
    """A personalized text: every candidate with its scores, the chosen one, the keywords it used."""

    candidates: list[TextCandidate]
    chosen: int
    keywords: list[str]
    alpha: float
    kind: str
    seconds: float

    @property
    def text(self) -> str:
        return self.candidates[self.chosen].text

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "text": self.text, "chosen": self.chosen, "alpha": self.alpha,
                "keywords": list(self.keywords), "candidates": [c.to_json() for c in self.candidates],
                "seconds": round(self.seconds, 3)}


def write_text(llm: Any, text_encoder: Any, item: Item, keywords: Sequence[str], weights: Sequence[float],
               alpha: float, titles: TitleIndex, kind: str = "pitch") -> TextResult:
    """Candidates at ``weights`` (guided decoding; without keywords only the plain one), scored and chosen."""
    import time

    from pmgen.models.guided import guided_replies

    t0 = time.perf_counter()
    ws = [float(w) for w in weights] if keywords else [0.0]
    raw = guided_replies(llm, messages(item, keywords, kind), messages(item, None, kind), ws)
    texts = [tidy(r) or clean_title(item.title) for r in raw]
    cands, chosen = score_texts(texts, ws, item, list(keywords), text_encoder, titles, alpha)
    return TextResult(cands, chosen, list(keywords), alpha, kind, time.perf_counter() - t0)
