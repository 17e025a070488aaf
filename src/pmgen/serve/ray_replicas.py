"""Model replicas on Ray Serve: ``pmgen serve --replicas N [--ray-address ADDR]``.

The API process stays a stateless ingress over the store; the models run in ``N`` replicas of one Ray
Serve deployment (:class:`ModelReplica`: Ray places them on the cluster, checks their health and
restarts a replica that dies). The store's durable queue stays the source of truth:

1. a dispatcher in each API process (a :class:`pmgen.serve.worker.Worker` with one thread per replica,
   whose threads call the replicas instead of the models) claims a **dynamic batch** from the queue —
   a waiting generation and up to ``batch − 1`` more within ``batch_wait_s``, as the in-process worker
   does — holds their leases with the heartbeat and sends their ids to the deployment in one call;
2. Ray Serve routes the call to a free replica (one batch per replica at a time), which runs it:
   :meth:`pmgen.serve.service.Service.run_generations` (one LLM call for the keyword cache misses,
   shared UNet batches; a lone generation the one-at-a-time way) writes each result and finishes it in
   the store under the dispatcher's lease;
3. a call that fails because its replica died gives the lease back (:meth:`pmgen.data.store.Store.release`):
   the generation is claimed again and runs on a live replica (``attempts`` counts it). An API process
   that dies stops renewing its leases; another API process claims them when they expire, and a replica
   still running one of them cannot store a second result (``finish`` checks the lease owner).

    pool = ReplicaPool(functools.partial(PMG.from_preset, "sticker-tiny"), catalog, root=..., store_url=...,
                       replicas=2, batch=8)
    pool.start()                         # ray.init + serve.run; blocks until the replicas are up
    pool.run([(generation_id, owner), ...])   # from a dispatcher thread; returns when the results are stored
    pool.stop()

Needs ``pip install 'pmgen[ray]'`` (``ray[serve]``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from pmgen.data.schema import Dataset

log = logging.getLogger(__name__)

APP_NAME = "pmgen-models"
MAX_REPLICAS = 64
CALL_TIMEOUT_S = 900.0
"""A replica call that takes longer than this is given up (the lease goes back to the queue)."""


class ModelReplica:
    """One model replica (the Ray Serve deployment's class; see :func:`deployment`).

    Args:
        loader: returns a loaded :class:`pmgen.pipeline.PMG` (called once, in the replica).
        catalog: the service's catalog.
        root: the service's folder (result images and uploads), shared with the API processes.
        store_url: the store (the same as the API processes').
        lease_s: the lease length the dispatchers use.
        threads: torch threads in this replica.
    """

    def __init__(self, loader: Callable[[], Any], catalog: Dataset, root: str, store_url: str, lease_s: float,
                 threads: int = 1):
        import torch

        from pmgen.data.store import Store
        from pmgen.serve.service import Service

        torch.set_num_threads(max(1, threads))
        self.store = Store.open(store_url)
        self.service = Service(loader(), catalog, self.store, root, workers=0, lease_s=lease_s)

    async def run(self, calls: list[tuple[str, str]]) -> list[tuple[str, int]]:
        """A dynamic batch of ``(generation id, lease owner)``: each generation still held by its owner
        runs; returns per call its status (``"done"`` / ``"failed"``, or ``"lost"``: the lease went
        elsewhere) and the size of the batch it ran in."""
        if not 1 <= len(calls) <= 32:
            raise ValueError(f"a batch holds 1..32 generations, got {len(calls)}")
        gens, owners = [], []
        for gen_id, owner in calls:
            g = self.store.generation(gen_id)
            if g is not None and g.status == "running" and g.lease_owner == owner:
                gens.append(g)
                owners.append(owner)
        if len(gens) == 1:  # alone: the one-at-a-time path, as the in-process worker runs it
            await asyncio.to_thread(self.service.run_generation, gens[0], owners[0])
        elif gens:
            await asyncio.to_thread(self.service.run_generations, gens, owners)
        ran = {g.id for g in gens}
        return [((self.store.status(gen_id) or "lost") if gen_id in ran else "lost", len(gens)) for gen_id, _ in calls]

    def check_health(self) -> None:
        """Ray Serve's health check: the store answers (a replica whose database is gone is restarted)."""
        self.store.queue_depth()


def deployment(replicas: int, cpus: float) -> Any:
    """The Ray Serve deployment of :class:`ModelReplica` (``replicas`` copies, ``cpus`` each, one batch
    at a time each: Ray Serve sends a call to a free replica)."""
    from ray import serve

    return serve.deployment(ModelReplica, name="ModelReplica", num_replicas=replicas,
                            ray_actor_options={"num_cpus": cpus}, max_ongoing_requests=1,
                            health_check_period_s=10, health_check_timeout_s=30)


class ReplicaPool:
    """``replicas`` model replicas on Ray Serve, called by an API process's dispatcher threads.

    Args:
        loader: returns a loaded PMG in each replica (picklable: e.g. ``functools.partial(PMG.from_preset, name)``).
        catalog, root, store_url, lease_s: as the service's.
        replicas: number of replicas (1..64).
        batch: most generations one replica runs together (dynamic batching).
        batch_wait_s: how long a replica's batch waits for more calls after its first.
        cpus: CPUs Ray reserves per replica (its torch threads: ``max(1, int(cpus))``).
        ray_address: an existing Ray cluster (``ray start --head``); default: a local Ray in this process.
    """

    def __init__(self, loader: Callable[[], Any], catalog: Dataset, *, root: str | Path, store_url: str,
                 replicas: int = 1, batch: int = 8, batch_wait_s: float = 0.05, cpus: float = 1.0,
                 lease_s: float = 10.0, ray_address: str | None = None):
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be in 1..{MAX_REPLICAS}, got {replicas}")
        if not 1 <= batch <= 32:
            raise ValueError(f"batch must be in 1..32, got {batch}")
        if not 0 < cpus <= 64:
            raise ValueError(f"cpus per replica must be in (0, 64], got {cpus}")
        self.loader, self.catalog, self.root, self.store_url = loader, catalog, str(root), store_url
        self.replicas, self.batch, self.batch_wait_s, self.cpus = replicas, batch, batch_wait_s, cpus
        self.lease_s, self.ray_address = lease_s, ray_address
        self.handle: Any = None
        self.joined = False
        """Whether this pool joined replicas another API process deployed on the cluster."""
        self._started_ray = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def concurrency(self) -> int:
        """Dispatcher threads: one per replica, each with one batch out at a time."""
        return self.replicas

    def start(self) -> None:
        """Start (or join) Ray, deploy the replicas and wait until they are up (their models loaded).

        A local Ray's processes share the fate of the *thread* that started them (Linux's parent-death
        signal follows the thread), so Ray is started on a thread of its own that lives until :meth:`stop`,
        whichever thread calls this.
        """
        started, failed = threading.Event(), []

        def hold() -> None:
            try:
                self._start()
            except BaseException as e:  # noqa: BLE001 — handed to the caller
                failed.append(e)
                return
            finally:
                started.set()
            self._halt.wait()
            self._stop()

        self._thread = threading.Thread(target=hold, name="pmgen-ray-driver", daemon=True)
        self._thread.start()
        started.wait()
        if failed:
            raise failed[0]

    def _start(self) -> None:
        try:
            import ray
            from ray import serve
        except ImportError as e:
            raise RuntimeError("--replicas needs Ray Serve: pip install 'pmgen[ray]'") from e
        if not ray.is_initialized():
            if self.ray_address:
                ray.init(address=self.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, int(self.replicas * self.cpus + 0.999)),
                         include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        serve.start(proxy_location="Disabled")  # the API is pmgen's own; no Serve HTTP proxy
        if self.ray_address and APP_NAME in serve.status().applications:  # another API process deployed it
            self.handle = serve.get_app_handle(APP_NAME)
            self.joined = True
            log.info("joined the model replicas already running on %s", self.ray_address)
            return
        app = deployment(self.replicas, self.cpus).bind(
            self.loader, self.catalog, self.root, self.store_url, self.lease_s, max(1, int(self.cpus)))
        self.handle = serve.run(app, name=APP_NAME, route_prefix=None)
        log.info("%d model replica(s) up on Ray Serve", self.replicas)

    def run(self, calls: list[tuple[str, str]]) -> list[tuple[str, int]]:
        """Run claimed generations ``(id, lease owner)`` together on a replica (blocks): each one's status
        afterwards and the size of the batch it ran in."""
        got = self.handle.run.remote(list(calls)).result(timeout_s=CALL_TIMEOUT_S)
        return [(str(status), int(size)) for status, size in got]

    def stop(self, timeout: float = 60.0) -> None:
        """Delete the replicas and stop the local Ray this pool started; on a cluster (``ray_address``)
        the replicas keep serving the other API processes (remove them with ``serve shutdown``)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _stop(self) -> None:
        try:
            from ray import serve

            if self.ray_address:  # a cluster's replicas serve every API process: they stay (`serve shutdown`)
                return
            serve.delete(APP_NAME)
            if self._started_ray:
                import ray

                serve.shutdown()
                ray.shutdown()
        except Exception:  # noqa: BLE001 — stopping must not raise on a cluster already gone
            log.exception("stopping the model replicas")
