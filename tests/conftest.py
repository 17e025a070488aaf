from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data directory with every built-in dataset built once per test session (~20 s)."""
    from pmgen import datasets

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
