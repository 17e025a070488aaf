"""The service's boundary against a hostile client (issue 46): private reads, long polls that must not
starve the API, malformed bodies, stalled bodies and idle connections, loose types, the CLI's store.

Servers run on 127.0.0.1 only (TestClient, or uvicorn in a thread); every load is bounded.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import running_server, toy_catalog  # noqa: E402

from pmgen.serve.app import create_app  # noqa: E402

EVENTS = [{"type": "social", "item_id": "b", "value": "send", "time": 1},
          {"type": "search", "text": "cat stickers", "time": 2}]
GENERATION = {"user_id": "u", "target_id": "a", "weights": [0]}
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def app_for(tiny_pmg, toy_data, tmp_path, store_url):
    """``app_for(**create_app options)`` → the app on the tiny models, its files under tmp_path, on each store."""

    def make(**kw):
        kw.setdefault("root", tmp_path / "serve")
        kw.setdefault("store_url", store_url)
        return create_app(tiny_pmg, toy_catalog(toy_data), **kw)

    return make


def _done(c, gen_id, headers=None):
    g = c.get(f"/v1/generations/{gen_id}", params={"wait": 60}, headers=headers or {}).json()
    assert g["status"] == "done", g
    return g


# ---------------------------------------------------------------------------------- 1. private reads

READS = ["/v1/users", "/v1/users/u", "/v1/generations/{gid}", "/v1/generations/{gid}/images/chosen.png",
         "/v1/items?q=cat", "/v1/items/a/image", "/v1/items/from-message?message=I%20love%20you",
         "/docs", "/redoc", "/openapi.json"]


def test_the_token_guards_every_read_and_anonymous_reads_start_no_model_work(app_for, monkeypatch):
    with TestClient(app_for(host="0.0.0.0", token=TOKEN)) as c:
        service = c.app.state.service
        assert c.post("/v1/users/u/events", json={"events": EVENTS}, headers=AUTH).status_code == 200
        gid = c.post("/v1/generations", json={"user_id": "u", "target_id": "a", "weights": [0]},
                     headers=AUTH).json()["id"]
        _done(c, gid, AUTH)
        service._keywords.clear()  # the next profile read would run the LLM
        calls = []
        real_extract = service.pmg.extract
        monkeypatch.setattr(service.pmg, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
        for url in [u.format(gid=gid) for u in READS] + ["/", "/static/app.js", "/healthz", "/readyz"]:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
                r = c.get(url, headers=headers)
                assert r.status_code == 401, (url, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
                assert "problems" in r.json()
        assert calls == []  # anonymous reads never reached the model
        for url in [u.format(gid=gid) for u in READS] + ["/", "/static/app.js", "/healthz", "/readyz"]:
            assert c.get(url, headers=AUTH).status_code == 200, url
        assert calls == [1]  # the profile read with the token ran the keyword stage once
        prof = c.get("/v1/users/u", headers=AUTH).json()
        assert prof["events"][1]["text"] == "cat stickers" and prof["generations"][0]["id"] == gid


def test_public_read_opens_the_page_and_health_only(app_for):
    with TestClient(app_for(host="0.0.0.0", token=TOKEN, public_read=True)) as c:
        for url in ("/", "/static/app.js", "/static/style.css", "/healthz", "/readyz"):
            assert c.get(url).status_code == 200, url
        for url in READS:
            assert c.get(url.format(gid="g0")).status_code == 401, url
        assert c.post("/v1/users/u/events", json={"events": EVENTS}).status_code == 401
        assert c.get("/v1/users", headers=AUTH).json()["users"] == []  # nothing was stored


def test_without_a_token_on_loopback_everything_stays_open(app_for):
    with TestClient(app_for()) as c:
        for url in ("/", "/static/app.js", "/healthz", "/v1/users", "/v1/items?q=cat", "/docs", "/openapi.json"):
            assert c.get(url).status_code == 200, url
    with pytest.raises(ValueError, match="only with a token"):
        app_for(public_read=True)


# ---------------------------------------------------------------------------------- 2. long polls

def _park(base: str, gen_id: str, n: int, wait: float) -> tuple[ThreadPoolExecutor, list]:
    pool = ThreadPoolExecutor(n)
    futures = [pool.submit(httpx.get, f"{base}/v1/generations/{gen_id}", params={"wait": wait}, timeout=wait + 30)
               for _ in range(n)]
    return pool, futures


def _until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_100_parked_long_polls_leave_health_and_writes_answering(app_for):
    app = app_for(waits_per_client=128)
    service = app.state.service
    with running_server(app) as base:
        assert httpx.post(f"{base}/v1/users/u/events", json={"events": EVENTS}).status_code == 200
        with service._model_lock:  # the worker holds the generation: every wait stays parked
            gid = httpx.post(f"{base}/v1/generations", json=GENERATION).json()["id"]
            pool, futures = _park(base, gid, 100, wait=30)
            assert _until(lambda: service.waits.parked == 100, 30), service.waits.parked
            for _ in range(3):  # generous bounds: the machine is shared
                t = time.perf_counter()
                assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "alive"}
                assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
                r = httpx.post(f"{base}/v1/users/u/events", json={"events": EVENTS[1:]}, timeout=10)
                assert r.status_code == 200 and time.perf_counter() - t < 10
                assert all(not f.done() for f in futures)  # still parked, none answered early
        # the lock is released: the generation finishes and every wait returns
        answers = [f.result() for f in futures]
        pool.shutdown()
    assert [r.json()["status"] for r in answers] == ["done"] * 100
    assert service.waits.parked == 0


def test_waits_per_client_are_bounded_with_429_and_retry_after(app_for):
    app = app_for(waits_per_client=2)
    service = app.state.service
    with running_server(app) as base:
        httpx.post(f"{base}/v1/users/u/events", json={"events": EVENTS})
        with service._model_lock:
            gid = httpx.post(f"{base}/v1/generations", json=GENERATION).json()["id"]
            pool, futures = _park(base, gid, 2, wait=30)
            assert _until(lambda: service.waits.parked == 2, 20)
            r = httpx.get(f"{base}/v1/generations/{gid}", params={"wait": 30}, timeout=10)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert "waits" in r.json()["detail"]
            assert httpx.get(f"{base}/v1/generations/{gid}", timeout=10).status_code == 200  # no wait: no slot needed
        assert [f.result().json()["status"] for f in futures] == ["done", "done"]
        pool.shutdown()
        assert httpx.get(f"{base}/v1/generations/{gid}", params={"wait": 5}).status_code == 200  # slots freed


# ---------------------------------------------------------------------------------- 3. malformed bodies

MALFORMED = {
    "deep array": b"[" * 200_000,
    "deep inside an object": b'{"user": {"events": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
    "deep but closed": b'{"target": {"title": "x", "text": ' + b"[" * 40 + b"]" * 40 + b"}}",
    "truncated": b'{"user_id": "u", "target_id": ',
    "not UTF-8": b'{"user_id": "\xff\xfe"}',
    "a 5000-digit integer": b'{"seed": 1' + b"0" * 5000 + b"}",
    "not JSON": b"user_id=u&target_id=a",
    "a bare string": b'"hello"',
    "an unterminated escaped string": b'["' + b'\\"' * 100_000,
}
WRITES = ["/v1/generations", "/v1/users/u/events", "/v1/generations/g0/feedback"]


@pytest.mark.parametrize("name", list(MALFORMED))
def test_every_malformed_body_is_a_4xx_naming_the_problem(app_for, name):
    with TestClient(app_for()) as c:
        for url in WRITES:
            r = c.post(url, content=MALFORMED[name], headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (name, url, r.status_code, r.text[:200])
            body = r.json()
            assert body["detail"] and body["problems"] and all(p["message"] for p in body["problems"])
            if name.startswith("deep"):
                assert r.status_code == 422 and "nested deeper than 32" in body["problems"][0]["message"]
        # the multipart form's JSON field goes through the same checks
        r = c.post("/v1/generations", data={"request": "[" * 100_000}, files={"image": ("t.png", b"x", "image/png")})
        assert r.status_code == 422 and "nested deeper" in r.json()["problems"][0]["message"]


def test_json_at_the_nesting_limit_is_accepted(app_for):
    with TestClient(app_for()) as c:
        event = {"type": "search", "text": "x"}
        assert c.post("/v1/users/u/events", json={"events": [event]}).status_code == 200
        nested: object = "x"
        for _ in range(29):
            nested = [nested]
        # {"events": [{"text": 29 lists}]}: 32 levels in all
        r = c.post("/v1/users/u/events", json={"events": [{**event, "text": nested}]})
        assert r.status_code == 422 and r.json()["problems"][0]["field"] == "events[0].text"  # a type problem
        r = c.post("/v1/users/u/events", json={"events": [{**event, "text": [nested]}]})  # 33 levels
        assert r.status_code == 422 and "nested deeper than 32" in r.json()["problems"][0]["message"]


# ---------------------------------------------------------------------------------- 4. stalled bodies, idle connections

def _server_config(app, port):
    from pmgen.serve.server import uvicorn_config

    return uvicorn_config(app, "127.0.0.1", port, log_level="warning", keep_alive=1)


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection; (bytes, seconds taken)."""
    sock.settimeout(timeout)
    t, out = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"the server kept the connection open for {timeout} s; got {out[:80]!r}") from None
        if not chunk:
            return out, time.monotonic() - t
        out += chunk


def test_a_stalled_body_gets_408_and_the_connection_closes(app_for):
    with running_server(app_for(body_timeout=1.0), _server_config) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"user_id"')
            out, took = _read_until_closed(s, 15)
        assert out.startswith(b"HTTP/1.1 408"), out[:200]
        assert b"did not arrive within 1 s" in out and took < 10
        assert httpx.get(f"{base}/healthz").status_code == 200  # the server is fine


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"])
def test_idle_connections_close(app_for, sent):
    with running_server(app_for(), _server_config) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(sent)
            out, took = _read_until_closed(s, 15)
        assert took < 10 and not out.startswith(b"HTTP/1.1 2")
        with socket.create_connection(("127.0.0.1", port)) as s:  # the same after an answer (keep-alive)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(10)
            answer = b""
            while not answer.endswith(b'{"status":"alive"}'):  # the whole answer: the head, then the body
                chunk = s.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            s.sendall(sent)
            out, took = _read_until_closed(s, 15)
        assert out == b"" and took < 10


# ---------------------------------------------------------------------------------- 5. loose types, the CLI's store

def test_booleans_are_refused_where_integers_or_numbers_are_expected(app_for):
    with TestClient(app_for()) as c:
        c.post("/v1/users/u/events", json={"events": EVENTS})
        gid = c.post("/v1/generations", json={"user_id": "u", "target_id": "a", "weights": [0, 1]}).json()["id"]
        _done(c, gid)
        for value in (True, False):
            r = c.post(f"/v1/generations/{gid}/feedback", json={"candidate": value, "signal": "like"})
            assert r.status_code == 422 and r.json()["problems"][0]["field"] == "candidate", r.text
        assert c.get("/v1/users/u").json()["feedback"] == []  # nothing stored
        r = c.post("/v1/generations", json={"user_id": "u", "target_id": "a", "weights": [0, True], "seed": True,
                                            "alpha": True, "strength": False})
        assert r.status_code == 422
        assert {p["field"] for p in r.json()["problems"]} == {"weights", "seed", "alpha", "strength"}
        r = c.post("/v1/users/u/events", json={"events": [{"type": "rating", "item_id": "a", "value": True}]})
        assert r.status_code == 422 and r.json()["problems"][0]["field"] == "events[0].value"
        assert c.get("/v1/items", params={"limit": "true"}).status_code == 422
        assert c.post(f"/v1/generations/{gid}/feedback", json={"candidate": 1, "signal": "like"}).status_code == 200


def test_pmgen_feedback_reaches_a_service_started_with_a_store_url(app_for, tmp_path, store_url):
    from typer.testing import CliRunner

    from pmgen.cli import app as cli

    url = store_url or f"sqlite:///{tmp_path / 'elsewhere' / 'store.sqlite'}"
    (tmp_path / "elsewhere").mkdir()
    with TestClient(app_for(store_url=url)) as c:
        c.post("/v1/users/u/events", json={"events": EVENTS})
        gid = c.post("/v1/generations", json={"user_id": "u", "target_id": "a", "weights": [0, 1]}).json()["id"]
        _done(c, gid)
        folder = c.app.state.service.gen_root / gid
        r = CliRunner().invoke(cli, ["feedback", str(folder), "--like", "1", "--store", url,
                                     "--data-dir", str(tmp_path / "unused")])
        assert r.exit_code == 0, r.output
        prof = c.get("/v1/users/u").json()
        assert [(f["candidate"], f["signal"]) for f in prof["feedback"]] == [(1, "like")]
        assert prof["alpha"]["n_feedback"] == 1
    assert not (tmp_path / "unused" / "serve").exists()  # the default store was not touched
