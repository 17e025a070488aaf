"""SIGKILL the service under load, restart it on the same store, and check nothing acknowledged is lost.

The server is a subprocess on tiny models (``tests/serve_tiny_server.py``, each candidate slowed by
0.15 s so the kill lands while generations are queued and running). Bounded load on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import signal
import subprocess
import threading
import time

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from serve_helpers import free_port, start_server, wait_ready  # noqa: E402

from pmgen.data.store import Store, sqlite_url  # noqa: E402

N_CLIENTS = 4
ROUNDS = 40  # requests per client at most (the kill comes first)


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


def test_sigkill_under_load_then_restart_loses_nothing_acknowledged(tmp_path):
    state, port = tmp_path / "state", free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = start_server(state, port, log, queue_size=64, slow=0.15)
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
        store = Store.open(sqlite_url(state / "serve" / "pmgen-serve.sqlite"))  # as the kill left it
        pending_at_kill = [g.id for g in store.unfinished()]
        store.close()
        assert pending_at_kill, "the kill should land while generations are waiting"

        proc = start_server(state, port, log, queue_size=64)  # same store, full speed
        t_restart = time.monotonic()
        ready = wait_ready(base, proc)
        assert ready["recovered"]["resumed"] + ready["recovered"]["failed"] == len(pending_at_kill)

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
            assert all(r["resumed"] >= 1 for r in resumed.values()), resumed
            assert sum(r["status"] == "done" for r in statuses.values()) >= len(acked["generations"]) - 1
            # every acknowledged feedback row is there
            fb_ids = {f["id"] for u in range(N_CLIENTS) for f in c.get(f"/v1/users/kill-u{u}").json()["feedback"]}
            assert set(acked["feedback"]) <= fb_ids
            # no half-written image is served: every image of a done generation is a whole PNG
            for r in statuses.values():
                if r["status"] != "done":
                    assert c.get(f"/v1/generations/{r['id']}/images/chosen.png").status_code == 404
                    continue
                for url in [r["images"]["chosen"], *r["images"]["candidates"]]:
                    resp = c.get(url)
                    assert resp.status_code == 200
                    Image.open(io.BytesIO(resp.content)).verify()
                    assert Image.open(io.BytesIO(resp.content)).size == (64, 64)
        print(f"kill test: {len(acked['events'])} events, {len(acked['generations'])} generations "
              f"({len(pending_at_kill)} queued/running at the kill), {len(acked['feedback'])} feedback acknowledged; "
              f"after restart: {ready['recovered']}, all drained {time.monotonic() - t_restart:.1f} s after restart")
        leftovers = [p.name for p in (state / "serve" / "generations").iterdir() if p.name.startswith(".")]
        assert leftovers == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
