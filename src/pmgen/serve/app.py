"""The HTTP layer of ``pmgen serve`` (FastAPI): thin routes over :class:`pmgen.serve.service.Service`.

    app = create_app(pmg, datasets.load("stickers"), root="~/.cache/pmgen/data/serve")
    uvicorn.run(app, host="127.0.0.1", port=8000)

API (versioned under ``/v1``; OpenAPI at ``/docs``)::

    POST /v1/users/{user_id}/events          append events (docs/data.md format); 422 lists every problem, stores nothing
    GET  /v1/users/{user_id}                 event count, recent events, preference keywords, α, feedback
    GET  /v1/users                           stored users (for the page)
    POST /v1/generations                     202 + id; JSON, or multipart (field "request" + file "image")
    GET  /v1/generations/{id}?wait=30        status, record (keywords, candidates with d_t, d_p, z, chosen), image URLs
    GET  /v1/generations/{id}/images/{name}  chosen.png or w_<weight>.png of a finished generation
    POST /v1/generations/{id}/feedback       {candidate, signal: pick|like|dislike}
    GET  /v1/items?q=                        catalog search;  GET /v1/items/{id}/image
    GET  /v1/items/from-message?message=     the catalog item a chat message asks for
    GET  /healthz, /readyz                   alive / models loaded
    GET  /metrics                            Prometheus text: queue depth, running, latency histogram, replicas

With a token, every request needs ``Authorization: Bearer <token>`` — reads and writes, ``/docs``
too; ``public_read`` opens the page and ``/healthz``, ``/readyz`` only. A token is required to bind
anything but loopback. Bodies are bounded in bytes (:func:`max_body_bytes`), arrival time and JSON
nesting (:mod:`pmgen.serve.guards`); long polls park on the event loop, a bounded number per client
(:mod:`pmgen.serve.waiting`); CORS is off unless origins are given.
"""

from __future__ import annotations

import asyncio
import ipaddress
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Literal, TYPE_CHECKING

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from pmgen.data.schema import Dataset
from pmgen.limits import LIMITS, Limits
from pmgen.serve.errors import ServiceError, TooLarge, problem
from pmgen.serve.guards import BodyGuard, TokenGuard, error_response, parse_json
from pmgen.serve.metrics import CONTENT_TYPE, metrics_registry, render
from pmgen.serve.service import MAX_WAIT_S, Service
from pmgen.serve.worker import LEASE_S
from pmgen.data.store import STORE_FILE, Store, sqlite_url

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

STATIC = Path(__file__).parent / "static"


# ---------------------------------------------------------------------------------------- models

class EventsIn(BaseModel):
    """Events in the event format of docs/data.md, oldest first."""

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
    candidate: int = Field(..., strict=True, description="index into the record's candidates (true/false refused)")
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


def _field(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


# ---------------------------------------------------------------------------------------- the app

def create_app(pmg: PMG | Callable[[], PMG], catalog: Dataset, *, root: str | Path, store_url: str | None = None,
               host: str = "127.0.0.1", token: str | None = None, public_read: bool = False,
               cors_origins: tuple[str, ...] = (), limits: Limits = LIMITS, queue_size: int = 16,
               waits_per_client: int = 16, body_timeout: float = 30.0, workers: int = 1,
               lease_s: float = LEASE_S, batch: int = 1, pool: Any = None) -> FastAPI:
    """The service's ASGI app.

    Args:
        pmg: a loaded :class:`pmgen.pipeline.PMG` (tests inject tiny models), or a function that
            loads one (``/readyz`` answers 503 until it is done).
        catalog: the items (e.g. ``datasets.load("stickers")``).
        root: folder of the store (SQLite by default), result images and uploads.
        store_url: another SQLAlchemy URL for the store (e.g. ``postgresql://user@host:5432/pmgen``).
        host: the address it will be bound to; not loopback → ``token`` is required.
        token: bearer token checked on every request, reads included (``None``: all open, loopback only).
        public_read: with a token, open the page (``/``, ``/static/``) and ``/healthz``, ``/readyz`` to anyone.
        cors_origins: origins allowed by CORS (none: CORS off).
        queue_size: generations waiting at most (more get 503).
        waits_per_client: long polls one client address may park at once (more get 429).
        body_timeout: seconds a request body may take to arrive (more: 408, the connection closes).
        workers: model worker threads in this process (0: only accept; other processes sharing the
            store run the generations, e.g. ``pmgen serve --workers 1 --no-http``).
        lease_s: seconds a claimed generation stays its worker's without a heartbeat.
        batch: most generations a model worker runs together (dynamic batching; 1: one at a time).
        pool: model replicas on Ray Serve (:class:`pmgen.serve.ray_replicas.ReplicaPool`, on the same
            store and root) run the generations instead of this process's worker threads.
    """
    if not is_loopback(host) and not token:
        raise ValueError(f"binding {host} (not loopback) needs a token: --token or PMGEN_TOKEN")
    if public_read and not token:
        raise ValueError("--public-read is only with a token (without one everything is open, on loopback)")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    store = Store.open(store_url or sqlite_url(root / STORE_FILE))
    service = Service(pmg, catalog, store, root, limits=limits, queue_size=queue_size,
                      waits_per_client=waits_per_client, workers=workers, lease_s=lease_s, batch=batch, pool=pool)
    registry = metrics_registry(service)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        service.waits.bind(asyncio.get_running_loop())
        service.start()
        yield
        await run_in_threadpool(service.stop)
        store.close()

    app = FastAPI(title="pmgen serve", version="1", lifespan=lifespan,
                  description="Personalized images per user: post events, request generations, send feedback.")
    app.state.service = service
    app.add_middleware(BodyGuard, limit=max_body_bytes(limits), timeout=body_timeout, max_depth=limits.max_json_depth)
    if token:  # outside the body guard: a request without the token is refused before its body is read
        app.add_middleware(TokenGuard, token=token, public_read=public_read)
    if cors_origins:  # outermost: preflights carry no token
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, e: ServiceError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        probs = [problem(_field(tuple(err.get("loc", ()))), err.get("msg", "invalid")) for err in e.errors()]
        return JSONResponse({"detail": f"{len(probs)} problem(s) in the request; nothing was stored",
                             "problems": probs}, 422)

    # ------------------------------------------------------------------ page and health
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")  # async and in memory, like readyz: answers whatever the threads are doing
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse({"ready": False, "error": service.load_error}, 503, headers={"Retry-After": "5"})
        depth = await run_in_threadpool(service.queue_depth)
        return JSONResponse({"ready": True, "preset": service.pmg.preset.name, "queue_depth": depth,
                             "queue_size": service.queue_size, "replicas": service.replicas,
                             "waits_parked": service.waits.parked, "recovered": service.recovered})

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ users
    @app.get("/v1/users")
    def list_users() -> dict[str, Any]:
        return {"users": service.users()}

    @app.post("/v1/users/{user_id}/events")
    def add_events(user_id: str, body: EventsIn) -> dict[str, Any]:
        return service.add_events(user_id, body.events)

    @app.get("/v1/users/{user_id}")
    def get_user(user_id: str) -> dict[str, Any]:
        return service.profile(user_id)

    # ------------------------------------------------------------------ generations
    @app.post("/v1/generations", status_code=202, openapi_extra={
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": GenerationIn.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "request": {"type": "string", "description": "the JSON request (as application/json)"},
                "image": {"type": "string", "format": "binary", "description": "the target image"}}}}}}})
    async def create_generation(request: Request) -> dict[str, Any]:
        upload = None
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4, max_part_size=2**20)
            body = parse_json(str(form.get("request") or "{}"), limits.max_json_depth, "request")
            file = form.get("image")
            if file is not None and not isinstance(file, str):
                upload = await file.read(limits.max_image_bytes + 1)
                if len(upload) > limits.max_image_bytes:
                    raise TooLarge("the target image is over the byte limit", [problem("image", "image too large")])
        else:
            body = parse_json(await request.body(), limits.max_json_depth)
        return await run_in_threadpool(service.submit, body, upload)

    @app.get("/v1/generations/{gen_id}")
    async def get_generation(request: Request, gen_id: str, wait: float = Query(
            0, ge=0, le=MAX_WAIT_S, description="wait up to this many seconds for it to finish")) -> dict:
        return await service.wait(gen_id, wait, request.client.host if request.client else "unknown")

    @app.get("/v1/generations/{gen_id}/images/{name}")
    def generation_image(gen_id: str, name: str) -> FileResponse:
        return FileResponse(service.image_path(gen_id, name), media_type="image/png")

    @app.post("/v1/generations/{gen_id}/feedback")
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
