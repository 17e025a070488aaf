"""One ``pmgen train generator`` run: settings → data (→ composites) → trainer → resume → train."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pmgen.models.generator import count_parameters
from pmgen.train.generator.card import write_model_card
from pmgen.train.generator.config import GeneratorTrainConfig
from pmgen.train.generator.data import load_train_data
from pmgen.train.generator.trainer import GeneratorTrainer
from pmgen.train.run import begin_run, stamped_log, stop_on_signals


def main(given: Mapping[str, Any], resume: bool = False, write_card: bool = False,
         log: Callable[[str], None] = stamped_log) -> int:
    """Train (or, with ``resume``, continue) the run ``given`` describes; exit code (2: bad settings).

    ``given``: :class:`GeneratorTrainConfig` fields set on the command line (see :mod:`pmgen.train.run`
    for what ``resume`` takes from the checkpoint). ``write_card``: only rewrite the model card of
    ``out`` from the run's logs.
    """
    if write_card:
        card = write_model_card(Path(given["out"]), GeneratorTrainConfig.train_dir_of(given))
        print(f"written: {card}")
        return 0
    cfg = begin_run(GeneratorTrainConfig, given, resume, log)
    if cfg is None:
        return 2
    t0 = time.monotonic()
    data = load_train_data(cfg)
    log(f"data: {len(data.ids)} items ({int(data.heldout.sum())} held out, {int(data.skintone.sum())} skin-tone "
        f"variants), {sum(map(len, data.texts))} texts, loaded in {time.monotonic() - t0:.0f} s")
    composites = None
    if cfg.composite_share > 0:
        from pmgen.composites import load_composites

        t1 = time.monotonic()
        composites = load_composites(cfg, data.ids, data.images, data.heldout)
        log(f"composites: {len(composites.train)} training, {len(composites.val)} validation (held-out targets; "
            f"{len(composites.catalog.heldout_targets)} items never composed as targets), "
            f"made in {time.monotonic() - t1:.0f} s")
    trainer = GeneratorTrainer(cfg, data, log=log, composites=composites)
    log(f"VAE {count_parameters(trainer.vae) / 1e6:.2f}M params, UNet {count_parameters(trainer.unet) / 1e6:.2f}M "
        f"params; train dir {trainer.train_dir}")
    if resume:
        trainer.load_checkpoint()
        log(f"resumed at stage {trainer.stage}, VAE step {trainer.vae_step}, decoder step {trainer.dec_step}, "
            f"UNet step {trainer.step}")

    stop = stop_on_signals(log)
    remaining = cfg.minutes - (time.monotonic() - t0) / 60
    trainer.run(minutes=max(remaining, 0.01), stop=stop)
    return 0
