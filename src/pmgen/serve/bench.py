"""``pmgen bench-serve``: bounded load on a local ``pmgen serve`` (127.0.0.1 only), and the API's overhead.

1. **In process**: the same 3-weight generation (weights 0,1,2; one user, one target) ``n`` times
   with :meth:`pmgen.pipeline.PMG.generate` → median seconds.
2. **Through the API, one at a time** on a fresh server subprocess (its own temporary store): POST
   + ``GET ?wait=`` until done, ``n`` times → median; the ratio API / in process.
3. **Mixed load**: ``clients`` threads send ``requests`` requests in all — events (70 %), 3-weight
   generations (10 %) and feedback (20 %) — honouring ``Retry-After`` on 503. Per endpoint: count,
   p50/p95 latency, errors; generations also from acceptance to done (queueing included) and
   from start to done on the worker; throughput; lost requests (never answered with success).

``--long-polls N`` runs another scenario instead (:func:`run_long_polls`): N concurrent long polls
on unfinished generations plus a trickle of writes; ``/healthz`` p99 and the writes' p95 latency.

``--throughput 1,2`` and ``--replicas 0,1,2`` run the throughput comparisons of
:mod:`pmgen.serve.bench_scale`.

Everything is bounded in count and time and sent to 127.0.0.1 only; the server is stopped and its
temporary folder removed at the end.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

WEIGHTS = (0.0, 1.0, 2.0)
TARGET = "1F602"  # face with tears of joy
EVENTS = [{"type": "search", "text": "cat stickers"}, {"type": "social", "item_id": "1F431", "value": "send"},
          {"type": "social", "item_id": "1F63A", "value": "like"},
          {"type": "conversation", "speaker": "user", "text": "my cat is the cutest"}]
MAX_RETRIES = 30


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(preset: str, n: int, data_dir: Path | None, log: Callable[[str], None]) -> list[float]:
    """Seconds of ``n`` 3-weight generations with the PMG in this process (after one warm-up)."""
    from pmgen.data import datasets
    from pmgen.data.schema import Event, User
    from pmgen.pipeline import PMG
    from pmgen.data.requests import history_image_paths

    ds = datasets.load("stickers", data_dir)
    pmg = PMG.from_preset(preset)
    user = User("bench-seq", [Event(**e) for e in EVENTS])
    target = ds.items[TARGET]
    times = []
    for i in range(n + 1):
        t = time.perf_counter()
        pmg.generate(user, target, ds.items, target_image=ds.image_path(target), weights=WEIGHTS, seed=0,
                     history_images=history_image_paths(ds, user, ds.items), user_id=user.user_id)
        if i:  # the first one warms caches up
            times.append(time.perf_counter() - t)
    log(f"in process: {n} × 3-weight generation, median {statistics.median(times):.2f} s")
    del pmg
    gc.collect()
    return times


class Recorder:
    """Latencies and errors per endpoint (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.retries = 0
        self.lost = 0

    def add(self, name: str, seconds: float | None) -> None:
        with self.lock:
            self.lat.setdefault(name, [])
            self.errors.setdefault(name, 0)
            if seconds is None:
                self.errors[name] += 1
            else:
                self.lat[name].append(seconds)


def _send(c: httpx.Client, rec: Recorder, name: str, method: str, url: str, body: Any, ok: int) -> Any:
    """One logical request: retried after ``Retry-After`` on 503; latency of the successful attempt."""
    for _ in range(MAX_RETRIES):
        t = time.perf_counter()
        try:
            r = c.request(method, url, json=body)
        except httpx.HTTPError:
            rec.add(name, None)
            with rec.lock:
                rec.lost += 1
            return None
        if r.status_code == 503:
            with rec.lock:
                rec.retries += 1
            time.sleep(min(float(r.headers.get("Retry-After", "1")), 5.0))
            continue
        if r.status_code != ok:
            rec.add(name, None)
            with rec.lock:
                rec.lost += 1
            return None
        rec.add(name, time.perf_counter() - t)
        return r.json()
    rec.add(name, None)
    with rec.lock:
        rec.lost += 1
    return None


def _run_clients(n: int, client: Callable[[int], None]) -> None:
    """``client(k)`` for k in 0..n-1, each on its own thread, until all return."""
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _accept(c: httpx.Client, rec: Recorder, name: str, body: dict[str, Any], accepted: list[str]) -> None:
    """POST one generation (503s retried); its id joins ``accepted`` once acknowledged."""
    r = _send(c, rec, name, "POST", "/v1/generations", body, 202)
    if r:
        with rec.lock:
            accepted.append(r["id"])


def _until_final(c: httpx.Client, gen_id: str) -> dict[str, Any]:
    """The generation's view once it is done or failed (long polls of up to 60 s)."""
    g = c.get(f"/v1/generations/{gen_id}", params={"wait": 60}).json()
    while g["status"] not in ("done", "failed"):
        g = c.get(f"/v1/generations/{gen_id}", params={"wait": 60}).json()
    return g


def _machine(log: Callable[[str], None]) -> float:
    load = os.getloadavg()[0]
    log(f"machine: {os.cpu_count()} cores, load average {load:.2f} (1 min) at the start; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return load


@contextmanager
def local_server(preset: str, data_dir: Path, log: Callable[[str], None], *args: str, worker_procs: int = 0,
                 store: str | None = None) -> Iterator[str]:
    """A fresh ``pmgen serve`` subprocess on 127.0.0.1 (its own temporary store, ``args`` added), ready;
    yields its base URL; stopped and its folder removed at the end. With ``worker_procs``: the API runs no
    model worker, and that many ``pmgen serve --no-http`` processes share its store and folder."""
    tmp = Path(tempfile.mkdtemp(prefix="pmgen-bench-serve-"))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    common = ["--preset", preset, "--root", str(tmp / "serve"), "--data-dir", str(data_dir),
              *(("--store", store) if store else ())]
    cmd = [sys.executable, "-m", "pmgen.serve", "serve", "--host", "127.0.0.1", "--port", str(port), *common,
           "--queue-size", "16", *args, *(("--workers", "0") if worker_procs else ())]
    procs = []
    for k, c in enumerate([cmd] + [[sys.executable, "-m", "pmgen.serve", "serve", "--no-http", *common]] * worker_procs):
        with open(tmp / (f"worker{k}.log" if k else "server.log"), "wb") as out:
            procs.append(subprocess.Popen(c, stdout=out, stderr=subprocess.STDOUT))
    proc = procs[0]
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {tmp / 'server.log'}")
            try:
                r = httpx.get(f"{base}/readyz", timeout=2)
                if r.status_code == 200:
                    break
                if r.status_code == 503 and r.json().get("error"):  # the models failed to load: no use waiting
                    raise RuntimeError(f"the server cannot load its models: {r.json()['error']}; see {tmp / 'server.log'}")
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() - t0 > 600:
                raise TimeoutError("server not ready after 600 s")
            time.sleep(0.5)
        for k in range(1, len(procs)):  # each worker process logs its name once its models are loaded
            while b"model worker " not in (tmp / f"worker{k}.log").read_bytes():
                if procs[k].poll() is not None or time.monotonic() - t0 > 600:
                    raise RuntimeError(f"worker {k} did not start; see {tmp / f'worker{k}.log'}")
                time.sleep(0.5)
        log(f"server ready on {base} after {time.monotonic() - t0:.1f} s"
            + (f" (+{worker_procs} model worker processes)" if worker_procs else ""))
        yield base
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def run_bench(preset: str = "sticker-tiny", clients: int = 16, requests: int = 200, n_sequential: int = 5,
              data_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three phases (see the module docstring) and print the table; returns the numbers."""
    from pmgen.data import datasets

    load0 = _machine(log)
    ds = datasets.load("stickers", data_dir)  # builds the catalog once if missing
    inproc = in_process(preset, n_sequential, data_dir, log)
    with local_server(preset, ds.root.parent, log) as base:
        result = _measure(base, inproc, clients, requests, n_sequential, log)
    load1 = os.getloadavg()
    result["load_average"] = {"start": load0, "end": load1[0]}
    log(f"load average (1 min) at the end: {load1[0]:.2f}")
    return result


def _measure(base: str, inproc: list[float], clients: int, requests: int, n_seq: int,
             log: Callable[[str], None]) -> dict[str, Any]:
    c = httpx.Client(base_url=base, timeout=120)
    # ---- phase 2: the same generation through the API, one at a time
    c.post("/v1/users/bench-seq/events", json={"events": EVENTS}).raise_for_status()
    body = {"user_id": "bench-seq", "target_id": TARGET, "weights": list(WEIGHTS), "seed": 0}
    api_times, done_ids = [], []
    for i in range(n_seq + 1):
        t = time.perf_counter()
        r = c.post("/v1/generations", json=body)
        r.raise_for_status()
        g = _until_final(c, r.json()["id"])
        if g["status"] != "done":
            raise RuntimeError(f"generation failed: {g['error']}")
        done_ids.append(g["id"])
        if i:
            api_times.append(time.perf_counter() - t)
    ratio = statistics.median(api_times) / statistics.median(inproc)
    log(f"through the API: {n_seq} × the same generation one at a time, median {statistics.median(api_times):.2f} s "
        f"→ ratio {ratio:.2f}× (target ≤ 1.5×)")

    # ---- phase 3: mixed load
    rec = Recorder()
    accepted: list[str] = []
    plan = ["generation" if i % 10 == 5 else "feedback" if i % 10 in (2, 8) else "events" for i in range(requests)]
    per_client = [plan[k::clients] for k in range(clients)]

    def client(k: int) -> None:
        user = f"bench-c{k}"
        with httpx.Client(base_url=base, timeout=120) as cc:
            _send(cc, rec, "POST /v1/users/{id}/events", "POST", f"/v1/users/{user}/events", {"events": EVENTS[:1]},
                  200)  # the user exists before its first generation (not counted in the plan)
            for j, op in enumerate(per_client[k]):
                if op == "events":
                    ev = [{"type": "search", "text": f"bench {k} {j}"}]
                    _send(cc, rec, "POST /v1/users/{id}/events", "POST", f"/v1/users/{user}/events",
                          {"events": ev}, 200)
                elif op == "generation":
                    _accept(cc, rec, "POST /v1/generations (accept)",
                            {"user_id": user, "target_id": TARGET, "weights": list(WEIGHTS), "seed": j}, accepted)
                else:
                    gid = done_ids[j % len(done_ids)]
                    _send(cc, rec, "POST /v1/generations/{id}/feedback", "POST", f"/v1/generations/{gid}/feedback",
                          {"candidate": j % len(WEIGHTS), "signal": ("like", "dislike", "pick")[j % 3]}, 200)

    t0 = time.perf_counter()
    _run_clients(clients, client)
    t_sent = time.perf_counter() - t0
    e2e, service, failed = [], [], 0
    for gid in accepted:
        g = _until_final(c, gid)
        if g["status"] == "done":
            e2e.append(g["finished_at"] - g["created_at"])
            service.append(g["finished_at"] - g["started_at"])
        else:
            failed += 1
    t_all = time.perf_counter() - t0
    rec.lat["generation: accepted → done"] = e2e
    rec.errors["generation: accepted → done"] = failed
    rec.lat["generation: running → done"] = service
    rec.errors["generation: running → done"] = failed
    c.close()

    n_requests = sum(len(v) for k, v in rec.lat.items() if not k.startswith("generation:"))
    rows = []
    for name in ("POST /v1/users/{id}/events", "POST /v1/generations (accept)", "POST /v1/generations/{id}/feedback",
                 "generation: accepted → done", "generation: running → done"):
        v = rec.lat.get(name, [])
        rows.append({"endpoint": name, "n": len(v), "p50_ms": _pct(v, 0.5) * 1000, "p95_ms": _pct(v, 0.95) * 1000,
                     "errors": rec.errors.get(name, 0)})
    log("")
    log(f"mixed load: {clients} clients, {requests} requests (+{clients} first events) — "
        f"events 70 %, 3-weight generations 10 %, feedback 20 %")
    log(f"| {'endpoint':<36} | {'n':>4} | {'p50 ms':>9} | {'p95 ms':>9} | {'errors':>6} |")
    log(f"|{'-' * 38}|{'-' * 6}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for r in rows:
        log(f"| {r['endpoint']:<36} | {r['n']:>4} | {r['p50_ms']:>9.1f} | {r['p95_ms']:>9.1f} | {r['errors']:>6} |")
    log(f"throughput: {n_requests / t_sent:.1f} requests/s while sending ({n_requests} in {t_sent:.1f} s); "
        f"all {len(accepted)} generations done after {t_all:.1f} s; 503 answers retried: {rec.retries}; "
        f"lost: {rec.lost + failed}")
    log(f"3-weight generation, median: in process {statistics.median(inproc):.2f} s, through the API "
        f"{statistics.median(api_times):.2f} s, ratio {ratio:.2f}× (target ≤ 1.5×)")
    return {"rows": rows, "throughput_rps": n_requests / t_sent, "seconds_sending": t_sent, "seconds_total": t_all,
            "retries_503": rec.retries, "lost": rec.lost + failed, "errors": sum(rec.errors.values()),
            "in_process_s": inproc, "api_s": api_times, "ratio": ratio, "generations": len(accepted)}


# ---------------------------------------------------------------------------------------- long polls

HEALTHZ_P99_MS = 200.0
WRITES_P95_MS = 500.0


def run_long_polls(preset: str = "sticker-tiny", polls: int = 100, seconds: float = 30.0,
                   data_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``polls`` concurrent ``GET /v1/generations/{id}?wait=60`` parked on unfinished generations (a full
    queue on the real model) for ``seconds``, while ``/healthz`` is probed every 50 ms and a trickle of
    event writes (4 per second) is sent; their latencies against the targets (healthz p99 ≤ 200 ms,
    writes p95 ≤ 500 ms). Loopback only, bounded in time; the server is a fresh subprocess."""
    from pmgen.data import datasets

    load0 = _machine(log)
    ds = datasets.load("stickers", data_dir)
    with local_server(preset, ds.root.parent, log, "--waits-per-client", str(polls + 8)) as base:
        result = asyncio.run(_long_polls(base, polls, seconds, log))
    result["load_average"] = {"start": load0, "end": os.getloadavg()[0]}
    log(f"load average (1 min) at the end: {result['load_average']['end']:.2f}")
    return result


async def _long_polls(base: str, polls: int, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pool = httpx.Limits(max_connections=polls + 8, max_keepalive_connections=polls + 8)
    waits = httpx.AsyncClient(base_url=base, timeout=90, limits=pool)
    probe = httpx.AsyncClient(base_url=base, timeout=30)  # its own connections: never queued behind the waits
    await probe.post("/v1/users/bench-lp/events", json={"events": EVENTS})
    ids: list[str] = []
    for seed in range(17):  # one running and a full queue: generations that stay unfinished for a while
        r = await probe.post("/v1/generations", json={"user_id": "bench-lp", "target_id": TARGET,
                                                      "weights": list(WEIGHTS), "seed": seed})
        if r.status_code == 202:
            ids.append(r.json()["id"])
    finished: set[str] = set()
    counts = {"answered": 0, "refused_429": 0, "errors": 0}

    async def waiter(k: int) -> None:
        while True:
            pending = [g for g in ids if g not in finished]
            if not pending:  # all finished (a long run): nothing left to wait on
                await asyncio.sleep(1)
                continue
            gid = pending[k % len(pending)]  # spread: each finished generation wakes its waits, which park again
            try:
                r = await waits.get(f"/v1/generations/{gid}", params={"wait": 60})
            except httpx.HTTPError:
                counts["errors"] += 1
                await asyncio.sleep(1)
                continue
            counts["answered"] += 1
            if r.status_code == 429:
                counts["refused_429"] += 1
                await asyncio.sleep(1)
            elif r.status_code != 200:
                counts["errors"] += 1
            elif r.json()["status"] in ("done", "failed"):
                finished.add(gid)

    async def parked() -> int:
        return (await probe.get("/readyz")).json().get("waits_parked", -1)

    tasks = [asyncio.create_task(waiter(k)) for k in range(polls)]
    t0 = loop.time()
    while await parked() < polls and loop.time() - t0 < 30:
        await asyncio.sleep(0.2)
    log(f"{await parked()} long polls parked after {loop.time() - t0:.1f} s; measuring for {seconds:g} s")
    health: list[tuple[float, float]] = []  # (seconds taken, seconds into the run when sent)
    writes: list[tuple[float, float]] = []
    seen_parked: list[int] = []
    start = loop.time()
    stop = start + seconds

    async def timed(name: str, out: list[tuple[float, float]], request: Any) -> None:
        t = time.perf_counter()
        at = loop.time() - start
        try:
            r = await request
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        out.append((time.perf_counter() - t, at))
        if not ok:
            counts["errors"] += 1
            log(f"error: {name}")

    async def health_probe() -> None:
        while loop.time() < stop:
            await timed("GET /healthz", health, probe.get("/healthz"))
            await asyncio.sleep(0.05)

    async def writer() -> None:
        i = 0
        while loop.time() < stop:
            ev = [{"type": "search", "text": f"long-poll bench {i}"}]
            await timed("POST events", writes, probe.post(f"/v1/users/bench-lp-w{i % 4}/events", json={"events": ev}))
            i += 1
            await asyncio.sleep(0.25)

    async def watch() -> None:
        while loop.time() < stop:
            seen_parked.append(await parked())
            await asyncio.sleep(1)

    answered0 = counts["answered"]
    await asyncio.gather(health_probe(), writer(), watch())
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    statuses = [(await probe.get(f"/v1/generations/{g}")).json()["status"] for g in ids]
    await waits.aclose()
    await probe.aclose()
    done = sum(s in ("done", "failed") for s in statuses)

    def row(name: str, samples: list[tuple[float, float]], q: float) -> dict[str, Any]:
        v = [took for took, _ in samples]
        slowest = max(samples, default=(float("nan"), float("nan")))
        return {"endpoint": name, "n": len(v), "p50_ms": _pct(v, 0.5) * 1000,
                f"p{round(q * 100)}_ms": _pct(v, q) * 1000,
                "max_ms": slowest[0] * 1000, "max_at_s": slowest[1]}

    h, w = row("GET /healthz", health, 0.99), row("POST /v1/users/{id}/events", writes, 0.95)
    log("")
    log(f"long polls: {polls} concurrent GET /v1/generations/{{id}}?wait=60 on unfinished generations, "
        f"{seconds:g} s; parked (sampled each second): min {min(seen_parked, default=0)}, "
        f"max {max(seen_parked, default=0)}")
    log(f"| {'endpoint':<28} | {'n':>4} | {'p50 ms':>7} | {'p95/p99 ms':>10} | {'max ms (at s)':>15} |")
    log(f"|{'-' * 30}|{'-' * 6}|{'-' * 9}|{'-' * 12}|{'-' * 17}|")
    for r, q in ((h, "p99"), (w, "p95")):
        log(f"| {r['endpoint']:<28} | {r['n']:>4} | {r['p50_ms']:>7.1f} | {q} {r[q + '_ms']:>6.1f} | "
            f"{r['max_ms']:>7.1f} ({r['max_at_s']:>4.0f}) |")
    ok = h["p99_ms"] <= HEALTHZ_P99_MS and w["p95_ms"] <= WRITES_P95_MS
    log(f"healthz p99 {h['p99_ms']:.1f} ms (target ≤ {HEALTHZ_P99_MS:g}), writes p95 {w['p95_ms']:.1f} ms "
        f"(target ≤ {WRITES_P95_MS:g}): {'met' if ok else 'NOT met'}; long polls answered during the run "
        f"{counts['answered'] - answered0} (generations finished: {done} of {len(ids)}), 429: {counts['refused_429']}, "
        f"errors: {counts['errors']}")
    return {"polls": polls, "seconds": seconds, "healthz": h, "writes": w, "parked_min": min(seen_parked, default=0),
            "targets_met": ok, "errors": counts["errors"], "refused_429": counts["refused_429"],
            "generations_finished": done, "long_polls_answered": counts["answered"] - answered0}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_bench(), indent=2))
