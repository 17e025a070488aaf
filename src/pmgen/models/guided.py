"""Guided decoding with the frozen LLM: one reply per preference weight, classifier-free guidance
between a prompt *with* the user's preference and the same prompt *without* it.

For weight ``w`` every next token is the argmax of::

    log p(token | plain prompt, reply so far) + w · (log p(token | preference prompt, reply so far)
                                                     − log p(token | plain prompt, reply so far))

so ``w = 0`` is the plain prompt's own greedy reply (the non-personalized text, as ``w = 0`` is the
non-personalized image), ``w = 1`` the preference prompt's, and ``w > 1`` pushes further toward what
the preference changes. All weights decode together: two batched forward passes per token (one per
prompt), ``len(weights)`` rows each.

    replies = guided_replies(llm, with_preference, without_preference, weights=(0, 1, 2))
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from pmgen.models.llm import Message

MAX_NEW_TOKENS = 64
"""Longest reply, in tokens."""


@torch.no_grad()
def guided_replies(llm: Any, preference: Sequence[Message], plain: Sequence[Message], weights: Sequence[float],
                   max_new_tokens: int = 40, repetition_penalty: float = 1.3) -> list[str]:
    """One greedy reply per weight (see the module docstring); a reply ends at the end-of-turn token or
    its first line break. ``llm`` is a local :class:`pmgen.models.llm.LLM` (its chat template and model);
    message contents are neutralized (no text becomes a control token). ``repetition_penalty`` lowers the
    log-probability of tokens a reply already holds by ``log(repetition_penalty)``."""
    if not weights:
        return []
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens}")
    if any(not math.isfinite(w) or not 0 <= w <= 16 for w in weights):
        raise ValueError(f"weights must be in [0, 16], got {list(weights)}")
    if repetition_penalty < 1:
        raise ValueError(f"repetition_penalty must be >= 1, got {repetition_penalty}")
    model, tok = llm.model, llm.tokenizer
    k = len(weights)
    w = torch.tensor([float(x) for x in weights]).view(k, 1)
    streams = []
    for messages in (preference, plain):
        ids = llm.encode_chat(messages).repeat(k, 1)
        out = model(input_ids=ids, use_cache=True)
        streams.append([out.past_key_values, out.logits[:, -1].float(), ids.shape[1]])
    stops = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int) and i >= 0}
    penalty = math.log(repetition_penalty)
    replies: list[list[int]] = [[] for _ in range(k)]
    done = torch.zeros(k, dtype=torch.bool)
    for _ in range(max_new_tokens):
        lp_pref = torch.log_softmax(streams[0][1], dim=-1)
        lp_plain = torch.log_softmax(streams[1][1], dim=-1)
        scores = lp_plain + w * (lp_pref - lp_plain)
        for row, seen in enumerate(replies):
            if seen and penalty > 0:
                scores[row, list(set(seen))] -= penalty
        nxt = scores.argmax(dim=-1)
        for row in range(k):
            if done[row]:
                continue
            t = int(nxt[row])
            if t in stops or "\n" in tok.decode([t]):
                done[row] = True
            else:
                replies[row].append(t)
        if bool(done.all()):
            break
        feed = torch.where(done, torch.full_like(nxt, next(iter(stops), 0)), nxt).view(k, 1)
        for s in streams:
            s[2] += 1
            out = model(input_ids=feed, past_key_values=s[0], use_cache=True,
                        attention_mask=torch.ones(k, s[2], dtype=torch.long))
            s[0], s[1] = out.past_key_values, out.logits[:, -1].float()
    return [tok.decode(r, skip_special_tokens=True).strip() for r in replies]
