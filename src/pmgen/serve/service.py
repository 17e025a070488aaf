"""What the service does, without HTTP: validate, store, queue, run on the model worker, recover.

The web layer (:mod:`pmgen.serve.app`) only maps HTTP to these methods and their errors to status
codes; the model work is :meth:`pmgen.pipeline.PMG.generate` on the worker thread, the records
are the library's own (``GenerationRecord.to_json()``); what clients send is checked by
:mod:`pmgen.serve.validation` (events with :mod:`pmgen.data.validate`'s rules) and the errors are
:mod:`pmgen.serve.errors`'.

Files (all under ``root``, default ``<data dir>/serve``)::

    pmgen-serve.sqlite              the store (unless another URL is given)
    generations/<id>/               one result folder per generation (chosen.png, candidates/, record.json,
                                    report.html), written by GenerationResult.save: temp folder + rename
    uploads/<id>.img                an uploaded target image (checked, then written temp + rename)

Ids that become paths (users, generations) pass :func:`pmgen.paths.check_id` and every path is
resolved with :func:`pmgen.paths.inside`; no path a client sends is ever opened.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import re
import secrets
import shutil
import statistics
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, TYPE_CHECKING

from pmgen.data.schema import Dataset, Event, Item
from pmgen.limits import LIMITS, Limits
from pmgen.paths import inside
from pmgen.serve.catalog import Catalog
from pmgen.serve.jobs import PARTIAL, GenerationJobs
from pmgen.serve.errors import Busy, Conflict, Invalid, NotFound, problem, safe_id
from pmgen.data.store import SIGNALS, Generation, Store
from pmgen.serve.validation import RequestValidator
from pmgen.serve.waiting import RECHECK_S, Waits
from pmgen.serve.worker import LEASE_S, Worker
from pmgen.stages.feedback import FeedbackEvent, UserBalance, learn
from pmgen.stages.select import DEFAULT_ALPHA

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

log = logging.getLogger(__name__)

MAX_WAIT_S = 60.0
"""Longest ``?wait=`` a request may block."""
FINAL = ("done", "failed")
"""Statuses a generation never leaves."""
BALANCES_CACHED = 10_000
"""Users whose feedback posterior is kept in memory (least recently used go first)."""
_IMAGE_NAME = re.compile(r"(chosen|(x\d{1,2}_)?w_\d{1,2}\.\d{2})\.png")


# ---------------------------------------------------------------------------------------- service

class Service(GenerationJobs):
    """The personalization service over one PMG, one catalog and one store.

    Args:
        pmg: a loaded :class:`pmgen.pipeline.PMG`, or a function returning one (loaded on a
            background thread by :meth:`start`; until then ``ready`` is false and generations get 503).
        catalog: the items users act on and targets come from (e.g. ``datasets.load("stickers")``).
        store: where users, events, generations and feedback live.
        root: folder for result images and uploads (beside an SQLite store by default).
        limits: input sizes (:mod:`pmgen.limits`).
        queue_size: generations waiting at most (in the store, over all API processes); more get 503
            with ``Retry-After``.
        waits_per_client: long polls one client may park at once; more get 429.
        workers: model worker threads in this process (0: this process only accepts; workers of other
            processes sharing the store run the generations).
        lease_s: a claimed generation's lease (see :mod:`pmgen.serve.worker`).
        batch: most generations a worker thread runs together (dynamic batching; 1: one at a time).
        pool: model replicas on Ray Serve (:class:`pmgen.serve.ray_replicas.ReplicaPool`): this process's
            worker threads then only claim generations and hand them to the replicas (``workers`` is
            ignored; one dispatcher thread per replica claims dynamic batches of up to ``pool.batch``).
    """

    def __init__(self, pmg: PMG | Callable[[], PMG], catalog: Dataset, store: Store, root: str | Path, limits: Limits = LIMITS,
                 queue_size: int = 16, waits_per_client: int = 16, workers: int = 1, lease_s: float = LEASE_S,
                 batch: int = 1, pool: Any = None):
        if queue_size < 1:
            raise ValueError(f"queue size must be >= 1, got {queue_size}")
        self._loader: Callable[[], Any] | None = pmg if callable(pmg) and not hasattr(pmg, "generate") else None
        self.pmg = None if self._loader else pmg
        self.catalog = catalog
        self.index = Catalog(catalog.items)
        self.store = store
        self.root = Path(root).resolve()
        self.gen_root = self.root / "generations"
        self.upload_root = self.root / "uploads"
        for d in (self.gen_root, self.upload_root):
            d.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.validator = RequestValidator(catalog, self.index, store, limits)
        self.queue_size = queue_size
        self.pool = pool
        self.lease_s = lease_s
        if pool is not None:
            self.worker: Worker | None = Worker(store, lambda gen: self._dispatch([gen]), lease_s=lease_s,
                                                threads=pool.concurrency, batch=pool.batch, run_many=self._dispatch,
                                                batch_wait_s=pool.batch_wait_s)
        elif workers:
            self.worker = Worker(store, self.run_generation, lease_s=lease_s, threads=workers, batch=batch,
                                 run_many=self.run_generations)
        else:
            self.worker = None
        self._ready = threading.Event()
        self.waits = Waits(waits_per_client)
        self._model_lock = threading.Lock()
        self._durations: list[float] = []
        self._keywords: dict[tuple[str, int], list[str]] = {}
        self._balances: OrderedDict[str, tuple[float, int, int, UserBalance]] = OrderedDict()
        self._balance_lock = threading.Lock()
        self.load_error: str | None = None
        self.recovered: dict[str, int] = {"pending": 0, "partial_removed": 0}
        if self.pmg is not None:
            self._ready.set()

    # ------------------------------------------------------------------ life cycle
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        """Recover what a previous run left, load the models (if given a loader), start the worker once
        they are loaded (it claims nothing before)."""
        self.recover()
        if self.ready and self.pool is not None:  # the replicas load their models: not ready before
            self._ready.clear()
            threading.Thread(target=self._load, name="pmgen-model-loader", daemon=True).start()
        elif self.ready and self.worker is not None:
            self.worker.start()
        if self._loader is not None and not self.ready:
            threading.Thread(target=self._load, name="pmgen-model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            t = time.perf_counter()
            if self.pmg is None:
                self.pmg = self._loader()
                log.info("models loaded in %.1f s", time.perf_counter() - t)
            if self.pool is not None:
                self.pool.start()
                log.info("%d model replica(s) ready after %.1f s", self.pool.replicas, time.perf_counter() - t)
            self._ready.set()
            if self.worker is not None:
                self.worker.start()
        except Exception as e:  # reported by /readyz
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading the models failed")

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.pool is not None:
            self.pool.stop()

    def recover(self) -> None:
        """After a restart: remove half-written result folders (``.<id>.<hex>.partial``, pmgen's own) of
        generations no live worker holds, and upload temp files. Generations accepted but not finished
        need nothing: they wait in the store's queue, and one whose worker died is claimed again once its
        lease expires (``pending`` counts them)."""
        for d in (self.gen_root, self.upload_root):
            for p in d.iterdir():
                if d is self.upload_root and p.name.endswith(".tmp") or (
                        PARTIAL.fullmatch(p.name) and not self.store.held(p.name[1:].split(".")[0])):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    self.recovered["partial_removed"] += 1
        self.recovered["pending"] = len(self.store.unfinished())

    # ------------------------------------------------------------------ users and events
    def add_events(self, user_id: str, events: Any) -> dict[str, Any]:
        """Append events to a user (created when new); all or nothing."""
        user_id = safe_id(user_id, "user_id")
        parsed = self.validator.events(events, "request")
        try:
            n = self.store.add_events(user_id, parsed, max_total=self.limits.max_events_per_user)
        except ValueError as e:
            raise Invalid(str(e), [problem("events", str(e))]) from None
        return {"user_id": user_id, "added": len(parsed), "n_events": n}

    def users(self) -> list[dict[str, Any]]:
        return self.store.users()

    def profile(self, user_id: str) -> dict[str, Any]:
        """Event count and recent events, current preference keywords, α, feedback, recent generations."""
        user_id = safe_id(user_id, "user_id")
        if not self.store.has_user(user_id):
            raise NotFound(f"unknown user {user_id!r} (post events to /v1/users/{user_id}/events first)")
        events = self.store.events(user_id)
        return {
            "user_id": user_id,
            "n_events": len(events),
            "events": [e.to_json() for e in events[-50:]],
            "preference_keywords": self._preference_keywords(user_id, events),
            "alpha": self.alpha_of(user_id),
            "feedback": self.store.feedback(user_id),
            "generations": self.store.user_generations(user_id),
        }

    def balance(self, user_id: str) -> UserBalance:
        """What the user's feedback taught (α posterior, weights worth generating). Cached per user: a new
        feedback row updates the cached posterior with that row only; the whole history is replayed when
        the cache cannot be trusted (first use, another prior, rows that committed out of id order)."""
        prior = self.default_alpha
        with self._balance_lock:
            cached = self._balances.get(user_id)
        if cached is not None and cached[0] != prior:
            cached = None
        n, rows = self.store.feedback_with_records(user_id, cached[2] if cached else 0)
        if cached is not None and n != cached[1] + len(rows):
            cached, (n, rows) = None, self.store.feedback_with_records(user_id, 0)
        if cached is not None and not rows:
            return cached[3]
        balance = copy.deepcopy(cached[3]) if cached is not None else learn([], prior)
        for row, record in rows:
            if record:  # the same update as pmgen.stages.feedback.learn, one event at a time
                ev = FeedbackEvent.from_record(record, row["candidate"], row["signal"])
                balance.posterior.update(ev.d_t, ev.d_p, ev.candidate, ev.signal)
                balance.weights.update(ev.weights, ev.candidate, ev.signal)
        last = rows[-1][0]["id"] if rows else cached[2] if cached else 0
        with self._balance_lock:
            self._balances[user_id] = (prior, n, last, balance)
            self._balances.move_to_end(user_id)
            while len(self._balances) > BALANCES_CACHED:
                self._balances.popitem(last=False)
        return balance

    @property
    def default_alpha(self) -> float:
        return self.pmg.settings.alpha if self.pmg is not None else DEFAULT_ALPHA

    def alpha_of(self, user_id: str) -> dict[str, Any]:
        """The user's α for the next generation, where it comes from, and how sure it is."""
        b = self.balance(user_id)
        value, source = b.alpha(self.default_alpha)
        weights = self.pmg.settings.weights if self.pmg is not None else ()
        return {"value": value, "source": "learned" if b.n_events else "preset", "detail": source,
                "sd": round(b.posterior.std, 4), "n_feedback": b.n_events,
                "weights_worth_generating": b.weights.worth_generating(weights) if weights else []}

    def _preference_keywords(self, user_id: str, events: list[Event]) -> list[str] | None:
        """The keyword stage on the user's history (cached per history; ``None`` while models load)."""
        key = (user_id, len(events))
        if key not in self._keywords:
            if self.pmg is None or not events:
                return None if self.pmg is None else []
            with self._model_lock:
                self._keywords[key] = list(self.pmg.extract(events, self.catalog.items).keywords)
                while len(self._keywords) > 4096:  # the oldest go first
                    self._keywords.pop(next(iter(self._keywords)))
        return self._keywords.get(key, [])

    # ------------------------------------------------------------------ generations
    @property
    def replicas(self) -> int:
        """Model replicas on Ray Serve, else model worker threads in this process (0: it only accepts)."""
        if self.pool is not None:
            return self.pool.replicas
        return self.worker.threads if self.worker is not None else 0

    def queue_depth(self) -> int:
        """Generations waiting in the store (over all API processes)."""
        return self.store.queue_depth()

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the median generation time (at least 1)."""
        per = statistics.median(self._durations[-20:]) if self._durations else 5.0
        return max(1, math.ceil(per))

    def submit(self, body: Mapping[str, Any], upload: bytes | None = None) -> dict[str, Any]:
        """Accept a generation (202): stored as ``queued`` and put on the worker's queue.

        Raises:
            Invalid: every problem of the request (nothing stored).
            TooLarge: an image over the byte or pixel limits.
            Busy: the queue is full, or the models are still loading (with ``Retry-After``).
        """
        if not isinstance(body, Mapping):
            raise Invalid("expected a JSON object", [problem(None, "expected a JSON object")])
        prep = self.validator.generation(body, upload)
        if prep.problems:
            raise Invalid(f"{len(prep.problems)} problem(s) in the request; nothing was stored", prep.problems)
        if self.load_error:
            raise Busy(f"the models failed to load: {self.load_error}")
        gen_id = "g" + secrets.token_hex(8)
        image_file = None
        if prep.upload is not None:
            image_file = self.upload_root / f"{gen_id}.img"
            tmp = self.upload_root / f".{gen_id}.{secrets.token_hex(4)}.tmp"
            tmp.write_bytes(prep.upload)
            os.replace(tmp, image_file)
            prep.request["target"]["image"] = image_file.name

        if not self.store.enqueue(gen_id, prep.user_id, prep.request, self.queue_size):
            if image_file is not None:
                image_file.unlink(missing_ok=True)
            wait = self.retry_after()
            raise Busy(f"the generation queue is full ({self.queue_size} waiting); retry in {wait} s",
                       headers={"Retry-After": str(wait)})
        if self.worker is not None:
            self.worker.notify()
        return {"id": gen_id, "status": "queued", "url": f"/v1/generations/{gen_id}",
                **({"target_id": prep.request["target"]["item_id"]} if "item_id" in prep.request["target"] else {})}

    def get(self, gen_id: str) -> dict[str, Any]:
        """A generation's status, record, image URLs and feedback."""
        gen_id = safe_id(gen_id, "generation_id")
        gen = self.store.generation(gen_id)
        if gen is None:
            raise NotFound(f"unknown generation {gen_id!r}")
        return self._view(gen)

    async def wait(self, gen_id: str, seconds: float, client: str) -> dict[str, Any]:
        """:meth:`get` once the generation is final or ``seconds`` (at most :data:`MAX_WAIT_S`) have
        passed; the wait is parked on the event loop (:mod:`pmgen.serve.waiting`), store reads run on a
        thread. Raises :class:`~pmgen.serve.errors.TooMany` when ``client`` has its bound of waits parked."""
        view = await asyncio.to_thread(self.get, gen_id)
        if view["status"] in FINAL or seconds <= 0:
            return view
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(seconds, MAX_WAIT_S)
        with self.waits.slot(client):
            while True:
                changed = self.waits.event(view["id"])  # before reading: a change after the read wakes us
                view = await asyncio.to_thread(self.get, gen_id)
                left = deadline - loop.time()
                if view["status"] in FINAL or left <= 0:
                    return view
                await self.waits.sleep(changed, min(left, RECHECK_S))

    def _view(self, gen: Generation) -> dict[str, Any]:
        base = f"/v1/generations/{gen.id}/images"
        out: dict[str, Any] = {
            "id": gen.id, "status": gen.status, "user_id": gen.user_id, "created_at": gen.created_at,
            "started_at": gen.started_at, "finished_at": gen.finished_at, "resumed": gen.resumed,
            "attempts": gen.attempts,
            "error": gen.error, "request": {k: v for k, v in gen.request.items() if k != "user"},
            "record": gen.record, "images": None, "feedback": gen.feedback,
        }
        if gen.status == "queued":
            out["queue_depth"] = self.store.queue_depth()
        if gen.record:
            out["images"] = {"chosen": f"{base}/chosen.png",
                             "candidates": [f"{base}/{Path(c['image']).name}" for c in gen.record["candidates"]]}
        return out

    def image_path(self, gen_id: str, name: str) -> Path:
        """The file of a finished generation's image (``chosen.png`` or ``w_<weight>.png``)."""
        gen_id = safe_id(gen_id, "generation_id")
        if not _IMAGE_NAME.fullmatch(name):
            raise NotFound(f"no image {name!r} (expected chosen.png, w_<weight>.png or x<n>_w_<weight>.png)")
        if self.store.status(gen_id) != "done":
            raise NotFound(f"generation {gen_id!r} has no images (not done)")
        folder = inside(self.gen_root, gen_id)
        path = inside(folder, name) if name == "chosen.png" else inside(folder, "candidates", name)
        if not path.is_file():
            raise NotFound(f"no image {name!r} in generation {gen_id!r}")
        return path

    def feedback(self, gen_id: str, candidate: Any, signal: Any) -> dict[str, Any]:
        """Store ``pick``/``like``/``dislike`` on one candidate (by index) of a finished generation."""
        gen_id = safe_id(gen_id, "generation_id")
        gen = self.store.generation(gen_id)
        if gen is None:
            raise NotFound(f"unknown generation {gen_id!r}")
        probs = []
        if signal not in SIGNALS:
            probs.append(problem("signal", f"expected one of {', '.join(SIGNALS)}, got {signal!r}"))
        if gen.status != "done" or not gen.record:
            raise Conflict(f"generation {gen_id!r} is {gen.status}; feedback needs a finished generation")
        n = len(gen.record["candidates"])
        if isinstance(candidate, bool) or not isinstance(candidate, int) or not 0 <= candidate < n:
            probs.append(problem("candidate", f"expected a candidate index in [0, {n - 1}], got {candidate!r}"))
        if probs:
            raise Invalid(f"{len(probs)} problem(s) in the feedback; nothing was stored", probs)
        weight = float(gen.record["candidates"][candidate]["weight"])
        fid = self.store.add_feedback(gen_id, gen.user_id, candidate, weight, signal)
        return {"id": fid, "generation_id": gen_id, "user_id": gen.user_id, "candidate": candidate,
                "weight": weight, "signal": signal}

    # ------------------------------------------------------------------ catalog
    def item_json(self, item: Item) -> dict[str, Any]:
        return {"id": item.id, "title": item.title, "text": item.text[:200],
                "image": f"/v1/items/{item.id}/image" if item.image else None}

    def search(self, q: str, limit: int = 24) -> dict[str, Any]:
        if len(q) > self.limits.max_title_chars:
            raise Invalid("query too long", [problem("q", f"at most {self.limits.max_title_chars} characters")])
        hits = self.index.search(q, max(1, min(limit, 100)))
        return {"q": q, "items": [self.item_json(it) for it in hits]}

    def target_for_message(self, message: str) -> dict[str, Any]:
        item = self.index.target_from_message(message[:self.limits.max_text_chars])
        if item is None:
            raise NotFound("no catalog item matches this message")
        return self.item_json(item)

    def item_image(self, item_id: str) -> Path:
        item = self.catalog.items.get(item_id)
        path = self.catalog.image_path(item) if item is not None else None
        if path is None or not Path(path).is_file():
            raise NotFound(f"no image for item {item_id!r}")
        return Path(path)
