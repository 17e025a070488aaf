"""The Ray Data batch engine: the same batch file, request folders and index as the local engine,
with the LLM stage and the generator stage in separate actor pools that run at the same time.

::

    driver: read + validate the batch file (bad lines reported per line), skip finished requests,
            groups of ``group_size`` pending requests in file order (the local engine's groups)
      │  ray.data.from_items (one block per group)
      ▼
    KeywordStage actors (``llm_actors``): target keywords, preference keywords (cache lookups first,
            the misses of a group in one batched LLM call), soft embeddings        ── the LLM
      ▼
    GenerateStage actors (``actors``): conditions, every candidate of the group in shared fixed-shape
            UNet batches (:func:`pmgen.batch.grouped.render_many`), selection, atomic write of each
            request folder (:func:`pmgen.paths.write_result_dir`)                  ── the UNet
      ▼
    driver: per-request results, failures by line, ``index.jsonl`` (with ``attempts``/``retried``)

Ray Data streams blocks between the pools, so while one group is in the UNet the next ones are in
the LLM. Actors are restarted and their tasks retried when a worker process dies (Ray Data's
defaults: ``max_restarts=-1``, ``max_task_retries=-1``); a retried group skips the requests its dead
attempt already finished, the attempt log (:mod:`pmgen.batch.common`) records each start, and the
hidden temp folder of a write cut short is removed at the end. Workers read the batch file and write
the output folder themselves, so on a cluster both must be on a shared file system.

Each stage builds its models through a picklable ``factory(roles) -> PMG`` (:class:`PresetFactory`
for a preset; ``roles`` is ``{"keywords"}`` or ``{"generate"}``, the other models are left out).
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pmgen.batch.common import (
    start_batch,
    DEFAULT_GROUP_SIZE,
    FAULT_ENV,
    fault_point,
    groups,
    keywords_for_group,
    message,
    note_attempt,
    plan_group,
    remove_partials,
    soft_for_group,
    write_index,
)
from pmgen.batch.grouped import DEFAULT_BATCH_SIZE, render_many
from pmgen.data.requests import Request, read_batch
from pmgen.paths import RESULT_MARKER, inside
from pmgen.progress import progress_bar

ROLES = ("keywords", "generate")


@dataclass(frozen=True)
class ModelInfo:
    """Name and content hash of a model that lives in another actor (what the record's ``models`` needs)."""

    name: str
    content_hash: str
    budget_tokens: int = 0


@dataclass
class PresetFactory:
    """Builds a preset's models for one stage (picklable: sent to every actor).

    ``settings`` are overrides of the preset's generation settings (as ``pmgen generate``'s options);
    ``preset_overrides`` replace preset fields (e.g. ``generator``, ``soft_prompt``); ``keyword_cache``
    is ``"default"`` (the cache dir's SQLite), a path, or ``None`` (no cache).
    """

    preset: str = "sticker-tiny"
    settings: dict[str, Any] = field(default_factory=dict)
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    keyword_cache: str | None = "default"

    def __call__(self, roles: frozenset[str]) -> Any:
        from pmgen.pipeline import PMG, Settings
        from pmgen.presets import (get_preset, load_generator, load_history_encoder, load_history_tower, load_llm,
                                   load_scorer, load_soft_prompt, load_text_encoder)

        p = get_preset(self.preset, **dict(self.preset_overrides))
        settings = Settings.for_preset(p, **{"use_soft": bool(p.soft_prompt), **self.settings})
        llm = soft = te = gen = sel = cache = hist = tower = None
        if "keywords" in roles:
            from pmgen.stages.keywords import KeywordCache

            llm = load_llm(p)
            soft = load_soft_prompt(p, llm)
            if self.keyword_cache is not None:
                cache = KeywordCache(None if self.keyword_cache == "default" else self.keyword_cache)
        if "generate" in roles:
            gen = load_generator(p)
            te = load_text_encoder(p, gen)
            sel = load_scorer(p, "selector", te)
            hist = load_history_encoder(p)  # the generator actors plan the conditions
            tower = load_history_tower(p, te, sel) if hist is not None else None
        return PMG.with_preset_history_encoder(p, llm, te, gen, sel, soft, settings, cache, hist, tower)


def _info(model: Any) -> ModelInfo | None:
    if model is None:
        return None
    return ModelInfo(str(model.name), str(model.content_hash), int(getattr(model, "budget_tokens", 0) or 0))


class _Stage:
    """What both actor kinds share: the models, the batch file's requests (parsed once per actor)."""

    def __init__(self, factory: Callable[[frozenset[str]], Any], roles: frozenset[str], batch: str,
                 data_root: str | None, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pmg = factory(roles)
        self.batch, self.data_root = Path(batch), Path(data_root) if data_root else None
        self._requests: dict[str, Request] | None = None

    def requests(self, ids: list[str]) -> list[Request]:
        if self._requests is None:
            self._requests = {r.request_id: r for _, r in read_batch(self.batch, self.data_root)
                              if isinstance(r, Request)}
        return [self._requests[i] for i in ids]

    @staticmethod
    def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
        return [pickle.loads(b) for b in batch["payload"]]

    @staticmethod
    def _out(rows: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np

        return {"payload": np.array([pickle.dumps(r) for r in rows], dtype=object)}


class KeywordStage(_Stage):
    """LLM actor: preference keywords (cache first, misses batched) and soft embeddings of a group."""

    def __init__(self, factory: Callable[[frozenset[str]], Any], batch: str, data_root: str | None = None,
                 threads: int | None = None):
        super().__init__(factory, frozenset({"keywords"}), batch, data_root, threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = []
        for row in self._rows(batch):
            row["t_start"] = row.get("t_start") or time.time()
            reqs = self.requests(row["ids"])
            row["keywords"] = keywords_for_group(self.pmg, reqs)
            row["soft"] = soft_for_group(self.pmg, reqs)
            row["llm"] = _info(self.pmg.llm)
            row["soft_prompt"] = _info(self.pmg.soft_prompt)
            out.append(row)
        return self._out(out)


class GenerateStage(_Stage):
    """Generator actor: plans, every candidate of the group in shared UNet batches, selection, writes."""

    def __init__(self, factory: Callable[[frozenset[str]], Any], batch: str, out: str, data_root: str | None = None,
                 unet_batch: int = DEFAULT_BATCH_SIZE, threads: int | None = None, fault: str | None = None):
        super().__init__(factory, frozenset({"generate"}), batch, data_root, threads)
        self.out = Path(out)
        self.unet_batch = unet_batch
        self.fault = fault

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = []
        for row in self._rows(batch):
            out.extend(self.group(row))
        return self._out(out)

    def group(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        die = fault_point(self.out, self.fault)
        pmg = self.pmg
        pmg.llm, pmg.soft_prompt = row["llm"], row["soft_prompt"]
        results: list[dict[str, Any]] = []
        todo = []
        for i, (rid, lineno) in enumerate(zip(row["ids"], row["lines"])):
            folder = inside(self.out, rid)
            if (folder / "record.json").is_file() and (folder / RESULT_MARKER).is_file():
                results.append({"request_id": rid, "line": lineno, "ok": True, "skipped": True})  # done by a dead attempt
            else:
                todo.append(i)
                note_attempt(self.out, rid)
        if not todo:
            return results
        reqs = self.requests([row["ids"][i] for i in todo])
        pos = {i: j for j, i in enumerate(todo)}
        kws = {pos[i]: v for i, v in row["keywords"].items() if i in pos}
        soft = {pos[i]: v for i, v in row["soft"].items() if i in pos}
        alphas = row.get("alphas") or {}
        plans = plan_group(pmg, reqs, lambda uid: alphas.get(uid), kws, soft)
        ok = [p for p in plans if not isinstance(p, Exception)]
        t = time.perf_counter()
        images = iter(render_many(pmg, ok, self.unet_batch) if ok else [])
        dt = time.perf_counter() - t
        n_rows = sum(len(p.conditions) for p in ok) or 1
        for k, (i, req, plan) in enumerate(zip(todo, reqs, plans)):
            rid, lineno = row["ids"][i], row["lines"][i]
            res: Any = plan
            if not isinstance(plan, Exception):
                plan.timings["generate"] = dt * len(plan.conditions) / n_rows
                try:
                    res = pmg.finish(plan, next(images))
                    if req.ground_truth:
                        res.record.ground_truth_personalized = req.ground_truth
                    if die is not None and k == len(todo) - 1:
                        _die_while_writing(res, inside(self.out, rid), die)
                    res.save(inside(self.out, rid))
                except (ValueError, OSError) as e:
                    res = e
            if isinstance(res, Exception):
                results.append({"request_id": rid, "line": lineno, "ok": False, "error": message(res)})
            else:
                now = time.time()
                results.append({"request_id": rid, "line": lineno, "ok": True, "candidates": len(res.record.candidates),
                                "latency_s": now - row["t_start"], "t_start": row["t_start"], "t_end": now})
        return results


def _die_while_writing(res: Any, folder: Path, die: Callable[[], None]) -> None:
    """Fault injection: write the result's files into the temp folder, then exit before the rename."""
    import pmgen.paths as paths

    real = paths.write_result_dir

    def dying(out: Any, write: Callable[[Path], None]) -> Path:
        return real(out, lambda tmp: (write(tmp), die()))

    paths.write_result_dir = dying
    try:
        res.save(folder)
    finally:
        paths.write_result_dir = real


def run_batch_ray(factory: Callable[[frozenset[str]], Any], batch: Path, out: Path, data_root: Path | None = None,
                  console: Any = None, err: Any = None, requests: list[tuple[int, Request | Exception]] | None = None,
                  alpha_of: Callable[[str], tuple[float, str] | None] | None = None,
                  group_size: int = DEFAULT_GROUP_SIZE, unet_batch: int = DEFAULT_BATCH_SIZE,
                  actors: int | None = None, llm_actors: int = 1, address: str | None = None,
                  cpus_per_actor: float = 1.0, llm_cpus: float = 0.5,
                  stats: dict[str, Any] | None = None) -> tuple[int, int]:
    """Run a batch file on Ray Data (see the module docstring); same outputs and return value as
    :func:`pmgen.batch.local.run_batch`.

    Args:
        factory: builds each stage's models in its actor (:class:`PresetFactory`).
        actors: generator actors (default: as many as the CPUs left by the LLM actors hold, at least 1;
            the CPUs left are then shared among them: 2 CPUs → 1 LLM actor on 0.5 + 2 generator actors
            on 0.75 each, so the generators use both cores while the LLM actor waits on cached keywords).
        llm_actors: keyword/soft-embedding actors.
        address: an existing Ray cluster (``ray start --head`` prints it); ``None`` = a Ray already
            initialized in this process, else a local one started here (and stopped at the end).
        cpus_per_actor: Ray CPUs per generator actor when ``actors`` is given; torch threads per actor
            are this rounded down (at least 1).
        llm_cpus: Ray CPUs per LLM actor (one torch thread).
        stats: receives ``latency_s`` per request written (from its group entering the LLM stage to its
            folder in place), ``wall_s`` (Ray start and actor loading included), ``candidates``,
            ``retried``, and ``first_start`` / ``last_end`` (epoch seconds: the first group entering the
            LLM stage, the last folder written).
    """
    import ray
    from rich.console import Console

    console = console or Console()
    start = start_batch(batch, out, data_root, requests, err)
    out, by_id, pending = start.out, start.by_id, start.pending
    skipped, failed, report = start.skipped, start.failed, start.report
    done = skipped
    t_start = time.perf_counter()
    rows = []
    for gi, g in enumerate(groups(pending, group_size)):
        alphas = {}
        if alpha_of is not None:
            for p in g:
                uid = by_id[p.request_id].user.user_id
                if uid not in alphas:
                    alphas[uid] = alpha_of(uid)
        rows.append({"group": gi, "ids": [p.request_id for p in g], "lines": [p.lineno for p in g],
                     "alphas": {k: v for k, v in alphas.items() if v}})
    latencies: list[float] = []
    window: list[float] = []
    n_candidates = 0
    started_here = False
    if rows:
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PMGEN_CACHE_DIR",
                                               "PMGEN_DATA_DIR") if k in os.environ}
            ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                     include_dashboard=False, log_to_driver=False, logging_level="warning")
            started_here = True
        try:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            cpus = float(ray.cluster_resources().get("CPU", 1))
            left = max(cpus - llm_cpus * llm_actors, 0.5)
            n_gen = actors or max(1, int(round(left / cpus_per_actor + 0.25)))
            gen_cpus = cpus_per_actor if actors else left / n_gen
            threads = max(1, int(cpus_per_actor))
            common = dict(batch=str(Path(batch).resolve()), data_root=str(data_root) if data_root else None,
                          threads=threads)
            ds = ray.data.from_items([{"payload": pickle.dumps(r)} for r in rows], override_num_blocks=len(rows))
            ds = ds.map_batches(KeywordStage, batch_size=1, batch_format="numpy", concurrency=llm_actors,
                                num_cpus=llm_cpus, fn_constructor_kwargs=dict(factory=factory, **common))
            ds = ds.map_batches(GenerateStage, batch_size=1, batch_format="numpy", concurrency=n_gen,
                                num_cpus=gen_cpus,
                                fn_constructor_kwargs=dict(factory=factory, out=str(out), unet_batch=unet_batch,
                                                           fault=os.environ.get(FAULT_ENV), **common))
            results: dict[str, dict[str, Any]] = {}
            before = len(start.parsed) - len(pending)
            with progress_bar("generating (Ray)", len(start.parsed), console, start=before) as update:
                for item in ds.iter_rows():
                    res = pickle.loads(item["payload"])
                    results[res["request_id"]] = res  # a retried group reports each request again: the last word wins
                    update(before + len(results))
        finally:
            if started_here:
                ray.shutdown()
        for p in pending:
            res = results.get(p.request_id)
            if res is None:
                failed += 1
                report(p.lineno, "no result came back from the Ray pipeline")
            elif res["ok"]:
                done += 1
                if not res.get("skipped"):
                    latencies.append(res["latency_s"])
                    n_candidates += res["candidates"]
                    window += [res["t_start"], res["t_end"]]
            else:
                failed += 1
                report(p.lineno, res["error"])
        remove_partials(out, [p.request_id for p in pending])
    index = write_index(out, {p.request_id: p.lineno for p in pending})
    if stats is not None:
        stats.update(latency_s=latencies, wall_s=time.perf_counter() - t_start, candidates=n_candidates,
                     written=len(latencies), retried=sorted(r["request_id"] for r in index if r["retried"]),
                     first_start=min(window, default=None), last_end=max(window, default=None))
    console.print(f"{done} done ({skipped} already finished before), {failed} failed → {out} (Ray)")
    return done, failed
