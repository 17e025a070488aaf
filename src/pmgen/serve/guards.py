"""What a request must pass before any route sees it (ASGI middleware of :func:`pmgen.serve.app.create_app`).

* :class:`TokenGuard` — with a token, every request needs ``Authorization: Bearer <token>`` (reads and
  writes, ``/docs`` and ``/openapi.json`` too); ``public_read`` opens the page's files and health only.
* :class:`BodyGuard` — a request body arrives whole within ``timeout`` seconds (else 408 and the
  connection closes), is at most ``limit`` bytes (413; a declared length is checked before reading)
  and, unless it is a multipart form, is JSON nested at most ``max_depth`` levels (checked before it
  is parsed) that parses (422 naming the problem).

Both answer in the service's error format (:func:`error_response`) before the app reads a byte.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

from starlette.responses import JSONResponse

from pmgen.serve.errors import Invalid, RequestTimeout, ServiceError, TooLarge, Unauthorized, problem

PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz"})
"""Open to anyone with ``public_read`` (besides ``/static/``)."""
_FORMS = (b"multipart/form-data",)
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})
_THREAD_ABOVE = 2**16  # bodies larger than this are checked on a thread, off the event loop


def error_response(e: ServiceError, close: bool = False) -> JSONResponse:
    """The service's answer for ``e``: ``{"detail", "problems"}`` with its status and headers."""
    headers = {**e.headers, **({"Connection": "close"} if close else {})}
    return JSONResponse({"detail": e.message, "problems": e.problems}, e.status, headers=headers)


# ---------------------------------------------------------------------------------------- the token

class TokenGuard:
    """ASGI middleware: every HTTP request needs the bearer ``token``; with ``public_read``, the page
    (``/``, ``/static/...``) and ``/healthz``, ``/readyz`` are open to anyone."""

    def __init__(self, app: Any, token: str, public_read: bool = False):
        self.app, self.token, self.public_read = app, token.encode(), public_read

    def allowed(self, scope: Any) -> bool:
        path = scope.get("path", "")
        if self.public_read and (path in PUBLIC_PATHS or path.startswith("/static/")):
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return given.startswith(b"Bearer ") and secrets.compare_digest(given[7:], self.token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.allowed(scope):
            return await self.app(scope, receive, send)
        e = Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)",
                         [problem("Authorization", "expected 'Bearer <token>' with the server's token")],
                         headers={"WWW-Authenticate": "Bearer"})
        await error_response(e)(scope, receive, send)


# ---------------------------------------------------------------------------------------- bodies

# a JSON string, or an unterminated one up to the end: it always matches, so stripping strings is linear
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[{]}")))


def too_deep(data: bytes, max_depth: int) -> bool:
    """Whether JSON text nests arrays and objects more than ``max_depth`` levels (strings skipped).

    Without parsing, in time linear in the size: each pass removes the innermost ``()`` pairs of the
    brackets, so a structure ``d`` levels deep is gone after ``d`` passes; what stays of unclosed
    input is ``)…)(…(``, and its trailing openers add to the depth."""
    s = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKET)
    for passes in range(max_depth + 1):
        shorter = s.replace(b"()", b"")
        if shorter == s:
            return passes + len(s) - len(s.rstrip(b"(")) > max_depth
        s = shorter
    return True


def parse_json(data: bytes | str, max_depth: int, field: str | None = None) -> Any:
    """``data`` parsed as JSON, its nesting checked first; else :class:`Invalid` naming the problem."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if too_deep(raw, max_depth):
        msg = f"JSON nested deeper than {max_depth} levels (pmgen.limits.Limits.max_json_depth)"
        raise Invalid(msg, [problem(field, msg)])
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        msg = f"malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})"
    except UnicodeDecodeError as e:
        msg = f"the body is not UTF-8 text (byte {e.start}: {e.reason})"
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        msg = f"malformed JSON: {e}"
    raise Invalid(msg, [problem(field, msg)])


class BodyGuard:
    """ASGI middleware: the body of a request arrives whole within ``timeout`` s, is at most ``limit``
    bytes and, unless it is a multipart form, is JSON of at most ``max_depth`` levels; else 408, 413 or
    422 before the app runs (the app then reads the body from memory)."""

    def __init__(self, app: Any, limit: int, timeout: float, max_depth: int):
        self.app, self.limit, self.timeout, self.max_depth = app, limit, timeout, max_depth

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in _BODYLESS:
            return await self.app(scope, receive, send)
        try:
            body = await self.read(scope, receive)
            if body is None:  # the client went away
                return
            headers = dict(scope.get("headers") or [])
            if body and not headers.get(b"content-type", b"").startswith(_FORMS):
                if len(body) > _THREAD_ABOVE:
                    await asyncio.to_thread(parse_json, body, self.max_depth)
                else:
                    parse_json(body, self.max_depth)
        except ServiceError as e:
            return await error_response(e, close=not isinstance(e, Invalid))(scope, receive, send)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:  # after the body: whatever the server says next (a disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def read(self, scope: Any, receive: Any) -> bytes | None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            raise TooLarge(f"request body over {self.limit:,} bytes", [problem(None, "request body too large")])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                msg = f"the request body did not arrive within {self.timeout:g} s"
                raise RequestTimeout(msg, [problem(None, msg)]) from None
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                raise TooLarge(f"request body over {self.limit:,} bytes", [problem(None, "request body too large")])
            if not msg.get("more_body", False):
                return b"".join(chunks)
