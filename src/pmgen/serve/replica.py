"""Model workers outside the API process: ``pmgen serve --no-http`` runs one on a store shared with
the API processes (PostgreSQL, or one SQLite file on one machine) and a result folder they all mount.

Each worker claims generations from the store's durable queue (:mod:`pmgen.serve.worker`), so the
API processes are stateless ingresses and workers can be added, killed and restarted at any time: a
generation whose worker died is claimed again when its lease expires.

    run_worker(PMG.from_preset("sticker-tiny"), datasets.load("stickers"), root="/mnt/pmgen/serve",
               store_url="postgresql://pmgen@db:5432/pmgen")       # until SIGTERM / SIGINT
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Callable, TYPE_CHECKING

from pmgen.data.schema import Dataset
from pmgen.data.store import STORE_FILE, Store, shown_url, sqlite_url
from pmgen.serve.service import Service
from pmgen.serve.worker import LEASE_S

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

log = logging.getLogger(__name__)


def run_worker(pmg: PMG | Callable[[], PMG], catalog: Dataset, *, root: str | Path, store_url: str | None = None, threads: int = 1,
               lease_s: float = LEASE_S, stop: threading.Event | None = None, batch: int = 1) -> None:
    """Run generations from the store until ``stop`` is set (or SIGTERM / SIGINT arrives, in the main thread).

    Args:
        pmg: a loaded :class:`pmgen.pipeline.PMG`, or a function returning one.
        catalog: the same catalog as the API processes'.
        root: the service's folder (result images and uploads), shared with the API processes.
        store_url: the store (default: SQLite under ``root``).
        threads: generations run at once.
        lease_s: a claimed generation's lease.
        batch: most generations run together (dynamic batching).
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    store = Store.open(store_url or sqlite_url(root / STORE_FILE))
    service = Service(pmg, catalog, store, root, workers=threads, lease_s=lease_s, batch=batch)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    service.start()
    log.info("model worker %s on %s", service.worker.owner, shown_url(str(store.engine.url)))
    stop.wait()
    service.stop()
    store.close()
