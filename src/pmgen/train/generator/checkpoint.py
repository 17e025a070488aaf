"""What a generator run starts from: its resume checkpoint (the checks before a run continues from
one) or, for ``init_from``, the weights of an exported pipeline. The trainer
(:class:`~pmgen.train.generator.trainer.GeneratorTrainer`) writes the checkpoint and restores its state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pmgen.models.generator import StickerGenerator
from pmgen.train.generator.config import GeneratorTrainConfig

CHECKPOINT_FORMAT = "pmgen-generator-train"
CHECKPOINT_VERSION = 1


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


def read_checkpoint(path: Path, cfg: GeneratorTrainConfig, data_fingerprint: str,
                    composite_fingerprint: str | None) -> dict[str, Any]:
    """The checkpoint at ``path``, once it is known to be this run's: its format, model settings, data
    and composites (``None``: none) match.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: naming what differs, and what to do.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    state = torch.load(path, weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
    saved = GeneratorTrainConfig(**{k: v for k, v in state["config"].items()})
    differ = cfg.model_fields_differ(saved)
    if differ:
        raise ValueError(f"{path} was trained with a different config ({', '.join(differ)}); "
                         "resume with the same settings or start a new run with another --train-dir")
    if state["data_fingerprint"] != data_fingerprint:
        raise ValueError(f"{path} was trained on different data (catalog or text variants changed)")
    if state.get("composite_fingerprint") != composite_fingerprint:
        raise ValueError(f"{path} was trained on different composites (pmgen.composites changed)")
    return state
