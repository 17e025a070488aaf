"""Train a CLIP-style scorer (selector or evaluator) on the OpenMoji catalog.

    pmgen train scorer --role selector          # ~10–20 min on 2 cores
    pmgen train scorer --role evaluator

The image tower learns to match each sticker with texts drawn from its name, aliases and tags,
against the frozen all-MiniLM-L6-v2 pooled vectors (symmetric InfoNCE, learned temperature).
Skin-tone variants of one emoji form one group: a batch never holds two of a group, and a group is
either trained on or held out. The two roles differ in seed, architecture and held-out groups.
Augmentations (small zoom/shift on white, blur, noise) make the scorer robust to generated images;
``--generated-strengths`` also mixes in the generator's own drawings of the catalog (``generated``).

Resume state lives in ``<cache dir>/train/scorer-<role>/``; the shippable model (fp16) goes to
``--out`` with a model card and loss curve. Modules: ``config``, ``trainer`` (with the model card),
``generated`` (the generator views) and ``main``; importing this package is cheap (names load their module on first use).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ScorerTrainConfig": "config", "ROLE_DEFAULTS": "config",
    "train": "trainer", "text_variants": "trainer", "augment": "trainer", "clip_loss": "trainer",
    "evaluate": "trainer", "pooled_text_vectors": "trainer", "write_model_card": "trainer",
    "generated_views": "generated",
}
__all__ = ["ROLE_DEFAULTS", "ScorerTrainConfig", "augment", "clip_loss", "evaluate", "generated_views",
           "pooled_text_vectors",
           "text_variants", "train", "write_model_card"]


def __getattr__(name: str) -> Any:  # lazy: the CLI reads the config without importing torch
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
