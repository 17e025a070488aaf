"""The local batch engine: every request of a batch file, in this process, in groups.

Finished requests are folders ``<out>/<request_id>/`` written atomically
(:func:`pmgen.paths.write_result_dir`); a re-run skips them. See :mod:`pmgen.data.requests` for the
batch file format and :mod:`pmgen.batch.common` for the index and the attempt log.

``group_size = 1`` runs :meth:`pmgen.pipeline.PMG.generate` per request: exactly the images of
``pmgen generate``. ``group_size > 1`` (the CLI's default, 8) takes the requests ``group_size`` at a
time: keywords for the group's cache misses in one batched LLM call (when the extractor has
``extract_many``), then the candidates of the whole group in shared fixed-shape UNet batches
(:func:`pmgen.batch.grouped.render_many`): each request's images are then the same whatever group it is
in (and the same as the Ray engine's), and within float rounding of ``pmgen generate``'s.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING

import torch

from pmgen.batch.common import (
    start_batch,
    DEFAULT_GROUP_SIZE,  # noqa: F401  (re-exported for callers choosing a group size)
    groups,
    keywords_for_group,
    message,
    note_attempt,
    plan_group,
    soft_for_group,
    write_index,
)
from pmgen.batch.grouped import DEFAULT_BATCH_SIZE, render_many
from pmgen.data.requests import Request
from pmgen.paths import inside
from pmgen.progress import progress_bar

if TYPE_CHECKING:
    from pmgen.pipeline import PMG


def run_batch(pmg: PMG, batch: Path, out: Path, data_root: Path | None = None, console: Any = None,
              err: Any = None, requests: list[tuple[int, Request | Exception]] | None = None,
              alpha_of: Callable[[str], tuple[float, str] | None] | None = None, group_size: int = 1,
              unet_batch: int = DEFAULT_BATCH_SIZE, stats: dict[str, Any] | None = None,
              overlap: bool = True) -> tuple[int, int]:
    """Run every request of a batch file into ``out/<request_id>/``; skip finished ones.

    Returns ``(done, failed)``. Failures (bad lines, unknown ids) are reported with their line number
    and do not stop the batch; ``out/index.jsonl`` lists every finished request
    (:func:`pmgen.batch.common.write_index`). ``requests`` (from :func:`read_batch`) skips re-reading the
    file. ``out`` must be new, empty, or a batch folder pmgen made (:func:`pmgen.paths.prepare_batch_root`);
    every request folder is verified to stay inside it, and a folder pmgen did not write is never
    replaced. ``alpha_of(user_id)`` gives a user's learned ``(α, source)`` (or ``None``: the settings' α).
    ``group_size``: see the module docstring; ``unet_batch``: rows per UNet call in a group.
    ``overlap`` (groups only): the next group's keywords and soft embeddings are computed in a second
    thread while this group is in the UNet, each stage with half of torch's threads meanwhile (one
    each on 2 cores; restored at the end).
    ``stats``, when given, receives ``latency_s`` (per request written: from its group's start to its
    folder being in place), ``wall_s``, ``candidates``, and ``first_start`` / ``last_end`` (epoch seconds
    of the processing window: models are loaded before it).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    console = console or Console()
    start = start_batch(batch, out, data_root, requests, err)
    parsed, out, by_id, pending = start.parsed, start.out, start.by_id, start.pending
    skipped, failed, report = start.skipped, start.failed, start.report
    done = skipped
    latencies: list[float] = []
    n_candidates = 0
    t_start, wall_start = time.perf_counter(), time.time()
    seen = len(parsed) - len(pending)
    with progress_bar("generating", len(parsed), console, start=seen,
                      columns=(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeRemainingColumn())) as update:
        glist = list(groups(pending, group_size))
        overlapped = overlap and group_size > 1 and len(glist) > 1
        threads = torch.get_num_threads()
        pool = ThreadPoolExecutor(1, thread_name_prefix="pmgen-keywords") if overlapped else None
        if overlapped:
            torch.set_num_threads(max(1, threads // 2))  # two stages at once: half the threads each

        def prepare(group: list[Any]) -> tuple[float, list[Request], Any, Any]:
            t0 = time.perf_counter()
            reqs = [by_id[p.request_id] for p in group]
            if group_size == 1:
                return t0, reqs, None, None
            return t0, reqs, keywords_for_group(pmg, reqs), soft_for_group(pmg, reqs)

        try:
            nxt = pool.submit(prepare, glist[0]) if pool is not None and glist else None
            for gi, group in enumerate(glist):
                if nxt is not None:
                    t0, reqs, kws, soft = nxt.result()
                    nxt = pool.submit(prepare, glist[gi + 1]) if gi + 1 < len(glist) else None  # type: ignore[union-attr]
                else:
                    t0, reqs, kws, soft = prepare(group)
                for p in group:
                    note_attempt(out, p.request_id)
                if group_size == 1:
                    results: list[Any] = []
                    for req in reqs:
                        try:
                            results.append(pmg.generate(req.user, req.target, req.items,
                                                        **req.generate_kwargs(alpha_of)))
                        except (ValueError, OSError) as e:
                            results.append(e)
                else:
                    results = run_group(pmg, reqs, alpha_of, unet_batch, kws, soft)
                for p, req, res in zip(group, reqs, results):
                    if not isinstance(res, Exception):
                        try:
                            if req.ground_truth:
                                res.record.ground_truth_personalized = req.ground_truth
                            res.save(inside(out, p.request_id))
                            done += 1
                            n_candidates += len(res.record.candidates)
                            latencies.append(time.perf_counter() - t0)
                        except (ValueError, OSError) as e:  # a foreign folder in the way, ...
                            res = e
                    if isinstance(res, Exception):
                        failed += 1
                        report(p.lineno, message(res))
                    seen += 1
                    update(seen)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                torch.set_num_threads(threads)
    write_index(out, {p.request_id: p.lineno for p in pending})
    if stats is not None:
        stats.update(latency_s=latencies, wall_s=time.perf_counter() - t_start, candidates=n_candidates,
                     written=len(latencies), first_start=wall_start, last_end=time.time())
    console.print(f"{done} done ({skipped} already finished before), {failed} failed → {out}")
    return done, failed


def run_group(pmg: PMG, reqs: list[Request], alpha_of: Callable[[str], Any] | None,
              unet_batch: int = DEFAULT_BATCH_SIZE, kws: Any = None, soft: Any = None) -> list[Any]:
    """One group: keywords (cache first, misses batched) and soft embeddings unless given, plans, the
    candidates of all in shared UNet batches, selection. A :class:`pmgen.pipeline.GenerationResult`
    or the exception per request."""
    kws = keywords_for_group(pmg, reqs) if kws is None else kws
    soft = soft_for_group(pmg, reqs) if soft is None else soft
    plans = plan_group(pmg, reqs, alpha_of, kws, soft)
    ok = [p for p in plans if not isinstance(p, Exception)]
    t = time.perf_counter()
    images = render_many(pmg, ok, unet_batch) if ok else []
    dt = time.perf_counter() - t
    n_rows = sum(len(p.conditions) for p in ok) or 1
    it = iter(images)
    results: list[Any] = []
    for p in plans:
        if isinstance(p, Exception):
            results.append(p)
            continue
        p.timings["generate"] = dt * len(p.conditions) / n_rows  # its share of the group's generator time
        try:
            results.append(pmg.finish(p, next(it)))
        except ValueError as e:
            results.append(e)
    return results
