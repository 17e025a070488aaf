"""Model workers fed by the store's durable queue (:meth:`pmgen.data.store.Store.claim`).

A worker thread claims the oldest waiting generation, runs it and stores its result; a heartbeat
thread renews the leases of the generations this worker runs. Workers in other processes (or on
other machines) sharing the store claim from the same queue; a worker that dies stops renewing, its
lease expires after ``lease_s`` and another worker takes the generation over. The API never blocks
on the queue: :meth:`pmgen.data.store.Store.enqueue` refuses past the bound (503 + ``Retry-After``).

    worker = Worker(store, run=service.run_generation, lease_s=10)
    worker.start()
    worker.notify()          # after storing a generation: claim now instead of at the next poll

**Dynamic batching** (``batch > 1`` with ``run_many``): once a thread has claimed one generation it
claims up to ``batch − 1`` more that wait in the queue, for at most ``batch_wait_s`` seconds, and runs
them together (``run_many(generations)``: one LLM call for their keyword cache misses, shared UNet
batches; :meth:`pmgen.serve.service.Service.run_generations`). A generation alone in the queue waits
``batch_wait_s`` at most before it runs.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections import Counter
import time
from typing import Callable

from pmgen.data.store import Generation, Store

log = logging.getLogger(__name__)

LEASE_S = 10.0
"""Seconds a claimed generation stays its worker's without a heartbeat (renewed every third of it)."""
POLL_S = 0.5
"""Seconds between looks at the queue when nothing was notified (generations stored by other processes)."""
BATCH_WAIT_S = 0.05
"""Seconds a dynamic batch waits for more generations after its first one."""
MAX_BATCH = 32


def worker_id() -> str:
    """A name for this worker that no other process shares: host, pid and a random suffix."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """``threads`` threads, each claiming generations from ``store`` and running ``run(generation)``.

    Args:
        store: the store holding the queue.
        run: called on a worker thread with each claimed generation; it stores the result with
            ``store.finish(..., owner=worker.owner)``. Exceptions are logged and never stop the worker
            (the lease then expires and the generation is claimed again).
        lease_s: lease length; the heartbeat renews it every ``lease_s / 3``.
        threads: worker threads, each running one generation (or one batch) at a time.
        batch: most generations one thread runs together through ``run_many`` (1: one at a time).
        run_many: runs a list of claimed generations together (needed when ``batch > 1``).
        batch_wait_s: how long a batch waits for more generations after its first.
    """

    def __init__(self, store: Store, run: Callable[[Generation], None], lease_s: float = LEASE_S,
                 poll_s: float = POLL_S, threads: int = 1, owner: str | None = None, batch: int = 1,
                 run_many: Callable[[list[Generation]], None] | None = None, batch_wait_s: float = BATCH_WAIT_S):
        if threads < 1:
            raise ValueError(f"worker threads must be >= 1, got {threads}")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"worker batch must be in 1..{MAX_BATCH}, got {batch}")
        if batch > 1 and run_many is None:
            raise ValueError("a worker batch > 1 needs run_many")
        if not 0 <= batch_wait_s <= 10:
            raise ValueError(f"batch wait must be in [0, 10] seconds, got {batch_wait_s}")
        self.batch, self.run_many, self.batch_wait_s = batch, run_many, batch_wait_s
        self.store = store
        self.run = run
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.owner = owner or worker_id()
        self.threads = threads
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._halt = threading.Event()  # set once the worker threads have stopped: the heartbeat ends
        self._wake = threading.Semaphore(0)  # one release wakes one thread (no herd of claims per stored generation)
        self._lock = threading.Lock()
        self.running: set[str] = set()
        """Generations this worker runs now."""
        self.batches: Counter[int] = Counter()
        """Generations run by this worker, by the size of the batch they ran in (1: alone)."""

    @property
    def current(self) -> str | None:
        return next(iter(self.running), None)

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._halt.clear()
        self._threads = [threading.Thread(target=self._loop, name=f"pmgen-model-worker-{i}", daemon=True)
                         for i in range(self.threads)]
        self._threads.append(threading.Thread(target=self._heartbeat, name="pmgen-lease-heartbeat", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running generations and stop (queued ones stay in the store for any worker)."""
        self._stop.set()
        for _ in self._threads:
            self._wake.release()
        for t in self._threads[:-1]:
            t.join(timeout)
        self._halt.set()
        if self._threads:
            self._threads[-1].join(timeout)
        self._threads = []

    def notify(self) -> None:
        """A generation was stored: one idle thread looks at the queue now."""
        self._wake.release()

    def _claim(self) -> Generation | None:
        try:
            gen = self.store.claim(self.owner, self.lease_s)
        except Exception:  # the database is away for a moment: try again at the next poll
            log.exception("claiming from the queue failed")
            return None
        if gen is not None:
            with self._lock:
                self.running.add(gen.id)  # the heartbeat renews its lease from now on
        return gen

    def _more(self, first: Generation) -> list[Generation]:
        """``first`` and up to ``batch − 1`` more claimed within ``batch_wait_s``."""
        gens = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(gens) < self.batch and not self._stop.is_set():
            gen = self._claim()
            if gen is not None:
                gens.append(gen)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.acquire(timeout=min(left, 0.01))
        return gens

    def _loop(self) -> None:
        while not self._stop.is_set():
            gen = self._claim()
            if gen is None:  # the threads together look poll_s apart for generations other processes stored
                self._wake.acquire(timeout=self.poll_s * self.threads)
                continue
            gens = self._more(gen) if self.batch > 1 else [gen]
            with self._lock:
                self.batches[len(gens)] += len(gens)
            try:
                if len(gens) > 1 and self.run_many is not None:
                    self.run_many(gens)
                else:
                    self.run(gen)
            except Exception:  # run() records failures; the worker must outlive any job
                log.exception("generation(s) %s failed", ", ".join(g.id for g in gens))
            finally:
                with self._lock:
                    self.running.difference_update(g.id for g in gens)

    def _heartbeat(self) -> None:
        while not self._halt.wait(self.lease_s / 3):
            with self._lock:
                ids = list(self.running)
            for gen_id in ids:
                try:
                    if not self.store.renew(gen_id, self.owner, self.lease_s):
                        log.warning("generation %s: the lease was lost (another worker took it over)", gen_id)
                except Exception:
                    log.exception("renewing the lease of %s failed", gen_id)
