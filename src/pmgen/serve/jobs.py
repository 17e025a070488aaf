"""The model worker's side of :class:`pmgen.serve.service.Service`: running claimed generations.

A generation claimed from the store's queue (:mod:`pmgen.serve.worker`) is turned back into a
:class:`pmgen.data.requests.Request` (:meth:`GenerationJobs._request`), run alone
(:meth:`~GenerationJobs.run_generation`) or in a dynamic batch with others
(:meth:`~GenerationJobs.run_generations`: one LLM call for the keyword cache misses, shared UNet
batches), or handed to a Ray Serve replica (:meth:`~GenerationJobs._dispatch`), and its result
folder written and finished in the store only while its lease is still held — so each generation
ends with exactly one result.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from typing import Any

from pmgen.data.requests import Request
from pmgen.data.schema import Event, Item, User
from pmgen.data.store import Generation
from pmgen.paths import check_id, inside
from pmgen.stages.feedback import resolve_alpha

log = logging.getLogger("pmgen.serve.service")
MAX_ATTEMPTS = 2
"""A generation interrupted this many times (its worker died while running it) is marked failed."""
PARTIAL = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9._-]*\.[0-9a-f]{8}\.(partial|old)")
"""A result folder being written (``.<id>.<hex>.partial``) or replaced: pmgen's own, removed after a crash."""


class GenerationJobs:
    """Mixed into :class:`pmgen.serve.service.Service` (whose attributes it uses: ``pmg``, ``catalog``,
    ``store``, ``worker``, ``pool``, ``gen_root``, ``upload_root``, ``lease_s``, ``waits``, ``balance``…)."""

    def _request(self, gen: Generation) -> Request:
        """The stored generation as a :class:`pmgen.data.requests.Request`: the user's events (stored, as
        many as there were when it was accepted, or sent inline), the target, the context, the images, the
        options, and α learned from a stored user's feedback unless the request sets one."""
        from pmgen.data.requests import history_image_paths

        req = gen.request
        u = req["user"]
        if u["stored"]:
            user = User(u["user_id"], self.store.events(u["user_id"], limit=u["n_events"]))
        else:
            user = User(u["user_id"], [Event(**e) for e in u["events"]])
        t = req["target"]
        if "item_id" in t:
            target = self.catalog.items[t["item_id"]]
            target_image = self.catalog.image_path(target)
        else:
            target = Item(id=t["item"]["id"], title=t["item"]["title"], text=t["item"]["text"])
            target_image = inside(self.upload_root, check_id(t["image"], "upload")) if t.get("image") else None
        opts = dict(req["options"])
        if "weights" in opts:
            opts["weights"] = tuple(opts["weights"])
        learned = resolve_alpha(self.store, user.user_id, self.default_alpha, self.balance) \
            if "alpha" not in opts and u["stored"] else None
        if learned:  # α learned from this user's feedback
            opts["alpha"], opts["alpha_source"] = learned
        return Request(request_id=gen.id, user=user, target=target, items=self.catalog.items,
                       context=[Event(**e) for e in req["context"]], target_image=target_image,
                       history_images=history_image_paths(self.catalog, user, self.catalog.items),
                       images_root=self.catalog.items_root or self.catalog.root, options=opts)

    def _take(self, gen: Generation, owner: str | None) -> bool:
        """Before running a claimed generation: clear a dead worker's half-written folder; finish at once
        one whose result was written in full before a crash, or that was interrupted too often. ``True``
        when it still has to run."""
        self.waits.changed(gen.id)
        for p in self.gen_root.glob(f".{gen.id}.*"):  # a dead worker's half-written folder (the lease is ours now)
            if PARTIAL.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)
        folder = inside(self.gen_root, check_id(gen.id, "generation_id"))
        if (folder / "record.json").is_file():  # written in full before a crash, not yet marked done
            self._finish(gen.id, owner, json.loads((folder / "record.json").read_text()))
            return False
        if gen.attempts > MAX_ATTEMPTS:
            self._finish(gen.id, owner, error=f"interrupted {gen.attempts - 1} times (its worker stopped while "
                                              "running it); not retried")
            return False
        return True

    def _save(self, gen: Generation, owner: str | None, res: Any) -> dict[str, Any] | None:
        """Write a result's folder and return its record, unless another worker took the generation over
        (``None``: the result is dropped). Called under the model lock."""
        if owner is not None and not self.store.renew(gen.id, owner, self.lease_s):
            log.warning("generation %s was taken over by another worker; result dropped", gen.id)
            return None
        res.save(inside(self.gen_root, check_id(gen.id, "generation_id")))
        record = res.record.to_json()
        if gen.request["user"]["stored"]:  # the profile shows the keywords without running the LLM again
            self._keywords[(gen.user_id, int(gen.request["user"]["n_events"]))] = \
                list(record.get("preference_keywords") or [])
        return record

    def _owner(self) -> str | None:
        return self.worker.owner if self.worker is not None else None

    def _dispatch(self, gens: list[Generation]) -> None:
        """A dispatcher thread's job (with model replicas): run ``gens`` (a dynamic batch claimed from the
        queue) on one replica under this process's leases. A call that fails (its replica died, Ray is
        away) gives the leases back: the generations are claimed again in a moment and run on a live
        replica."""
        owner = self.worker.owner
        try:
            results = self.pool.run([(g.id, owner) for g in gens])
        except Exception as e:  # noqa: BLE001 — any failure of the call: the generations go back to the queue
            log.warning("generations %s: the replica call failed (%s: %s); back to the queue",
                        ", ".join(g.id for g in gens), type(e).__name__, e)
            results = [("lost", len(gens))] * len(gens)
        for gen, (status, _) in zip(gens, results):
            if status not in ("done", "failed"):  # claimable again in a moment (Ray routes away from a dead replica)
                self.store.release(gen.id, owner, after_s=min(2.0, self.lease_s / 3))
            self.waits.changed(gen.id)

    def run_generation(self, gen: Generation, owner: str | None = None) -> None:
        """Run one claimed generation on a worker thread and store its result (or its failure), as long
        as ``owner`` (default: this process's worker) still holds its lease (else another worker took
        it over and stores the result)."""
        owner = owner or self._owner()
        if not self._take(gen, owner):
            return
        t0 = time.perf_counter()
        try:
            req = self._request(gen)
            with self._model_lock:
                res = self.pmg.generate(req.user, req.target, req.items, **req.generate_kwargs())
                record = self._save(gen, owner, res)
            if record is not None and self._finish(gen.id, owner, record):
                self._durations = (self._durations + [time.perf_counter() - t0])[-50:]
        except Exception as e:  # a bad image, a model error: reported on the generation
            log.exception("generation %s failed", gen.id)
            self._finish(gen.id, owner, error=f"{type(e).__name__}: {e}")

    def run_generations(self, gens: list[Generation], owners: list[str] | None = None) -> None:
        """Run several claimed generations together (the worker's dynamic batch): the keywords of their
        cache misses in one LLM call, their candidates in shared UNet batches
        (:func:`pmgen.batch.local.run_group`), then each result stored as :meth:`run_generation` does.
        One generation's failure is its own; the others still finish. ``owners``: the lease owner of each
        generation (a model replica runs them for its dispatchers; default this process's worker)."""
        from pmgen.batch.local import run_group

        own = dict(zip([g.id for g in gens], owners)) if owners is not None else {}

        def owner_of(g: Generation) -> str | None:
            return own.get(g.id) or self._owner()

        ok: list[tuple[Generation, Request]] = []
        for gen in gens:
            if not self._take(gen, owner_of(gen)):
                continue
            try:
                ok.append((gen, self._request(gen)))
            except Exception as e:  # noqa: BLE001 — its own failure, reported on it
                log.exception("generation %s failed", gen.id)
                self._finish(gen.id, owner_of(gen), error=f"{type(e).__name__}: {e}")
        if not ok:
            return
        t0 = time.perf_counter()
        rows = sum(len(g.request["options"].get("weights") or self.pmg.settings.weights) for g, _ in ok)
        try:
            with self._model_lock:
                results = run_group(self.pmg, [r for _, r in ok], None, unet_batch=max(1, min(8, rows)))
                records = [None if isinstance(res, Exception) else self._save(gen, owner_of(gen), res)
                           for (gen, _), res in zip(ok, results)]
        except Exception as e:  # a model error hits the whole batch
            log.exception("generations %s failed", ", ".join(g.id for g, _ in ok))
            for gen, _ in ok:
                self._finish(gen.id, owner_of(gen), error=f"{type(e).__name__}: {e}")
            return
        dt = (time.perf_counter() - t0) / len(ok)
        for (gen, _), res, record in zip(ok, results, records):
            if isinstance(res, Exception):
                log.error("generation %s failed: %s", gen.id, res)
                self._finish(gen.id, owner_of(gen), error=f"{type(res).__name__}: {res}")
            elif record is not None and self._finish(gen.id, owner_of(gen), record):
                self._durations = (self._durations + [dt])[-50:]

    def _finish(self, gen_id: str, owner: str | None, record: dict[str, Any] | None = None,
                error: str | None = None) -> bool:
        done = self.store.finish(gen_id, record, error, owner=owner)
        if not done:
            log.warning("generation %s: not stored, another worker holds it now", gen_id)
        self.waits.changed(gen_id)
        return done
