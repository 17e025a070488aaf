"""The Ray Data engine on a local Ray (``ray.init(num_cpus=2)``, started and stopped here): the same
request folders, images and index as the local engine; resume; an actor process killed mid-batch."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the Ray engine needs the optional extra: pip install pmgen[ray]")
pytestmark = pytest.mark.ray
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def local_ray():
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                       "OMP_NUM_THREADS": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    from batch_helpers import TinyFactory, write_tiny_models

    root = write_tiny_models(tmp_path_factory.mktemp("tiny-models"))
    return TinyFactory(str(root), str(root / "kw.sqlite"))


def _batch(toy_data, tmp_path, n=5):
    root, items, user = toy_data
    lines = [json.dumps({"request_id": f"r{i}", "user": user.to_json(), "items": str(root / "items.jsonl"),
                         "target_id": "abcd"[i % 4], "seed": i}) for i in range(n)]
    lines.insert(3, '{"request_id": "broken", ')  # a bad line: reported with its number, the rest go on
    p = tmp_path / "batch.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p))
            for p in sorted(folder.glob("*/candidates/*.png")) + sorted(folder.glob("*/chosen.png"))}


def _index(out: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["request_id"] for r in rows})  # every request exactly once
    return {r["request_id"]: r for r in rows}


def test_ray_engine_matches_the_local_engine_and_resumes(local_ray, factory, toy_data, tmp_path, capsys):
    from pmgen.batch.local import run_batch
    from pmgen.batch.ray_engine import run_batch_ray

    batch = _batch(toy_data, tmp_path)
    stats: dict = {}
    assert run_batch_ray(factory, batch, tmp_path / "ray", group_size=2, actors=1, stats=stats) == (5, 1)
    captured = capsys.readouterr()
    assert f"{batch}:4" in captured.err
    assert re.search(r"generating \(Ray\): (\d+)/\1 ", captured.out)  # progress in logs, up to the last request
    assert run_batch(factory(), batch, tmp_path / "local", group_size=2) == (5, 1)
    a, b = _pngs(tmp_path / "ray"), _pngs(tmp_path / "local")
    assert len(a) == 5 * 4 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # identical images, chosen ones included
    for rid in ("r0", "r4"):
        ra = json.loads((tmp_path / "ray" / rid / "record.json").read_text())
        rb = json.loads((tmp_path / "local" / rid / "record.json").read_text())
        for key in ("chosen", "preference_keywords", "target_keywords", "seed", "models", "candidates"):
            assert ra[key] == rb[key], key
    idx = _index(tmp_path / "ray")
    assert sorted(idx) == [f"r{i}" for i in range(5)] and not any(r["retried"] for r in idx.values())
    assert len(stats["latency_s"]) == 5 and stats["candidates"] == 15
    # a re-run resumes: nothing left to do, nothing rewritten
    mtime = (tmp_path / "ray" / "r0" / "record.json").stat().st_mtime_ns
    assert run_batch_ray(factory, batch, tmp_path / "ray", group_size=2, actors=1) == (5, 1)
    assert (tmp_path / "ray" / "r0" / "record.json").stat().st_mtime_ns == mtime


def test_an_actor_killed_mid_batch_is_retried_and_every_request_is_written_once(
        local_ray, factory, toy_data, tmp_path, monkeypatch):
    from pmgen.batch.common import FAULT_ENV
    from pmgen.batch.local import run_batch
    from pmgen.batch.ray_engine import run_batch_ray

    batch = _batch(toy_data, tmp_path)
    monkeypatch.setenv(FAULT_ENV, "2")  # the worker of the 2nd generation task exits while writing its last request
    stats: dict = {}
    out = tmp_path / "ray"
    assert run_batch_ray(factory, batch, out, group_size=2, actors=1, stats=stats) == (5, 1)
    assert len(list((out / ".pmgen-attempts" / ".tasks").iterdir())) >= 4  # 3 groups + the retried one
    idx = _index(out)
    assert sorted(idx) == [f"r{i}" for i in range(5)]
    retried = sorted(k for k, r in idx.items() if r["retried"])
    assert len(retried) == 1 and idx[retried[0]]["attempts"] == 2 and stats["retried"] == retried
    assert not [p.name for p in out.iterdir() if p.name.endswith((".partial", ".old"))]  # no half-written folder
    monkeypatch.delenv(FAULT_ENV)
    assert run_batch(factory(), batch, tmp_path / "local", group_size=2) == (5, 1)
    a, b = _pngs(out), _pngs(tmp_path / "local")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for rid in idx:  # every folder whole: the same files as the local engine's
        files = lambda root: sorted(str(x.relative_to(root)) for x in root.rglob("*"))  # noqa: E731
        assert files(out / rid) == files(tmp_path / "local" / rid)
