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
import re
import secrets
import shutil
from collections.abc import Callable
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


# --------------------------------------------------------------------------------------------
# Safe ids and output paths: the one place that decides every path pmgen writes.

MAX_ID_CHARS = 128
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
RESULT_MARKER = ".pmgen-result"
"""Empty file in every folder pmgen writes as one result; only such folders are ever replaced."""
BATCH_MARKER = ".pmgen-batch"
"""File in every batch output root pmgen created."""


class UnsafePathError(ValueError):
    """An id that cannot be a file name, or a path that would leave its root or overwrite foreign files."""


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`UnsafePathError` saying what is allowed.

    A safe id is 1–128 characters of letters, digits, ``-``, ``_`` and ``.``, not starting with
    ``.`` (so never ``.``, ``..`` or a hidden file) — it can name a file or folder and nothing else.
    """
    if not isinstance(value, str):
        raise UnsafePathError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_CHARS or not _SAFE_ID.fullmatch(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise UnsafePathError(
            f"{what} {shown!r} is not a safe id (expected 1-{MAX_ID_CHARS} letters, digits, '-', '_' or '.', "
            "not starting with '.')")
    return value


def safe_id(text: str, fallback: str = "request") -> str:
    """Turn any text into a safe id (unsafe characters → ``_``, cut to 80 characters)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80].lstrip(".")
    return out or fallback


def inside(root: str | os.PathLike[str], *parts: str) -> Path:
    """``root / parts`` resolved, verified to stay inside ``root`` (symlinks followed).

    Raises:
        UnsafePathError: when the joined path leaves ``root``.
    """
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and not path.is_relative_to(base):
        raise UnsafePathError(f"{Path(*parts)} leaves the folder {base}")
    return path


def is_pmgen_result(folder: Path) -> bool:
    return (Path(folder) / RESULT_MARKER).is_file()


def check_result_dir(out: str | os.PathLike[str]) -> Path:
    """Check that ``out`` may receive a result (before any work): it is new, empty, or a pmgen result.

    Returns the resolved path. Raises :class:`UnsafePathError` naming the problem otherwise.
    """
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UnsafePathError(f"output path {out} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not is_pmgen_result(path):
        raise UnsafePathError(
            f"output folder {out} already holds files that pmgen did not write; pmgen never replaces them "
            "(choose a new or empty folder)")
    if path.parent == path:
        raise UnsafePathError(f"output path {out} is a file system root")
    return path


def write_file_atomically(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write one file atomically: ``write(tmp)`` writes a hidden temporary file beside ``path``
    (``.<name>.<random>.tmp``, same folder, so the rename cannot cross file systems), which then replaces
    ``path``. A reader sees the old file or the new one, never half of one; on any error the temporary
    file is removed and ``path`` is untouched. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_file_atomically` of a UTF-8 text."""
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_result_dir(out: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write one result folder atomically: ``write(tmp)`` fills a fresh temporary folder beside ``out``,
    which is then renamed into place.

    * ``out`` missing → the temp folder becomes ``out``;
    * ``out`` an empty folder → the written files are moved into it;
    * ``out`` a previous pmgen result (has :data:`RESULT_MARKER`) → replaced (the old one is deleted
      only after the new one is in place);
    * anything else → :class:`UnsafePathError`, nothing written.

    An interrupted write leaves at most a hidden ``.<name>.*.partial`` folder that pmgen created.
    """
    path = check_result_dir(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.partial"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / RESULT_MARKER).write_text("written by pmgen; this folder may be replaced by a re-run\n")
        if not path.exists():
            tmp.rename(path)
        elif not any(path.iterdir()):
            for child in tmp.iterdir():
                child.rename(path / child.name)
            tmp.rmdir()
        else:
            check_result_dir(path)  # still ours (checked again right before replacing)
            old = path.parent / f".{path.name}.{secrets.token_hex(4)}.old"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_batch_root(out: str | os.PathLike[str]) -> Path:
    """Check (without creating it) that ``out`` may hold a batch: new, empty, or a pmgen batch folder."""
    path = Path(out).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UnsafePathError(f"output path {out} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / BATCH_MARKER).is_file():
        raise UnsafePathError(
            f"output folder {out} already holds files that pmgen did not write (no {BATCH_MARKER}); "
            "choose a new or empty folder")
    return path


def prepare_batch_root(out: str | os.PathLike[str]) -> Path:
    """Create (or reuse) a batch output root: new, empty, or one pmgen created before (resume)."""
    path = check_batch_root(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / BATCH_MARKER).write_text("batch output written by pmgen\n")
    return path
