"""The settings of a history-image training run (torch-free: the CLI reads it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pmgen.train.soft_prompt.config import SoftPromptTrainConfig


@dataclass
class HistoryImageTrainConfig(SoftPromptTrainConfig):
    """Settings of one history-image training run: :class:`SoftPromptTrainConfig`'s, where ``n_img`` is the
    number of condition tokens and the LLM-only fields (``prefix_length``, ``use_img_tokens``,
    ``budget_tokens``) are not used; plus ``max_images``, the history images read per user."""

    prefix_length: int = 0
    max_images: int = 12
    max_steps: int = 1500
    batch_size: int = 8
    lr: float = 3e-3
    proj_lr: float = 3e-3

    KIND: ClassVar[str] = "history-images"

    def checks(self) -> list[tuple[bool, str, str]]:
        return [*super().checks(), (1 <= self.max_images <= 256, "max_images", "in 1..256"),
                (self.branch == "target", "branch", "'target' (history-image tokens are trained in [T ; S])")]

    @classmethod
    def default_train_dir(cls, values: Mapping[str, Any]) -> Path:
        from pmgen.paths import cache_dir

        return cache_dir() / "train" / f"history-images-{Path(values['out']).name}"
