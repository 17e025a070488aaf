"""The settings of a scorer training run: :class:`ScorerTrainConfig` (torch-free: the CLI reads it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pmgen.train.run import RunConfig

AUGMENT_DEFAULTS: dict[str, float] = {"zoom_min": 0.85, "zoom_max": 1.1, "roam": 0.0}
"""The augmentation the shipped scorers were trained with (a run with these keeps its old resume key)."""
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "selector": {"arch": "resnet", "widths": (32, 64, 128, 256), "depth": 1, "seed": 1, "holdout_seed": 101,
                 "steps": 1500},
    "evaluator": {"arch": "convnext", "widths": (32, 64, 128, 256), "depth": 1, "seed": 2, "holdout_seed": 202,
                  "steps": 800},
}


@dataclass
class ScorerTrainConfig(RunConfig):
    """Settings of one scorer training run (validated on construction).

    Attributes:
        out: folder for the shippable model; ``None`` → ``src/pmgen/zoo/sticker-tiny/<role>`` when run
            from a checkout, else ``<cache dir>/zoo/sticker-tiny/<role>``.
        train_dir: resume state; ``None`` → ``<cache dir>/train/scorer-<role>``.
        role: ``selector`` or ``evaluator``; fills in the architecture, seeds and steps below when
            they are left unset.
        arch: image tower, ``resnet`` or ``convnext`` (see :class:`pmgen.models.scorer.ScorerConfig`).
        widths: channels per stage of the image tower.
        depth: blocks per stage.
        embed_dim: width of the shared embedding.
        seed: initialization, batch order and augmentation seed.
        holdout_seed: which catalog groups are held out from training.
        holdout_fraction: share of catalog groups held out (in (0, 0.5)).
        batch_size: images per step (>= 8).
        steps: optimizer steps (>= 1; also the cosine decay's horizon).
        lr: peak AdamW learning rate (> 0).
        weight_decay: AdamW weight decay.
        warmup: linear warmup steps.
        eval_every: steps between held-out loss / accuracy checks.
        generated_strengths: img2img strengths of the generator views of the catalog
            (:mod:`pmgen.train.scorer.generated`) mixed into training; empty → catalog art only.
        generated_fraction: share of a batch's images drawn from those views (in [0, 1]).
        zoom_min, zoom_max: range of the random zoom of each training image (1 = as drawn;
            0.5 = half size, on white).
        roam: how far a shrunk image may move: 0 keeps it near the centre (±4% of the width), 1
            lets it reach the frame's edges (see :func:`pmgen.train.scorer.trainer.augment`).
    """

    out: str | None = None  # type: ignore[assignment]
    checkpoint_minutes: float = 3.0
    role: str = "selector"
    arch: str | None = None
    widths: tuple[int, ...] | None = None
    depth: int | None = None
    embed_dim: int = 256
    seed: int | None = None
    holdout_seed: int | None = None
    holdout_fraction: float = 0.1
    batch_size: int = 128
    steps: int | None = None
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    eval_every: int = 250
    generated_strengths: tuple[float, ...] | None = None
    generated_fraction: float = 0.5
    zoom_min: float = 0.85
    zoom_max: float = 1.1
    roam: float = 0.0

    KIND: ClassVar[str] = "scorer"
    CHECKPOINT_NAME: ClassVar[str] = "resume.pt"

    def normalize(self) -> None:
        for k, v in ROLE_DEFAULTS.get(self.role, {}).items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.widths is not None:
            self.widths = tuple(int(w) for w in self.widths)
        if self.generated_strengths is None:
            self.generated_strengths = ()
        self.generated_strengths = tuple(float(s) for s in self.generated_strengths)
        if self.out is None and self.role in ROLE_DEFAULTS:
            from pmgen.paths import cache_dir
            from pmgen.presets import ZOO

            # a writable checkout trains into its own zoo; an installed, read-only package into the cache
            base = ZOO if os.access(ZOO, os.W_OK) else cache_dir() / "zoo"
            self.out = str(base / "sticker-tiny" / self.role)

    def checks(self) -> list[tuple[bool, str, str]]:
        return [(self.role in ROLE_DEFAULTS, "role", f"one of {', '.join(ROLE_DEFAULTS)}"),
                *super().checks(),
                (0 < self.holdout_fraction < 0.5, "holdout_fraction", "in (0, 0.5)"),
                (self.batch_size >= 8, "batch_size", ">= 8"),
                ((self.steps or 0) >= 1, "steps", ">= 1"),
                (self.lr > 0, "lr", "> 0"),
                (all(0 < s <= 1 for s in self.generated_strengths or ()), "generated_strengths", "each in (0, 1]"),
                (0 <= self.generated_fraction <= 1, "generated_fraction", "in [0, 1]"),
                (0.25 <= self.zoom_min <= self.zoom_max <= 2, "zoom_min", "0.25 <= zoom_min <= zoom_max <= 2"),
                (0 <= self.roam <= 1, "roam", "in [0, 1]")]

    @classmethod
    def default_train_dir(cls, values: Mapping[str, Any]) -> Path:
        from pmgen.paths import cache_dir

        return cache_dir() / "train" / f"scorer-{values.get('role', 'selector')}"
