"""One model worker fed by a bounded queue.

The models are used by one thread only: generations run one at a time, in the order accepted.
:meth:`Worker.submit` never blocks — a full queue is refused (the API answers 503 with
``Retry-After``) so a caller never hangs behind a long backlog.

    worker = Worker(run=service.run_generation, maxsize=16)
    worker.start()
    worker.submit("g-1", accept=lambda: store.add_generation(...))   # False when full
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Worker:
    """A single thread running ``run(job_id)`` for each submitted id, from a queue of ``maxsize``.

    Args:
        run: called on the worker thread for each job; exceptions are logged (``run`` records
            failures itself) and never stop the worker.
        maxsize: jobs waiting at most (the one running is not counted).
    """

    def __init__(self, run: Callable[[str], None], maxsize: int = 16):
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        self.run = run
        self.maxsize = maxsize
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.current: str | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pmgen-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job and stop (queued jobs stay in the store and resume on the next start)."""
        if self._thread is None:
            return
        while True:  # drop waiting jobs so the stop signal gets in
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return self._queue.qsize()

    def submit(self, job_id: str, accept: Callable[[], None] | None = None) -> bool:
        """Queue ``job_id``; ``False`` (and ``accept`` not called) when the queue is full.

        ``accept`` runs before the job is queued, under the same lock (e.g. storing the job), so a
        job is stored only when it will be run.
        """
        with self._lock:
            if self._queue.full():
                return False
            if accept is not None:
                accept()
            self._queue.put_nowait(job_id)
            return True

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self.current = job
            try:
                self.run(job)
            except Exception:  # run() records the failure; the worker must outlive any job
                log.exception("generation %s failed", job)
            finally:
                self.current = None
