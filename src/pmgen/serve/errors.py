"""The service's answers other than success, and how a request's problems are reported.

Every error carries the HTTP status the API returns (:mod:`pmgen.serve.app` maps them) and the list
of problems, each ``{"index", "field", "message"}`` (``field`` like ``events[2].type``).
"""

from __future__ import annotations

import re
from typing import Any

from pmgen.data.schema import DataError
from pmgen.paths import UnsafePathError, check_id


class ServiceError(Exception):
    """An answer other than success: ``status`` is the HTTP status the API returns."""

    status = 400

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = problems or []
        self.headers = headers or {}


class Unauthorized(ServiceError):
    status = 401


class RequestTimeout(ServiceError):
    status = 408


class Invalid(ServiceError):
    status = 422


class TooLarge(ServiceError):
    status = 413


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class TooMany(ServiceError):
    status = 429


class Busy(ServiceError):
    status = 503


def problem(field_name: str | None, message: str) -> dict[str, Any]:
    """One problem of a request: ``field`` like ``events[2].type``; ``index`` is the event's position."""
    m = re.search(r"events\[(\d+)\]", field_name or "")
    return {"index": int(m.group(1)) if m else None, "field": field_name, "message": message}


def problems_of(err: DataError, prefix: str = "") -> list[dict[str, Any]]:
    return [problem(f"{prefix}{p.field}" if p.field else (prefix.rstrip(".") or None), p.message)
            for p in err.problems]


def safe_id(value: Any, what: str) -> str:
    """``value`` as an id that may become a path (:func:`pmgen.paths.check_id`); else :class:`Invalid`."""
    try:
        return check_id(value, what)
    except UnsafePathError as e:
        raise Invalid(str(e), [problem(what, str(e))]) from None
