"""The service's store: users, events, generations and feedback, and the durable queue (SQLAlchemy Core).

The embedded default is SQLite in WAL mode under the data directory; PostgreSQL works through psycopg 3
(``postgresql://user@host:port/db``; the ``serve`` extra installs the driver). The schema is created and
upgraded by Alembic migrations (``pmgen/data/migrations``) when the store is opened, on either database.
Every write is one transaction, committed before the API acknowledges it, so an acknowledged event,
generation or feedback row survives a crash of the process. Images are not stored here: each
generation's result folder lives on disk beside the database (see :class:`pmgen.serve.service.Service`).

The generations table is also the queue: a worker :meth:`~Store.claim`\\ s the oldest waiting generation
(``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite, whose writers are serialized, the same
conditional update), which gives it a lease until ``lease_expires``; the worker renews the lease while
it runs and :meth:`~Store.finish`\\ es only while it still holds it, so each generation ends with exactly
one result. A lease that expires because its worker died is claimed again (``attempts`` counts every
claim, ``resumed`` the claims that took over from a dead worker).

    store = Store.open("sqlite:////tmp/s/pmgen-serve.sqlite")
    store.add_events("alice", [Event("search", text="cats")])
    store.events("alice")            # [Event(type='search', text='cats')]
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import sqlalchemy as sa

from pmgen.data.schema import Event

STORE_FILE = "pmgen-serve.sqlite"
"""The store's file name under the service root (``<data dir>/serve`` by default; the CLI shares it)."""
STATUSES = ("queued", "running", "done", "failed")
"""A generation's life: queued → running → done | failed (running with an expired lease → claimed again)."""
SIGNALS = ("pick", "like", "dislike")
"""Feedback signals on one candidate."""
MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_REVISION = "0002"
"""The newest migration (``migrations/versions``); a store already there is opened without running Alembic."""
_MIGRATION_LOCK = 0x706D67656E  # a PostgreSQL advisory lock: one process migrates at a time

_meta = sa.MetaData()  # the tables as the migrations leave them (the queries' view; never create_all)
users_t = sa.Table(
    "users", _meta,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
events_t = sa.Table(
    "events", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(128), sa.ForeignKey("users.user_id"), nullable=False, index=True),
    sa.Column("event", sa.Text, nullable=False),  # the event JSON (docs/data.md)
    sa.Column("created_at", sa.Float, nullable=False),
)
generations_t = sa.Table(
    "generations", _meta,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("user_id", sa.String(128), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("request", sa.Text, nullable=False),  # what the worker needs to (re)run it
    sa.Column("record", sa.Text),  # GenerationRecord JSON when done
    sa.Column("error", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("resumed", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires", sa.Float),
)
feedback_t = sa.Table(
    "feedback", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("generation_id", sa.String(128), sa.ForeignKey("generations.id"), nullable=False, index=True),
    sa.Column("user_id", sa.String(128), nullable=False, index=True),
    sa.Column("candidate", sa.Integer, nullable=False),
    sa.Column("weight", sa.Float, nullable=False),
    sa.Column("signal", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
_g = generations_t.c


@dataclass
class Generation:
    """One stored generation (``request`` and ``record`` are JSON objects)."""

    id: str
    user_id: str
    status: str
    request: dict[str, Any]
    record: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    resumed: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    lease_owner: str | None = None
    lease_expires: float | None = None
    feedback: list[dict[str, Any]] = field(default_factory=list)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def shown_url(url: str) -> str:
    """A store URL fit for logs and errors: its password replaced by ``***``."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 — not parseable: show only its scheme
        return url.split(":", 1)[0] + "://…"


def engine_url(url: str) -> str:
    """``postgresql://…`` (and ``postgres://…``) → the psycopg 3 driver; other URLs unchanged."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def alembic_config() -> Any:
    """Alembic's configuration for the store's migrations (no ``alembic.ini``)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest migration (creates it in an empty database). A store made before
    the migrations existed (its tables, no ``alembic_version``) is stamped as the first revision first."""
    from alembic import command

    with engine.connect() as conn:
        if sa.inspect(conn).has_table("alembic_version") and conn.execute(
                sa.text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION:
            return
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        tables = set(sa.inspect(conn).get_table_names())
        cfg.attributes["connection"] = conn
        if "users" in tables and "alembic_version" not in tables:
            command.stamp(cfg, "0001")
        command.upgrade(cfg, "head")


def _ready(now: float) -> Any:
    """Claimable: waiting, or running under a lease that expired (or never had one: a dead pre-lease run)."""
    return (_g.status == "queued") | ((_g.status == "running")
                                      & (_g.lease_expires.is_(None) | (_g.lease_expires < now)))


class Store:
    """Users, events, generations, feedback and the queue behind a small interface (thread-safe)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        migrate(engine)

    @classmethod
    def open(cls, url: str) -> Store:
        """Open (and create or upgrade) the store at a SQLAlchemy URL; SQLite files get WAL mode and a
        busy timeout, ``postgresql://`` URLs the psycopg 3 driver."""
        url = engine_url(url)
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @sa.event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses no commit
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()
        else:
            engine = sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=24)
        return cls(engine)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ users and events
    def _ensure_user(self, conn: sa.Connection, user_id: str) -> None:
        if conn.execute(sa.select(users_t.c.user_id).where(users_t.c.user_id == user_id)).first() is None:
            if self.dialect == "postgresql":  # two first events of one user at once: one insert wins, no error
                from sqlalchemy.dialects.postgresql import insert

                conn.execute(insert(users_t).values(user_id=user_id, created_at=time.time())
                             .on_conflict_do_nothing())
            else:
                conn.execute(users_t.insert().values(user_id=user_id, created_at=time.time()))

    def add_events(self, user_id: str, events: Sequence[Event], max_total: int | None = None) -> int:
        """Append ``events`` to a user (created when new) in one transaction; return the user's event count.

        Raises:
            ValueError: when the user would hold more than ``max_total`` events (nothing is stored).
        """
        now = time.time()
        with self.engine.begin() as conn:
            self._ensure_user(conn, user_id)
            n = self._count(conn, user_id)
            if max_total is not None and n + len(events) > max_total:
                raise ValueError(f"the user holds {n:,} events; {len(events):,} more would pass the limit of "
                                 f"{max_total:,} events per user (pmgen.limits.Limits)")
            if events:
                conn.execute(events_t.insert(), [{"user_id": user_id, "event": json.dumps(e.to_json()),
                                                  "created_at": now} for e in events])
            return n + len(events)

    @staticmethod
    def _count(conn: sa.Connection, user_id: str) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(events_t)
                                .where(events_t.c.user_id == user_id)).scalar_one())

    def count_events(self, user_id: str) -> int:
        with self.engine.connect() as conn:
            return self._count(conn, user_id)

    def has_user(self, user_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(users_t.c.user_id).where(users_t.c.user_id == user_id)).first() is not None

    def events(self, user_id: str, limit: int | None = None) -> list[Event]:
        """A user's events, oldest first (the first ``limit`` when given: a generation's snapshot)."""
        q = sa.select(events_t.c.event).where(events_t.c.user_id == user_id).order_by(events_t.c.id)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [Event(**json.loads(row.event)) for row in conn.execute(q)]

    def users(self, limit: int = 200) -> list[dict[str, Any]]:
        """Stored users, newest first, with their event counts."""
        n = sa.select(sa.func.count()).select_from(events_t).where(events_t.c.user_id == users_t.c.user_id)
        q = (sa.select(users_t.c.user_id, n.scalar_subquery().label("n_events"))
             .order_by(users_t.c.created_at.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [{"user_id": r.user_id, "n_events": int(r.n_events)} for r in conn.execute(q)]

    # ------------------------------------------------------------------ generations
    def add_generation(self, gen_id: str, user_id: str, request: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(generations_t.insert().values(
                id=gen_id, user_id=user_id, status="queued", request=json.dumps(request), attempts=0, resumed=0,
                created_at=time.time()))

    def enqueue(self, gen_id: str, user_id: str, request: dict[str, Any], max_queued: int) -> bool:
        """Store a generation as ``queued`` unless ``max_queued`` wait already (then ``False``, nothing stored).
        On PostgreSQL the check and the insert hold a lock, so API processes together keep the bound."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK + 1})
            if self._n(conn, _g.status == "queued") >= max_queued:
                return False
            conn.execute(generations_t.insert().values(
                id=gen_id, user_id=user_id, status="queued", request=json.dumps(request), attempts=0, resumed=0,
                created_at=time.time()))
            return True

    def claim(self, owner: str, lease_s: float) -> Generation | None:
        """Take the oldest claimable generation for ``owner`` (→ ``running``, a lease of ``lease_s``
        seconds, ``attempts`` + 1; ``resumed`` + 1 when it takes over an expired lease); ``None`` when
        nothing waits. Concurrent claimers never get the same generation."""
        with self.engine.begin() as conn:
            for _ in range(8):  # on SQLite another claimer may win the row between the read and the update
                now = time.time()
                row = conn.execute(sa.select(_g.id, _g.status).where(_ready(now)).order_by(_g.created_at)
                                   .limit(1).with_for_update(skip_locked=True)).first()
                if row is None:
                    return None
                took = conn.execute(generations_t.update().where((_g.id == row.id) & _ready(now)).values(
                    status="running", lease_owner=owner, lease_expires=now + lease_s, started_at=now,
                    attempts=_g.attempts + 1, resumed=_g.resumed + int(row.status == "running")))
                if took.rowcount == 1:
                    return self._generation(conn.execute(sa.select(generations_t).where(_g.id == row.id)).one())
        return None

    def renew(self, gen_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease on a running generation; ``False`` when it is no longer theirs."""
        with self.engine.begin() as conn:
            return conn.execute(generations_t.update().where(
                (_g.id == gen_id) & (_g.status == "running") & (_g.lease_owner == owner))
                .values(lease_expires=time.time() + lease_s)).rowcount == 1

    def release(self, gen_id: str, owner: str, after_s: float = 0.0) -> bool:
        """Give ``owner``'s lease on a running generation back (its run failed before a result): a
        :meth:`claim` takes it again ``after_s`` seconds from now (as a ``resumed`` attempt). ``False``
        when it was not theirs."""
        with self.engine.begin() as conn:
            return conn.execute(generations_t.update().where(
                (_g.id == gen_id) & (_g.status == "running") & (_g.lease_owner == owner))
                .values(lease_expires=time.time() + after_s)).rowcount == 1

    def finish(self, gen_id: str, record: dict[str, Any] | None = None, error: str | None = None,
               owner: str | None = None) -> bool:
        """Mark done (with the record) or failed (with the error). With ``owner``: only while that worker
        still holds the generation's lease, so a generation ends with exactly one result; ``False`` when
        nothing was changed."""
        cond = _g.id == gen_id
        if owner is not None:
            cond &= (_g.status == "running") & (_g.lease_owner == owner)
        with self.engine.begin() as conn:
            return conn.execute(generations_t.update().where(cond).values(
                status="done" if error is None else "failed", record=json.dumps(record) if record else None,
                error=error, finished_at=time.time(), lease_expires=None)).rowcount == 1

    def generation(self, gen_id: str) -> Generation | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(generations_t).where(_g.id == gen_id)).first()
            if row is None:
                return None
            gen = self._generation(row)
            gen.feedback = self._feedback(conn, feedback_t.c.generation_id == gen_id)
            return gen

    @staticmethod
    def _generation(row: Any) -> Generation:
        return Generation(id=row.id, user_id=row.user_id, status=row.status, request=json.loads(row.request),
                          record=json.loads(row.record) if row.record else None, error=row.error,
                          attempts=row.attempts, resumed=row.resumed, created_at=row.created_at,
                          started_at=row.started_at, finished_at=row.finished_at, lease_owner=row.lease_owner,
                          lease_expires=row.lease_expires)

    def status(self, gen_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(_g.status).where(_g.id == gen_id)).scalar()

    def unfinished(self) -> list[Generation]:
        """Generations accepted but not done or failed, oldest first."""
        q = sa.select(generations_t).where(_g.status.in_(("queued", "running"))).order_by(_g.created_at)
        with self.engine.connect() as conn:
            return [self._generation(r) for r in conn.execute(q)]

    def held(self, gen_id: str) -> bool:
        """Is ``gen_id`` running under a lease that has not expired (a live worker may be writing it)?"""
        with self.engine.connect() as conn:
            return self._n(conn, (_g.id == gen_id) & (_g.status == "running") & (_g.lease_expires >= time.time())) > 0

    @staticmethod
    def _n(conn: sa.Connection, where: Any) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(generations_t).where(where)).scalar_one())

    def counts(self) -> dict[str, int]:
        """Generations per status (every status present, 0 when none)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(_g.status, sa.func.count()).group_by(_g.status)).all()
        return {s: 0 for s in STATUSES} | {r[0]: int(r[1]) for r in rows}

    def queue_depth(self) -> int:
        with self.engine.connect() as conn:
            return self._n(conn, _g.status == "queued")

    def latency_buckets(self, bounds: Sequence[float]) -> tuple[list[int], int, float]:
        """Finished (done) generations by accepted → done seconds: the cumulative count at or under each
        bound, the total count and the sum of seconds (a Prometheus histogram, computed in the store so
        every API process reports the same)."""
        took = _g.finished_at - _g.created_at
        cols = [sa.func.coalesce(sa.func.sum(sa.case((took <= b, 1), else_=0)), 0) for b in bounds]
        q = sa.select(*cols, sa.func.count(), sa.func.coalesce(sa.func.sum(took), 0.0)).where(_g.status == "done")
        with self.engine.connect() as conn:
            row = conn.execute(q).one()
        return [int(v) for v in row[:len(bounds)]], int(row[-2]), float(row[-1])

    def user_generations(self, user_id: str, limit: int = 20) -> list[dict[str, Any]]:
        q = (sa.select(_g.id, _g.status, _g.created_at)
             .where(_g.user_id == user_id).order_by(_g.created_at.desc()).limit(limit))
        with self.engine.connect() as conn:
            return [{"id": r.id, "status": r.status, "created_at": r.created_at} for r in conn.execute(q)]

    # ------------------------------------------------------------------ feedback
    def add_feedback(self, gen_id: str, user_id: str, candidate: int, weight: float, signal: str) -> int:
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
        with self.engine.begin() as conn:
            res = conn.execute(feedback_t.insert().values(generation_id=gen_id, user_id=user_id, candidate=candidate,
                                                          weight=weight, signal=signal, created_at=time.time()))
            return int(res.inserted_primary_key[0])

    @staticmethod
    def _feedback(conn: sa.Connection, where: Any, limit: int | None = None) -> list[dict[str, Any]]:
        q = sa.select(feedback_t).where(where).order_by(feedback_t.c.id)
        if limit is not None:
            q = sa.select(feedback_t).where(where).order_by(feedback_t.c.id.desc()).limit(limit)
        rows = [{"id": r.id, "generation_id": r.generation_id, "candidate": r.candidate, "weight": r.weight,
                 "signal": r.signal, "created_at": r.created_at} for r in conn.execute(q)]
        return sorted(rows, key=lambda r: r["id"])

    def feedback(self, user_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """A user's feedback rows, oldest first (the newest ``limit``)."""
        with self.engine.connect() as conn:
            return self._feedback(conn, feedback_t.c.user_id == user_id, limit)

    def feedback_with_records(self, user_id: str, after_id: int = 0) -> tuple[int, list[tuple[dict, dict]]]:
        """A user's feedback count, and their rows with id > ``after_id`` (oldest first), each with its
        generation's record — in one read, for the per-user posterior cache."""
        f = feedback_t.c
        q = (sa.select(f.id, f.candidate, f.signal, _g.record).join(generations_t, _g.id == f.generation_id)
             .where((f.user_id == user_id) & (f.id > after_id)).order_by(f.id))
        with self.engine.connect() as conn:
            n = int(conn.execute(sa.select(sa.func.count()).select_from(feedback_t)
                                 .where(f.user_id == user_id)).scalar_one())
            rows = [({"id": r.id, "candidate": r.candidate, "signal": r.signal}, json.loads(r.record) if r.record
                     else None) for r in conn.execute(q)]
        return n, rows
