"""The settings of a soft-prompt training run: :class:`SoftPromptTrainConfig` (torch-free: the CLI reads it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pmgen.train.run import RunConfig


@dataclass
class SoftPromptTrainConfig(RunConfig):
    """Settings of one soft-prompt training run (validated on construction).

    Run control (may change on ``--resume``): ``out``, ``minutes``, ``max_steps``, ``train_dir``,
    ``data_dir``, ``checkpoint_minutes``, ``log_every``, ``threads``.

    Attributes:
        out: folder the trained weights are exported to.
        minutes: wall-clock budget of this run (> 0).
        max_steps: stop after this many optimizer steps (the planned length of the run; >= 1).
        train_dir: resume state and logs; ``None`` → ``<cache dir>/train/soft-prompt-<name of out>``.
        prefix_length: P-Tuning-v2 prefix positions per LLM layer (>= 0; see :class:`pmgen.stages.soft.SoftPromptConfig`).
        n_img: [IMG] embeddings, i.e. soft vectors handed to the generator (>= 1).
        use_img_tokens: read the soft vectors at appended [IMG] tokens (else pooled prompt states).
        budget_tokens: token budget of the verbalized history, newest events first (>= 16).
        batch_size: users per step (>= 1).
        lr: AdamW learning rate of the prefix and [IMG] embeddings (> 0).
        proj_lr: AdamW learning rate of the linear map into the text encoder's width (> 0).
        neg_weight: λ of the negative-image hinge (>= 0; 0 drops the negative term).
        margin: m of the negative-image hinge (>= 0).
        user_weight: μ of the other-user hinge (>= 0; 0 drops it).
        user_margin: m_u of the other-user hinge (>= 0).
        match_norm: rescale every soft vector to the text encoder's mean token-state norm.
        positives: ``all`` (ground truth where recorded, else a held-out taste item),
            ``ground-truth`` (only samples with a recorded personalized version of the target: the
            held-out taste items are unrelated to the target text, and learning to draw them teaches
            the soft embeddings to override the target) or ``taste`` (every sample's positive is one of
            the user's own taste stickers, held out of its history: for ``branch="preference"``).
        branch: which generator condition the soft embeddings are trained in. ``target``: ``[T ; S]``,
            PMG's w = 1 concat condition (the paper's). ``preference``: compose mode's preference
            branch ``[P ; S]`` — the user's preference keywords (extracted by the preset's LLM, cached),
            then the soft embeddings, without the target — which compose adds to the target's guidance.
        t_max: share of the noise schedule timesteps are drawn from (in (0, 1]).
        val_users: validation examples, one per val-split user, fixed (>= 1).
        val_every: steps between validations (>= 1).
        seed: data order, noise and initialization.
        init_from: warm start from an exported soft-prompt folder of the same shape (e.g. the
            committed zoo weights, when the resume checkpoint is gone): its weights, step count and
            minutes carry on, the data order continues where its run left off (same seed), the
            optimizer starts afresh. Ignored when ``train_dir`` holds a checkpoint.
    """

    minutes: float = 90.0
    max_steps: int = 480
    log_every: int = 10
    prefix_length: int = 4
    n_img: int = 4
    use_img_tokens: bool = True
    budget_tokens: int = 96
    batch_size: int = 4
    lr: float = 3e-3
    proj_lr: float = 1e-3
    neg_weight: float = 0.5
    margin: float = 0.02
    user_weight: float = 1.0
    user_margin: float = 0.02
    match_norm: bool = True
    positives: str = "ground-truth"
    t_max: float = 0.8
    val_users: int = 48
    val_every: int = 120
    seed: int = 0
    init_from: str | None = None
    branch: str = "target"

    KIND: ClassVar[str] = "soft-prompt"
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("out", "minutes", "max_steps", "train_dir", "data_dir",
                                             "checkpoint_minutes", "log_every", "threads")

    def checks(self) -> list[tuple[bool, str, str]]:
        return [*super().checks(),
                (self.max_steps >= 1, "max_steps", ">= 1"),
                (self.prefix_length >= 0, "prefix_length", ">= 0"),
                (self.n_img >= 1, "n_img", ">= 1"),
                (self.budget_tokens >= 16, "budget_tokens", ">= 16"),
                (self.batch_size >= 1, "batch_size", ">= 1"),
                (self.lr > 0, "lr", "> 0"),
                (self.proj_lr > 0, "proj_lr", "> 0"),
                (self.neg_weight >= 0, "neg_weight", ">= 0"),
                (self.margin >= 0, "margin", ">= 0"),
                (self.user_weight >= 0, "user_weight", ">= 0"),
                (self.positives in ("all", "ground-truth", "taste"), "positives", "'all', 'ground-truth' or 'taste'"),
                (self.branch in ("target", "preference"), "branch", "'target' or 'preference'"),
                (self.user_margin >= 0, "user_margin", ">= 0"),
                (0 < self.t_max <= 1, "t_max", "in (0, 1]"),
                (self.val_users >= 1, "val_users", ">= 1"),
                (self.val_every >= 1, "val_every", ">= 1")]

    @classmethod
    def default_train_dir(cls, values: Mapping[str, Any]) -> Path:
        from pmgen.paths import cache_dir

        return cache_dir() / "train" / f"soft-prompt-{Path(values['out']).name}"
