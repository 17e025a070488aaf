"""Shared plumbing for the built-in dataset builders.

A builder writes into a fresh hidden ``<data dir>/.<name>.*.partial`` folder and renames it to ``<data dir>/<name>`` only
when everything (files and ``dataset.json``) is written, so a crash never leaves a half-built
dataset that looks complete. A dataset is rebuilt only when missing, when its builder version
changed, or on ``force=True``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from pmgen.data.schema import write_json


def is_built(folder: Path, version: int, params: dict[str, Any] | None = None) -> bool:
    """True when ``folder/dataset.json`` exists with this builder version and build parameters."""
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if meta.get("builder_version") != version:
        return False
    return params is None or all(meta.get("build_params", {}).get(k) == v for k, v in params.items())


def build_atomically(folder: Path, write: Callable[[Path], dict[str, Any]], version: int,
                     params: dict[str, Any] | None = None) -> Path:
    """Run ``write(tmp_folder) -> meta`` and move the result into place with its ``dataset.json``.

    Each build writes into its own fresh temporary folder, so two processes building the same
    dataset at once never touch each other's half-written files; each finished build is swapped in
    whole (the older folder is renamed away first, then deleted); when another build lands first,
    it is kept.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        meta = write(tmp)
        meta = {"name": folder.name, "builder_version": version, "build_params": params or {}, **meta}
        write_json(tmp / "dataset.json", meta)
        old = tmp.with_suffix(".old")
        try:
            folder.rename(old)  # a previous build (rebuild / force): renamed away, deleted below
        except FileNotFoundError:
            pass
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # another process put its finished build in place meanwhile: keep it (it is complete)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def user_disjoint_splits(user_ids: Sequence[str], seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
                         ) -> dict[str, str]:
    """Assign each user to train/val/test with a fixed seed (the same ids and seed give the same split)."""
    ids = sorted(user_ids)
    rng = random.Random(seed)
    rng.shuffle(ids)
    n = len(ids)
    n_train = round(n * fractions[0])
    n_val = round(n * fractions[1])
    out: dict[str, str] = {}
    for i, uid in enumerate(ids):
        out[uid] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
