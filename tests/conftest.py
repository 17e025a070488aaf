from __future__ import annotations

import os
from pathlib import Path

import json

import pytest
from PIL import Image

from pmgen.data.schema import Event, Item, User

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
    from serve_helpers import build_tiny_pmg

    return build_tiny_pmg(tmp_path_factory.mktemp("tiny-pmg"))


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


# ------------------------------------------------------------------ the service's store: SQLite and PostgreSQL
STORES = ["sqlite", "postgresql"]
"""The service tests run on both stores: SQLite (a file under the test's root) and a real PostgreSQL."""


@pytest.fixture(scope="session")
def postgres_admin_url():
    """A throwaway PostgreSQL server for the session (pmgen.data.pg_local); skipped where PostgreSQL is not
    installed, except in CI (``make setup`` installs it there)."""
    from pmgen.data.pg_local import pg_bin, postgres_server

    if pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing: `make setup` installs it (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (run `make setup`)")
    with postgres_server() as url:
        yield url


def _postgres_database(request, name: str) -> str:
    from pmgen.data.pg_local import create_database

    admin = request.getfixturevalue("postgres_admin_url")
    created = request.session.__dict__.setdefault("_pmgen_pg_databases", {})
    if name not in created:
        created[name] = create_database(admin, name)
    return created[name]


@pytest.fixture(params=STORES)
def store_url(request):
    """The store URL of one service test: ``None`` (SQLite under the test's root) or an emptied PostgreSQL
    database (one per session, its tables emptied before each test)."""
    if request.param == "sqlite":
        return None
    import sqlalchemy as sa

    from pmgen.data.store import Store

    url = _postgres_database(request, "pmgen_tests")
    store = Store.open(url)  # migrated on first use
    with store.engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE users, events, generations, feedback RESTART IDENTITY CASCADE"))
    store.close()
    return url


@pytest.fixture(scope="module", params=STORES)
def module_store_url(request):
    """As ``store_url``, for a module-scoped server: a PostgreSQL database of the module's own."""
    if request.param == "sqlite":
        return None
    return _postgres_database(request, "pmgen_" + request.module.__name__.replace(".", "_"))
