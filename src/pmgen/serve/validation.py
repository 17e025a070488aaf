"""Checking what clients send, before anything is stored: events (with the same validator as
users.jsonl files), generation requests (every problem at once) and target images (bytes and pixels
from the header, before decoding). No path a client sends is ever opened.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Mapping

from pmgen.data.images import ImageError, check_image
from pmgen.data.schema import DataError, Dataset, Event
from pmgen.limits import Limits, describe_bytes
from pmgen.serve.catalog import Catalog
from pmgen.serve.errors import Invalid, TooLarge, problem, problems_of, safe_id
from pmgen.data.store import Store
from pmgen.stages.select import weight_grid


def _is_number(v: Any) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, never a number to the API)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Prepared:
    """A checked generation request: the user it is for, what the worker stores, the target image's
    bytes (when uploaded) and every problem found (nothing is stored unless there are none)."""

    user_id: str
    request: dict[str, Any]
    upload: bytes | None = None
    problems: list[dict[str, Any]] = field(default_factory=list)


class RequestValidator:
    """Checks requests against the catalog (items, search), the store (users) and the limits."""

    def __init__(self, catalog: Dataset, index: Catalog, store: Store, limits: Limits):
        self.catalog = catalog
        self.index = index
        self.store = store
        self.limits = limits

    def events(self, raw: Any, where: str, prefix: str = "") -> list[Event]:
        """Events in the format of docs/data.md, checked by the same validator as users.jsonl files."""
        from pmgen.data.requests import user_from_json

        if not isinstance(raw, list):
            raise Invalid("expected a list of events", [problem(f"{prefix}events", "expected a list of events")])
        if not raw:
            raise Invalid("no events", [problem(f"{prefix}events", "expected at least one event")])
        try:
            return user_from_json({"events": raw}, where, self.catalog.items, self.limits).events
        except DataError as e:
            probs = problems_of(e, prefix)
            raise Invalid(f"{len(probs)} problem(s) in the events; nothing was stored", probs) from None

    def generation(self, body: Mapping[str, Any], upload: bytes | None) -> Prepared:
        """Check a generation request (every problem at once) and turn it into what the worker stores."""
        probs: list[dict[str, Any]] = []
        user: dict[str, Any] = {}
        user_id = "inline"
        if body.get("user_id") is not None and body.get("user") is not None:
            probs.append(problem("user", "give either 'user_id' (a stored user) or 'user' (inline events), not both"))
        elif body.get("user_id") is not None:
            user_id = safe_id(body["user_id"], "user_id")
            if not self.store.has_user(user_id):
                probs.append(problem("user_id", f"unknown user {user_id!r} (post its events first, or send "
                                                "'user': {'user_id', 'events'} inline)"))
            user = {"stored": True, "user_id": user_id, "n_events": self.store.count_events(user_id)}
        elif body.get("user") is not None:
            inline = body["user"]
            if not isinstance(inline, Mapping):
                probs.append(problem("user", "expected an object {'user_id', 'events'}"))
            else:
                if inline.get("user_id") is not None:
                    user_id = safe_id(inline["user_id"], "user.user_id")
                try:
                    events = self.events(inline.get("events"), "request", "user.")
                    user = {"stored": False, "user_id": user_id, "events": [e.to_json() for e in events]}
                except Invalid as e:
                    probs += e.problems
        else:
            probs.append(problem("user_id", "give 'user_id' (a stored user) or 'user' (inline events)"))

        context: list[Event] = []
        if body.get("context"):
            try:
                context = self.events(body["context"], "request", "context.")
            except Invalid as e:
                probs += e.problems
        message = body.get("message")
        if message is not None:
            if not isinstance(message, str) or not message.strip():
                probs.append(problem("message", "expected a non-empty chat message"))
            elif len(message) > self.limits.max_text_chars:
                probs.append(problem("message", f"{len(message):,} characters; the limit is "
                                                f"{self.limits.max_text_chars:,}"))
            else:
                context.append(Event("conversation", text=message, speaker="user"))

        target: dict[str, Any] = {}
        tid, inline_item = body.get("target_id"), body.get("target")
        if tid is not None and inline_item is not None:
            probs.append(problem("target", "give either 'target_id' (a catalog item) or 'target', not both"))
        elif tid is not None:
            if not isinstance(tid, str) or tid not in self.catalog.items:
                probs.append(problem("target_id", f"unknown item id {tid!r} (search the catalog: GET /v1/items?q=)"))
            else:
                target = {"item_id": tid}
        elif inline_item is not None:
            target, upload, more = self._inline_target(inline_item, upload)
            probs += more
        elif isinstance(message, str) and message.strip() and len(message) <= self.limits.max_text_chars:
            item = self.index.target_from_message(message)
            if item is None:
                probs.append(problem("message", "no catalog item matches this message; give 'target_id'"))
            else:
                target = {"item_id": item.id, "from_message": True}
        else:
            probs.append(problem("target_id", "give 'target_id' (a catalog item), 'target' {title, text, image} "
                                              "or a chat 'message' to take the target from"))

        options: dict[str, Any] = {}
        weights = body.get("weights")
        if weights is not None:
            if not isinstance(weights, list) or not all(_is_number(w) for w in weights):
                probs.append(problem("weights", "expected a list of numbers such as [0, 1, 2]"))
            else:
                try:
                    options["weights"] = weight_grid(weights)
                except ValueError as e:
                    probs.append(problem("weights", str(e)))
        for key, lo, hi in (("alpha", 0.0, 1.0), ("strength", 0.0, 1.0)):
            v = body.get(key)
            if key == "alpha" and v == "auto":  # the user's learned α (the default anyway)
                continue
            if v is not None:
                if not _is_number(v) or not lo <= v <= hi:
                    probs.append(problem(key, f"expected a number in [{lo:g}, {hi:g}], got {v!r}"))
                else:
                    options[key] = float(v)
        hist = body.get("history_images")
        if hist is not None:
            if not isinstance(hist, bool):
                probs.append(problem("history_images", f"expected true or false, got {hist!r}"))
            else:
                options["use_history_images"] = hist
        seed = body.get("seed")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
                probs.append(problem("seed", f"expected an integer in [0, 2^63), got {seed!r}"))
            else:
                options["seed"] = seed
        request = {"user": user, "target": target, "context": [e.to_json() for e in context], "options": options}
        return Prepared(user_id, request, upload, probs)

    def _inline_target(self, obj: Any, upload: bytes | None) -> tuple[dict[str, Any], bytes | None, list]:
        probs: list[dict[str, Any]] = []
        if not isinstance(obj, Mapping):
            return {}, upload, [problem("target", "expected an object {title, text, image}")]
        title, text = obj.get("title"), obj.get("text") or ""
        if not isinstance(title, str) or not title.strip():
            probs.append(problem("target.title", "expected a non-empty title"))
        elif len(title) > self.limits.max_title_chars:
            probs.append(problem("target.title", f"{len(title):,} characters; the limit is "
                                                 f"{self.limits.max_title_chars:,}"))
        if not isinstance(text, str) or len(text) > self.limits.max_text_chars:
            probs.append(problem("target.text", f"expected text of at most {self.limits.max_text_chars:,} characters"))
        image = obj.get("image")
        if image is not None:
            if upload is not None:
                probs.append(problem("target.image", "give the image either as base64 or as an upload, not both"))
            elif not isinstance(image, str):
                probs.append(problem("target.image", "expected base64 image data"))
            else:
                data = image.split(",", 1)[1] if image.startswith("data:") and "," in image else image
                if len(data) > self.limits.max_image_bytes * 4 // 3 + 8:
                    raise TooLarge(f"the target image is over {describe_bytes(self.limits.max_image_bytes)} "
                                   "(pmgen.limits.Limits)", [problem("target.image", "image too large")])
                try:
                    upload = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    probs.append(problem("target.image", "expected base64 image data (a data: URL or plain base64; "
                                                         "file paths are never opened)"))
        if upload is not None:
            self.check_upload(upload)
        item = {"id": "upload", "title": title if isinstance(title, str) else "", "text": text}
        return {"item": item, "image": None}, upload, probs

    def check_upload(self, data: bytes) -> None:
        """Bytes and pixels (from the header, before decoding) within the limits: else 413; unreadable: 422."""
        if len(data) > self.limits.max_image_bytes:
            msg = (f"the target image is {describe_bytes(len(data))}; the limit is "
                   f"{describe_bytes(self.limits.max_image_bytes)} (pmgen.limits.Limits)")
            raise TooLarge(msg, [problem("target.image", msg)])
        try:
            check_image(data, self.limits, name="target.image")
        except ImageError as e:
            cls = TooLarge if "pixels" in str(e) else Invalid
            raise cls(str(e), [problem("target.image", str(e))]) from None
