"""Weighting: turn target keywords, preference keywords and soft embeddings into generator conditions.

For a preference weight ``w`` a :class:`Condition` holds token-level ``prompt_embeds`` and a
matching ``negative_prompt_embeds`` (same shape) for classifier-free guidance. Two modes:

``"concat"`` — the paper's weighting. The condition is the target states followed by ``w`` copies
    of the *preference unit* (the preference keywords' real token states, then the soft
    embeddings): ``[T ; (P ; S) × w]``. A fractional ``w`` adds the first ``frac(w)`` share of one
    more unit. Repetition raises the preference's share of the cross-attention, which is how PMG's
    released code weights it (there by repeating the keyword string). The negative embedding is
    the empty string's states padded to the same length.
``"guidance"`` — a continuous weighting by composing guidance directions:
    ``ε = ε_u + g·(ε_t − ε_u) + w·(ε_{t+p} − ε_t)``, where ``ε_t`` is conditioned on the target
    alone and ``ε_{t+p}`` on ``[T ; P ; S]``. Needs one more UNet call per step.
``"compose"`` — the preference as a concept of its own, composed with the target (Composable
    Diffusion's AND, Liu et al. 2022): ``ε = ε_u + g·(ε_t − ε_u) + c·w·(ε_p − ε_u)``, where ``ε_p`` is
    conditioned on the preference alone (the keywords as a prompt, then the soft embeddings and any
    history-image tokens) and ``c`` = :data:`COMPOSE_SCALE`. The target's own guidance is untouched at
    every weight, so the target is kept while the preference adds to it. One more UNet call per step.

In every mode ``w = 0`` gives exactly the target-only condition (the non-personalized baseline),
so with the same seed and init image the baseline is reproduced bit for bit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pmgen.settings import WEIGHTING_MODES  # noqa: E402,F401  (re-exported)
COMPOSE_SCALE = 2.0
"""``"compose"`` mode: the preference's guidance scale per unit of weight (``w = 1`` → ``c·w = 2``)."""
log = logging.getLogger(__name__)


def keywords_text(keywords: Sequence[str]) -> str:
    """``["cat", "kitten"]`` → ``"cat, kitten"`` (the text form encoded and scored)."""
    return ", ".join(k.strip() for k in keywords if k and k.strip())


@dataclass
class Condition:
    """One generator condition. Tensors are float32 ``[1, L, D]``.

    ``extra_prompt_embeds`` / ``extra_scale`` are set in ``"guidance"`` and ``"compose"`` modes for
    ``w > 0``; ``extra_base`` says which prediction the extra direction starts from (``"cond"``: the
    target's, ``"uncond"``: the unconditional one).
    """

    weight: float
    mode: str
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    extra_prompt_embeds: torch.Tensor | None = None
    extra_scale: float = 0.0
    extra_base: str = "cond"
    n_preference_tokens: int = 0
    warnings: list[str] = field(default_factory=list)


class ConditionBuilder:
    """Encodes texts with the generator's text encoder (cached) and assembles conditions.

    Args:
        text_encoder: has ``token_states(texts, max_length) -> (states [B, L, D], mask [B, L])``.
        max_length: token length of the target condition — the length the generator was trained on
            (32 for ``sticker-tiny``, 77 for Stable Diffusion).
        mode: ``"concat"`` or ``"guidance"``.
    """

    def __init__(self, text_encoder: Any, max_length: int = 32, mode: str = "concat"):
        if mode not in WEIGHTING_MODES:
            raise ValueError(f"weighting mode must be one of {WEIGHTING_MODES}, got {mode!r}")
        self.text_encoder = text_encoder
        self.max_length = int(max_length)
        self.mode = mode
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, int, bool]] = {}

    def encode(self, text: str, length: int | None = None) -> tuple[torch.Tensor, int, bool]:
        """States ``[L, D]`` of ``text`` padded to ``length`` (default ``max_length``), its number of
        real tokens, and whether it was truncated."""
        length = length or self.max_length
        key = (text, length)
        if key not in self._cache:
            states, mask = self.text_encoder.token_states([text], max_length=length)
            n_real = int(mask[0].sum())
            truncated = False
            if n_real >= length and text:
                full = self.text_encoder.token_states([text], max_length=max(length * 4, 128))[1]
                truncated = int(full[0].sum()) > n_real
            self._cache[key] = (states[0].float(), n_real, truncated)
        return self._cache[key]

    @property
    def width(self) -> int:
        """The text encoder's state width D."""
        return int(self.unconditional(self.max_length).shape[-1])

    def unconditional(self, length: int) -> torch.Tensor:
        """The empty string's states ``[length, D]``."""
        return self.encode("", length)[0]

    def preference_unit(self, preference_keywords: Sequence[str], soft: torch.Tensor | None,
                        warnings: list[str]) -> torch.Tensor:
        """``[P_real ; S]``: the preference keywords' real token states, then the soft embeddings."""
        text = keywords_text(preference_keywords)
        parts = []
        if text:
            states, n_real, truncated = self.encode(text)
            if truncated:
                warnings.append(f"preference keywords exceed the text encoder's {self.max_length} tokens; "
                                f"truncated to the first {n_real} tokens")
            parts.append(states[:n_real])
        if soft is not None:
            if soft.dim() != 2 or soft.shape[-1] != self.width:
                raise ValueError(f"soft embeddings must be [n_img, {self.width}], "
                                 f"got {tuple(soft.shape)}")
            parts.append(soft.float())
        if not parts:
            return torch.zeros(0, self.width)
        return torch.cat(parts)

    def build(self, target_keywords: Sequence[str], preference_keywords: Sequence[str], weight: float,
              soft: torch.Tensor | None = None) -> Condition:
        """The condition for preference weight ``weight`` (≥ 0)."""
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"preference weight must be a finite number >= 0, got {weight}")
        warnings: list[str] = []
        target_text = keywords_text(target_keywords)
        t_states, _, t_trunc = self.encode(target_text)
        if t_trunc:
            warnings.append(f"target keywords exceed {self.max_length} tokens; truncated")
        base = t_states.unsqueeze(0)
        uncond = self.unconditional(self.max_length).unsqueeze(0)
        if weight == 0:
            return Condition(weight, self.mode, base, uncond, warnings=warnings)
        unit = self.preference_unit(preference_keywords, soft, warnings)
        if unit.shape[0] == 0:
            warnings.append("no preference keywords or soft embeddings: the condition is the target alone")
            return Condition(weight, self.mode, base, uncond, warnings=warnings)
        for w in warnings:
            log.warning(w)
        if self.mode == "compose":
            p_states = self.encode(keywords_text(preference_keywords))[0]
            extra = torch.cat([p_states, *([soft.float()] if soft is not None else [])]).unsqueeze(0)
            return Condition(weight, self.mode, base, uncond, extra_prompt_embeds=extra,
                             extra_scale=COMPOSE_SCALE * float(weight), extra_base="uncond",
                             n_preference_tokens=unit.shape[0], warnings=warnings)
        if self.mode == "guidance":
            extra = torch.cat([t_states, unit]).unsqueeze(0)
            return Condition(weight, self.mode, base, uncond, extra_prompt_embeds=extra, extra_scale=float(weight),
                             n_preference_tokens=unit.shape[0], warnings=warnings)
        whole, frac = int(weight), weight - int(weight)
        blocks = [unit] * whole
        if frac > 0:
            blocks.append(unit[: max(1, math.ceil(frac * unit.shape[0]))])
        pref = torch.cat(blocks)
        cond = torch.cat([t_states, pref]).unsqueeze(0)
        neg = self.unconditional(cond.shape[1]).unsqueeze(0)
        return Condition(weight, self.mode, cond, neg, n_preference_tokens=pref.shape[0], warnings=warnings)
