"""Generation requests: from a built-in dataset, or from the user's own behavior files; batch runs.

A batch file is JSONL, one request per line, in one of these forms::

    {"dataset": "sticker-users", "sample_id": "su0003-1"}
    {"dataset": "sticker-users", "user_id": "su0003", "target_id": "1F602"}
    {"user": {"user_id": "alice", "events": [...]}, "target_id": "p3", "items": "my_data/items.jsonl"}

Optional per line: ``"request_id"`` (default: derived from the request), ``"seed"``. Each finished
request is a folder ``<out>/<request_id>/`` with ``record.json``; a re-run skips finished requests,
and a request interrupted mid-write leaves no folder behind (see :meth:`GenerationResult.save`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from pmgen.data import DataError, Dataset, Event, Item, Problem, User
from pmgen.validate import _Ctx, parse_event, parse_items


@dataclass
class Request:
    """Everything one generation needs."""

    request_id: str
    user: User
    target: Item
    items: Mapping[str, Item]
    context: list[Event] = field(default_factory=list)
    target_image: Path | None = None
    history_images: list[Path] = field(default_factory=list)
    seed: int | None = None
    ground_truth: str | None = None


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "request"


def history_image_paths(ds_or_root: Dataset | Path, user: User, items: Mapping[str, Item], limit: int = 12) -> list[Path]:
    """Images of the items in a user's history, newest first (items without images are skipped)."""
    from pmgen.verbalize import newest_first

    out: list[Path] = []
    for e in newest_first(user.events):
        if e.item_id and e.item_id in items and items[e.item_id].image:
            p = ds_or_root.image_path(e.item_id) if isinstance(ds_or_root, Dataset) else Path(ds_or_root) / items[e.item_id].image
            if p is not None and p not in out:
                out.append(p)
        if len(out) >= limit:
            break
    return out


def from_dataset(ds: Dataset, sample_id: str | None = None, user_id: str | None = None,
                 target_id: str | None = None, request_id: str | None = None) -> Request:
    """A request for a sample of a built-in/loaded dataset, or for any (user, target) pair in it."""
    context: list[Event] = []
    gt = None
    if sample_id is not None:
        matches = [s for s in ds.samples if s.sample_id == sample_id]
        if not matches:
            raise KeyError(f"unknown sample id {sample_id!r} in dataset {ds.name!r}")
        s = matches[0]
        user_id, target_id, context, gt = s.user_id, s.target_id, s.context, s.ground_truth_personalized
    if user_id is None or target_id is None:
        raise ValueError("give a sample id, or both a user id and a target id")
    if user_id not in ds.users:
        raise KeyError(f"unknown user id {user_id!r} in dataset {ds.name!r} ({len(ds.users)} users)")
    if target_id not in ds.items:
        raise KeyError(f"unknown target item id {target_id!r} in dataset {ds.name!r} ({len(ds.items)} items)")
    user = ds.users[user_id]
    return Request(request_id=request_id or _safe_id(sample_id or f"{user_id}-{target_id}"), user=user,
                   target=ds.items[target_id], items=ds.items, context=list(context),
                   target_image=ds.image_path(target_id), history_images=history_image_paths(ds, user, ds.items),
                   ground_truth=gt)


def user_from_json(obj: Any, where: str, items: Mapping[str, Item] | None) -> User:
    """A user object ``{"user_id", "events": [...]}`` checked like a users.jsonl line."""
    problems: list[Problem] = []
    ctx = _Ctx(Path(where), problems)
    if not isinstance(obj, dict):
        raise DataError([Problem(where, None, "user", "expected an object with 'user_id' and 'events'")])
    events = []
    raw = obj.get("events")
    if not isinstance(raw, list):
        problems.append(Problem(where, None, "events", "expected a list of behavior events"))
        raw = []
    for j, ev in enumerate(raw):
        e = parse_event(ev, ctx, f"events[{j}]", items)
        if e is not None:
            events.append(e)
    if problems:
        raise DataError(problems)
    return User(str(obj.get("user_id", "user")), events, obj.get("attributes") or {})


def from_files(behaviors: Path, items_path: Path, target_id: str, request_id: str | None = None,
               context: list[Event] | None = None) -> Request:
    """A request from the user's own data: a JSON/JSONL file with one user's behaviors + an items file."""
    problems: list[Problem] = []
    items = parse_items(items_path, problems)
    if problems:
        raise DataError(problems)
    text = behaviors.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) != 1:
            raise DataError([Problem(str(behaviors), None, None, "expected one JSON object: a user with 'events' "
                                     "(for several users use a users.jsonl dataset folder or a batch file)")])
        obj = json.loads(lines[0])
    user = user_from_json(obj, str(behaviors), items)
    if target_id not in items:
        raise KeyError(f"unknown target item id {target_id!r} (not in {items_path})")
    root = items_path.parent
    target = items[target_id]
    return Request(request_id=request_id or _safe_id(f"{user.user_id}-{target_id}"), user=user, target=target,
                   items=items, context=context or [],
                   target_image=(root / target.image) if target.image else None,
                   history_images=history_image_paths(root, user, items))


def read_batch(path: Path, data_root: Path | None = None) -> Iterator[tuple[int, Request | Exception]]:
    """Parse a batch JSONL file into requests (a bad line yields its exception, the rest go on)."""
    from pmgen import datasets

    loaded: dict[str, Dataset] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            rid = obj.get("request_id")
            if "dataset" in obj:
                name = obj["dataset"]
                if name not in loaded:
                    loaded[name] = datasets.load(name, data_root)
                req = from_dataset(loaded[name], obj.get("sample_id"), obj.get("user_id"), obj.get("target_id"), rid)
            elif "user" in obj:
                if "items" not in obj or "target_id" not in obj:
                    raise ValueError("a request with 'user' needs 'items' (path) and 'target_id'")
                items_path = (path.parent / obj["items"]) if not Path(obj["items"]).is_absolute() else Path(obj["items"])
                problems: list[Problem] = []
                items = parse_items(items_path, problems)
                if problems:
                    raise DataError(problems)
                user = user_from_json(obj["user"], f"{path}:{lineno}", items)
                if obj["target_id"] not in items:
                    raise KeyError(f"unknown target item id {obj['target_id']!r} (not in {items_path})")
                target = items[obj["target_id"]]
                req = Request(request_id=rid or _safe_id(f"{user.user_id}-{target.id}"), user=user, target=target,
                              items=items, target_image=(items_path.parent / target.image) if target.image else None,
                              history_images=history_image_paths(items_path.parent, user, items))
            else:
                raise ValueError("expected 'dataset' (+ 'sample_id' or 'user_id'/'target_id') or 'user' + 'items' + "
                                 "'target_id'")
            if "seed" in obj:
                req.seed = int(obj["seed"])
            yield lineno, req
        except (ValueError, KeyError, DataError, json.JSONDecodeError, OSError) as e:
            yield lineno, e


def run_batch(pmg: Any, batch: Path, out: Path, data_root: Path | None = None, console: Any = None,
              err: Any = None) -> tuple[int, int]:
    """Run every request of a batch file into ``out/<request_id>/``; skip finished ones.

    Returns ``(done, failed)``. Failures (bad lines, unknown ids) are reported with their line number
    and do not stop the batch; ``out/index.jsonl`` lists every finished request's record path.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = console or Console()
    err = err or Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    parsed = list(read_batch(batch, data_root))
    done = failed = skipped = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("generating", total=len(parsed))
        for lineno, req in parsed:
            if isinstance(req, Exception):
                failed += 1
                msg = req.args[0] if isinstance(req, KeyError) and req.args else str(req)
                err.print(f"[red]{batch}:{lineno}[/]: {msg}", highlight=False)
            elif (out / req.request_id / "record.json").is_file():
                skipped += 1
                done += 1
            else:
                res = pmg.generate(req.user, req.target, req.items, context=req.context, target_image=req.target_image,
                                   history_images=req.history_images, user_id=req.user.user_id,
                                   **({"seed": req.seed} if req.seed is not None else {}))
                if req.ground_truth:
                    res.record["ground_truth_personalized"] = req.ground_truth
                res.save(out / req.request_id)
                done += 1
            bar.advance(task)
    index = [str(p.relative_to(out)) for p in sorted(out.glob("*/record.json"))]
    tmp = out / "index.jsonl.tmp"
    tmp.write_text("".join(json.dumps({"record": r}) + "\n" for r in index))
    tmp.replace(out / "index.jsonl")
    console.print(f"{done} done ({skipped} already finished before), {failed} failed → {out}")
    return done, failed
