"""One ``pmgen train history-images`` run: the preset's frozen models, the catalog's latents and image
embeddings, the examples → trainer → resume → train."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from pmgen.train.history_images.config import HistoryImageTrainConfig


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
    from pmgen.stages.history_images import image_tower

    selector = image_tower(load_scorer(p, "selector", te))  # an ensemble's first member: one selector's embeddings
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
    from pmgen.train.history_images.trainer import HistoryImageTrainer

    return HistoryImageTrainer(cfg, te, gen, latents, features, train, val, p.text_max_length, log=log,
                            image_encoder_name=str(getattr(selector, "name", "selector")),
                            image_encoder_hash=str(getattr(selector, "content_hash", "") or ""))


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
