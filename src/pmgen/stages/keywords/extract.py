"""History → ``k`` preference keywords with a frozen chat LLM: :class:`PreferenceExtractor`."""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, replace
from typing import AbstractSet, Any, Mapping, Sequence

from pmgen.data.schema import Event, Item
from pmgen.models.llm import Decoding, Message
from pmgen.types import ChatLLM
from pmgen.stages.keywords.cache import KeywordCache, Keywords, _with_fallback, model_id
from pmgen.stages.keywords.decode import (
    DEFAULT_DECODING,
    PromptCache,
    generate,
    generate_batch,
)
from pmgen.stages.keywords.glossary import (
    Glossary,
    _may_be_foreign,
    english_words,
    free_text_lines,
    gloss_history,
)
from pmgen.stages.keywords.ground import (
    catalog_df,
    history_keywords,
    history_vocabulary,
    is_grounded,
    keyword_idf,
    keyword_support,
    support_counts,
    vote_keywords,
    votes_of,
)
from pmgen.stages.keywords.parse import _enough, keyword_key, parse_keywords
from pmgen.stages.keywords.prompt import (
    PROMPT_VERSION,
    history_kind,
    preference_messages,
)
from pmgen.stages.verbalize import (
    History,
    aggregate_history,
    approx_token_count,
    newest_first,
    verbalize_history,
)


def _permutation_seed(history_text: str) -> int:
    """A seed from the *content* of a history (its sorted lines): equal multisets → equal renderings."""
    canon = "\n".join(sorted(history_text.splitlines()))
    return int(hashlib.sha256(canon.encode("utf-8")).hexdigest()[:12], 16)


class PreferenceExtractor:
    """History → ``k`` preference keywords with a frozen chat LLM (the PMG "extract preferences" stage).

    Args:
        llm: any :class:`~pmgen.types.ChatLLM`; a local :class:`~pmgen.models.llm.LLM` gets
            early stopping and its ``count_tokens`` for the history budget.
        k: number of keywords (``1..32``; PMG uses 8).
        prompt_version: which prompt (:data:`PROMPT_VERSION`); part of the cache key.
        cache: a :class:`KeywordCache`, or ``None`` for no caching.
        decoding: decoding settings (default :data:`DEFAULT_DECODING`: greedy, penalties on
            generated tokens only).
        max_new_tokens: generation cap (``<= 48`` keeps one user within the CPU budget).
        budget_tokens: token budget of the verbalized history (whole lines, newest first).
        detail_words: words of each item's text appended to its title in the history (e.g. genres);
            ``None`` (default) = 3 for rating histories (movie titles alone say little), 0 otherwise
            (sticker titles say it all; their first text field is a broad group, "smileys emotion",
            that the model parrots back: 10 of 12 sticker users got a taste keyword without it, 9 with
            it, measured with SmolLM2-135M and a draft of this prompt).
        min_rating: drop rating events below this value before verbalizing (``None`` keeps all).
        max_words: maximum words per keyword.
        pad: fill up to ``k`` with :func:`history_keywords` when the model gives fewer (stated in
            ``fallback``); with ``pad=False`` only an output with no usable keyword falls back.
        history_format: ``"aggregated"`` (default: the order-invariant summary of
            :func:`pmgen.stages.verbalize.aggregate_history` — tag counts, distinct items with counts) or
            ``"newest-first"`` (the raw listing of :func:`pmgen.stages.verbalize.verbalize_history`).
        n_permutations: permutation self-consistency — this many renderings of the history (the
            canonical one + shuffles of its item lines, seeded by the history's content) go through
            the LLM in **one** batched call and their keywords are voted (:func:`vote_keywords`).
            ``1`` (default) = the canonical rendering alone. The cache key stays the (canonical) history.
            Chosen on 40 val sticker users with today's ranking (by support, see ``vote_weight``): 1 and 2
            renderings give the same stability (one-event-dropped Jaccard 0.848 vs. 0.849) and hidden
            taste (0.975), 2 halve the fallbacks (0.050 → 0.025) and name more of the set (model share
            0.25 → 0.33) but cost ~1.7× the LLM time — 4.2 s cold on this 2-core CPU, over the 3 s budget.
            (Before the support ranking, 2 renderings cut the fallbacks 0.75 → 0.17 on 12 val users.)
        grounded: drop keywords the history does not support (:func:`is_grounded`: a title, tag,
            search/chat word or a category word over them) — few-shot echoes and hallucinations; the
            dropped ones are listed in the record's ``dropped``.
        n_candidates: how many keywords the model is asked for per rendering (default ``k``: the history's
            tags complete the candidates, and 8 asked instead of 10 decode ~8% faster; on 24 val users
            one-event-dropped Jaccard 0.81 with 10 asked, 0.83 with 8).
        recency_ties: break ties between equally frequent aggregated lines by recency (``True``) or by
            text (``False``, default: the rendering is then fully order-invariant).
        selection: ``"votes"`` (default) keeps the top ``k`` grounded model keywords (votes, then support);
            ``"consensus"`` keeps at most ``ceil(5k/8)`` of them — those every rendering agrees on or that
            are among the history's ``k`` most distinctive item words — and pads the rest from those
            words (stated in ``fallback``): on 10 val sticker users one-event-dropped Jaccard 0.55 → 0.79,
            at the price of a padded record nearly always.
        tag_candidates: the history's ``tag_candidates`` most distinctive item words
            (:func:`history_keywords`) join the model's keywords as candidates — I-AM-G's frequent tags as
            an order-invariant anchor, once the model gave at least one usable keyword (so do the English
            glosses of non-English free text, see ``translate``: glossary words, never the text). They are part of
            the method, not a fallback: ``fallback`` is set only when the model gives no usable keyword
            (the history's words replace it) or the candidates run short of ``k`` (padding);
            ``n_from_model`` says how many kept keywords the model named. ``0`` = model keywords only.
        vote_weight, min_votes: the ``k`` kept are the grounded candidates ranked by ``vote_weight ×
            votes / n_permutations + support / max support`` (:func:`keyword_support`: how many liked
            history items back the word; ties: the rarer word in the catalog, then the vote order), after
            dropping model keywords fewer than ``min_votes`` renderings named (unless none is left).
            Defaults (``0``, ``2``, with ``tag_candidates=24``) were chosen on 40 val sticker users
            (one-event-dropped Jaccard / hidden taste in the keywords): model keywords ranked by votes
            (``1``, ``1``, ``0``) 0.50 / 0.98; with 8 tags ranked by support 0.77 / 0.95; agreed by both
            renderings 0.80 / 0.98; 24 tags 0.85 / 0.98 (the history's tags alone: 0.84). Ranking by
            votes makes the set follow the LLM's order-sensitive output; ranking by support does not.
        translate: free text that is not English gets English glosses (:func:`gloss_history` with a
            :class:`Glossary`, loaded on the first such history: ``Glossary.cached()`` unless
            ``glossary`` is given), so the keywords come out in the catalog's language.
    """

    def __init__(self, llm: ChatLLM, k: int = 8, prompt_version: str = PROMPT_VERSION,
                 cache: KeywordCache | None = None, decoding: Decoding = DEFAULT_DECODING,
                 max_new_tokens: int = 48, budget_tokens: int = 192, detail_words: int | None = None,
                 min_rating: float | None = None, max_words: int = 3, pad: bool = True,
                 history_format: str = "aggregated", n_permutations: int = 1, grounded: bool = True,
                 translate: bool = True, glossary: "Glossary | None" = None, n_candidates: int | None = None,
                 recency_ties: bool = False, tag_candidates: int = 24, selection: str = "votes",
                 vote_weight: float = 0.0, min_votes: int = 2):
        if history_format not in ("aggregated", "newest-first"):
            raise ValueError(f"history_format must be 'aggregated' or 'newest-first', got {history_format!r}")
        if not 1 <= n_permutations <= 16:
            raise ValueError(f"n_permutations must be in 1..16, got {n_permutations}")
        if not 1 <= k <= 32:
            raise ValueError(f"k must be in 1..32, got {k}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if budget_tokens < 1:
            raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
        preference_messages("", k, prompt_version)  # fail early on an unknown prompt version
        self.llm = llm
        self.k = k
        self.prompt_version = prompt_version
        self.cache = cache
        self.decoding = decoding
        self.max_new_tokens = max_new_tokens
        self.budget_tokens = budget_tokens
        self.detail_words = detail_words
        self.min_rating = min_rating
        self.prompt_cache = PromptCache()
        self.max_words = max_words
        self.pad = pad
        self.history_format = history_format
        self.n_permutations = n_permutations
        self.grounded = grounded
        self.translate = translate
        self.n_candidates = max(k, n_candidates if n_candidates is not None else k)
        self.recency_ties = recency_ties
        if tag_candidates < 0:
            raise ValueError(f"tag_candidates must be >= 0, got {tag_candidates}")
        self.tag_candidates = tag_candidates
        if selection not in ("votes", "consensus"):
            raise ValueError(f"selection must be 'votes' or 'consensus', got {selection!r}")
        self.selection = selection
        if not 0 <= vote_weight <= 4:
            raise ValueError(f"vote_weight must be in [0, 4], got {vote_weight}")
        self.vote_weight = vote_weight
        if min_votes < 1:
            raise ValueError(f"min_votes must be >= 1, got {min_votes}")
        self.min_votes = min(min_votes, n_permutations)  # one rendering: every keyword has its one vote
        self._glossary = glossary
        self._english: AbstractSet[str] | None = None

    def _count_tokens(self, text: str) -> int:
        fn = getattr(self.llm, "count_tokens", None)
        return int(fn(text)) if callable(fn) else approx_token_count(text)

    def settings(self, exclude_titles: bool = False) -> dict[str, Any]:
        """Everything besides history, ``k``, model and prompt version that changes the result."""
        out = {"decoding": asdict(self.decoding), "max_new_tokens": self.max_new_tokens,
               "max_words": self.max_words, "pad": self.pad, "exclude_titles": exclude_titles,
               "min_rating": self.min_rating}
        if self.prompt_version != "pref-v1" or self.history_format != "newest-first":
            out.update(history_format=self.history_format, n_permutations=self.n_permutations,
                       grounded=self.grounded, pad_source="items", translate=self.translate,
                       n_candidates=self.n_candidates, recency_ties=self.recency_ties,
                       tag_candidates=self.tag_candidates, selection=self.selection,
                       vote_weight=self.vote_weight, min_votes=self.min_votes, gloss_candidates=True)
        return out

    def _detail(self, events: Sequence[Event], items: Mapping[str, Item]) -> int:
        if self.detail_words is not None:
            return self.detail_words
        probe = verbalize_history(events, items, self.budget_tokens, approx_token_count, 0)
        return 3 if history_kind(probe.lines) == "ratings" else 0

    def verbalize(self, events: Sequence[Event], items: Mapping[str, Item],
                  item_order: Sequence[int] | None = None) -> History:
        """The history as the model sees it, within ``budget_tokens``: aggregated (order-invariant) or
        newest first (``history_format``); ``item_order`` re-orders the aggregated item lines."""
        detail = self._detail(events, items)
        if self.history_format == "aggregated":
            return aggregate_history(events, items, self.budget_tokens, self._count_tokens, detail,
                                     min_rating=3.0, item_order=item_order, recency_ties=self.recency_ties)
        return verbalize_history(events, items, self.budget_tokens, self._count_tokens, detail)

    def renderings(self, events: Sequence[Event], items: Mapping[str, Item], history: History) -> list[str]:
        """The ``n_permutations`` history texts sent to the model: the canonical one, then shuffles of
        its item lines (the tag summary stays first) seeded by the history's content, so the same
        events in any order give the same renderings."""
        texts = [history.text]
        if self.n_permutations == 1:
            return texts
        head = [x for x in history.lines if x.startswith("Most frequent tags")]
        body = [x for x in history.lines if not x.startswith("Most frequent tags")]
        rng = random.Random(_permutation_seed(history.text))
        for _ in range(self.n_permutations - 1):
            order = list(range(len(body)))
            rng.shuffle(order)
            texts.append("\n".join(f"- {x}" for x in [*head, *(body[i] for i in order)]))
        return texts

    def gloss(self, history: History) -> tuple[History, list[str]]:
        """English glosses for non-English free text (``translate``); the glossary loads only when needed."""
        texts = [t for t in free_text_lines(history) if t] if self.translate else []
        if not texts:
            return history, []
        if self._english is None:
            self._english = self._glossary.english if self._glossary is not None else english_words()
        if not any(_may_be_foreign(t, self._english) for t in texts):
            return history, []
        if self._glossary is None:
            self._glossary = Glossary.cached()
        return gloss_history(history, self._glossary)

    def extract(self, events: Sequence[Event], items: Mapping[str, Item], exclude_titles: bool = False) -> Keywords:
        """Preference keywords of one user's history.

        Args:
            events: the user's behaviors (any order; see :func:`pmgen.stages.verbalize.newest_first`).
            items: the catalog (``item_id → Item``) the events refer to.
            exclude_titles: drop keywords equal to the title of an item in the history.

        Returns:
            a :class:`Keywords` record (``cached=True`` when served from the cache; ``n_events``
            counts the events left after ``min_rating``).

        Raises:
            ValueError: when the history is empty, or when not even its newest event fits in
                ``budget_tokens`` — the caller (the pipeline) decides what to do with such a user.
        """
        begun = self._begin(events, items, exclude_titles)
        if isinstance(begun, Keywords):
            return begun
        t1 = time.perf_counter()
        raws = self._decode(begun["prompts"])
        return self._end(begun, raws, time.perf_counter() - t1)

    def _decode(self, prompts: Sequence[Sequence[Message]]) -> list[str]:
        """The LLM's raw answers to ``prompts``: one call, batched when there are several."""
        stop = lambda s: _enough(s, self.n_candidates, self.max_words)  # noqa: E731
        if len(prompts) == 1:
            return [generate(self.llm, prompts[0], self.max_new_tokens, self.decoding, stop=stop,
                             prompt_cache=self.prompt_cache, n_prefix_messages=len(prompts[0]) - 1)]
        return generate_batch(self.llm, prompts, self.max_new_tokens, self.decoding, stop=stop,
                              prompt_cache=self.prompt_cache, n_prefix_messages=len(prompts[0]) - 1)

    def extract_many(self, histories: Sequence[tuple[Sequence[Event], Mapping[str, Item]]],
                     exclude_titles: bool = False) -> list[Keywords | ValueError]:
        """:meth:`extract` for many users: cache lookups first, then every miss's renderings in **one**
        batched LLM call (:func:`generate_batch`; the shared system + few-shot prefix computed once).

        Returns one entry per ``(events, items)``, in order: a :class:`Keywords` record, or the
        ``ValueError`` :meth:`extract` would raise for that history. The same history twice is run
        once. Parsing, grounding, voting and the cache are :meth:`extract`'s. A batch pads the
        prompts to a common length, which moves the LLM's float sums by rounding: a greedy decode can
        then (rarely) pick another token than the same history decoded alone.
        """
        out: list[Any] = [None] * len(histories)
        misses: dict[tuple, list[int]] = {}
        begun: dict[tuple, dict[str, Any]] = {}
        for i, (events, items) in enumerate(histories):
            try:
                b = self._begin(events, items, exclude_titles)
            except ValueError as e:
                out[i] = e
                continue
            if isinstance(b, Keywords):
                out[i] = b
            else:
                misses.setdefault(b["key"], []).append(i)
                begun.setdefault(b["key"], b)
        if not misses:
            return out
        keys = list(misses)
        prompts = [pr for k in keys for pr in begun[k]["prompts"]]
        t1 = time.perf_counter()
        raws = self._decode(prompts)
        t_llm = (time.perf_counter() - t1) / len(keys)
        pos = 0
        for k in keys:
            n = len(begun[k]["prompts"])
            record = self._end(begun[k], raws[pos:pos + n], t_llm)
            pos += n
            for i in misses[k]:
                out[i] = record
        return out

    def _begin(self, events: Sequence[Event], items: Mapping[str, Item],
               exclude_titles: bool) -> Keywords | dict[str, Any]:
        """:meth:`extract` up to the LLM: the cached record, or what the LLM is asked and the rest needs."""
        t0 = time.perf_counter()
        if not events:
            raise ValueError("cannot extract preferences from an empty history (0 events); "
                             "skip the user or use non-personalized generation (w = 0)")
        if self.min_rating is not None:
            events = [e for e in events if not (e.type == "rating" and isinstance(e.value, (int, float))
                                                and e.value < self.min_rating)]
            if not events:
                raise ValueError(f"no events left after dropping ratings below min_rating={self.min_rating}")
        history = self.verbalize(events, items)
        if history.n_kept == 0:
            raise ValueError(f"not even the newest of {history.n_events} events fits in budget_tokens="
                             f"{self.budget_tokens}; raise the budget")
        if self.history_format == "aggregated":  # every event, in a content order: padding ties stay order-free
            kept = [replace(e, time=None) for e in sorted(events, key=lambda e: (
                e.type, e.item_id or "", e.text or "", str(e.value), e.speaker or ""), reverse=True)]
        else:
            kept = newest_first(events)[: history.n_kept]
        titles = [items[e.item_id].title for e in kept if e.item_id and e.item_id in items] if exclude_titles else []
        key = KeywordCache.key(history.text, self.k, model_id(self.llm), self.prompt_version,
                               self.settings(exclude_titles))
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                hit.timings_s = {"cache": time.perf_counter() - t0}
                return hit
        history, glossed = self.gloss(history)
        texts = self.renderings(events, items, history)
        n_ask = self.n_candidates
        prompts = [preference_messages(t, n_ask, self.prompt_version) for t in texts]
        t_verbalize = time.perf_counter() - t0
        return {"t0": t0, "events": events, "items": items, "history": history, "glossed": glossed,
                "kept": kept, "titles": titles, "key": key, "prompts": prompts, "n_ask": n_ask,
                "t_verbalize": t_verbalize}

    def _end(self, begun: dict[str, Any], raws: list[str], t_llm: float) -> Keywords:
        """:meth:`extract` after the LLM: parse, ground, vote, pad, cache."""
        t0, items, history, glossed = begun["t0"], begun["items"], begun["history"], begun["glossed"]
        kept, titles, key, n_ask, t_verbalize = (begun["kept"], begun["titles"], begun["key"], begun["n_ask"],
                                                 begun["t_verbalize"])
        t2 = time.perf_counter()
        lists = [parse_keywords(r, n_ask, exclude=titles, max_words=self.max_words) for r in raws]
        voted = vote_keywords(lists, n_ask * len(lists))
        dropped: list[str] = []
        if self.grounded:
            vocab = history_vocabulary(kept, items, extra=glossed)
            dropped = [kw for kw in voted if not is_grounded(kw, vocab)]
            voted = [kw for kw in voted if is_grounded(kw, vocab)]
        if self.min_votes > 1:  # a keyword only one shuffle produced is the order talking, not the history;
            voted = [kw for kw in voted if votes_of(kw, lists) >= self.min_votes] or voted  # none agreed: all
        if glossed and self._glossary is not None:  # a glossed history: its keywords in English too
            lists = [[self._glossary.english_keyword(kw) for kw in li] for li in lists]
            seen_keys: dict[str, str] = {}
            for kw in (self._glossary.english_keyword(x) for x in voted):
                seen_keys.setdefault(keyword_key(kw), kw)  # first surface form wins, order kept
            voted = list(seen_keys.values())
        if self.tag_candidates and voted:  # no model keyword at all: the history fallback below says so
            have = {keyword_key(kw) for kw in voted}
            # the history's item tags, and the English glosses of what the user wrote in another language
            # (glossary words only, never the free text itself): the same evidence the model read
            for w in [*history_keywords(kept, items, self.tag_candidates, exclude=titles), *glossed]:
                if keyword_key(w) not in have:
                    have.add(keyword_key(w))
                    voted.append(w)
        if len(voted) > self.k:  # rank by votes and by how many history items back the keyword
            counts = support_counts(kept, items)
            for line in history.lines:  # glossed free text backs its English words like an item does
                m = re.search(r"\(in English: ([^)]*)\)$", line)
                counts.update({keyword_key(w.strip()) for w in m.group(1).split(",")} if m else set())
            votes = Counter(keyword_key(kw) for li in lists for kw in li)
            top = max([keyword_support(kw, counts) for kw in voted] + [1])
            score = {kw: self.vote_weight * votes[keyword_key(kw)] / len(lists) + keyword_support(kw, counts) / top for kw in voted}
            df, n_items = catalog_df(items)  # ties: the rarer word in the catalog first, then the vote order
            voted = sorted(voted, key=lambda kw: (-round(score[kw], 9), -keyword_idf(kw, df, n_items)))
        if self.selection == "consensus":
            frequent = {keyword_key(w) for w in history_keywords(kept, items, self.k, exclude=titles)}
            voted = [kw for kw in voted if keyword_key(kw) in frequent or votes_of(kw, lists) == len(lists)]
            voted = voted[: math.ceil(5 * self.k / 8)]
        from_model = voted[: self.k]
        n_model = sum(1 for kw in from_model if votes_of(kw, lists))
        raw = raws[0] if len(set(raws)) == 1 else "\n---\n".join(raws)  # renderings' outputs, in order
        keywords, fallback = _with_fallback(from_model, self.k, self.pad, "".join(raws),
                                            lambda: history_keywords(kept, items, self.k + len(from_model),
                                                                     exclude=[*titles, *from_model]))
        t_parse = time.perf_counter() - t2
        record = Keywords(keywords=keywords, raw=raw, fallback=fallback, n_from_model=n_model,
                          n_events=history.n_events, n_kept=history.n_kept, history_tokens=history.n_tokens,
                          model=model_id(self.llm), prompt_version=self.prompt_version,
                          timings_s={"verbalize": t_verbalize, "llm": t_llm, "parse": t_parse,
                                     "total": time.perf_counter() - t0},
                          dropped=dropped, n_renderings=len(raws))
        if self.cache is not None:
            self.cache.put(key, record)
        return record
