"""The sticker catalog as training and evaluation read it: items, their 64×64 images, held-out items.

One loader for every reader (the generator, scorer and soft-prompt trainers, ``pmgen models report``):
it builds the ``stickers`` dataset once when missing and returns the items in the dataset's own
order (the order the scorer's and soft prompt's numbers were made with); the generator trainer
sorts them by id (:meth:`ImageCatalog.sorted_by_id`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pmgen.data.schema import Item


@dataclass(frozen=True)
class ImageCatalog:
    """Catalog items and their images, row ``k`` of ``images`` showing ``items[k]``.

    Attributes:
        items: the catalog items.
        images: uint8 ``[N, 3, 64, 64]`` RGB on white.
    """

    items: list[Item]
    images: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.items)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or tuple(self.images.shape[:2]) != (n, 3):
            raise ValueError(f"images must be uint8 [{n}, 3, H, W], got {self.images.dtype} {list(self.images.shape)}")

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def groups(self) -> list[str]:
        """Each item's group key: skin-tone variants share their base emoji's id."""
        return [it.attributes.get("skintone_base") or it.id for it in self.items]

    @property
    def skintone(self) -> np.ndarray:
        """bool ``[N]``, True for skin-tone variants."""
        return np.array([bool(it.attributes.get("skintone")) for it in self.items], dtype=bool)

    def sorted_by_id(self) -> ImageCatalog:
        order = sorted(range(len(self.items)), key=lambda k: self.items[k].id)
        return ImageCatalog([self.items[k] for k in order], self.images[order].contiguous())


def load_catalog(data_dir: str | Path | None = None) -> ImageCatalog:
    """Build (once) and load the ``stickers`` dataset of ``data_dir`` (default: pmgen's data dir).

    Raises:
        ValueError: naming the dataset folder and the item when an item has no image.
    """
    from PIL import Image

    from pmgen.data import datasets

    ds = datasets.load("stickers", data_dir)
    items = list(ds.items.values())
    images = []
    for it in items:
        path = ds.image_path(it)
        if path is None:
            raise ValueError(f"{ds.root}: item {it.id} has no image")
        with Image.open(path) as img:
            images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return ImageCatalog(items, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous())


def choose_heldout(ids: Sequence[str], skintone: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` non-skin-tone items with the smallest SHA-1 of their id, as a bool mask ``[N]``
    (stable across runs and item orders): the generator's held-out items."""
    order = sorted((hashlib.sha1(i.encode()).hexdigest(), k) for k, i in enumerate(ids) if not skintone[k])
    mask = np.zeros(len(ids), dtype=bool)
    mask[[k for _, k in order[:n]]] = True
    return mask
