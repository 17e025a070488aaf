"""What the generator trains on: images and conditioning texts (:class:`TrainData`), and the cached
token states of those texts (:class:`TextStates`).

Each item gets a few conditioning texts built from its name, aliases, tags and subgroup
(``"grinning face"``, ``"cat face, happy"``, ``"animal mammal: cat"``, :func:`text_variants`). Their
token states ``[L, D]`` are computed once and cached (fp16 safetensors) under the train dir; a
training step only indexes the cache.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmgen.data.catalog import choose_heldout, load_catalog
from pmgen.paths import write_file_atomically
from pmgen.train.generator.config import GeneratorTrainConfig

__all__ = ["TextStates", "TrainData", "choose_heldout", "load_train_data", "text_states_cached", "text_variants"]


@dataclass
class TrainData:
    """Images and conditioning texts, in one fixed order.

    Attributes:
        ids: item ids, ``[N]``.
        images: uint8 ``[N, 3, 64, 64]`` RGB on white.
        texts: conditioning texts per item (at least one each).
        skintone: bool ``[N]``, True for skin-tone variants (down-weighted in UNet epochs).
        heldout: bool ``[N]``, True for items never trained on.
    """

    ids: list[str]
    images: torch.Tensor
    texts: list[list[str]]
    skintone: np.ndarray
    heldout: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[:2] != (n, 3):
            raise ValueError(f"images must be uint8 [{n}, 3, H, W], got {self.images.dtype} {list(self.images.shape)}")
        if len(self.texts) != n or any(len(t) == 0 for t in self.texts):
            raise ValueError("texts must hold at least one text for every item")
        if self.skintone.shape != (n,) or self.heldout.shape != (n,):
            raise ValueError(f"skintone and heldout must be bool [{n}]")
        if not (~self.heldout).any():
            raise ValueError("every item is held out: nothing to train on")

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(~self.heldout)

    @property
    def heldout_index(self) -> np.ndarray:
        return np.flatnonzero(self.heldout)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(json.dumps([self.ids, self.texts, self.heldout.tolist()]).encode())
        h.update(self.images.numpy().tobytes())
        return h.hexdigest()[:16]


def _words(s: str) -> str:
    return s.replace("-", " ").replace("_", " ").strip()


def text_variants(title: str, attributes: dict[str, Any], item_id: str, max_variants: int = 8) -> list[str]:
    """Conditioning texts for one catalog item, most specific first, deduplicated.

    From the name (``"grinning face"``), aliases, name + one tag (``"cat face, happy"``), subgroup +
    shortest name (``"animal mammal: cat"``) and a few tags alone. Which tags are used is fixed per
    item (a hash of the id), so the cache is stable.
    """
    names = [title] + [a for a in attributes.get("aliases") or [] if isinstance(a, str)]
    title_words = set(title.lower().replace(",", " ").replace(":", " ").split())
    tags = [t for t in attributes.get("tags") or [] if isinstance(t, str) and t and t.lower() not in title_words]
    subgroup = _words(str(attributes.get("subgroup") or ""))
    rng = random.Random(int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16))
    picked = rng.sample(tags, k=min(3, len(tags)))
    shortest = min(names, key=len)
    candidates = [*names[:3], *(f"{title}, {t}" for t in picked)]
    if subgroup:
        candidates.append(f"{subgroup}: {shortest}")
    if len(tags) >= 2:
        candidates.append(", ".join(rng.sample(tags, k=min(4, len(tags)))))
    out: list[str] = []
    seen: set[str] = set()
    for text in candidates:
        text = " ".join(text.split())
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out[:max_variants]


def load_train_data(cfg: GeneratorTrainConfig) -> TrainData:
    """Build (once) and load the sticker catalog as :class:`TrainData` (items sorted by id)."""
    catalog = load_catalog(cfg.data_dir).sorted_by_id()
    texts = [text_variants(it.title, it.attributes, it.id, cfg.max_variants) for it in catalog.items]
    skintone = catalog.skintone
    return TrainData(catalog.ids, catalog.images, texts, skintone, choose_heldout(catalog.ids, skintone, cfg.holdout))


# ------------------------------------------------------------------ text states
@dataclass
class TextStates:
    """Cached token states of every item's texts.

    Attributes:
        states: float16 ``[T, L, D]``, the texts of item ``i`` at rows ``offsets[i]:offsets[i+1]``.
        offsets: int64 ``[N + 1]``.
        empty: float32 ``[1, L, D]``, the empty string (classifier-free guidance).
    """

    states: torch.Tensor
    offsets: torch.Tensor
    empty: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def encode_texts(encoder: Any, texts: Sequence[str], max_length: int, batch: int = 256,
                 progress: Callable[[str], None] = print) -> torch.Tensor:
    out = []
    t0 = time.monotonic()
    for start in range(0, len(texts), batch):
        states, _ = encoder.token_states(texts[start:start + batch], max_length=max_length)
        out.append(states.to(torch.float16))
        if (start // batch) % 20 == 0:
            progress(f"text states {start + len(out[-1])}/{len(texts)} ({time.monotonic() - t0:.0f} s)")
    return torch.cat(out)


def text_states_cached(encoder: Any, encoder_id: str, data: TrainData, max_length: int, folder: Path,
                       progress: Callable[[str], None] = print) -> TextStates:
    """Load the token states of every item text from ``folder``, computing them once."""
    from safetensors.torch import load_file, save_file

    flat = [t for texts in data.texts for t in texts]
    key = hashlib.sha1(json.dumps([encoder_id, max_length, flat]).encode()).hexdigest()[:16]
    path = folder / f"text_states-{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
        return TextStates(tensors["states"], tensors["offsets"], tensors["empty"].float())
    progress(f"computing token states of {len(flat)} texts (cached at {path})")
    states = encode_texts(encoder, flat, max_length, progress=progress)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum([len(t) for t in data.texts])]), dtype=torch.int64)
    empty, _ = encoder.token_states([""], max_length=max_length)
    tensors = {"states": states.contiguous(), "offsets": offsets, "empty": empty.to(torch.float16)}
    write_file_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
    return TextStates(states, offsets, empty.to(torch.float16).float())
