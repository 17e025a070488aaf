"""``pmgen bench-serve --throughput`` / ``--replicas``: generation throughput of ``pmgen serve`` set-ups.

``--throughput 1,2`` (:func:`run_throughput`): ``clients`` clients submit ``generations`` 3-weight
generations against one in-process model worker, then against a stateless API with N model worker
processes (``pmgen serve --no-http``) on the same store; generations per minute and p95 accepted → done.

``--replicas 0,1,2 --store sqlite,postgresql`` (:func:`run_scale`): today's single in-process worker
(one generation at a time) against dynamic batching in process and N Ray Serve replicas, on each store;
generations/min, accept p95, accepted → done, lost, and one-at-a-time latency.

Bounded in count and time, 127.0.0.1 only; each server is stopped and its folder removed at the end.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import httpx

from pmgen.serve.bench import (EVENTS, TARGET, WEIGHTS, Recorder, _accept, _machine, _pct, _run_clients, _send,
                               _until_final, local_server)

# ---------------------------------------------------------------------------------------- throughput

def run_throughput(preset: str = "sticker-tiny", clients: int = 16, generations: int = 50,
                   workers: tuple[int, ...] = (1, 2), store: str | None = None, data_dir: Path | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generations per minute with one in-process model worker (``1`` in ``workers``; ``0`` is the same)
    and with a stateless API plus N worker processes (each N > 1), on a fresh store each time (``store``:
    a PostgreSQL URL whose database is emptied first; default a temporary SQLite file)."""
    from pmgen.data import datasets

    load0 = _machine(log)
    ds = datasets.load("stickers", data_dir)
    runs = []
    for n in workers:
        if store:
            _empty(store)
        with local_server(preset, ds.root.parent, log, "--queue-size", str(generations), worker_procs=n if n > 1 else 0,
                          store=store) as base:
            runs.append({"workers": n, **_throughput(base, clients, generations, log)})
        label = "one in-process worker" if n <= 1 else f"API + {n} worker processes"
        r = runs[-1]
        log(f"{label}: {generations} generations from {clients} clients in {r['seconds']:.1f} s → "
            f"{r['per_min']:.2f} generations/min; accepted → done p50 {r['p50_s']:.1f} s, p95 {r['p95_s']:.1f} s; "
            f"failed {r['failed']}, 503 retried {r['retries_503']}")
    base_rate = runs[0]["per_min"]
    for r in runs[1:]:
        log(f"{r['workers']} worker processes / one in-process worker: {r['per_min'] / base_rate:.2f}× generations/min")
    load1 = os.getloadavg()[0]
    log(f"load average (1 min): {load0:.2f} at the start, {load1:.2f} at the end")
    return {"runs": runs, "load_average": {"start": load0, "end": load1},
            "errors": sum(r["failed"] for r in runs), "lost": sum(r["lost"] for r in runs)}


def _empty(url: str) -> None:
    import sqlalchemy as sa

    from pmgen.data.store import Store

    s = Store.open(url)
    with s.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM feedback"))
        conn.execute(sa.text("DELETE FROM generations"))
        conn.execute(sa.text("DELETE FROM events"))
        conn.execute(sa.text("DELETE FROM users"))
    s.close()


def _throughput(base: str, clients: int, generations: int, log: Callable[[str], None],
                mixed: bool = False) -> dict[str, Any]:
    """``clients`` clients submit ``generations`` 3-weight generations in all (``mixed``: each also sends
    two events before each generation, as the mixed load of `pmgen bench-serve` does 7 per generation);
    generations/min from the first request to the last result, accept latency, accepted → done.

    The mixed events carry a fresh random tag per call, so every generation's history is new to the
    keyword cache (as new behaviour is in production) and no run profits from an earlier one's cache."""
    tag = secrets.token_hex(4)
    rec = Recorder()
    accepted: list[str] = []
    per_client = [list(range(generations))[k::clients] for k in range(clients)]

    def client(k: int) -> None:
        user = f"bench-t{k}"
        with httpx.Client(base_url=base, timeout=120) as cc:
            _send(cc, rec, "events", "POST", f"/v1/users/{user}/events", {"events": EVENTS}, 200)
            for j in per_client[k]:
                if mixed:  # the user's newest behaviours; they also change the history the keywords see
                    for e in range(2):
                        _send(cc, rec, "events", "POST", f"/v1/users/{user}/events",
                              {"events": [{"type": "search", "text": f"bench {tag} {k} {j} {e}"}]}, 200)
                _accept(cc, rec, "accept", {"user_id": user, "target_id": TARGET, "weights": list(WEIGHTS),
                                            "seed": j}, accepted)

    t0 = time.time()
    _run_clients(clients, client)
    e2e, failed, last = [], 0, t0
    with httpx.Client(base_url=base, timeout=120) as c:
        for gid in accepted:
            g = _until_final(c, gid)
            if g["status"] == "done":
                e2e.append(g["finished_at"] - g["created_at"])
                last = max(last, g["finished_at"])
            else:
                failed += 1
    seconds = last - t0
    return {"seconds": seconds, "per_min": len(e2e) / seconds * 60 if seconds > 0 else 0.0,
            "p50_s": _pct(e2e, 0.5), "p95_s": _pct(e2e, 0.95), "failed": failed, "retries_503": rec.retries,
            "lost": rec.lost + (generations - len(accepted)),
            "accept_p95_ms": _pct(rec.lat.get("accept", []), 0.95) * 1000,
            "events_p95_ms": _pct(rec.lat.get("events", []), 0.95) * 1000}


# ---------------------------------------------------------------------------------------- scale

def _stores(names: tuple[str, ...], stack: ExitStack) -> dict[str, str | None]:
    """``sqlite`` → ``None`` (a temporary SQLite file per run); ``postgresql`` → a throwaway local server
    (:mod:`pmgen.data.pg_local`); a ``postgresql://`` URL as it is (its tables are emptied before each run)."""
    urls: dict[str, str | None] = {}
    for name in names:
        if name == "sqlite":
            urls[name] = None
        elif name in ("postgresql", "postgres"):
            from pmgen.data.pg_local import postgres_server

            urls[name] = stack.enter_context(postgres_server())
        elif name.startswith(("postgresql://", "postgres://")):
            urls[name] = name
        else:
            raise ValueError(f"store {name!r}: expected sqlite, postgresql or a postgresql:// URL")
    return urls


def _one_at_a_time(base: str, n: int) -> list[float]:
    """``n`` 3-weight generations one after another (after one warm-up): seconds from POST to done."""
    times = []
    with httpx.Client(base_url=base, timeout=120) as c:
        c.post("/v1/users/bench-seq/events", json={"events": EVENTS}).raise_for_status()
        for i in range(n + 1):
            t = time.perf_counter()
            r = c.post("/v1/generations", json={"user_id": "bench-seq", "target_id": TARGET,
                                                "weights": list(WEIGHTS), "seed": i})
            r.raise_for_status()
            g = _until_final(c, r.json()["id"])
            if g["status"] != "done":
                raise RuntimeError(f"generation failed: {g['error']}")
            if i:
                times.append(time.perf_counter() - t)
    return times


def run_scale(preset: str = "sticker-tiny", clients: int = 16, generations: int = 32,
              replicas: tuple[int, ...] = (0, 1, 2), stores: tuple[str, ...] = ("sqlite", "postgresql"),
              batch: int = 8, n_sequential: int = 3, data_dir: Path | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Today's single worker (in process, one generation at a time, SQLite) against every ``store`` ×
    ``replicas`` (0: the in-process worker with dynamic batching; N: N Ray Serve replicas behind a
    dispatching API), each on a fresh server: ``clients`` clients with a mixed load of ``generations``
    3-weight generations and events; generations/min, accept p95, accepted → done, lost; and the
    latency of one generation at a time (N replicas against the in-process worker of the same store)."""
    from pmgen.data import datasets

    load0 = _machine(log)
    ds = datasets.load("stickers", data_dir)
    configs = [("today: 1 in-process worker, one at a time", "sqlite", 0, 1)] + [
        (f"{'in-process worker' if r == 0 else f'{r} Ray Serve replica' + ('s' if r > 1 else '')}, batch {batch}",
         st, r, batch) for st in stores for r in replicas]
    runs = []
    with ExitStack() as stack:
        urls = _stores(tuple(dict.fromkeys(["sqlite", *stores])), stack)
        for label, st, r, b in configs:
            if urls[st]:
                _empty(urls[st])
            args = ["--queue-size", str(generations), "--batch", str(b),
                    *(("--replicas", str(r), "--workers", "0") if r else ())]
            with local_server(preset, ds.root.parent, log, *args, store=urls[st]) as base:
                seq = _one_at_a_time(base, n_sequential)
                row = {"config": label, "store": st, "replicas": r, "batch": b,
                       "one_at_a_time_s": statistics.median(seq), **_throughput(base, clients, generations, log,
                                                                                 mixed=True)}
            runs.append(row)
            log(f"{label} [{st}]: {row['per_min']:.2f} generations/min; accept p95 {row['accept_p95_ms']:.0f} ms; "
                f"accepted → done p50 {row['p50_s']:.1f} s, p95 {row['p95_s']:.1f} s; one at a time "
                f"{row['one_at_a_time_s']:.2f} s; failed {row['failed']}, lost {row['lost']}")
    base_rate = runs[0]["per_min"]
    inproc = {(x["store"]): x["one_at_a_time_s"] for x in runs[1:] if x["replicas"] == 0}
    log("")
    log(f"{clients} clients, {generations} 3-weight generations + 2 events each per run; "
        f"one-at-a-time: median of {n_sequential}")
    log("| configuration | store | generations/min | × today | accept p95 ms | accepted → done p95 s | "
        "one at a time s | × in process | lost |")
    log("|---|---|---|---|---|---|---|---|---|")
    for x in runs:
        rel = x["one_at_a_time_s"] / inproc[x["store"]] if x["replicas"] and x["store"] in inproc else None
        log(f"| {x['config']} | {x['store']} | {x['per_min']:.2f} | {x['per_min'] / base_rate:.2f}× | "
            f"{x['accept_p95_ms']:.0f} | {x['p95_s']:.1f} | {x['one_at_a_time_s']:.2f} | "
            f"{f'{rel:.2f}×' if rel else '–'} | {x['lost']} |")
    load1 = os.getloadavg()[0]
    log(f"load average (1 min): {load0:.2f} at the start, {load1:.2f} at the end")
    return {"runs": runs, "load_average": {"start": load0, "end": load1},
            "errors": sum(x["failed"] for x in runs), "lost": sum(x["lost"] for x in runs)}
