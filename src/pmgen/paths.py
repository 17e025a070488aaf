"""Where pmgen keeps its files.

pmgen writes two kinds of local state, both outside the repository:

* the **cache directory** (``$PMGEN_CACHE_DIR``, default ``$XDG_CACHE_HOME/pmgen`` or
  ``~/.cache/pmgen``): dequantized model weights, keyword caches, training resume checkpoints;
* the **data directory** (``$PMGEN_DATA_DIR``, default ``<cache dir>/data``): built-in datasets,
  each in its own sub-folder, rebuilt only when missing.

Both can also be passed explicitly to every function and CLI command that uses them.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return pmgen's cache directory (created if missing)."""
    if override is not None:
        path = Path(override)
    elif os.environ.get("PMGEN_CACHE_DIR"):
        path = Path(os.environ["PMGEN_CACHE_DIR"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "pmgen"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory holding built-in datasets (created if missing)."""
    if override is not None:
        path = Path(override)
    elif os.environ.get("PMGEN_DATA_DIR"):
        path = Path(os.environ["PMGEN_DATA_DIR"])
    else:
        path = cache_dir() / "data"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str) -> Path:
    """Locate an installed package's folder *without importing it*.

    Several registry packages pmgen uses only carry files (a GGUF model, a font, a dataset); some
    of them import heavy, unused dependencies at import time, so we never import them.

    Raises:
        FileNotFoundError: naming the package and how to install it.
    """
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise FileNotFoundError(
            f"the Python package '{dist}' is not installed; install it with "
            f"`pip install --no-deps {dist}` (or run `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))
