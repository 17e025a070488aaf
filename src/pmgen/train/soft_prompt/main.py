"""One ``pmgen train soft-prompt`` run: settings → the preset's frozen models and the examples →
trainer → resume → train (with a progress bar)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pmgen.train.run import begin_run, stamped_log, stop_on_signals
from pmgen.train.soft_prompt.config import SoftPromptTrainConfig
from pmgen.train.soft_prompt.data import build_examples, one_per_user, with_positives, with_preference_texts
from pmgen.train.soft_prompt.trainer import SoftPromptTrainer


def prepare(cfg: SoftPromptTrainConfig, preset: str = "sticker-tiny", log: Callable[[str], None] = print
            ) -> SoftPromptTrainer:
    """Load the preset's frozen models and the ``sticker-users`` examples, and build a trainer."""
    from pmgen.data import datasets
    from pmgen.data.catalog import load_catalog
    from pmgen.presets import get_preset, load_generator, load_llm, load_text_encoder

    p = get_preset(preset)
    t0 = time.monotonic()
    gen = load_generator(p)
    te = load_text_encoder(p, gen)
    llm = load_llm(p)
    catalog = load_catalog(cfg.data_dir)
    items, images = catalog.items, catalog.images
    ds = datasets.load("sticker-users", cfg.data_dir)
    rows = {it.id: k for k, it in enumerate(items)}
    with torch.no_grad():
        latents = torch.cat([gen.encode(images[i:i + 256].float() / 255) for i in range(0, len(items), 256)])
    taste = cfg.positives == "taste"
    train = build_examples(ds, "train", llm.count_tokens, cfg.budget_tokens, cfg.seed, rows, taste_positives=taste)
    train = with_positives(train, cfg.positives)
    val = one_per_user(build_examples(ds, "val", llm.count_tokens, cfg.budget_tokens, cfg.seed, rows,
                                      taste_positives=taste), cfg.val_users, cfg.seed)
    if cfg.branch == "preference":
        texts = preference_keywords(p, llm, ds, sorted({*train.user_ids, *val.user_ids}), log)
        train, val = with_preference_texts(train, texts), with_preference_texts(val, texts)
    n_gt = sum(k == "ground truth" for k in train.positive_kind)
    log(f"{len(train)} training examples ({n_gt} with a ground-truth sticker), {len(val)} validation users; "
        f"models and latents ready in {time.monotonic() - t0:.0f} s")
    return SoftPromptTrainer(cfg, llm, te, gen, latents, train, val, p.text_max_length, log=log,
                             llm_name=getattr(llm, "name", "smollm2"))


def preference_keywords(preset: Any, llm: Any, ds: Any, users: list[str], log: Callable[[str], None]
                        ) -> dict[str, str]:
    """The preference keywords of ``users`` as PMG extracts them with the preset's settings (the keyword
    cache makes a second run instant), with a progress bar."""
    from tqdm import tqdm

    from pmgen.pipeline import Settings
    from pmgen.stages.keywords import KeywordCache, PreferenceExtractor
    from pmgen.train.background import preference_keywords_by_user

    s = Settings.for_preset(preset)
    extractor = PreferenceExtractor(llm, k=s.k, cache=KeywordCache(), budget_tokens=s.budget_tokens)
    t0 = time.monotonic()
    with tqdm(total=len(users), desc="preference keywords", unit="user", mininterval=5, file=sys.stderr) as bar:
        texts = preference_keywords_by_user(extractor, ds, users, progress=lambda i, n: bar.update(i - bar.n))
    log(f"preference keywords of {len(users)} users in {time.monotonic() - t0:.0f} s "
        f"({sum(not t for t in texts.values())} without any)")
    return texts


def main(given: Mapping[str, Any], resume: bool = False, preset: str = "sticker-tiny",
         log: Callable[[str], None] = stamped_log) -> int:
    """Train (or, with ``resume``, continue) the run ``given`` describes; exit code (2: bad settings).

    ``given``: :class:`SoftPromptTrainConfig` fields set on the command line (see :mod:`pmgen.train.run`
    for what ``resume`` takes from the checkpoint); ``preset``: whose LLM, text encoder and generator.
    """
    cfg = begin_run(SoftPromptTrainConfig, given, resume, log)
    if cfg is None:
        return 2
    return train_with_progress(prepare(cfg, preset, log), resume, log, "soft prompt")


def train_with_progress(trainer: SoftPromptTrainer, resume: bool, log: Callable[[str], None], desc: str) -> int:
    """Resume ``trainer`` (if asked) and train it with a progress bar until done or signalled; exit code."""
    if resume:
        try:
            trainer.load_checkpoint()
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        log(f"resumed at step {trainer.step} (epoch {trainer.epoch})")
    stop = stop_on_signals(log)
    from tqdm import tqdm

    with tqdm(total=trainer.cfg.max_steps, initial=trainer.step, desc=desc, unit="step",
              mininterval=5, file=sys.stderr) as bar:
        def progress(step: int, losses: dict[str, float]) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", pos=f"{losses['pos']:.4f}", refresh=False)

        trainer.run(stop=stop, progress=progress)
    return 0
