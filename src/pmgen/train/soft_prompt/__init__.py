"""``pmgen train soft-prompt``: train the bias-correction LLM's prefix, [IMG] tokens and linear map.

Everything else is frozen: the LLM, the text encoder and the generator. One training example is a
sticker user of the train split, their verbalized history (what the soft prompt reads), the
target's keywords (what the generator is told to draw) and a **positive image** that reflects the
user's taste: the recorded ground-truth personalized sticker (laughing + cats → *cat with tears of
joy*). By default only samples that have one are used (``positives="ground-truth"``); with
``positives="all"`` the others contribute one of the user's own taste stickers, held out of the
history it is paired with (an ablation: those images are unrelated to the target text).

Objective, for soft embeddings ``S`` of the history and target token states ``T``:

    L_pos = ‖v̂(x_pos, t | [T ; S]) − v‖²          (the generator's v-prediction loss)
    L_neg = ‖v̂(x_neg, t | [T ; S]) − v‖²          (a random catalog sticker outside the user's taste,
                                                     same noise and timestep)
    L_oth = ‖v̂(x_pos, t | [T ; S_other]) − v‖²  (the same image, another user's soft embeddings: a
                                                     user of the batch with another taste)
    loss  = L_pos + λ · max(0, m + L_pos − L_neg) + μ · max(0, m_u + L_pos − L_oth)

The hinge is the released code's "minus 0.5 × the negative loss", bounded: once the user's sticker
is reconstructed better than a random one by the margin ``m`` it stops pushing, so the soft
embeddings carry the user's taste rather than growing without bound. The second hinge asks the
user's own soft embeddings to beat another user's on the user's sticker: without it (μ = 0, the
first trained weights) most of what was learned was one user-independent vector (soft embeddings
of different users had cosine 0.93–0.99) that helps any reconstruction and overrides the target at
inference. With ``match_norm`` every soft vector is rescaled to the text encoder's mean token norm.
Timesteps are drawn from the first ``t_max`` of the schedule: at inference the
generator edits the target's image at the preset's strength (0.6 by default), so only those noise
levels are ever used.

Validation (held-out users of the val split, fixed noise and timesteps): ``val_pos`` (L_pos),
``val_neg``, ``val_gain`` = L_pos with the target alone − L_pos with ``[T ; S]``, and
``val_user_gain`` = L_pos with *another* user's soft embeddings (a validation user of a different
taste) − L_pos with the user's own. ``val_gain`` also counts what any appended vectors do to the
generator; ``val_user_gain`` is what the soft embeddings know about *this* user.

The condition ``[T ; S]`` is built by :class:`pmgen.stages.condition.ConditionBuilder` exactly as PMG
builds its w = 1 condition at inference (target keywords, no preference keywords, the soft
embeddings); the loss is :func:`pmgen.train.losses.diffusion_mse`.

With ``branch="preference"`` the soft embeddings are trained where compose mode uses them instead: the
preference branch ``[P ; S]`` (the user's preference keywords, extracted by the preset's LLM and cached,
then the soft embeddings; no target), whose guidance compose adds to the target's. Its positives are then
``positives="taste"``: one of the user's own taste stickers, held out of the history — the branch draws
the taste and compose puts it with the target. ``T`` in the formulas above reads ``P`` there, and
``val_gain`` compares against the preference keywords alone.

Checkpoints (every few minutes and at each validation) hold the trainable weights, the optimizer,
the step, the data order and every RNG, so ``--resume`` continues exactly. The exported folder
(``config.json``, ``soft_prompt.safetensors``, ``README.md``, ``loss.png``) is what presets load.

Modules: ``config`` (the settings), ``data`` (examples), ``trainer``, ``card`` (model card) and
``main`` (one command-line run). Importing this package is cheap: the names below load their module
on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SoftPromptTrainConfig": "config",
    "SoftExamples": "data", "build_examples": "data", "with_positives": "data", "with_preference_texts": "data",
    "other_user_index": "data",
    "one_per_user": "data",
    "SoftPromptTrainer": "trainer", "mean_token_norm": "trainer", "objective": "trainer",
    "CHECKPOINT_FORMAT": "trainer",
    "write_model_card": "card",
    "prepare": "main",
}
__all__ = ["CHECKPOINT_FORMAT", "SoftExamples", "SoftPromptTrainConfig", "SoftPromptTrainer",
           "build_examples", "mean_token_norm", "objective", "one_per_user", "other_user_index", "prepare",
           "with_positives", "with_preference_texts", "write_model_card"]


def __getattr__(name: str) -> Any:  # lazy: the CLI reads the config without importing torch
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
