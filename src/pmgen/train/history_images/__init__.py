"""``pmgen train history-images``: train the projection of history images into condition tokens.

The soft prompt's recipe (:mod:`pmgen.train.soft_prompt`) with another encoder: the user's history
stickers, embedded by the frozen selector image tower, averaged and mapped by a trained
``Linear + LayerNorm`` to ``n_img`` tokens at a word's norm (:class:`pmgen.stages.history_images.
HistoryImageEncoder`). Same examples (the train users of ``sticker-users``; by default only samples
with a recorded personalized sticker, whose image is the positive), same objective —

    L_pos + λ·max(0, m + L_pos − L_neg) + μ·max(0, m_u + L_pos − L_oth)

with the condition ``[T ; H]`` built by :class:`pmgen.stages.condition.ConditionBuilder` — same
validation, checkpoints, exact resume and export. The positive is never among the history images it
reads (no copying shortcut). No LLM is loaded: the examples' history texts are not read.

Modules: ``config`` (the settings; torch-free, the CLI reads it), ``trainer`` (the trainer and its model
card) and ``main`` (one command-line run). The names below load their module on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"HistoryImageTrainConfig": "config", "HistoryImageTrainer": "trainer", "write_model_card": "trainer",
            "prepare": "main", "main": "main"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: the CLI reads the config without importing torch
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
