"""A ``pmgen serve`` on tiny random models and a toy catalog, for the kill test and the browser test.

    python tests/serve_tiny_server.py --state DIR --port 8765 [--store URL] [--workers N] [--lease S]
    python tests/serve_tiny_server.py --state DIR --worker-only --store URL     # a model worker, no HTTP
    python tests/serve_tiny_server.py --state DIR --port 8765 --replicas 2       # models on Ray Serve replicas

Models and catalog are built under ``DIR/models`` and ``DIR/catalog`` (seconds); the service's
store and images under ``DIR/serve`` — the same on every start, so a restart resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tiny(models: Path, slow: float):
    """The tiny PMG, each candidate slowed by ``slow`` seconds (also called inside Ray Serve replicas:
    defined here, in ``__main__``, so Ray ships it by value)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_helpers import build_tiny_pmg

    pmg = build_tiny_pmg(models)
    if slow > 0:
        import time

        fast = pmg.generator.decode  # once per candidate, alone or in a batch

        def slowed(*args, **kw):
            time.sleep(slow)
            return fast(*args, **kw)

        pmg.generator.decode = slowed
    return pmg


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--store", default=None, help="store URL (default: SQLite under DIR/serve)")
    p.add_argument("--workers", type=int, default=1, help="model worker threads (0: accept only)")
    p.add_argument("--lease", type=float, default=10.0, help="lease seconds of a claimed generation")
    p.add_argument("--worker-only", action="store_true", help="run generations from the store, no HTTP")
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--slow", type=float, default=0.0, help="seconds added to each candidate (a slower model)")
    p.add_argument("--replicas", type=int, default=0, help="model replicas on Ray Serve (a local Ray)")
    p.add_argument("--batch", type=int, default=1, help="dynamic batch size")
    a = p.parse_args()
    import functools

    import uvicorn
    from serve_helpers import write_toy_data

    from pmgen.serve.app import create_app

    catalog = write_toy_data(a.state / "catalog")
    pmg = load_tiny(a.state / "models", a.slow)
    pool = None
    if a.replicas:
        from pmgen.data.store import STORE_FILE, sqlite_url
        from pmgen.serve.ray_replicas import ReplicaPool

        (a.state / "serve").mkdir(parents=True, exist_ok=True)
        pool = ReplicaPool(functools.partial(load_tiny, a.state / "models", a.slow), catalog, root=a.state / "serve",
                           store_url=a.store or sqlite_url(a.state / "serve" / STORE_FILE), replicas=a.replicas,
                           batch=max(a.batch, 4), lease_s=a.lease, cpus=0.5)
    if a.worker_only:
        from pmgen.serve.replica import run_worker

        run_worker(pmg, catalog, root=a.state / "serve", store_url=a.store, threads=a.workers, lease_s=a.lease,
                   batch=a.batch)
        return
    app = create_app(pmg, catalog, root=a.state / "serve", queue_size=a.queue_size, store_url=a.store,
                     workers=a.workers, lease_s=a.lease, batch=a.batch, pool=pool)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
