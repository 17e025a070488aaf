"""The command functions of ``pmgen serve`` and ``pmgen bench-serve`` (registered in :mod:`pmgen.cli`).

Imports of the service's dependencies happen inside the commands, so ``pmgen`` runs without the
``serve`` extra installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(8000, min=1, max=65535),
    preset: str = typer.Option("sticker-tiny", help="Model preset, loaded once at start-up."),
    store: Optional[str] = typer.Option(None, help="URL of the store (default: SQLite in WAL mode under the data "
                                                   "dir; postgresql://USER@HOST:PORT/DB with psycopg 3)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="pmgen data directory (catalog; the "
                                                                      "service's files go to DATA_DIR/serve)."),
    root: Optional[Path] = typer.Option(None, help="Folder for the store, images and uploads "
                                                   "(default DATA_DIR/serve)."),
    catalog: str = typer.Option("stickers", help="Built-in dataset whose items are the catalog."),
    token: Optional[str] = typer.Option(None, envvar="PMGEN_TOKEN",
                                        help="Bearer token required on every request, reads included "
                                             "(also PMGEN_TOKEN)."),
    public_read: bool = typer.Option(False, help="With --token: the page (/, /static/) and /healthz, /readyz "
                                                 "are open to anyone; the API and /docs still need the token."),
    cors_origin: List[str] = typer.Option([], help="Allow this origin by CORS (repeatable; default: CORS off)."),
    queue_size: int = typer.Option(16, min=1, max=10_000, help="Generations waiting at most; more get 503."),
    waits_per_client: int = typer.Option(16, min=1, max=10_000, help="Long polls (?wait=) one client address "
                                                                     "may park at once; more get 429."),
    body_timeout: float = typer.Option(30.0, min=0.1, max=3600, help="Seconds a request body may take to "
                                                                     "arrive; slower gets 408."),
    workers: int = typer.Option(1, min=0, max=64, help="Model worker threads in this process (0: only accept; "
                                                       "worker processes on the same store run the generations)."),
    http: bool = typer.Option(True, help="--no-http: a model worker only (no API), claiming generations from "
                                         "--store; give the API processes' --root (a shared folder)."),
    lease: float = typer.Option(10.0, min=1, max=3600, help="Seconds a claimed generation stays its worker's "
                                                            "without a heartbeat; then another worker takes it."),
    batch: int = typer.Option(8, min=1, max=32, help="Dynamic batching: a model worker runs up to this many waiting "
                                                     "generations together (one LLM call for their keyword cache "
                                                     "misses, shared UNet batches); 1: one at a time."),
    replicas: int = typer.Option(0, min=0, max=64, help="Model replicas on Ray Serve (needs pmgen[ray]); this "
                                                        "process then only accepts and dispatches. 0: the models "
                                                        "run in this process (--workers)."),
    ray_address: Optional[str] = typer.Option(None, help="With --replicas: an existing Ray cluster "
                                                         "(`ray start --head`); default a local Ray."),
    replica_cpus: float = typer.Option(1.0, min=0.1, max=64, help="CPUs per replica (its torch threads)."),
) -> None:
    """Run the personalization service: API under /v1, the page at /, OpenAPI at /docs."""
    try:
        import uvicorn

        from pmgen.serve.app import create_app, is_loopback
        from pmgen.serve.server import uvicorn_config
    except ImportError as e:
        _fail(f"{e.name} is not installed: install the service's dependencies with "
              "`pip install -e '.[serve]'` (or `make setup`)")
    from pmgen.data import datasets
    from pmgen.paths import data_dir as pmgen_data_dir

    if not is_loopback(host) and not token:
        _fail(f"binding {host} (not loopback) needs a token: --token or PMGEN_TOKEN")
    if public_read and not token:
        _fail("--public-read is only with --token (without a token everything is open, on loopback)")
    from pmgen.presets import get_preset

    try:
        get_preset(preset)
    except (KeyError, ValueError) as e:
        _fail(str(e.args[0]) if e.args else str(e))
    if store:  # fail here, clearly, when the store cannot be opened (its password never printed)
        import sqlalchemy as sa

        from pmgen.data.store import Store, shown_url

        try:
            Store.open(store).close()
        except (sa.exc.SQLAlchemyError, ValueError, ImportError) as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            _fail(f"cannot open the store {shown_url(store)}: {reason.replace(_password(store), '***')}")
    ddir = pmgen_data_dir(data_dir)
    typer.echo(f"loading the catalog {catalog!r} from {ddir} …")
    ds = datasets.load(catalog, ddir)

    def load_models():
        from pmgen.pipeline import PMG

        return PMG.from_preset(preset)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not http:
        from pmgen.serve.replica import run_worker

        typer.echo(f"pmgen model worker ({max(workers, 1)} thread(s)) on the store; stop with Ctrl-C / SIGTERM")
        run_worker(load_models(), ds, root=root or ddir / "serve", store_url=store, threads=max(workers, 1),
                   lease_s=lease, batch=batch)
        return
    pool = None
    if replicas:
        import functools

        from pmgen.data.store import STORE_FILE, sqlite_url
        from pmgen.pipeline import PMG
        from pmgen.serve.ray_replicas import ReplicaPool

        serve_root = Path(root or ddir / "serve").expanduser()
        serve_root.mkdir(parents=True, exist_ok=True)
        pool = ReplicaPool(functools.partial(PMG.from_preset, preset), ds, root=serve_root,
                           store_url=store or sqlite_url(serve_root / STORE_FILE), replicas=replicas, batch=batch,
                           cpus=replica_cpus, lease_s=lease, ray_address=ray_address)
    app = create_app(load_models, ds, root=root or ddir / "serve", store_url=store, host=host, token=token,
                     public_read=public_read, cors_origins=tuple(cors_origin), queue_size=queue_size,
                     waits_per_client=waits_per_client, body_timeout=body_timeout, workers=workers, lease_s=lease,
                     batch=batch, pool=pool)
    typer.echo(f"pmgen serve on http://{host}:{port}/ (models load in the background; /readyz says when)")
    uvicorn.Server(uvicorn_config(app, host, port)).run()


def _password(url: str) -> str:
    """The password in a database URL (``""`` when none), to keep it out of every message."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password or "\x00"
    except Exception:  # noqa: BLE001 — not a URL: nothing to hide
        return "\x00"


def bench_serve(
    preset: str = typer.Option("sticker-tiny", help="Model preset of the server and of the in-process run."),
    clients: int = typer.Option(16, min=1, max=64, help="Concurrent clients."),
    requests: int = typer.Option(200, min=10, max=5000, help="Requests of the mixed load (bounded)."),
    generations: int = typer.Option(5, min=1, max=50, help="Sequential 3-weight generations timed in process "
                                                             "and through the API (the ratio)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="pmgen data directory (the catalog)."),
    out: Optional[Path] = typer.Option(None, help="Also write the results as JSON here."),
    long_polls: int = typer.Option(0, min=0, max=1000, help="Instead: this many concurrent long polls on "
                                                            "unfinished generations plus a trickle of writes; "
                                                            "/healthz p99 and the writes' p95."),
    seconds: float = typer.Option(30.0, min=5, max=300, help="How long the --long-polls scenario measures."),
    throughput: Optional[str] = typer.Option(None, help="Instead: generations/min and p95 accepted → done with "
                                                        "one in-process worker (1) and an API + N worker processes "
                                                        "(N > 1), e.g. 1,2."),
    throughput_generations: int = typer.Option(50, min=1, max=500, help="Generations of the --throughput run."),
    store: Optional[str] = typer.Option(None, help="--throughput on this store (a PostgreSQL URL; its database "
                                                   "is emptied first). Default: a temporary SQLite file. With "
                                                   "--replicas: a list of sqlite, postgresql (a throwaway local "
                                                   "server) or postgresql:// URLs."),
    replicas: Optional[str] = typer.Option(None, help="Instead: the scaling comparison: today's single worker "
                                                      "against these replica counts (0: the in-process worker "
                                                      "with dynamic batching; N: Ray Serve replicas), e.g. 0,1,2."),
    batch: int = typer.Option(8, min=1, max=32, help="With --replicas: the dynamic batch size."),
) -> None:
    """Bounded load on a local server (127.0.0.1): p50/p95 per endpoint, throughput, errors, and the
    same 3-weight generation in process vs. through the API (or, with --long-polls, parked long polls)."""
    try:
        from pmgen.serve.bench import run_bench, run_long_polls
    except ImportError as e:
        _fail(f"{e.name} is not installed: `pip install -e '.[serve]'` (or `make setup`)")
    import json

    if replicas:
        from pmgen.serve.bench_scale import run_scale

        try:
            counts = tuple(int(x) for x in replicas.split(","))
        except ValueError:
            _fail(f"--replicas: expected replica counts like 0,1,2, got {replicas!r}")
        if any(not 0 <= n <= 8 for n in counts):
            _fail(f"--replicas: counts must be in 0..8, got {replicas!r}")
        stores = tuple(x.strip() for x in (store or "sqlite").split(",") if x.strip())
        try:
            result = run_scale(preset=preset, clients=clients, generations=min(throughput_generations, 200),
                               replicas=counts, stores=stores, batch=batch, n_sequential=generations,
                               data_dir=data_dir)
        except ValueError as e:
            _fail(str(e))
    elif throughput:
        from pmgen.serve.bench_scale import run_throughput

        try:
            counts = tuple(int(x) for x in throughput.split(","))
        except ValueError:
            _fail(f"--throughput: expected worker counts like 1,2, got {throughput!r}")
        result = run_throughput(preset=preset, clients=clients, generations=throughput_generations, workers=counts,
                                store=store, data_dir=data_dir)
    elif long_polls:
        result = run_long_polls(preset=preset, polls=long_polls, seconds=seconds, data_dir=data_dir)
    else:
        result = run_bench(preset=preset, clients=clients, requests=requests, n_sequential=generations,
                           data_dir=data_dir)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    if result.get("lost") or result["errors"]:
        raise typer.Exit(1)
