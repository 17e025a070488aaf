"""The history-image trainer: the soft prompt's trainer with a :class:`HistoryImageEncoder` in place of the
LLM (see :mod:`pmgen.train.history_images`), and its model card."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pmgen.stages.history_images import HistoryImageConfig, HistoryImageEncoder
from pmgen.train.history_images.config import HistoryImageTrainConfig
from pmgen.train.soft_prompt.trainer import SoftPromptTrainer


class HistoryImageTrainer(SoftPromptTrainer):
    """Trains a :class:`HistoryImageEncoder` against a frozen generator.

    Args: as :class:`SoftPromptTrainer`, without the LLM, plus ``features`` — the frozen image
    encoder's embeddings ``[N, F]`` of every image the examples' ``history_rows`` point to — and
    ``image_encoder_name`` / ``image_encoder_hash`` (recorded, checked at inference).
    """

    SHAPE_KEYS = ("feature_dim", "text_width", "n_tokens", "max_images")
    CHECKPOINT_FORMAT = "pmgen-history-images-train"

    def __init__(self, cfg: HistoryImageTrainConfig, text_encoder: Any, generator: Any, latents: torch.Tensor,
                 features: torch.Tensor, train: Any, val: Any, text_max_length: int = 32,
                 log: Callable[[str], None] = print, image_encoder_name: str = "selector",
                 image_encoder_hash: str = ""):
        if not train.history_rows or not val.history_rows:
            raise ValueError("the examples carry no history_rows (build them with build_examples)")
        self.features = features.float()
        self.image_encoder_name = image_encoder_name
        self.image_encoder_hash = image_encoder_hash
        super().__init__(cfg, None, text_encoder, generator, latents, train, val, text_max_length, log=log)

    def build_encoder(self, width: int, norm: float, llm_name: str = "") -> Any:
        cfg = self.cfg
        return HistoryImageEncoder(HistoryImageConfig(
            image_encoder=self.image_encoder_name, feature_dim=int(self.features.shape[1]), text_width=width,
            n_tokens=cfg.n_img, max_images=cfg.max_images, norm=norm, image_encoder_hash=self.image_encoder_hash))

    def encode(self, ex: Any, idx: Sequence[int]) -> torch.Tensor:
        rows = [ex.history_rows[i][: self.cfg.max_images] for i in idx]
        n = max(1, max(len(r) for r in rows))
        feats = torch.zeros(len(rows), n, self.features.shape[1])
        mask = torch.zeros(len(rows), n)
        for k, r in enumerate(rows):
            if r:
                feats[k, :len(r)] = self.features[r]
                mask[k, :len(r)] = 1
        return self.encoder(feats, mask)

    def load_export(self, folder: Path) -> Any:
        return HistoryImageEncoder.load(Path(folder))

    def write_card(self) -> None:
        write_model_card(self)


def write_model_card(trainer: Any) -> None:
    """``README.md`` and ``loss.png`` of the exported encoder."""
    from pmgen.train.soft_prompt.card import plot_losses, reproduce_options

    cfg, out = trainer.cfg, Path(trainer.cfg.out)
    plot_losses(trainer, f"history images → {cfg.n_img} condition tokens")
    va = [h for h in trainer.history if "val_pos" in h]
    first, last = (va[0], va[-1]) if va else ({}, {})
    enc = trainer.encoder.cfg
    nan = float("nan")
    (out / "README.md").write_text(f"""# sticker-tiny history-image encoder

The user's {enc.max_images} most recent distinct history stickers, embedded by the frozen
`{enc.image_encoder}` image tower ({enc.feature_dim}-d unit vectors), averaged and mapped by a trained
Linear + LayerNorm to {enc.n_tokens} condition tokens at the text encoder's mean token norm
({enc.norm:.2f}). Trained against the frozen sticker generator
(`{trainer.generator.info.get('name', 'zoo:sticker-tiny/generator')}`) on the train users of
`sticker-users`; in PMG they are the fourth condition group, `[T ; (P ; S ; H) × w]`.

| | |
|---|---|
| training examples / validation users | {len(trainer.train_ex)} / {len(trainer.val_ex)} |
| steps × batch | {trainer.step} × {cfg.batch_size} (epoch {trainer.epoch}) |
| objective | L_pos + {cfg.neg_weight:g}·hinge(negative image, m = {cfg.margin:g}) + {cfg.user_weight:g}·hinge(other user's tokens, m = {cfg.user_margin:g}) |
| training time | {enc.info.get('train_minutes')} min on a 2-core CPU ({cfg.threads} thread{'' if cfg.threads == 1 else 's'}) |
| validation L_pos at start → end | {first.get('val_pos', nan):.5f} → {last.get('val_pos', nan):.5f} |
| validation target-only loss | {last.get('val_target_only', nan):.5f} |
| val_gain (target-only − with tokens) | {last.get('val_gain', nan):+.5f} |
| val_user_gain (another user's tokens − own) | {last.get('val_user_gain', nan):+.5f} |

Reproduce: `pmgen train history-images --out {out.as_posix()} {reproduce_options(cfg)}`.

![loss](loss.png)
""")
