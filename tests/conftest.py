from __future__ import annotations

import os
from pathlib import Path

import json

import pytest
import torch
from PIL import Image

from pmgen.data.schema import Event, Item, User
from tiny_models import tiny_sticker_generator, write_tiny_bert, write_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data directory with every built-in dataset built once per test session (~20 s)."""
    from pmgen.data import datasets

    root = tmp_path_factory.mktemp("pmgen-data")
    for name in datasets.NAMES:
        datasets.build(name, root)
    return root


@pytest.fixture()
def write_jsonl_lines(tmp_path):
    """Write raw lines (str or bytes) to a file in tmp_path and return its path."""

    def _write(name: str, lines: list[str | bytes]) -> Path:
        p = tmp_path / name
        with p.open("wb") as f:
            for line in lines:
                f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
                f.write(b"\n")
        return p

    return _write


@pytest.fixture(scope="module")
def tiny_pmg(tmp_path_factory):
    from pmgen.models.llm import LLM
    from pmgen.models.scorer import DualEncoder, Scorer, ScorerConfig
    from pmgen.models.text_encoder import TextEncoder
    from pmgen.pipeline import PMG, Settings
    from pmgen.stages.keywords import KeywordCache
    from pmgen.presets import get_preset

    root = tmp_path_factory.mktemp("tiny-pmg")
    torch.manual_seed(0)
    te = TextEncoder(write_tiny_bert(root / "bert"))
    gen = tiny_sticker_generator(text_max_length=16)
    sel_model = DualEncoder(ScorerConfig(widths=(8, 16), embed_dim=16, text_dim=32))
    selector = Scorer(sel_model, te, name="tiny-selector")
    llm = LLM.from_pretrained(write_tiny_llama(root / "llama"))
    preset = get_preset("sticker-tiny", text_max_length=16)
    settings = Settings(weights=(0.0, 1.0, 2.0), num_inference_steps=3, strength=0.6, guidance_scale=3.0, k=4)
    return PMG(preset, llm, te, gen, selector, settings=settings, keyword_cache=KeywordCache(root / "kw.sqlite"))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A tiny dataset folder: 4 items with images, one user."""
    root = tmp_path_factory.mktemp("toy-data")
    (root / "img").mkdir()
    colors = {"a": (250, 200, 0), "b": (200, 80, 0), "c": (0, 120, 255), "d": (230, 30, 60)}
    items = {}
    for iid, col in colors.items():
        im = Image.new("RGB", (64, 64), "white")
        im.paste(Image.new("RGB", (30, 30), col), (17, 17))
        im.save(root / "img" / f"{iid}.png")
        items[iid] = Item(iid, {"a": "grinning face", "b": "cat face", "c": "blue heart", "d": "red heart"}[iid],
                          "tags: test", image=f"img/{iid}.png")
    with open(root / "items.jsonl", "w") as f:
        for it in items.values():
            f.write(json.dumps(it.to_json()) + "\n")
    user = User("u1", [Event("social", item_id="b", value="send", time=1), Event("search", text="cat stickers", time=2),
                       Event("social", item_id="b", value="send", time=3)])
    return root, items, user
