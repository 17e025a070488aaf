"""Validation of items / users / samples JSONL files with errors a user can act on.

Every problem is reported with file, line number, field and what was expected; loading never
raises a raw traceback on bad input and never drops a valid record silently (a file with problems
is rejected whole, listing them all).

    >>> report = validate_file(Path("my_data/users.jsonl"))
    >>> for p in report.problems: print(p)
    my_data/users.jsonl:7 [events[2].type]: unknown event type 'clik' (expected one of: click, ...)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pmgen.data.schema import (
    EVENT_TYPES,
    EVENTS_NEEDING_ITEM,
    EVENTS_NEEDING_TEXT,
    SOCIAL_ACTIONS,
    SPLITS,
    DataError,
    Dataset,
    Event,
    Item,
    Problem,
    Sample,
    User,
    iter_jsonl_lines,
)
from pmgen.limits import LIMITS, Limits, check_file_size

DEFAULT_RATING_SCALE = (1.0, 5.0)
FILE_KINDS = ("items", "users", "samples")


@dataclass
class Report:
    """What validation found. ``dataset`` is set by :func:`validate_folder` when there are no problems."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    dataset: Dataset | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


class _Ctx:
    """Collects problems for one file, checked against ``limits``."""

    def __init__(self, path: Path, problems: list[Problem], limits: Limits = LIMITS):
        self.file = str(path)
        self.problems = problems
        self.line: int | None = None
        self.limits = limits

    def add(self, fld: str | None, message: str) -> None:
        self.problems.append(Problem(self.file, self.line, fld, message))


def _read_records(path: Path, ctx: _Ctx) -> Iterator[tuple[int, dict[str, Any]]]:
    """Decode each line as a UTF-8 JSON object; report undecodable lines (in line order) and go on."""
    try:
        too_big = check_file_size(str(path), path.stat().st_size, ctx.limits.max_data_file_bytes, "data file")
        if too_big:
            ctx.add(None, too_big)
            return
        lines = list(iter_jsonl_lines(path))
    except OSError as e:
        ctx.add(None, f"cannot read file: {e.strerror or e}")
        return
    for lineno, raw in lines:
        ctx.line = lineno
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            ctx.add(None, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                    "(save the file as UTF-8)")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            ctx.add(None, f"malformed JSON: {e.msg} at column {e.colno} (expected one JSON object per line)")
            continue
        if not isinstance(obj, dict):
            ctx.add(None, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield lineno, obj
    ctx.line = None


def _id(obj: dict[str, Any], key: str, ctx: _Ctx, required: bool = True) -> str | None:
    """An identifier: a non-empty string (integers are accepted and turned into strings)."""
    if key not in obj or obj[key] is None:
        if required:
            ctx.add(key, f"missing required field '{key}'")
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        ctx.add(key, f"expected a string id, got {type(v).__name__}")
        return None
    v = str(v)
    if not v.strip():
        ctx.add(key, "expected a non-empty id")
        return None
    if len(v) > ctx.limits.max_title_chars:
        ctx.add(key, f"id of {len(v):,} characters; the limit is {ctx.limits.max_title_chars:,}")
        return None
    return v


def _text(obj: dict[str, Any], key: str, ctx: _Ctx, required: bool, where: str = "",
          max_chars: int | None = None) -> str | None:
    name = f"{where}{key}"
    if key not in obj or obj[key] is None:
        if required:
            ctx.add(name, f"missing required field '{key}'")
        return None
    v = obj[key]
    if not isinstance(v, str):
        ctx.add(name, f"expected a string, got {type(v).__name__}")
        return None
    if required and not v.strip():
        ctx.add(name, "expected non-empty text")
        return None
    limit = max_chars or ctx.limits.max_text_chars
    if len(v) > limit:
        ctx.add(name, f"text of {len(v):,} characters; the limit is {limit:,} (pmgen.limits.Limits)")
        return None
    return v


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def check_image_path(image: str, root: Path, ctx: _Ctx, fld: str = "image", check_content: bool = True) -> None:
    """An item image must be a relative path inside ``root`` that exists and is a readable image within
    the size limits (:mod:`pmgen.data.images`)."""
    p = Path(image)
    full = (root / p).resolve()
    if p.is_absolute() or not full.is_relative_to(root.resolve()):
        ctx.add(fld, f"image path '{image}' escapes the dataset folder {root} "
                "(expected a path relative to the folder holding items.jsonl, without '..')")
        return
    if not full.is_file():
        ctx.add(fld, f"image file does not exist: {full}")
        return
    if check_content:
        from pmgen.data.images import ImageError, check_image

        try:
            check_image(full, ctx.limits)
        except ImageError as e:
            ctx.add(fld, str(e))


def parse_items(path: Path, problems: list[Problem], check_images: bool = True,
                limits: Limits = LIMITS) -> dict[str, Item]:
    """Parse and check an items file; problems are appended to ``problems``."""
    ctx = _Ctx(path, problems, limits)
    root = path.parent
    items: dict[str, Item] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in _read_records(path, ctx):
        ctx.line = lineno
        n_before = len(problems)
        iid = _id(obj, "id", ctx)
        title = _text(obj, "title", ctx, required=True, max_chars=ctx.limits.max_title_chars)
        text = _text(obj, "text", ctx, required=False) or ""
        image = _text(obj, "image", ctx, required=False)
        attrs = obj.get("attributes", {})
        if attrs is None:
            attrs = {}
        if not isinstance(attrs, dict):
            ctx.add("attributes", f"expected an object, got {type(attrs).__name__}")
        if image is not None:
            check_image_path(image, root, ctx, check_content=check_images)
        if iid is not None and iid in items:
            ctx.add("id", f"duplicate item id '{iid}' (first seen on line {first_line[iid]})")
        if len(problems) == n_before and iid is not None and title is not None:
            items[iid] = Item(id=iid, title=title, text=text, image=image, attributes=attrs)
            first_line[iid] = lineno
    return items


def parse_event(
    obj: Any,
    ctx: _Ctx,
    where: str,
    items: dict[str, Item] | None,
    rating_scale: tuple[float, float] = DEFAULT_RATING_SCALE,
) -> Event | None:
    """Parse and check one event object; returns ``None`` (after reporting) when invalid."""
    if not isinstance(obj, dict):
        ctx.add(where, f"expected an event object, got {type(obj).__name__}")
        return None
    n_before = len(ctx.problems)
    etype = obj.get("type")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        ctx.add(f"{where}.type", f"unknown event type {etype!r} (expected one of: {', '.join(EVENT_TYPES)})")
        return None
    item_id = _id(obj, "item_id", ctx, required=False) if obj.get("item_id") is not None else None
    if item_id is None and etype in EVENTS_NEEDING_ITEM:
        ctx.add(f"{where}.item_id", f"a '{etype}' event needs an 'item_id'")
    if item_id is not None and items is not None and item_id not in items:
        ctx.add(f"{where}.item_id", f"unknown item id '{item_id}' (not in the items file)")
    text = _text(obj, "text", ctx, required=etype in EVENTS_NEEDING_TEXT, where=f"{where}.")
    value = obj.get("value")
    if etype == "rating":
        num = _number(value)
        lo, hi = rating_scale
        if num is None:
            ctx.add(f"{where}.value", f"a rating needs a numeric 'value' in [{lo:g}, {hi:g}], got {value!r}")
        elif not lo <= num <= hi:
            ctx.add(f"{where}.value", f"rating {num:g} out of range (expected {lo:g} to {hi:g})")
        value = num
    elif etype == "social":
        if value not in SOCIAL_ACTIONS:
            ctx.add(f"{where}.value", f"social action {value!r} unknown (expected one of: {', '.join(SOCIAL_ACTIONS)})")
        if item_id is None and not text:
            ctx.add(where, "a 'social' event needs an 'item_id' or a 'text'")
    time = obj.get("time")
    if time is not None and _number(time) is None:
        ctx.add(f"{where}.time", f"expected a number (e.g. a Unix timestamp), got {time!r}")
    speaker = _text(obj, "speaker", ctx, required=False, where=f"{where}.")
    if len(ctx.problems) != n_before:
        return None
    return Event(
        type=etype,
        item_id=item_id,
        text=text,
        value=value if value is not None else None,
        time=_number(time),
        speaker=speaker,
    )


def parse_users(
    path: Path,
    problems: list[Problem],
    items: dict[str, Item] | None,
    rating_scale: tuple[float, float] = DEFAULT_RATING_SCALE,
) -> dict[str, User]:
    """Parse and check a users file (``items=None`` skips the item-id check)."""
    ctx = _Ctx(path, problems)
    users: dict[str, User] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in _read_records(path, ctx):
        ctx.line = lineno
        n_before = len(problems)
        uid = _id(obj, "user_id", ctx)
        events_raw = obj.get("events")
        events: list[Event] = []
        if events_raw is None:
            ctx.add("events", "missing required field 'events' (a list of behavior events)")
        elif not isinstance(events_raw, list):
            ctx.add("events", f"expected a list of events, got {type(events_raw).__name__}")
        elif not events_raw:
            ctx.add("events", "empty history: the user has no events (expected at least one)")
        elif len(events_raw) > ctx.limits.max_events_per_user:
            ctx.add("events", f"{len(events_raw):,} events; the limit is {ctx.limits.max_events_per_user:,} per user "
                    "(pmgen.limits.Limits)")
        else:
            for j, ev in enumerate(events_raw):
                e = parse_event(ev, ctx, f"events[{j}]", items, rating_scale)
                if e is not None:
                    events.append(e)
        attrs = obj.get("attributes") or {}
        if not isinstance(attrs, dict):
            ctx.add("attributes", f"expected an object, got {type(attrs).__name__}")
        if uid is not None and uid in users:
            ctx.add("user_id", f"duplicate user id '{uid}' (first seen on line {first_line[uid]})")
        if len(problems) == n_before and uid is not None:
            users[uid] = User(user_id=uid, events=events, attributes=attrs)
            first_line[uid] = lineno
    return users


def parse_samples(
    path: Path,
    problems: list[Problem],
    items: dict[str, Item] | None,
    users: dict[str, User] | None,
) -> list[Sample]:
    """Parse and check a samples file (``None`` for items/users skips those cross-checks)."""
    ctx = _Ctx(path, problems)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, obj in _read_records(path, ctx):
        ctx.line = lineno
        n_before = len(problems)
        sid = _id(obj, "sample_id", ctx, required=False) or f"line{lineno}"
        uid = _id(obj, "user_id", ctx)
        if uid is not None and users is not None and uid not in users:
            ctx.add("user_id", f"unknown user id '{uid}' (not in the users file)")
        if obj.get("target_id") in (None, ""):
            ctx.add("target_id", "missing target: each sample needs a 'target_id' naming an item")
            tid = None
        else:
            tid = _id(obj, "target_id", ctx)
            if tid is not None and items is not None and tid not in items:
                ctx.add("target_id", f"unknown target item id '{tid}' (not in the items file)")
        split = obj.get("split", "test")
        if split not in SPLITS:
            ctx.add("split", f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
        context: list[Event] = []
        raw_ctx = obj.get("context") or []
        if not isinstance(raw_ctx, list):
            ctx.add("context", f"expected a list of events, got {type(raw_ctx).__name__}")
        else:
            for j, ev in enumerate(raw_ctx):
                e = parse_event(ev, ctx, f"context[{j}]", items)
                if e is not None:
                    context.append(e)
        gt = _id(obj, "ground_truth_personalized", ctx, required=False)
        if gt is not None and items is not None and gt not in items:
            ctx.add("ground_truth_personalized", f"unknown item id '{gt}' (not in the items file)")
        heldout = obj.get("heldout") or []
        if not isinstance(heldout, list):
            ctx.add("heldout", "expected a list of item ids")
            heldout = []
        heldout = [str(h) for h in heldout]
        if items is not None:
            for h in heldout:
                if h not in items:
                    ctx.add("heldout", f"unknown item id '{h}' (not in the items file)")
        attrs = obj.get("attributes") or {}
        if sid in seen:
            ctx.add("sample_id", f"duplicate sample id '{sid}' (first seen on line {seen[sid]})")
        if len(problems) == n_before and uid is not None and tid is not None:
            seen[sid] = lineno
            samples.append(Sample(sample_id=sid, user_id=uid, target_id=tid, split=split,
                                  context=context, ground_truth_personalized=gt, heldout=heldout,
                                  attributes=attrs if isinstance(attrs, dict) else {}))
    return samples


def _detect_kind(path: Path) -> str | None:
    stem = path.name.lower()
    for kind in FILE_KINDS:
        if stem.startswith(kind):
            return kind
    try:
        for _, raw in iter_jsonl_lines(path):
            obj = json.loads(raw.decode("utf-8", errors="replace"))
            if isinstance(obj, dict):
                if "events" in obj:
                    return "users"
                if "target_id" in obj:
                    return "samples"
                if "title" in obj or "id" in obj:
                    return "items"
            return None
    except (OSError, json.JSONDecodeError):
        return None
    return None


def items_file_for(folder: Path) -> Path | None:
    """The items file belonging to a dataset folder: its own, or the one ``dataset.json`` points to."""
    meta = folder / "dataset.json"
    if meta.is_file():
        try:
            ref = json.loads(meta.read_text(encoding="utf-8")).get("items")
        except (json.JSONDecodeError, UnicodeDecodeError):
            ref = None
        if ref:
            cand = (folder / ref)
            cand = cand / "items.jsonl" if cand.is_dir() or not cand.suffix else cand
            if cand.is_file():
                return cand
    own = folder / "items.jsonl"
    return own if own.is_file() else None


def validate_file(
    path: Path,
    kind: str | None = None,
    items_path: Path | None = None,
    users_path: Path | None = None,
    rating_scale: tuple[float, float] = DEFAULT_RATING_SCALE,
    check_images: bool = True,
) -> Report:
    """Validate one JSONL file (kind detected from the name or content unless given).

    For users/samples files, item ids are checked against ``items_path`` or, when not given, the
    folder's own ``items.jsonl`` (or the one its ``dataset.json`` points to).
    """
    path = Path(path)
    report = Report()
    if not path.is_file():
        report.problems.append(Problem(str(path), None, None, "file not found"))
        return report
    kind = kind or _detect_kind(path)
    if kind not in FILE_KINDS:
        report.problems.append(Problem(str(path), None, None,
                                       "cannot tell whether this is an items, users or samples file "
                                       "(name it items.jsonl / users.jsonl / samples.jsonl or pass --kind)"))
        return report
    items: dict[str, Item] | None = None
    if kind in ("users", "samples"):
        ip = items_path or items_file_for(path.parent)
        if ip is not None:
            items = parse_items(ip, report.problems, check_images=False)
        else:
            report.warnings.append("no items file found: item ids were not checked (pass --items)")
    if kind == "items":
        items = parse_items(path, report.problems, check_images=check_images)
        report.counts["items"] = len(items)
    elif kind == "users":
        users = parse_users(path, report.problems, items, rating_scale)
        report.counts["users"] = len(users)
    else:
        up = users_path or (path.parent / "users.jsonl")
        users = parse_users(up, report.problems, items, rating_scale) if up.is_file() else None
        if users is None:
            report.warnings.append("no users file found: user ids were not checked")
        samples = parse_samples(path, report.problems, items, users)
        report.counts["samples"] = len(samples)
    return report


def validate_folder(folder: Path, rating_scale: tuple[float, float] | None = None,
                    check_images: bool = True) -> Report:
    """Validate a dataset folder and, when it is clean, attach the loaded :class:`Dataset`."""
    folder = Path(folder)
    report = Report()
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    meta: dict[str, Any] = {}
    if (folder / "dataset.json").is_file():
        try:
            meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            report.problems.append(Problem(str(folder / "dataset.json"), None, None, f"malformed JSON: {e}"))
    if rating_scale is None:
        rating_scale = tuple(meta.get("rating_scale", DEFAULT_RATING_SCALE))  # type: ignore[assignment]
    ip = items_file_for(folder)
    items: dict[str, Item] = {}
    if ip is not None:
        items = parse_items(ip, report.problems, check_images=check_images)
    users: dict[str, User] = {}
    if (folder / "users.jsonl").is_file():
        users = parse_users(folder / "users.jsonl", report.problems, items if ip else None, rating_scale)
    samples: list[Sample] = []
    if (folder / "samples.jsonl").is_file():
        samples = parse_samples(folder / "samples.jsonl", report.problems, items if ip else None, users)
    if ip is None and not users:
        report.problems.append(Problem(str(folder), None, None,
                                       "no items.jsonl or users.jsonl found in the dataset folder"))
    report.counts = {"items": len(items), "users": len(users), "samples": len(samples)}
    if not report.problems:
        report.dataset = Dataset(name=meta.get("name", folder.name), root=folder, items=items,
                                 users=users, samples=samples, meta=meta,
                                 items_root=ip.parent if ip else None)
    return report


def load_dataset(folder: str | Path, name: str | None = None) -> Dataset:
    """Load a dataset folder (items, users, optional samples), validating every record.

    Raises:
        DataError: listing every problem found, with file, line and field.
        FileNotFoundError: when the folder or its ``users.jsonl`` is missing.
    """
    report = validate_folder(Path(folder))
    if report.problems:
        raise DataError(report.problems)
    assert report.dataset is not None
    if name:
        report.dataset.name = name
    return report.dataset
