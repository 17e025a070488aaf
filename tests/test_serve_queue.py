"""The store beyond one process, on SQLite and PostgreSQL: migrations, the durable queue (claims, leases,
exactly one result), the per-user feedback posterior cache, and ``/metrics``."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import sqlalchemy as sa  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_helpers import toy_catalog  # noqa: E402

from pmgen.data.store import SCHEMA_REVISION, STORE_FILE, Store, alembic_config, sqlite_url  # noqa: E402
from pmgen.serve.app import create_app  # noqa: E402
from pmgen.stages.feedback import FeedbackEvent, learn  # noqa: E402

EVENTS = [{"type": "social", "item_id": "b", "value": "send", "time": 1},
          {"type": "search", "text": "cat stickers", "time": 2}]


@pytest.fixture()
def store(store_url, tmp_path):
    s = Store.open(store_url or sqlite_url(tmp_path / STORE_FILE))
    yield s
    s.close()


def test_concurrent_claimers_get_each_generation_exactly_once(store):
    n, claims, lock = 30, [], threading.Lock()
    for i in range(n):
        store.add_generation(f"g{i:03d}", "u", {"i": i})

    def worker(owner: str) -> None:
        while (gen := store.claim(owner, lease_s=30)) is not None:
            with lock:
                claims.append(gen.id)
            assert store.finish(gen.id, {"by": owner}, owner=owner)

    threads = [threading.Thread(target=worker, args=(f"w{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claims) == [f"g{i:03d}" for i in range(n)]  # each once, none lost
    assert store.counts() == {"queued": 0, "running": 0, "done": n, "failed": 0}
    assert {store.generation(g).attempts for g in claims} == {1}


def test_an_expired_lease_is_claimed_again_and_the_late_worker_cannot_finish(store):
    store.add_generation("g1", "u", {})
    first = store.claim("dead", lease_s=-1)  # its worker died: the lease is over at once
    assert (first.id, first.attempts, first.resumed) == ("g1", 1, 0)
    assert not store.held("g1")
    second = store.claim("alive", lease_s=30)
    assert (second.id, second.attempts, second.resumed, second.lease_owner) == ("g1", 2, 1, "alive")
    assert store.held("g1") and store.claim("third", lease_s=30) is None  # a live lease is not taken
    assert not store.renew("g1", "dead", 30) and not store.finish("g1", {"by": "dead"}, owner="dead")
    assert store.renew("g1", "alive", 30) and store.finish("g1", {"by": "alive"}, owner="alive")
    assert not store.finish("g1", {"by": "alive"}, owner="alive")  # exactly one result
    g = store.generation("g1")
    assert (g.status, g.record, g.attempts) == ("done", {"by": "alive"}, 2)


def test_the_queue_bound_holds_in_the_store(store):
    assert all(store.enqueue(f"g{i}", "u", {}, max_queued=3) for i in range(3))
    assert not store.enqueue("g3", "u", {}, max_queued=3) and store.generation("g3") is None
    store.claim("w", 30)
    assert store.enqueue("g3", "u", {}, max_queued=3) and store.queue_depth() == 3


def test_a_store_made_before_the_migrations_is_upgraded_in_place(tmp_path):
    url = sqlite_url(tmp_path / "old.sqlite")
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the schema as Store.create_all made it before the migrations
        conn.exec_driver_sql("CREATE TABLE users (user_id VARCHAR(128) PRIMARY KEY, created_at FLOAT NOT NULL)")
        conn.exec_driver_sql("CREATE TABLE events (id INTEGER PRIMARY KEY, user_id VARCHAR(128) NOT NULL, "
                             "event TEXT NOT NULL, created_at FLOAT NOT NULL)")
        conn.exec_driver_sql("CREATE TABLE generations (id VARCHAR(128) PRIMARY KEY, user_id VARCHAR(128) NOT NULL, "
                             "status VARCHAR(16) NOT NULL, request TEXT NOT NULL, record TEXT, error TEXT, "
                             "attempts INTEGER NOT NULL, resumed INTEGER NOT NULL, created_at FLOAT NOT NULL, "
                             "started_at FLOAT, finished_at FLOAT)")
        conn.exec_driver_sql("CREATE TABLE feedback (id INTEGER PRIMARY KEY, generation_id VARCHAR(128) NOT NULL, "
                             "user_id VARCHAR(128) NOT NULL, candidate INTEGER NOT NULL, weight FLOAT NOT NULL, "
                             "signal VARCHAR(16) NOT NULL, created_at FLOAT NOT NULL)")
        conn.exec_driver_sql("INSERT INTO generations VALUES ('old1', 'u', 'queued', '{}', NULL, NULL, 0, 0, 1.0, "
                             "NULL, NULL)")
    engine.dispose()
    store = Store.open(url)
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == SCHEMA_REVISION
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == SCHEMA_REVISION
    assert store.claim("w", 30).id == "old1"  # the old row, now with a lease
    store.close()
    Store.open(url).close()  # opening again changes nothing


def test_metrics_in_prometheus_text(tiny_pmg, toy_data, tmp_path, store_url):
    with TestClient(create_app(tiny_pmg, toy_catalog(toy_data), root=tmp_path, store_url=store_url)) as c:
        c.post("/v1/users/u/events", json={"events": EVENTS})
        gid = c.post("/v1/generations", json={"user_id": "u", "target_id": "a", "weights": [0]}).json()["id"]
        assert c.get(f"/v1/generations/{gid}", params={"wait": 60}).json()["status"] == "done"
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        fams = {f.name: f for f in text_string_to_metric_families(r.text)}
        value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
        assert value[("pmgen_queue_depth", ())] == 0 and value[("pmgen_generations_running", ())] == 0
        assert value[("pmgen_generations", (("status", "done"),))] == 1
        assert value[("pmgen_generation_latency_seconds_count", ())] == 1
        assert value[("pmgen_generation_latency_seconds_bucket", (("le", "+Inf"),))] == 1
        assert 0 < value[("pmgen_generation_latency_seconds_sum", ())] < 60
        assert value[("pmgen_replicas", ())] == 1


def test_the_feedback_posterior_is_cached_per_user_and_updated_with_new_rows_only(tiny_pmg, toy_data, tmp_path,
                                                                                  store_url, monkeypatch):
    with TestClient(create_app(tiny_pmg, toy_catalog(toy_data), root=tmp_path, store_url=store_url)) as c:
        service = c.app.state.service
        c.post("/v1/users/u/events", json={"events": EVENTS})
        gid = c.post("/v1/generations", json={"user_id": "u", "target_id": "a", "weights": [0, 1, 2]}).json()["id"]
        record = c.get(f"/v1/generations/{gid}", params={"wait": 60}).json()["record"]
        reads = []
        real = service.store.feedback_with_records
        monkeypatch.setattr(service.store, "feedback_with_records", lambda u, after=0: reads.append(after) or real(u, after))
        given = []
        for cand, signal in [(0, "pick"), (2, "like"), (1, "dislike")]:
            fid = c.post(f"/v1/generations/{gid}/feedback", json={"candidate": cand, "signal": signal}).json()["id"]
            given.append(FeedbackEvent.from_record(record, cand, signal))
            got = service.balance("u")
            want = learn(given, service.default_alpha)
            assert got.posterior.mean == pytest.approx(want.posterior.mean, abs=1e-12)
            assert got.posterior.std == pytest.approx(want.posterior.std, abs=1e-12)
            assert got.weights.to_json() == want.weights.to_json()
            assert reads[-1] == (fid - 1 if len(given) > 1 else 0)  # only the rows after the cached one
        t = time.perf_counter()
        assert service.balance("u") is service.balance("u")  # nothing new: the cached object
        assert time.perf_counter() - t < 1.0
        assert c.get("/v1/users/u").json()["alpha"]["n_feedback"] == 3


def test_a_worker_batches_what_waits_and_runs_a_lone_generation_alone(store):
    from pmgen.serve.worker import Worker

    for i in range(5):
        store.add_generation(f"g{i}", "u", {"i": i})
    batches, done = [], threading.Event()

    def finish(gens):
        batches.append([g.id for g in gens])
        for g in gens:
            assert store.finish(g.id, {"n": len(gens)}, owner=w.owner)
        if sum(map(len, batches)) == 5:
            done.set()

    w = Worker(store, run=lambda g: finish([g]), run_many=finish, batch=4, batch_wait_s=0.05, poll_s=0.05)
    w.start()
    try:
        assert done.wait(30)
    finally:
        w.stop()
    assert batches == [["g0", "g1", "g2", "g3"], ["g4"]]  # the queue's order; the fifth alone, through run()
    assert dict(w.batches) == {4: 4, 1: 1}  # generations by the size of their batch
    assert store.counts()["done"] == 5 and {store.generation(f"g{i}").attempts for i in range(5)} == {1}


@pytest.mark.parametrize("bad", [{"batch": 0}, {"batch": 33}, {"batch": 2, "run_many": None},
                                 {"batch": 2, "batch_wait_s": -1}])
def test_worker_batch_settings_are_checked(store, bad):
    from pmgen.serve.worker import Worker

    kw = {"run_many": lambda gens: None, **bad}
    with pytest.raises(ValueError):
        Worker(store, run=lambda g: None, **kw)


def test_the_service_runs_waiting_generations_as_one_batch_with_their_own_options(tiny_pmg, toy_data, tmp_path,
                                                                                   store_url):
    root = tmp_path / "serve"
    with TestClient(create_app(tiny_pmg, toy_catalog(toy_data), root=root, store_url=store_url, workers=0,
                               queue_size=8)) as c:  # an ingress only: the generations wait in the store
        assert c.post("/v1/users/u/events", json={"events": EVENTS}).status_code == 200
        bodies = [{"user_id": "u", "target_id": "a", "weights": [0, 1], "seed": 1},
                  {"user_id": "u", "target_id": "b", "weights": [0], "alpha": 0.9},
                  {"user": {"user_id": "inline", "events": EVENTS}, "target_id": "a", "weights": [0, 2]}]
        ids = [c.post("/v1/generations", json=b).json()["id"] for b in bodies]
    with TestClient(create_app(tiny_pmg, toy_catalog(toy_data), root=root, store_url=store_url, workers=1,
                               batch=4)) as c:
        gens = [c.get(f"/v1/generations/{g}", params={"wait": 60}).json() for g in ids]
        assert [g["status"] for g in gens] == ["done"] * 3, gens
        assert dict(c.app.state.service.worker.batches) == {3: 3}  # all three in one batch
        recs = [g["record"] for g in gens]
        assert [[x["weight"] for x in r["candidates"]] for r in recs] == [[0.0, 1.0], [0.0], [0.0, 2.0]]
        assert [r["target_id"] for r in recs] == ["a", "b", "a"] and recs[0]["seed"] == 1
        assert recs[1]["alpha"] == pytest.approx(0.9) and recs[1]["alpha_source"] == "request"
        assert recs[2]["user_id"] == "inline"
        for g in gens:
            assert c.get(g["images"]["chosen"]).content.startswith(b"\x89PNG")
        fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        assert {s.labels["size"]: s.value for s in fams["pmgen_batched_generations"].samples
                if s.name.endswith("_total")} == {"3": 3}


def test_a_released_lease_is_claimed_again_after_its_delay_and_only_by_its_owner(store):
    store.add_generation("g1", "u", {})
    assert store.claim("dispatcher", lease_s=30).id == "g1"
    assert not store.release("g1", "someone-else")  # not theirs: nothing changes
    assert store.release("g1", "dispatcher", after_s=0.3)  # its replica died: back to the queue in 0.3 s
    assert store.claim("other", lease_s=30) is None
    time.sleep(0.4)
    again = store.claim("other", lease_s=30)
    assert (again.id, again.attempts, again.resumed) == ("g1", 2, 1)
    assert not store.release("g1", "dispatcher")  # the lease is the other's now
