"""SIGKILL the service under load, and separately one of its model workers: nothing acknowledged is lost.

The servers are subprocesses on tiny models (``tests/serve_tiny_server.py``, each candidate slowed by
0.15 s so the kill lands while generations are queued and running), on SQLite and on PostgreSQL.
Bounded load on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from serve_helpers import free_port, start_server, wait_ready  # noqa: E402

from pmgen.data.store import STORE_FILE, Store, sqlite_url  # noqa: E402

N_CLIENTS = 4
ROUNDS = 40  # requests per client at most (the kill comes first)
LEASE = ("--lease", "3")  # a dead worker's generation is taken over 3 s after its last heartbeat


def _open_store(store_url, state) -> Store:
    return Store.open(store_url or sqlite_url(state / "serve" / STORE_FILE))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _whole_images(c: httpx.Client, view: dict) -> None:
    """Every image of a done generation is a whole 64×64 PNG."""
    for url in [view["images"]["chosen"], *view["images"]["candidates"]]:
        resp = c.get(url)
        assert resp.status_code == 200
        Image.open(io.BytesIO(resp.content)).verify()
        assert Image.open(io.BytesIO(resp.content)).size == (64, 64)


def _client(base: str, k: int, acked: dict, stop: threading.Event) -> None:
    user = f"kill-u{k}"
    with httpx.Client(base_url=base, timeout=10) as c:
        for i in range(ROUNDS):
            if stop.is_set():
                return
            try:
                marker = f"client {k} round {i}"
                r = c.post(f"/v1/users/{user}/events", json={"events": [{"type": "search", "text": marker}]})
                if r.status_code == 200:
                    acked["events"].append((user, marker))
                if i % 3 == 1:
                    r = c.post("/v1/generations", json={"user_id": user, "target_id": "a", "weights": [0, 1, 2],
                                                        "seed": i})
                    if r.status_code == 202:
                        acked["generations"].append(r.json()["id"])
                done = [g for g in list(acked["generations"])[:8]
                        if c.get(f"/v1/generations/{g}").json().get("status") == "done"]
                if done:
                    r = c.post(f"/v1/generations/{done[-1]}/feedback", json={"candidate": i % 3, "signal": "like"})
                    if r.status_code == 200:
                        acked["feedback"].append(r.json()["id"])
            except httpx.HTTPError:  # the server is gone: what was not acknowledged does not count
                return


def test_sigkill_under_load_then_restart_loses_nothing_acknowledged(tmp_path, store_url):
    state, port = tmp_path / "state", free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = start_server(state, port, log, queue_size=64, slow=0.15, store_url=store_url, extra=LEASE)
    try:
        wait_ready(base, proc)
        acked: dict[str, list] = {"events": [], "generations": [], "feedback": []}
        stop = threading.Event()
        threads = [threading.Thread(target=_client, args=(base, k, acked, stop)) for k in range(N_CLIENTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while (len(acked["feedback"]) < 3 or len(acked["generations"]) < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(15)
        assert len(acked["feedback"]) >= 3 and len(acked["generations"]) >= 10, acked
        store = _open_store(store_url, state)  # as the kill left it
        pending_at_kill = {g.id: g.status for g in store.unfinished()}
        store.close()
        assert pending_at_kill, "the kill should land while generations are waiting"

        proc = start_server(state, port, log, queue_size=64, store_url=store_url, extra=LEASE)  # full speed
        t_restart = time.monotonic()
        ready = wait_ready(base, proc)
        assert ready["recovered"]["pending"] == len(pending_at_kill)

        with httpx.Client(base_url=base, timeout=70) as c:
            # every acknowledged event is there, in each user's order
            for user in {u for u, _ in acked["events"]}:
                stored = [e.get("text") for e in c.get(f"/v1/users/{user}").json()["events"]]
                mine = [m for u, m in acked["events"] if u == user]
                assert [s for s in stored if s in mine] == mine
            # every accepted generation is done, or failed with a reason; resumed ones say so
            statuses = {}
            for g in acked["generations"]:
                r = c.get(f"/v1/generations/{g}", params={"wait": 60}).json()
                assert r["status"] in ("done", "failed"), r
                statuses[g] = r
                if r["status"] == "failed":
                    assert r["error"]
            # a generation the server stored just before the kill may never have had its 202 reach the client:
            # it is not acknowledged, but it was pending in the store, so it is resumed all the same
            resumed = {g: statuses.get(g) or c.get(f"/v1/generations/{g}", params={"wait": 60}).json()
                       for g in pending_at_kill}
            assert all(r["status"] in ("done", "failed") for r in resumed.values()), resumed
            # the one(s) running at the kill were taken over from the dead worker: claimed again, counted
            assert all(resumed[g]["resumed"] >= 1 and resumed[g]["attempts"] >= 2
                       for g, st in pending_at_kill.items() if st == "running"), resumed
            assert sum(r["status"] == "done" for r in statuses.values()) >= len(acked["generations"]) - 1
            # every acknowledged feedback row is there
            fb_ids = {f["id"] for u in range(N_CLIENTS) for f in c.get(f"/v1/users/kill-u{u}").json()["feedback"]}
            assert set(acked["feedback"]) <= fb_ids
            # no half-written image is served: every image of a done generation is a whole PNG
            for r in statuses.values():
                if r["status"] != "done":
                    assert c.get(f"/v1/generations/{r['id']}/images/chosen.png").status_code == 404
                    continue
                _whole_images(c, r)
        print(f"kill test: {len(acked['events'])} events, {len(acked['generations'])} generations "
              f"({len(pending_at_kill)} queued/running at the kill), {len(acked['feedback'])} feedback acknowledged; "
              f"after restart: {ready['recovered']}, all drained {time.monotonic() - t_restart:.1f} s after restart")
        leftovers = [p.name for p in (state / "serve" / "generations").iterdir() if p.name.startswith(".")]
        assert leftovers == []
    finally:
        _stop(proc)


N_GENERATIONS = 10


def _submit(c: httpx.Client, n: int) -> list[str]:
    """User ``w`` with one event, then ``n`` 3-weight generations (seeds 0..n-1) accepted; their ids."""
    assert c.post("/v1/users/w/events", json={"events": [{"type": "search", "text": "cats"}]}).status_code == 200
    ids = []
    for i in range(n):
        r = c.post("/v1/generations", json={"user_id": "w", "target_id": "a", "weights": [0, 1, 2], "seed": i})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def test_sigkill_of_one_model_worker_process_loses_no_generation(tmp_path, store_url):
    """A stateless API process (no model worker) and two worker processes on one store; SIGKILL the
    worker that is running a generation while 10 are queued or running: the other worker takes the
    dead one's generation over when its lease expires, every generation ends done exactly once (one
    result, attempts counted), and no half-written folder remains."""
    state, port = tmp_path / "state", free_port()
    base = f"http://127.0.0.1:{port}"
    api = start_server(state, port, tmp_path / "api.log", store_url=store_url, extra=("--workers", "0", *LEASE))
    procs = [api]
    try:
        wait_ready(base, api)
        workers = [start_server(state, 0, tmp_path / f"worker{k}.log", slow=0.15, store_url=store_url,
                                extra=("--worker-only", *LEASE)) for k in range(2)]
        procs += workers
        with httpx.Client(base_url=base, timeout=70) as c:
            ids = _submit(c, N_GENERATIONS)
            # wait until a worker runs a generation, then kill that worker's process
            store = _open_store(store_url, state)
            victim = deadline = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline:
                running = [g for g in store.unfinished() if g.status == "running" and g.lease_owner]
                for g in running:
                    pid = int(g.lease_owner.split(":")[1])
                    victim = next((w for w in workers if w.pid == pid), None)
                    if victim is not None:
                        taken = g.id
                        break
                time.sleep(0.05)
            assert victim is not None, "no worker started a generation"
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            at_kill = {g.id: g.status for g in store.unfinished()}
            assert taken in at_kill and len(at_kill) >= 5, at_kill
            views = [c.get(f"/v1/generations/{g}", params={"wait": 60}).json() for g in ids]
            views = [v if v["status"] in ("done", "failed") else
                     c.get(f"/v1/generations/{v['id']}", params={"wait": 60}).json() for v in views]
            assert [v["status"] for v in views] == ["done"] * N_GENERATIONS, [(v["id"], v["error"]) for v in views]
            by_id = {v["id"]: v for v in views}
            assert by_id[taken]["resumed"] == 1 and by_id[taken]["attempts"] == 2  # taken over once
            assert sum(v["attempts"] for v in views) == N_GENERATIONS + 1  # every other one ran once
            for v in views:
                _whole_images(c, v)
                assert v["record"]["seed"] == ids.index(v["id"])
            metrics = c.get("/metrics").text
            assert f"pmgen_generations{{status=\"done\"}} {float(N_GENERATIONS)}" in metrics
            assert "pmgen_queue_depth 0.0" in metrics and "pmgen_replicas 0.0" in metrics
            store.close()
        # exactly one result each: one folder per generation, no half-written or stale folder beside them
        folders = sorted(p.name for p in (state / "serve" / "generations").iterdir())
        assert folders == sorted(ids), folders
        survivor_log = "".join((tmp_path / f"worker{k}.log").read_text() for k in range(2))
        assert "not stored" not in survivor_log
        print(f"worker kill: {taken} taken over after the kill; {len(at_kill)} queued/running at the kill; "
              f"attempts {sum(v['attempts'] for v in views)} for {N_GENERATIONS} generations")
    finally:
        for p in procs:
            _stop(p)


@pytest.mark.ray
def test_sigkill_of_one_ray_serve_replica_loses_no_generation(tmp_path, store_url):
    """``--replicas 2`` (Ray Serve, a local Ray): the API process only dispatches; SIGKILL one replica
    while 10 generations are queued or running. The calls it held fail, their leases go back to the
    queue, the survivor (or the replica Ray restarts) runs them: every generation ends done exactly once,
    no half-written folder remains."""
    pytest.importorskip("ray.serve")
    state, port = tmp_path / "state", free_port()
    base = f"http://127.0.0.1:{port}"
    api = start_server(state, port, tmp_path / "api.log", slow=0.3, store_url=store_url,
                       extra=("--workers", "0", "--replicas", "2", *LEASE))
    try:
        wait_ready(base, api, timeout=300)
        with httpx.Client(base_url=base, timeout=70) as c:
            assert c.get("/readyz").json()["replicas"] == 2
            ids = _submit(c, N_GENERATIONS)
            store = _open_store(store_url, state)
            deadline = time.monotonic() + 120
            while not any(g.status == "running" for g in store.unfinished()) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the replicas are inside their batches now (each candidate takes 0.3 s)
            replicas = subprocess.run(["pgrep", "-f", "ServeReplica:pmgen-models"], capture_output=True,
                                      text=True).stdout.split()
            assert len(replicas) == 2, replicas
            at_kill = {g.id: g.status for g in store.unfinished()}
            os.kill(int(replicas[0]), signal.SIGKILL)
            assert len(at_kill) >= 5, at_kill
            views = [c.get(f"/v1/generations/{g}", params={"wait": 60}).json() for g in ids]
            for _ in range(3):  # long polls end after 60 s at most: ask again for the slow ones
                views = [v if v["status"] in ("done", "failed") else
                         c.get(f"/v1/generations/{v['id']}", params={"wait": 60}).json() for v in views]
            assert [v["status"] for v in views] == ["done"] * N_GENERATIONS, [(v["id"], v["error"]) for v in views]
            retried = [v["id"] for v in views if v["attempts"] > 1]
            assert retried, "the killed replica's generations were run again"
            assert all(v["resumed"] == v["attempts"] - 1 for v in views)
            for v in views:
                _whole_images(c, v)
                assert v["record"]["seed"] == ids.index(v["id"])
            store.close()
        folders = sorted(p.name for p in (state / "serve" / "generations").iterdir())
        assert folders == sorted(ids), folders  # one result each, nothing half-written beside them
        print(f"replica kill: {len(at_kill)} queued/running at the kill; retried {len(retried)}; "
              f"attempts {sum(v['attempts'] for v in views)} for {N_GENERATIONS} generations")
    finally:
        _stop(api)
