"""Tiny models saved to folders and a picklable factory that loads them in any process (Ray actors too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def write_tiny_models(root: Path) -> Path:
    """The ``tiny_pmg`` fixture's kind of models (random, tiny), written once under ``root``."""
    from pmgen.models.scorer import DualEncoder, ScorerConfig
    from tiny_models import tiny_sticker_generator, write_tiny_bert, write_tiny_llama

    torch.manual_seed(0)
    write_tiny_bert(root / "bert")
    tiny_sticker_generator(text_max_length=16).save_pretrained(root / "generator")
    DualEncoder(ScorerConfig(widths=(8, 16), embed_dim=16, text_dim=32)).save(root / "selector", fp16=False)
    write_tiny_llama(root / "llama")
    return root


@dataclass
class TinyFactory:
    """``factory(roles) -> PMG`` for :mod:`pmgen.batch.ray_engine`, loading :func:`write_tiny_models`' folders."""

    root: str
    keyword_cache: str

    def __call__(self, roles=frozenset({"keywords", "generate"})):
        from pmgen.models.generator import StickerGenerator
        from pmgen.models.llm import LLM
        from pmgen.models.scorer import Scorer
        from pmgen.models.text_encoder import TextEncoder
        from pmgen.pipeline import PMG, Settings
        from pmgen.presets import get_preset
        from pmgen.stages.keywords import KeywordCache

        root = Path(self.root)
        settings = Settings(weights=(0.0, 1.0, 2.0), num_inference_steps=3, strength=0.6, guidance_scale=3.0, k=4)
        llm = te = gen = sel = cache = None
        if "keywords" in roles:
            llm = LLM.from_pretrained(root / "llama")
            cache = KeywordCache(self.keyword_cache)
        if "generate" in roles:
            te = TextEncoder(root / "bert")
            gen = StickerGenerator.from_pretrained(root / "generator")
            sel = Scorer.load(root / "selector", te, name="tiny-selector")
        return PMG(get_preset("sticker-tiny", text_max_length=16), llm, te, gen, sel, settings=settings,
                   keyword_cache=cache)
