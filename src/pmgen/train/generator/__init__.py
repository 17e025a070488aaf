"""Train the ``sticker-tiny`` generator on the OpenMoji catalog, on a CPU, resumably.

Run::

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator --minutes 600
    pmgen train generator --out ... --minutes 300 --resume     # continue exactly

Recipe (read top to bottom, nothing hidden in a framework):

0. **Text.** Each item gets a few conditioning texts built from its name, aliases, tags and
   subgroup (``"grinning face"``, ``"cat face, happy"``, ``"animal mammal: cat"``,
   :func:`text_variants`). Their MiniLM token states ``[L=32, 384]`` are computed once and cached
   (fp16 safetensors) under the train dir; a step only indexes the cache.
1. **VAE** (``vae_steps`` steps): :class:`~diffusers.AutoencoderKL` on 64×64 images, L1 reconstruction
   + a small KL term; cosine LR. Held-out L1 / PSNR is logged. Then the posterior (mean, std) of every
   image is computed once and the latent scaling factor is set to 1 / std of the training latents.
1b. **Decoder** (``decoder_steps`` steps, optional): the encoder is frozen (so the latents, and any
   UNet trained on them, stay valid) and the decoder is tuned with an L1 loss weighted up on
   saturated pixels: plain L1 on a mostly white catalog leaves rare colors (greens) desaturated.
2. **UNet** (until the time budget or ``max_steps``): v-prediction on posterior samples of the cached
   latents, min-SNR-γ loss weighting, the text replaced by the empty string ``cond_drop`` of the time
   (classifier-free guidance), AdamW, linear warmup then constant (or cosine) LR, EMA of the weights.
   No augmentation: flips and crops change what a sticker means (arrows, text, flags).

Every ``checkpoint_minutes`` the full state (models, EMA, optimizers, LR schedulers, step, data
position, the trainer's torch generator and the global python/numpy/torch RNG states) is written
atomically to ``<train dir>/last.pt``; ``--resume`` continues bit-exactly. Every
``milestone_steps`` UNet steps (and when the run ends) the EMA weights are exported as a diffusers
pipeline folder (fp16 safetensors) to ``--out`` with a sample grid ``samples.png``; the grid history
and ``progress.log`` stay in the train dir (``<cache dir>/train/generator`` by default).

**Composition fine-tune** (``composite_share > 0``, issue 19): a share of every UNet batch is drawn
from :mod:`pmgen.composites` — a target sticker shown with an element of a hidden taste, its
condition built by :class:`pmgen.stages.condition.ConditionBuilder` exactly as at inference (target keywords,
then ``w`` copies of the taste's preference keywords). The rest of the batch stays plain catalog
items, so single objects are not forgotten. Rows of different condition lengths are padded and
masked (``encoder_attention_mask``); a dropped condition is the builder's negative (the empty string
at the condition's length). Start it from the shipped weights with ``init_from``::

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator-compose \
        --train-dir ~/.cache/pmgen/train/generator-compose \
        --init-from src/pmgen/zoo/sticker-tiny/generator --composite-share 0.5

Modules: :mod:`~pmgen.train.generator.config` (the settings), :mod:`~pmgen.train.generator.data`
(images, texts, text-state cache), :mod:`~pmgen.train.generator.vae` (stages 1 and 1b),
:mod:`~pmgen.train.generator.trainer` (the state, steps, validation, checkpoints),
:mod:`~pmgen.train.generator.checkpoint` (checks before resuming; the warm start from an export),
:mod:`~pmgen.train.generator.card` (sample grids, export, model card) and
:mod:`~pmgen.train.generator.main` (one command-line run). Importing this package is cheap: the
names below load their module on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "GeneratorTrainConfig": "config",
    "TrainData": "data", "TextStates": "data", "text_variants": "data", "load_train_data": "data",
    "text_states_cached": "data", "encode_texts": "data",
    "GeneratorTrainer": "trainer", "load_export": "trainer", "CHECKPOINT_FORMAT": "trainer",
    "CHECKPOINT_VERSION": "trainer",
    "load_vae_weights": "vae", "psnr": "vae",
    "write_model_card": "card", "sample_grid": "card", "composite_sample_grid": "card", "SAMPLE_PAIRS": "card",
    "TRAINING_LOG": "card",
}
__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "SAMPLE_PAIRS",
    "TRAINING_LOG",
    "GeneratorTrainConfig",
    "GeneratorTrainer",
    "TextStates",
    "TrainData",
    "composite_sample_grid",
    "encode_texts",
    "load_export",
    "load_train_data",
    "load_vae_weights",
    "psnr",
    "sample_grid",
    "text_states_cached",
    "text_variants",
    "write_model_card",
]


def __getattr__(name: str) -> Any:  # lazy: the CLI reads the config without importing torch
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
