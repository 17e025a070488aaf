"""Decoding for the keyword stages: early stop, penalties on generated tokens only, a shared few-shot prefix.

:func:`generate` runs one chat prompt, :func:`generate_batch` several in one batched ``model.generate``
call; both reuse the key/value states of the system + few-shot prefix from a :class:`PromptCache`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pmgen.models.llm import Decoding, Message
from pmgen.types import ChatLLM

DEFAULT_DECODING = Decoding(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)
"""Greedy decoding; with an :class:`~pmgen.models.llm.LLM` the repetition penalty and the n-gram
ban apply to the *generated* tokens only (the prompt, which holds the history, is not penalized)."""


class PromptCache:
    """Key/value states of fixed prompt prefixes (system message + few-shot turns), reused across users.

    The few-shot prefix is ~2/3 of a preference prompt; computing it once per (model, prefix)
    instead of once per user cuts the prefill cost accordingly. Holds at most ``max_entries``
    prefixes (oldest dropped); each SmolLM2-135M entry of ~300 tokens takes ~7 MB.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._store: dict[tuple[int, tuple[int, ...]], Any] = {}

    def get(self, llm: Any, prefix_ids: Any) -> Any:
        """A fresh copy of the cache holding ``prefix_ids`` (``[1, P]``) for ``llm`` (computed when new)."""
        import copy

        import torch
        from transformers import DynamicCache

        key = (id(llm.model), tuple(prefix_ids[0].tolist()))
        if key not in self._store:
            with torch.no_grad():
                cache = DynamicCache(config=llm.model.config)
                llm.model(prefix_ids, attention_mask=torch.ones_like(prefix_ids), past_key_values=cache, use_cache=True,
                          logits_to_keep=1)  # only the key/values are kept: no logits over the whole prefix
            while len(self._store) >= self.max_entries:
                self._store.pop(next(iter(self._store)))
            self._store[key] = cache
        return copy.deepcopy(self._store[key])

    def __len__(self) -> int:
        return len(self._store)


def _decoding_kwargs(tok: Any, start: int, max_new_tokens: int, decoding: Decoding,
                     stop: Callable[[str], bool] | None, pad: int | None) -> dict[str, Any]:
    """``model.generate`` arguments shared by :func:`generate` and :func:`generate_batch`: penalties on the
    generated tokens only (from position ``start``), and a per-row early stop on ``stop(text_so_far)``."""
    import torch
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    class _GeneratedOnly(LogitsProcessor):
        def __init__(self, inner: Any):
            self.inner = inner

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return self.inner(input_ids[:, start:], scores)

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
            return torch.tensor([bool(stop is not None and stop(tok.decode(row[start:], skip_special_tokens=True)))
                                 for row in input_ids], dtype=torch.bool)

    class _ContentRepetitionPenalty(LogitsProcessor):
        def __init__(self, penalty: float):
            self.penalty = penalty
            self.is_separator: dict[int, bool] = {}

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            for row in range(input_ids.shape[0]):
                seen = []
                for t in set(input_ids[row, start:].tolist()):
                    if t not in self.is_separator:
                        self.is_separator[t] = not any(ch.isalnum() for ch in tok.decode([t]))
                    if not self.is_separator[t]:
                        seen.append(t)
                if seen:
                    idx = torch.tensor(seen, dtype=torch.long)
                    sc = scores[row, idx]
                    scores[row, idx] = torch.where(sc < 0, sc * self.penalty, sc / self.penalty)
            return scores

    procs = LogitsProcessorList()
    if decoding.repetition_penalty != 1.0:
        procs.append(_ContentRepetitionPenalty(decoding.repetition_penalty))
    if decoding.no_repeat_ngram_size:
        procs.append(_GeneratedOnly(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size)))
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": decoding.do_sample,
                              "pad_token_id": pad, "logits_processor": procs,
                              "stopping_criteria": StoppingCriteriaList([_Stop()])}
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def generate(llm: ChatLLM, messages: Sequence[Message], max_new_tokens: int, decoding: Decoding,
             stop: Callable[[str], bool] | None = None, prompt_cache: PromptCache | None = None,
             n_prefix_messages: int = 0) -> str:
    """Run a chat model, stopping early once ``stop(text_so_far)`` is true.

    For a local :class:`~pmgen.models.llm.LLM` this calls ``model.generate`` directly so that it
    can (a) stop early, (b) apply ``repetition_penalty`` and ``no_repeat_ngram_size`` to the
    generated tokens only — penalizing the prompt would push the model away from the very words
    of the history — and (c) reuse the key/value states of the first ``n_prefix_messages``
    messages from ``prompt_cache`` (used only when their tokens are an exact prefix of the full
    prompt's). Any other :class:`~pmgen.types.ChatLLM` goes through its ``chat`` (no early
    stop; the parser copes with the extra text).
    """
    from pmgen.models.llm import LLM

    if not isinstance(llm, LLM):
        return llm.chat(messages, max_new_tokens=max_new_tokens, decoding=decoding)
    import torch

    ids = llm.encode_chat(messages, check=True)  # contents neutralized; raises if a control token slipped in
    start = int(ids.shape[1])
    tok = llm.tokenizer

    kwargs = _decoding_kwargs(tok, start, max_new_tokens, decoding, stop, tok.pad_token_id)
    if prompt_cache is not None and 0 < n_prefix_messages < len(messages):
        prefix_ids = llm.encode_chat(messages[:n_prefix_messages], add_generation_prompt=False)
        n = int(prefix_ids.shape[1])
        if n < start and torch.equal(ids[:, :n], prefix_ids):
            kwargs["past_key_values"] = prompt_cache.get(llm, prefix_ids)
    with torch.no_grad():
        out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tok.decode(out[0, start:], skip_special_tokens=True)


def generate_batch(llm: ChatLLM, conversations: Sequence[Sequence[Message]], max_new_tokens: int,
                   decoding: Decoding, stop: Callable[[str], bool] | None = None,
                   prompt_cache: PromptCache | None = None, n_prefix_messages: int = 0) -> list[str]:
    """:func:`generate` for several prompts in **one** batched ``model.generate`` call.

    Each row stops on its own ``stop(text_so_far)``; the batch ends when every row has. Every prompt
    is encoded with the checked, neutralized chat template. When all prompts share their first
    ``n_prefix_messages`` messages (system + few-shot turns) and ``prompt_cache`` is given, the
    prefix's key/values are computed once and repeated over the batch; so are those of the tokens all
    rows share after it (the request line and a tag summary: one prefill at batch size 1, not one per
    row). The rest of each prompt is padded *between* the shared head and its own tail (masked;
    positions follow the mask), so only what differs between the prompts is prefilled per row.
    Otherwise rows are left-padded. A one-prompt batch is :func:`generate`; other
    :class:`~pmgen.types.ChatLLM` s get one ``chat`` call per prompt.
    """
    from pmgen.models.llm import LLM

    if not conversations:
        return []
    if not isinstance(llm, LLM) or len(conversations) == 1:
        return [generate(llm, m, max_new_tokens, decoding, stop=stop) for m in conversations]
    import torch

    tok = llm.tokenizer
    rows = [llm.encode_chat(m, check=True)[0] for m in conversations]
    pad = int(tok.pad_token_id)
    n_pre = 0
    prefix_ids = None
    if prompt_cache is not None and 0 < n_prefix_messages < min(len(m) for m in conversations):
        heads = [llm.encode_chat(m[:n_prefix_messages], add_generation_prompt=False)[0] for m in conversations]
        n = int(heads[0].shape[0])
        if all(torch.equal(h, heads[0]) and n < r.shape[0] and torch.equal(r[:n], h) for h, r in zip(heads, rows)):
            n_pre, prefix_ids = n, heads[0][None]
    shared = n_pre  # rows[:, :shared] are equal: computed once (each row keeps >= 1 token of its own)
    if prefix_ids is not None:
        last = min(int(r.shape[0]) for r in rows) - 1
        while shared < last and all(int(r[shared]) == int(rows[0][shared]) for r in rows[1:]):
            shared += 1
    tail = max(int(r.shape[0]) - shared for r in rows)
    start = shared + tail
    ids = torch.full((len(rows), start), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), start), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :shared] = r[:shared]
        mask[i, :shared] = 1
        ids[i, start - (r.shape[0] - shared):] = r[shared:]
        mask[i, start - (r.shape[0] - shared):] = 1

    kwargs = _decoding_kwargs(tok, start, max_new_tokens, decoding, stop, pad)
    if prefix_ids is not None:
        cache = prompt_cache.get(llm, prefix_ids)
        if shared > n_pre:
            with torch.no_grad():
                llm.model(rows[0][None, n_pre:shared], attention_mask=torch.ones((1, shared), dtype=torch.long),
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(rows))
        kwargs["past_key_values"] = cache
    with torch.no_grad():
        out = llm.model.generate(ids, attention_mask=mask, **kwargs)
    return [tok.decode(row[start:], skip_special_tokens=True) for row in out]
