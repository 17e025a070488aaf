"""The service's store: users, events, generations and feedback (SQLAlchemy Core).

The embedded default is SQLite in WAL mode under the data directory; any SQLAlchemy URL works
(``postgresql://…`` with a driver installed). Every write is one transaction, committed before
the API acknowledges it, so an acknowledged event or feedback row survives a crash of the process.
Images are not stored here: each generation's result folder lives on disk beside the database
(see :class:`pmgen.serve.service.Service`), written atomically.

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
"""A generation's life: queued → running → done | failed (a restart resumes queued/running ones)."""
SIGNALS = ("pick", "like", "dislike")
"""Feedback signals on one candidate."""

_meta = sa.MetaData()
users_t = sa.Table(
    "users", _meta,
    sa.Column("user_id", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
events_t = sa.Table(
    "events", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(128), sa.ForeignKey("users.user_id"), nullable=False, index=True),
    sa.Column("event", sa.Text, nullable=False),  # the README's event JSON
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
    feedback: list[dict[str, Any]] = field(default_factory=list)


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class Store:
    """Users, events, generations and feedback behind a small interface (thread-safe)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        _meta.create_all(engine)

    @classmethod
    def open(cls, url: str) -> Store:
        """Open (and create) the store at a SQLAlchemy URL; SQLite files get WAL mode and a busy timeout."""
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
            engine = sa.create_engine(url, pool_pre_ping=True)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ users and events
    def _ensure_user(self, conn: sa.Connection, user_id: str) -> None:
        if conn.execute(sa.select(users_t.c.user_id).where(users_t.c.user_id == user_id)).first() is None:
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

    def delete_queued(self, gen_id: str) -> None:
        """Remove a generation that was never acknowledged (the queue refused it)."""
        with self.engine.begin() as conn:
            conn.execute(generations_t.delete().where((generations_t.c.id == gen_id)
                                                      & (generations_t.c.status == "queued")))

    def start(self, gen_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(generations_t.update().where(generations_t.c.id == gen_id).values(
                status="running", started_at=time.time(), attempts=generations_t.c.attempts + 1))

    def finish(self, gen_id: str, record: dict[str, Any] | None = None, error: str | None = None) -> None:
        """Mark done (with the record) or failed (with the error)."""
        with self.engine.begin() as conn:
            conn.execute(generations_t.update().where(generations_t.c.id == gen_id).values(
                status="done" if error is None else "failed", record=json.dumps(record) if record else None,
                error=error, finished_at=time.time()))

    def requeue(self, gen_id: str) -> None:
        """A generation interrupted by a restart goes back to ``queued`` (``resumed`` counts how often)."""
        with self.engine.begin() as conn:
            conn.execute(generations_t.update().where(generations_t.c.id == gen_id).values(
                status="queued", resumed=generations_t.c.resumed + 1))

    def generation(self, gen_id: str) -> Generation | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(generations_t).where(generations_t.c.id == gen_id)).first()
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
                          started_at=row.started_at, finished_at=row.finished_at)

    def status(self, gen_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(generations_t.c.status).where(generations_t.c.id == gen_id)).scalar()

    def unfinished(self) -> list[Generation]:
        """Generations accepted but not done or failed, oldest first (to resume after a restart)."""
        q = (sa.select(generations_t).where(generations_t.c.status.in_(("queued", "running")))
             .order_by(generations_t.c.created_at))
        with self.engine.connect() as conn:
            return [self._generation(r) for r in conn.execute(q)]

    def user_generations(self, user_id: str, limit: int = 20) -> list[dict[str, Any]]:
        q = (sa.select(generations_t.c.id, generations_t.c.status, generations_t.c.created_at)
             .where(generations_t.c.user_id == user_id).order_by(generations_t.c.created_at.desc()).limit(limit))
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
