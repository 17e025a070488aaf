"""The HTTP layer of ``pmgen serve`` (FastAPI): thin routes over :class:`pmgen.serve.service.Service`.

    app = create_app(pmg, datasets.load("stickers"), root="~/.cache/pmgen/data/serve")
    uvicorn.run(app, host="127.0.0.1", port=8000)

API (versioned under ``/v1``; OpenAPI at ``/docs``)::

    POST /v1/users/{user_id}/events          append events (README format); 422 lists every problem, stores nothing
    GET  /v1/users/{user_id}                 event count, recent events, preference keywords, α, feedback
    GET  /v1/users                           stored users (for the page)
    POST /v1/generations                     202 + id; JSON, or multipart (field "request" + file "image")
    GET  /v1/generations/{id}?wait=30        status, record (keywords, candidates with d_t, d_p, z, chosen), image URLs
    GET  /v1/generations/{id}/images/{name}  chosen.png or w_<weight>.png of a finished generation
    POST /v1/generations/{id}/feedback       {candidate, signal: pick|like|dislike}
    GET  /v1/items?q=                        catalog search;  GET /v1/items/{id}/image
    GET  /v1/items/from-message?message=     the catalog item a chat message asks for
    GET  /healthz, /readyz                   alive / models loaded

Writes need ``Authorization: Bearer <token>`` when a token is set; a token is required to bind
anything but loopback. Request bodies are bounded (:func:`max_body_bytes`); CORS is off unless
origins are given.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from pmgen.data.schema import Dataset
from pmgen.limits import LIMITS, Limits
from pmgen.serve.errors import Invalid, ServiceError, TooLarge, problem
from pmgen.serve.service import MAX_WAIT_S, Service
from pmgen.data.store import STORE_FILE, Store, sqlite_url

STATIC = Path(__file__).parent / "static"


# ---------------------------------------------------------------------------------------- models

class EventsIn(BaseModel):
    """Events in the README's event format, oldest first."""

    events: list[Any] = Field(..., examples=[[{"type": "search", "text": "cat stickers"},
                                              {"type": "social", "item_id": "1F431", "value": "send"}]])


class GenerationIn(BaseModel):
    """A generation request: a user (stored id, or inline events), a target (catalog id, an item, or
    a chat message to take it from) and options. Multipart: this object as the form field ``request``
    and the target image as the file ``image``."""

    user_id: str | None = Field(None, description="a stored user")
    user: dict[str, Any] | None = Field(None, description="inline user {user_id, events}")
    target_id: str | None = Field(None, description="a catalog item id")
    target: dict[str, Any] | None = Field(None, description="an item {title, text, image: base64}")
    message: str | None = Field(None, description="a chat message: the conversation context, and the target "
                                                  "when no target is given")
    context: list[Any] | None = Field(None, description="conversation events")
    weights: list[float] | None = Field(None, examples=[[0, 1, 2]])
    alpha: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0)
    strength: float | None = Field(None, ge=0, le=1)
    history_images: bool | None = Field(None, description="add the history-image tokens (needs the preset's "
                                                          "trained history-image encoder; off by default)")


class FeedbackIn(BaseModel):
    candidate: int = Field(..., description="index into the record's candidates")
    signal: Literal["pick", "like", "dislike"]


# ---------------------------------------------------------------------------------------- helpers

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def max_body_bytes(limits: Limits) -> int:
    """Largest request body accepted: a base64 image at the byte limit, plus 1 MiB of JSON."""
    return max(limits.max_image_bytes * 4 // 3, limits.max_request_file_bytes) + 2**20


class BodyLimit:
    """ASGI middleware: bodies over ``limit`` bytes get 413 (declared length checked up front)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            resp = JSONResponse({"detail": f"request body over {self.limit:,} bytes", "problems": []}, 413)
            return await resp(scope, receive, send)
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit:,} bytes")
            return msg

        await self.app(scope, bounded, send)


def _field(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


# ---------------------------------------------------------------------------------------- the app

def create_app(pmg: Any, catalog: Dataset, *, root: str | Path, store_url: str | None = None,
               host: str = "127.0.0.1", token: str | None = None, cors_origins: tuple[str, ...] = (),
               limits: Limits = LIMITS, queue_size: int = 16) -> FastAPI:
    """The service's ASGI app.

    Args:
        pmg: a loaded :class:`pmgen.pipeline.PMG` (tests inject tiny models), or a function that
            loads one (``/readyz`` answers 503 until it is done).
        catalog: the items (e.g. ``datasets.load("stickers")``).
        root: folder of the store (SQLite by default), result images and uploads.
        store_url: another SQLAlchemy URL for the store (e.g. ``postgresql://…``).
        host: the address it will be bound to; not loopback → ``token`` is required.
        token: bearer token checked on every write (``None``: writes open, loopback only).
        cors_origins: origins allowed by CORS (none: CORS off).
    """
    if not is_loopback(host) and not token:
        raise ValueError(f"binding {host} (not loopback) needs a token: --token or PMGEN_TOKEN")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    store = Store.open(store_url or sqlite_url(root / STORE_FILE))
    service = Service(pmg, catalog, store, root, limits=limits, queue_size=queue_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        service.start()
        yield
        await run_in_threadpool(service.stop)
        store.close()

    app = FastAPI(title="pmgen serve", version="1", lifespan=lifespan,
                  description="Personalized images per user: post events, request generations, send feedback.")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=max_body_bytes(limits))
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, e: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": e.message, "problems": e.problems}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        probs = [problem(_field(tuple(err.get("loc", ()))), err.get("msg", "invalid")) for err in e.errors()]
        return JSONResponse({"detail": f"{len(probs)} problem(s) in the request; nothing was stored",
                             "problems": probs}, 422)

    def writer(request: Request) -> None:
        """Writes need the bearer token when one is set."""
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), token.encode())):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ page and health
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"ready": False, "error": service.load_error}, 503, headers={"Retry-After": "5"})
        return JSONResponse({"ready": True, "preset": service.pmg.preset.name, "queue_depth": service.worker.depth,
                             "queue_size": service.worker.maxsize, "recovered": service.recovered})

    # ------------------------------------------------------------------ users
    @app.get("/v1/users")
    def list_users() -> dict[str, Any]:
        return {"users": service.users()}

    @app.post("/v1/users/{user_id}/events", dependencies=[Depends(writer)])
    def add_events(user_id: str, body: EventsIn) -> dict[str, Any]:
        return service.add_events(user_id, body.events)

    @app.get("/v1/users/{user_id}")
    def get_user(user_id: str) -> dict[str, Any]:
        return service.profile(user_id)

    # ------------------------------------------------------------------ generations
    @app.post("/v1/generations", status_code=202, dependencies=[Depends(writer)], openapi_extra={
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": GenerationIn.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "request": {"type": "string", "description": "the JSON request (as application/json)"},
                "image": {"type": "string", "format": "binary", "description": "the target image"}}}}}}})
    async def create_generation(request: Request) -> dict[str, Any]:
        upload = None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4, max_part_size=2**20)
            try:
                body = json.loads(str(form.get("request") or "{}"))
            except json.JSONDecodeError as e:
                raise Invalid("malformed JSON", [problem("request", f"malformed JSON: {e.msg}")]) from None
            file = form.get("image")
            if file is not None and not isinstance(file, str):
                upload = await file.read(limits.max_image_bytes + 1)
                if len(upload) > limits.max_image_bytes:
                    raise TooLarge("the target image is over the byte limit", [problem("image", "image too large")])
        else:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise Invalid("malformed JSON", [problem(None, f"malformed JSON: {e}")]) from None
        return await run_in_threadpool(service.submit, body, upload)

    @app.get("/v1/generations/{gen_id}")
    def get_generation(gen_id: str, wait: float = Query(0, ge=0, le=MAX_WAIT_S,
                                                        description="block up to this many seconds")) -> dict:
        return service.get(gen_id, wait)

    @app.get("/v1/generations/{gen_id}/images/{name}")
    def generation_image(gen_id: str, name: str) -> FileResponse:
        return FileResponse(service.image_path(gen_id, name), media_type="image/png")

    @app.post("/v1/generations/{gen_id}/feedback", dependencies=[Depends(writer)])
    def add_feedback(gen_id: str, body: FeedbackIn) -> dict[str, Any]:
        return service.feedback(gen_id, body.candidate, body.signal)

    # ------------------------------------------------------------------ catalog
    @app.get("/v1/items")
    def search_items(q: str = "", limit: int = Query(24, ge=1, le=100)) -> dict[str, Any]:
        return service.search(q, limit)

    @app.get("/v1/items/from-message")
    def item_from_message(message: str = Query(..., min_length=1, max_length=limits.max_text_chars)) -> dict:
        return service.target_for_message(message)

    @app.get("/v1/items/{item_id}/image")
    def item_image(item_id: str) -> FileResponse:
        return FileResponse(service.item_image(item_id), headers={"Cache-Control": "max-age=86400"})

    return app
