"""Soft-prompt training examples from ``sticker-users``: a user's verbalized history, the target's
keyword text, a positive image that reflects the user's taste and the negatives (see
:mod:`pmgen.train.soft_prompt` for which image is positive)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class SoftExamples:
    """Training or validation examples: texts plus indices into a shared latent table."""

    sample_ids: list[str]
    user_ids: list[str]
    history_texts: list[str]
    target_texts: list[str]
    positives: list[int]  # row of ``latents``
    negatives: list[list[int]]  # rows a negative may be drawn from (outside the user's taste)
    positive_kind: list[str]  # "ground truth" or "held-out taste item"
    tastes: list[str]  # the user's hidden taste (for the other-user validation baseline)
    history_rows: list[list[int]] = dataclasses.field(default_factory=list)
    """Rows of the user's most recent distinct history items (never the positive), newest first — what a
    history-image encoder reads; empty when the examples were built without them."""
    preference_texts: list[str] = dataclasses.field(default_factory=list)
    """The user's preference keywords as the generator reads them (``"cat, kitten"``) — what compose mode's
    preference branch is conditioned on; empty unless set (:func:`with_preference_texts`)."""

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, index: Sequence[int]) -> SoftExamples:
        return SoftExamples(*[[getattr(self, f.name)[i] for i in index] if getattr(self, f.name) else []
                              for f in dataclasses.fields(self)])


def build_examples(ds: Any, split: str, count_tokens: Callable[[str], int], budget_tokens: int, seed: int,
                   item_rows: dict[str, int], n_target_keywords: int = 5, history_images: int = 12,
                   taste_positives: bool = False) -> SoftExamples:
    """Examples of one split of ``sticker-users`` (see the module docstring for the positive image).

    ``item_rows`` maps catalog item ids to rows of the latent table; items without a row are never used.
    ``history_images``: how many of the history's most recent distinct items go into ``history_rows``.
    ``taste_positives``: every positive is one of the user's own taste stickers, held out of the history
    it is paired with, even where a ground-truth personalized sticker is recorded (what compose mode's
    preference branch, which never sees the target, should draw).
    """
    from pmgen.stages.condition import keywords_text
    from pmgen.data.datasets.sticker_users import TASTES, taste_by_name
    from pmgen.stages.keywords import target_keywords
    from pmgen.stages.verbalize import newest_first, verbalize_history

    rng = random.Random(seed)
    base = [it for it in ds.items.values() if not it.attributes.get("skintone") and it.id in item_rows]
    in_taste = {t.name: {it.id for it in base if t.matches(it)} for t in TASTES}
    out = SoftExamples([], [], [], [], [], [], [], [], [], [])
    for s in ds.split(split):
        user = ds.users[s.user_id]
        taste = taste_by_name(user.attributes["taste"])
        events = list(user.events)
        if not taste_positives and s.ground_truth_personalized and s.ground_truth_personalized in item_rows:
            pos, kind = s.ground_truth_personalized, "ground truth"
        else:
            own = sorted({e.item_id for e in events if e.item_id and e.item_id in in_taste[taste.name]})
            if not own:
                continue
            pos, kind = rng.choice(own), "held-out taste item"
            events = [e for e in events if e.item_id != pos]
        text = verbalize_history(events, ds.items, budget_tokens, count_tokens=count_tokens).text
        target = ds.items[s.target_id]
        tkw = target_keywords(item=target, conversation=list(s.context) or None, k=n_target_keywords).keywords
        negatives = sorted(item_rows[it.id] for it in base if it.id not in in_taste[taste.name] and it.id != pos)
        out.sample_ids.append(s.sample_id)
        out.user_ids.append(s.user_id)
        out.history_texts.append(text)
        out.target_texts.append(keywords_text(tkw))
        out.positives.append(item_rows[pos])
        out.negatives.append(negatives)
        out.positive_kind.append(kind)
        out.tastes.append(taste.name)
        recent = dict.fromkeys(e.item_id for e in newest_first(events) if e.item_id in item_rows and e.item_id != pos)
        out.history_rows.append([item_rows[i] for i in list(recent)[:history_images]])
    return out


def with_positives(ex: SoftExamples, which: str) -> SoftExamples:
    """All examples (``"all"``), only those whose positive is the recorded ground truth (``"ground-truth"``)
    or only those whose positive is a held-out taste sticker (``"taste"``; build them with
    ``taste_positives=True`` to have one for every example)."""
    if which == "all":
        return ex
    kinds = {"ground-truth": "ground truth", "taste": "held-out taste item"}
    if which not in kinds:
        raise ValueError(f"positives must be 'all', 'ground-truth' or 'taste', got {which!r}")
    return ex.subset([i for i, k in enumerate(ex.positive_kind) if k == kinds[which]])


def with_preference_texts(ex: SoftExamples, texts: Mapping[str, str]) -> SoftExamples:
    """``ex`` with each example's ``preference_texts`` set to its user's entry of ``texts`` (user id →
    keywords text); examples whose user has none (or an empty one) are dropped."""
    keep = [i for i, u in enumerate(ex.user_ids) if texts.get(u)]
    out = ex.subset(keep)
    out.preference_texts = [texts[u] for u in out.user_ids]
    return out


def other_user_index(tastes: Sequence[str]) -> list[int]:
    """For each example, the next example (cyclically) whose user has another taste (itself if none has)."""
    n = len(tastes)
    return [next((j % n for j in range(i + 1, i + n) if tastes[j % n] != tastes[i]), i) for i in range(n)]


def one_per_user(ex: SoftExamples, n: int, seed: int) -> SoftExamples:
    """At most ``n`` examples, one per user (ground-truth examples preferred), in a fixed order."""
    first: dict[str, int] = {}
    for i, (u, kind) in enumerate(zip(ex.user_ids, ex.positive_kind)):
        if u not in first or (kind == "ground truth" and ex.positive_kind[first[u]] != "ground truth"):
            first[u] = i
    index = sorted(first.values())
    random.Random(seed).shuffle(index)
    return ex.subset(sorted(index[:n]))
