"""Generation requests: from a built-in dataset, or from the user's own behavior files; batch runs.

A batch file is JSONL, one request per line, in one of these forms::

    {"dataset": "sticker-users", "sample_id": "su0003-1"}
    {"dataset": "sticker-users", "user_id": "su0003", "target_id": "1F602"}
    {"user": {"user_id": "alice", "events": [...]}, "target_id": "p3", "items": "my_data/items.jsonl"}

Optional per line: ``"request_id"`` (default: derived from the request; a given one must be a safe
id, see :func:`pmgen.paths.check_id`), ``"seed"`` (an integer >= 0). Each finished request is a
folder ``<out>/<request_id>/`` with ``record.json``; a re-run skips finished requests, and a request
interrupted mid-write leaves no folder behind (see :func:`pmgen.paths.write_result_dir`). Sizes are
bounded by :mod:`pmgen.limits` (file bytes, lines, events per user, text lengths, images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pmgen.data.schema import DataError, Dataset, Event, Item, Problem, User, newest_first
from pmgen.data.validate import _Ctx, _id, parse_event, parse_items
from pmgen.limits import LIMITS, Limits, check_file_size
from pmgen.paths import check_id, safe_id


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
    images_root: Path | None = None
    """The folder the items' ``image`` paths are relative to (for :meth:`item_image`)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Settings overrides of this request (``weights``, ``alpha``, ``strength``, …: checked by whoever
    made the request; the service's :mod:`pmgen.serve.validation`)."""

    def generate_kwargs(self, alpha_of: Callable[[str], Any] | None = None) -> dict[str, Any]:
        """The keyword arguments of :meth:`pmgen.pipeline.PMG.generate` / :meth:`~pmgen.pipeline.PMG.plan`
        that this request carries: context, images (and the catalog's, for exemplars), user id, seed, the
        user's learned ``(α, source)`` when ``alpha_of`` has one (and :attr:`options` set no ``alpha``),
        and :attr:`options`."""
        learned = alpha_of(self.user.user_id) if alpha_of is not None and "alpha" not in self.options else None
        kw: dict[str, Any] = dict(context=self.context, target_image=self.target_image,
                                  history_images=self.history_images, user_id=self.user.user_id,
                                  item_images=self.item_image)
        if self.seed is not None:
            kw["seed"] = self.seed
        if learned:
            kw["alpha"], kw["alpha_source"] = learned
        return kw | self.options

    def item_image(self, item_id: str) -> Path | None:
        """The image of any catalog item (the exemplars' source), verified to stay inside
        :attr:`images_root`; ``None`` when the item has none, is unknown, or its path leaves the folder."""
        from pmgen.paths import UnsafePathError, inside

        item = self.items.get(item_id)
        if item is None or not item.image or self.images_root is None:
            return None
        try:
            return inside(self.images_root, item.image)
        except UnsafePathError:
            return None


def history_image_paths(ds_or_root: Dataset | Path, user: User, items: Mapping[str, Item], limit: int = 12) -> list[Path]:
    """Images of the items in a user's history, newest first (items without images are skipped)."""
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
    if request_id is not None:
        check_id(request_id, "request_id")
    user = ds.users[user_id]
    return Request(request_id=request_id or safe_id(sample_id or f"{user_id}-{target_id}"), user=user,
                   target=ds.items[target_id], items=ds.items, context=list(context),
                   target_image=ds.image_path(target_id), history_images=history_image_paths(ds, user, ds.items),
                   ground_truth=gt, images_root=ds.items_root or ds.root)


def user_from_json(obj: Any, where: str, items: Mapping[str, Item] | None, limits: Limits = LIMITS) -> User:
    """A user object ``{"user_id", "events": [...]}`` checked like a users.jsonl line."""
    problems: list[Problem] = []
    ctx = _Ctx(Path(where), problems, limits)
    if not isinstance(obj, dict):
        raise DataError([Problem(where, None, "user", "expected an object with 'user_id' and 'events'")])
    uid = _id(obj, "user_id", ctx, required=False) if "user_id" in obj else "user"
    events = []
    raw = obj.get("events")
    if not isinstance(raw, list):
        problems.append(Problem(where, None, "events", "expected a list of behavior events"))
        raw = []
    elif len(raw) > limits.max_events_per_user:
        problems.append(Problem(where, None, "events", f"{len(raw):,} events; the limit is "
                                f"{limits.max_events_per_user:,} per user (pmgen.limits.Limits)"))
        raw = []
    for j, ev in enumerate(raw):
        e = parse_event(ev, ctx, f"events[{j}]", items)
        if e is not None:
            events.append(e)
    attrs = obj.get("attributes") or {}
    if not isinstance(attrs, dict):
        problems.append(Problem(where, None, "attributes", f"expected an object, got {type(attrs).__name__}"))
    if problems:
        raise DataError(problems)
    return User(str(uid or "user"), events, attrs)


def _read_request_file(path: Path, what: str, limits: Limits) -> str:
    """The text of a behaviors or batch file, or a :class:`DataError` naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), None, None, f"{what} file not found")])
    if not path.is_file():
        raise DataError([Problem(str(path), None, None, f"{what} must be a file, not a folder")])
    too_big = check_file_size(str(path), path.stat().st_size, limits.max_request_file_bytes, f"{what} file")
    if too_big:
        raise DataError([Problem(str(path), None, None, too_big)])
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError([Problem(str(path), None, None, f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at "
                                 f"offset {e.start}); save the file as UTF-8")]) from None
    except OSError as e:
        raise DataError([Problem(str(path), None, None, f"cannot read file: {e.strerror or e}")]) from None


def _items_for(items_path: Path, limits: Limits) -> dict[str, Item]:
    problems: list[Problem] = []
    if not Path(items_path).is_file():
        raise DataError([Problem(str(items_path), None, None, "items file not found (expected an items JSONL file)")])
    items = parse_items(Path(items_path), problems, limits=limits)
    if problems:
        raise DataError(problems)
    return items


def from_files(behaviors: Path, items_path: Path, target_id: str, request_id: str | None = None,
               context: list[Event] | None = None, limits: Limits = LIMITS) -> Request:
    """A request from the user's own data: a JSON/JSONL file with one user's behaviors + an items file."""
    behaviors, items_path = Path(behaviors), Path(items_path)
    text = _read_request_file(behaviors, "behaviors", limits)
    items = _items_for(items_path, limits)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1:
            try:
                json.loads(lines[0])
                msg = ("expected one JSON object: a user with 'events' (for several users use a users.jsonl "
                       "dataset folder or a batch file)")
            except json.JSONDecodeError as e1:
                msg = f"malformed JSON: {e1.msg} at line 1 column {e1.colno}"
        else:
            msg = f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}"
        raise DataError([Problem(str(behaviors), None, None, msg + " (expected a JSON object "
                                 "{\"user_id\": ..., \"events\": [...]})")]) from None
    user = user_from_json(obj, str(behaviors), items, limits)
    if target_id not in items:
        raise KeyError(f"unknown target item id {target_id!r} (not in {items_path})")
    if request_id is not None:
        check_id(request_id, "request_id")
    root = items_path.parent
    target = items[target_id]
    return Request(request_id=request_id or safe_id(f"{user.user_id}-{target_id}"), user=user, target=target,
                   items=items, context=context or [],
                   target_image=(root / target.image) if target.image else None,
                   history_images=history_image_paths(root, user, items), images_root=root)


def _str_field(obj: Mapping[str, Any], key: str, required: bool = False) -> str | None:
    v = obj.get(key)
    if v is None:
        if required:
            raise ValueError(f"missing required field '{key}'")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError(f"'{key}' must be a string, got {type(v).__name__}")
    return str(v)


def _seed(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise ValueError(f"'seed' must be an integer in [0, 2^63), got {v!r}")
    return v


def read_batch(path: Path, data_root: Path | None = None,
               limits: Limits = LIMITS) -> Iterator[tuple[int, Request | Exception]]:
    """Parse a batch JSONL file into requests (a bad line yields its exception, the rest go on).

    Raises:
        DataError: when the file itself cannot be used (missing, a folder, too large, not UTF-8,
            more than ``limits.max_batch_requests`` requests).
    """
    from pmgen.data import datasets

    path = Path(path)
    lines = _read_request_file(path, "batch", limits).splitlines()
    n_requests = sum(1 for ln in lines if ln.strip())
    if n_requests > limits.max_batch_requests:
        raise DataError([Problem(str(path), None, None, f"{n_requests:,} requests; the limit is "
                                 f"{limits.max_batch_requests:,} per batch file (split it)")])
    loaded: dict[str, Dataset] = {}
    item_files: dict[Path, dict[str, Item] | DataError] = {}
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"malformed JSON: {e.msg} at column {e.colno} (expected one JSON object per line)"
                                 ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            rid = obj.get("request_id")
            if rid is not None:
                check_id(rid, "request_id")
            if "dataset" in obj:
                name = _str_field(obj, "dataset", required=True)
                if name not in datasets.NAMES:
                    raise KeyError(f"unknown dataset {name!r} (known: {', '.join(datasets.NAMES)})")
                if name not in loaded:
                    loaded[name] = datasets.load(name, data_root)
                req = from_dataset(loaded[name], _str_field(obj, "sample_id"), _str_field(obj, "user_id"),
                                   _str_field(obj, "target_id"), rid)
            elif "user" in obj:
                items_ref = _str_field(obj, "items")
                target_id = _str_field(obj, "target_id")
                if items_ref is None or target_id is None:
                    raise ValueError("a request with 'user' needs 'items' (path) and 'target_id'")
                items_path = (path.parent / items_ref).resolve()
                if items_path not in item_files:
                    try:
                        item_files[items_path] = _items_for(items_path, limits)
                    except DataError as e:
                        item_files[items_path] = e
                items_or_error = item_files[items_path]
                if isinstance(items_or_error, DataError):
                    raise items_or_error
                items = items_or_error
                user = user_from_json(obj["user"], f"{path}:{lineno}", items, limits)
                if target_id not in items:
                    raise KeyError(f"unknown target item id {target_id!r} (not in {items_path})")
                target = items[target_id]
                req = Request(request_id=rid or safe_id(f"{user.user_id}-{target.id}"), user=user, target=target,
                              items=items, target_image=(items_path.parent / target.image) if target.image else None,
                              history_images=history_image_paths(items_path.parent, user, items),
                              images_root=items_path.parent)
            else:
                raise ValueError("expected 'dataset' (+ 'sample_id' or 'user_id'/'target_id') or 'user' + 'items' + "
                                 "'target_id'")
            if "seed" in obj:
                req.seed = _seed(obj["seed"])
            if req.request_id in seen:
                raise ValueError(f"request_id {req.request_id!r} already used on line {seen[req.request_id]} "
                                 "(give each request its own 'request_id')")
            seen[req.request_id] = lineno
            yield lineno, req
        except (ValueError, KeyError, DataError, OSError) as e:
            yield lineno, e
