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
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
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
        return [*super().checks(), (1 <= self.max_images <= 256, "max_images", "in 1..256")]

    @classmethod
    def default_train_dir(cls, values: Mapping[str, Any]) -> Path:
        from pmgen.paths import cache_dir

        return cache_dir() / "train" / f"history-images-{Path(values['out']).name}"


@functools.cache
def _trainer_class() -> type:
    """The trainer (defined on first use: it imports torch and the soft-prompt trainer)."""
    import torch

    from pmgen.stages.history_images import HistoryImageConfig, HistoryImageEncoder
    from pmgen.train.soft_prompt.trainer import SoftPromptTrainer

    class HistoryImageTrainer(SoftPromptTrainer):
        """Trains a :class:`HistoryImageEncoder` against a frozen generator.

        Args: as :class:`SoftPromptTrainer`, without the LLM, plus ``features`` — the frozen image
        encoder's embeddings ``[N, F]`` of every image the examples' ``history_rows`` point to — and
        ``image_encoder_name`` (recorded, checked at inference).
        """

        SHAPE_KEYS = ("feature_dim", "text_width", "n_tokens", "max_images")
        CONFIG_CLASS = HistoryImageTrainConfig
        CHECKPOINT_FORMAT = "pmgen-history-images-train"

        def __init__(self, cfg: HistoryImageTrainConfig, text_encoder: Any, generator: Any, latents: torch.Tensor,
                     features: torch.Tensor, train: Any, val: Any, text_max_length: int = 32,
                     log: Callable[[str], None] = print, image_encoder_name: str = "selector"):
            if not train.history_rows or not val.history_rows:
                raise ValueError("the examples carry no history_rows (build them with build_examples)")
            self.features = features.float()
            self.image_encoder_name = image_encoder_name
            super().__init__(cfg, None, text_encoder, generator, latents, train, val, text_max_length, log=log)

        def build_encoder(self, width: int, norm: float, llm_name: str = "") -> Any:
            cfg = self.cfg
            return HistoryImageEncoder(HistoryImageConfig(
                image_encoder=self.image_encoder_name, feature_dim=int(self.features.shape[1]), text_width=width,
                n_tokens=cfg.n_img, max_images=cfg.max_images, norm=norm))

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

    return HistoryImageTrainer


def __getattr__(name: str) -> Any:
    if name == "HistoryImageTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
| training time | {enc.info.get('train_minutes')} min on a 2-core CPU ({cfg.threads} threads) |
| validation L_pos at start → end | {first.get('val_pos', nan):.5f} → {last.get('val_pos', nan):.5f} |
| validation target-only loss | {last.get('val_target_only', nan):.5f} |
| val_gain (target-only − with tokens) | {last.get('val_gain', nan):+.5f} |
| val_user_gain (another user's tokens − own) | {last.get('val_user_gain', nan):+.5f} |

Reproduce: `pmgen train history-images --out {out.as_posix()} {reproduce_options(cfg)}`.

![loss](loss.png)
""")


def prepare(cfg: HistoryImageTrainConfig, preset: str = "sticker-tiny", log: Callable[[str], None] = print) -> Any:
    """Load the preset's frozen generator, text encoder and selector, embed the catalog, build the trainer."""
    import torch

    from pmgen.data import datasets
    from pmgen.data.catalog import load_catalog
    from pmgen.presets import get_preset, load_generator, load_scorer, load_text_encoder
    from pmgen.train.soft_prompt.data import build_examples, one_per_user, with_positives

    p = get_preset(preset)
    t0 = time.monotonic()
    gen = load_generator(p)
    te = load_text_encoder(p, gen)
    selector = load_scorer(p, "selector", te)
    catalog = load_catalog(cfg.data_dir)
    items, images = catalog.items, catalog.images
    ds = datasets.load("sticker-users", cfg.data_dir)
    rows = {it.id: k for k, it in enumerate(items)}
    with torch.no_grad():
        batches = [images[i:i + 256].float() / 255 for i in range(0, len(items), 256)]
        latents = torch.cat([gen.encode(b) for b in batches])
        features = torch.cat([selector.image_embeddings(b) for b in batches])

    def words(text: str) -> int:  # the history texts are not read here: any token count will do
        return len(text.split())

    train = with_positives(build_examples(ds, "train", words, cfg.budget_tokens, cfg.seed, rows,
                                          history_images=cfg.max_images), cfg.positives)
    val = one_per_user(build_examples(ds, "val", words, cfg.budget_tokens, cfg.seed, rows,
                                      history_images=cfg.max_images), cfg.val_users, cfg.seed)
    log(f"{len(train)} training examples, {len(val)} validation users; models, latents and image embeddings "
        f"ready in {time.monotonic() - t0:.0f} s")
    return _trainer_class()(cfg, te, gen, latents, features, train, val, p.text_max_length, log=log,
                            image_encoder_name=str(getattr(selector, "name", "selector")))


def main(given: Mapping[str, Any], resume: bool = False, preset: str = "sticker-tiny",
         log: Callable[[str], None] | None = None) -> int:
    """Train (or, with ``resume``, continue) a run; exit code (2: bad settings)."""
    from pmgen.train.run import begin_run, stamped_log

    log = log or stamped_log
    cfg = begin_run(HistoryImageTrainConfig, given, resume, log)
    if cfg is None:
        return 2
    from pmgen.train.soft_prompt.main import train_with_progress

    return train_with_progress(prepare(cfg, preset, log), resume, log, "history images")
