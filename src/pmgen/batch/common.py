"""What both batch engines share: the pending requests, groups, per-request work, attempts, the index.

A batch output root holds one folder per finished request (``<out>/<request_id>/``, written atomically by
:func:`pmgen.paths.write_result_dir`), ``index.jsonl`` and a hidden ``.pmgen-attempts/`` folder: each time
an engine starts working on a request it adds one empty file ``.pmgen-attempts/<request_id>/<token>``,
so after a worker died (or the whole run was interrupted and resumed) the index says which requests
needed more than one attempt.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TYPE_CHECKING

from pmgen.data.requests import Request
from pmgen.paths import RESULT_MARKER, UnsafePathError, check_id, inside

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

ATTEMPTS_DIR = ".pmgen-attempts"
DEFAULT_GROUP_SIZE = 8
FAULT_ENV = "PMGEN_FAULT_EXIT_AT"
"""Fault injection for tests: ``PMGEN_FAULT_EXIT_AT=k`` makes the worker process that starts the k-th
generation task of a batch (counted over all processes, 1-based, through files in the output root)
exit with ``os._exit(1)`` midway through writing that task's results."""


def message(e: BaseException) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


@dataclass
class Pending:
    """A request to run: its batch-file line and id (the request itself is looked up by id)."""

    lineno: int
    request_id: str


def triage(parsed: Sequence[tuple[int, Request | Exception]], out: Path,
           report: Callable[[int, str], None]) -> tuple[list[Pending], int, int]:
    """Split parsed batch lines into pending requests, already finished ones and failures.

    Bad lines and unsafe request ids are reported (``report(lineno, message)``). Returns
    ``(pending, n_finished_before, n_failed)``.
    """
    pending: list[Pending] = []
    finished = failed = 0
    for lineno, req in parsed:
        if isinstance(req, Exception):
            failed += 1
            report(lineno, message(req))
            continue
        try:
            folder = inside(out, check_id(req.request_id, "request_id"))
        except UnsafePathError as e:
            failed += 1
            report(lineno, str(e))
            continue
        if (folder / "record.json").is_file() and (folder / RESULT_MARKER).is_file():
            finished += 1
        else:
            pending.append(Pending(lineno, req.request_id))
    return pending, finished, failed


@dataclass
class BatchStart:
    """What both engines know before the first request runs (see :func:`start_batch`)."""

    parsed: list[tuple[int, Request | Exception]]
    out: Path
    by_id: dict[str, Request]
    pending: list[Pending]
    skipped: int
    failed: int
    report: Callable[[int, str], None]  # report(lineno, message): a bad line, as file:line: message


def start_batch(batch: Path, out: Path, data_root: Path | None, requests: Any, err: Any = None) -> BatchStart:
    """Read the batch (unless ``requests`` were parsed already), prepare ``out`` and triage the lines;
    bad lines are reported as ``file:line: message`` on ``err`` (stderr by default)."""
    from rich.console import Console
    from rich.markup import escape

    from pmgen.data.requests import read_batch
    from pmgen.paths import prepare_batch_root

    err = err or Console(stderr=True)
    parsed = list(read_batch(batch, data_root)) if requests is None else requests
    out = prepare_batch_root(out)
    by_id = {r.request_id: r for _, r in parsed if isinstance(r, Request)}

    def report(lineno: int, msg: str) -> None:
        err.print(f"[red]{escape(str(batch))}:{lineno}[/]: {escape(msg)}", highlight=False, soft_wrap=True)

    pending, skipped, failed = triage(parsed, out, report)
    return BatchStart(parsed, out, by_id, pending, skipped, failed, report)


def groups(pending: Sequence[Pending], size: int) -> Iterator[list[Pending]]:
    """Consecutive groups of ``size`` pending requests, in file order (the same for both engines)."""
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    for i in range(0, len(pending), size):
        yield list(pending[i:i + size])


def note_attempt(out: Path, request_id: str) -> None:
    """Record that an attempt on ``request_id`` starts now (one file per attempt)."""
    d = out / ATTEMPTS_DIR / request_id
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{time.time_ns()}-{os.getpid()}-{secrets.token_hex(3)}").touch()


def attempts(out: Path, request_id: str) -> int:
    d = out / ATTEMPTS_DIR / request_id
    return sum(1 for _ in d.iterdir()) if d.is_dir() else 0


def fault_point(out: Path, setting: str | None) -> Callable[[], None] | None:
    """For fault-injection tests: count this generation task and return the exit call if it is the k-th.

    ``setting`` is :data:`FAULT_ENV`'s value (read by the driver and handed to the workers). Tasks are
    counted by creating ``.pmgen-attempts/.tasks/<n>`` exclusively, so the count is shared by every
    process writing into ``out``.
    """
    if not setting:
        return None
    k = int(setting)
    d = out / ATTEMPTS_DIR / ".tasks"
    d.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        try:
            fd = os.open(d / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            break
        except FileExistsError:
            n += 1
    return (lambda: os._exit(1)) if n == k else None


def remove_partials(out: Path, request_ids: Sequence[str]) -> int:
    """Remove the hidden ``.<request_id>.<hex>.partial`` folders that :func:`pmgen.paths.write_result_dir`
    left behind when a worker died mid-write (pmgen's own temp folders, by their exact name pattern)."""
    n = 0
    for rid in request_ids:
        pat = re.compile(rf"\.{re.escape(rid)}\.[0-9a-f]{{8}}\.(partial|old)")
        for p in out.glob(f".{rid}.*"):
            if p.is_dir() and pat.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def write_index(out: Path, lines: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Write ``out/index.jsonl`` (temp + rename): one line per finished request folder, sorted by id.

    Each line: ``record`` (path of its record.json relative to ``out``), ``request_id``, ``attempts``
    (how many times an engine started on it, over every run into ``out``), ``retried``
    (``attempts > 1``), and ``line`` (its batch-file line, when known).
    """
    rows = []
    for rec in sorted(out.glob("*/record.json")):
        folder = rec.parent
        if folder.name.startswith(".") or not (folder / RESULT_MARKER).is_file():
            continue
        rid = folder.name
        n = attempts(out, rid)
        row: dict[str, Any] = {"record": str(rec.relative_to(out)), "request_id": rid, "attempts": n,
                               "retried": n > 1}
        if lines and rid in lines:
            row["line"] = lines[rid]
        rows.append(row)
    tmp = out / "index.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "index.jsonl")
    return rows


def plan_group(pmg: PMG, reqs: Sequence[Request], alpha_of: Callable[[str], Any] | None,
               keywords: dict[int, tuple[Any, float]] | None = None,
               soft: dict[int, tuple[Any, float]] | None = None) -> list[Any | Exception]:
    """:meth:`PMG.plan` for every request of a group (an exception in place of a failed one), with the
    group's keywords and soft embeddings (``index → (value, seconds)``) when given."""
    plans: list[Any] = []
    for i, req in enumerate(reqs):
        if keywords and isinstance(keywords.get(i, (None, 0))[0], Exception):
            plans.append(keywords[i][0])  # the keyword stage failed for this request (as PMG.plan would)
            continue
        try:
            plans.append(pmg.plan(req.user, req.target, req.items,
                                  keywords=(keywords or {}).get(i, (None, 0))[0],
                                  soft=(soft or {}).get(i, (None, 0))[0], **req.generate_kwargs(alpha_of)))
            for name, given in (("preference_keywords", keywords), ("soft_embeddings", soft)):
                if given and i in given and name in plans[-1].timings:
                    plans[-1].timings[name] = given[i][1]  # this request's share of the group's call
        except (ValueError, OSError) as e:  # a bad image, an unusable history, ...
            plans.append(e)
    return plans


def keywords_for_group(pmg: PMG, reqs: Sequence[Request]) -> dict[int, tuple[Any, float]]:
    """Preference keywords of every request in a group that needs them: cache lookups first, then the
    misses in one batched LLM call when the extractor has ``extract_many`` (else one by one).

    A request whose history the stage refuses (``ValueError``, e.g. nothing fits the token budget) gets
    the exception: :func:`plan_group` reports it as that request's failure, as a single request does.
    Requests without events are left out (:meth:`PMG.plan` makes them non-personalized).
    """
    s = pmg.settings
    if not s.use_keywords:
        return {}
    ext = pmg.extractor(s.k, s.budget_tokens)
    todo = [i for i, r in enumerate(reqs) if r.user.events]
    many = getattr(ext, "extract_many", None)
    out: dict[int, tuple[Any, float]] = {}
    if many is not None and len(todo) > 1:
        t = time.perf_counter()
        got = many([(reqs[i].user.events, reqs[i].items) for i in todo])
        dt = (time.perf_counter() - t) / max(1, len(todo))
        for i, kw in zip(todo, got):
            out[i] = (kw, dt)
        return out
    for i in todo:
        t = time.perf_counter()
        try:
            kw: Any = ext.extract(reqs[i].user.events, reqs[i].items)
        except ValueError as e:
            kw = e
        out[i] = (kw, time.perf_counter() - t)
    return out


def soft_for_group(pmg: PMG, reqs: Sequence[Request]) -> dict[int, tuple[Any, float]]:
    """Soft embeddings of every request that uses them, one user at a time (:meth:`PMG.soft_embeddings`:
    the single-request numbers; a padded batch would change them)."""
    s = pmg.settings
    if not (s.use_soft and pmg.soft_prompt is not None):
        return {}
    out: dict[int, tuple[Any, float]] = {}
    for i, r in enumerate(reqs):
        if r.user.events:
            t = time.perf_counter()
            out[i] = (pmg.soft_embeddings(r.user.events, r.items), time.perf_counter() - t)
    return out
