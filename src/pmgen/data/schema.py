"""The behavior data model: items, users with typed events, samples; JSONL on disk.

A dataset is a folder with three JSONL files (one record per line, UTF-8):

``items.jsonl``
    ``{"id": "1F600", "title": "grinning face", "text": "tags: happy, smile",
    "image": "images/64/1F600.png", "attributes": {...}}`` — ``image`` (optional) is a path relative to
    the folder holding ``items.jsonl`` and must stay inside it.
``users.jsonl``
    ``{"user_id": "u1", "events": [{"type": "click", "item_id": "1F600", "time": 3}, ...],
    "attributes": {...}}`` — events oldest first (or with ``time``), see :data:`EVENT_TYPES`.
    ``attributes`` is never shown to a model (hidden taste profiles live there).
``samples.jsonl`` (optional)
    ``{"sample_id": "s1", "user_id": "u1", "target_id": "1F602", "split": "test",
    "context": [{"type": "conversation", "speaker": "user", "text": "haha so funny"}],
    "ground_truth_personalized": "1F639", "heldout": []}``

A folder may also hold ``dataset.json`` (name, license, counts, and ``"items": "../stickers"``
when the items live in another dataset's folder).

Loading goes through :mod:`pmgen.data.validate`: a file with any problem raises :class:`DataError`
listing every problem (file, line, field, what was expected); no valid record is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from pmgen.paths import write_file_atomically, write_text_atomically

EVENT_TYPES: tuple[str, ...] = (
    "click",
    "view",
    "purchase",
    "rating",
    "review",
    "search",
    "conversation",
    "social",
    "note",
)
"""The behavior types pmgen understands; each has a verbalizer in :mod:`pmgen.stages.verbalize`."""

EVENTS_NEEDING_ITEM = frozenset({"click", "view", "purchase", "rating", "review"})
EVENTS_NEEDING_TEXT = frozenset({"review", "search", "conversation", "note"})
SOCIAL_ACTIONS = ("like", "share", "comment", "send")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data. ``problems`` holds every problem found, each naming file, line and field."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        if len(problems) == 1:  # one line: file:line [field]: what was expected
            super().__init__(str(problems[0]))
            return
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problems in the data:\n{shown}{more}")


@dataclass(frozen=True)
class Problem:
    """One problem in a data file: where it is and what was expected."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        fld = f" [{self.field}]" if self.field else ""
        return f"{where}{fld}: {self.message}"


@dataclass(frozen=True)
class Event:
    """One behavior of a user.

    ``type`` is one of :data:`EVENT_TYPES`. ``item_id`` is required for click/view/purchase/rating/
    review; ``text`` for review/search/conversation/note. ``value`` is the rating (on the dataset's
    scale, 1–5 by default) or the social action (``like``/``share``/``comment``/``send``).
    ``time`` is any sortable number (e.g. a Unix timestamp); ``speaker`` names who spoke in a
    conversation (``"user"`` for the user).
    """

    type: str
    item_id: str | None = None
    text: str | None = None
    value: float | str | None = None
    time: float | None = None
    speaker: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Item:
    """A catalog item. ``image`` is a path relative to the item file's folder (or ``None``)."""

    id: str
    title: str
    text: str = ""
    image: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "title": self.title, "text": self.text}
        if self.image is not None:
            out["image"] = self.image
        if self.attributes:
            out["attributes"] = self.attributes
        return out


@dataclass
class User:
    """A user and their behaviors (oldest first). ``attributes`` are never shown to a model."""

    user_id: str
    events: list[Event]
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user_id": self.user_id, "events": [e.to_json() for e in self.events]}
        if self.attributes:
            out["attributes"] = self.attributes
        return out


@dataclass
class Sample:
    """One generation request: a user, the target item, and optional conversation context.

    ``ground_truth_personalized`` is the catalog item that matches both target and the user's
    hidden taste (sticker users only). ``heldout`` lists item ids the user later liked (MovieLens).
    """

    sample_id: str
    user_id: str
    target_id: str
    split: str = "test"
    context: list[Event] = field(default_factory=list)
    ground_truth_personalized: str | None = None
    heldout: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sample_id": self.sample_id,
            "user_id": self.user_id,
            "target_id": self.target_id,
            "split": self.split,
        }
        if self.context:
            out["context"] = [e.to_json() for e in self.context]
        if self.ground_truth_personalized is not None:
            out["ground_truth_personalized"] = self.ground_truth_personalized
        if self.heldout:
            out["heldout"] = self.heldout
        if self.attributes:
            out["attributes"] = self.attributes
        return out


@dataclass
class Dataset:
    """Items, users and samples loaded from one folder. ``root`` resolves item image paths."""

    name: str
    root: Path
    items: dict[str, Item]
    users: dict[str, User]
    samples: list[Sample]
    meta: dict[str, Any] = field(default_factory=dict)
    items_root: Path | None = None

    def image_path(self, item: Item | str) -> Path | None:
        """Absolute path of an item's image, or ``None`` if it has none."""
        it = self.items[item] if isinstance(item, str) else item
        if it.image is None:
            return None
        return (self.items_root or self.root) / it.image

    def split(self, name: str) -> list[Sample]:
        """Samples of one split (``train``/``val``/``test``)."""
        return [s for s in self.samples if s.split == name]

    def user_split(self, name: str) -> list[str]:
        """User ids of one split, in file order."""
        seen: dict[str, None] = {}
        for s in self.samples:
            if s.split == name:
                seen.setdefault(s.user_id, None)
        return list(seen)


# --------------------------------------------------------------------------------------------
# JSONL writing (atomic: a crash never leaves a half-written file behind)


def write_jsonl(path: Path, records: Iterable[Any]) -> int:
    """Write records (dataclasses with ``to_json`` or dicts) one per line, atomically."""
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                obj = r.to_json() if hasattr(r, "to_json") else r
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                n += 1

    write_file_atomically(path, write)
    return n


def write_json(path: Path, obj: Any) -> None:
    """Write one JSON document atomically (pretty-printed)."""
    write_text_atomically(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def iter_jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` for each non-blank line (1-based line numbers)."""
    with Path(path).open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if raw.strip():
                yield i, raw


def newest_first(events: Sequence[Event]) -> list[Event]:
    """Order events newest first: by ``time`` when every event has one, otherwise reverse file order."""
    if events and all(e.time is not None for e in events):
        order = sorted(range(len(events)), key=lambda i: (events[i].time, i), reverse=True)
        return [events[i] for i in order]
    return list(reversed(events))


def recent_item_ids(events: Sequence[Event], limit: int = 12) -> list[str]:
    """The ids of the ``limit`` most recent distinct items the events refer to, newest first."""
    out: list[str] = []
    for e in newest_first(events):
        if len(out) >= limit:
            break
        if e.item_id and e.item_id not in out:
            out.append(e.item_id)
    return out
