"""Built-in datasets, built locally from registry packages and cached under the data directory.

    >>> from pmgen.data import datasets
    >>> ds = datasets.load("sticker-users")     # builds stickers + sticker-users on first use
    >>> ds.split("test")[0].target_id

Names: ``stickers``, ``sticker-users``, ``movielens``, ``conversations``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pmgen.data.schema import Dataset
from pmgen.data.validate import load_dataset
from pmgen.paths import data_dir

from . import conversations, movielens, sticker_users, stickers

BUILDERS: dict[str, Callable[..., Path]] = {
    "stickers": stickers.build,
    "sticker-users": sticker_users.build,
    "movielens": movielens.build,
    "conversations": conversations.build,
}
NAMES = tuple(BUILDERS)


def _check(name: str) -> None:
    if name not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r} (known: {', '.join(NAMES)})")


def build(name: str, root: str | Path | None = None, force: bool = False, **options: Any) -> Path:
    """Build dataset ``name`` under the data directory (no-op when already built) and return its folder."""
    _check(name)
    return BUILDERS[name](data_dir(root), force=force, **options)


def load(name: str, root: str | Path | None = None, build_if_missing: bool = True, **options: Any) -> Dataset:
    """Load a built-in dataset, building it first when missing (``build_if_missing``). ``options`` go to
    its builder (``sticker-users``: ``seed=N`` loads another draw of users, :mod:`.sticker_users`)."""
    _check(name)
    if build_if_missing:
        folder = build(name, root, **options)
    else:
        folder = data_dir(root) / (sticker_users.folder_name(options.get("seed", 0)) if name == "sticker-users"
                                   else name)
        if not (folder / "dataset.json").is_file():
            how = f"`pmgen data build {name}`" if not options else f"datasets.build({name!r}, **{options!r})"
            raise FileNotFoundError(f"dataset {folder.name!r} is not built in {folder.parent}; run {how}")
    return load_dataset(folder, name=name)
