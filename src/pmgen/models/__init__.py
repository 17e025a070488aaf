"""Model roles (one module each); import the module you need, nothing is loaded at import time.

* :mod:`pmgen.models.text_encoder` — token states and pooled sentence vectors (MiniLM by default);
* :mod:`pmgen.models.generator` — the ``sticker-tiny`` latent diffusion generator.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch


def state_hash(tensors: Iterable[tuple[str, Any]]) -> str:
    """A short content hash (16 hex digits) of named tensors, e.g. ``module.state_dict().items()``.

    The hash covers names, dtypes, shapes and values, so it identifies the weights as they are used
    (recorded in every generation's ``models``).
    """
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
