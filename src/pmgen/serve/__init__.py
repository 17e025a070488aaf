"""``pmgen serve``: a personalization service (FastAPI) with a web page, a store and feedback.

* :mod:`pmgen.serve.app` — the HTTP routes (thin) and :func:`~pmgen.serve.app.create_app`;
* :mod:`pmgen.serve.guards` — before any route: the token, body size / arrival time / JSON nesting;
* :mod:`pmgen.serve.waiting` — long polls parked on the event loop, a bounded number per client;
* :mod:`pmgen.serve.server` — uvicorn's configuration (idle connections close);
* :mod:`pmgen.serve.service` — what each route does: queueing, the worker's job, recovery;
* :mod:`pmgen.serve.validation` — checking events, generation requests and target images;
* :mod:`pmgen.serve.errors` — the answers other than success (with their HTTP status) and problems;
* :mod:`pmgen.data.store` — users, events, generations, feedback and the durable queue (SQLAlchemy Core,
  Alembic migrations; SQLite WAL by default, PostgreSQL through psycopg 3);
* :mod:`pmgen.serve.worker` — model worker threads claiming generations from the store (leases, heartbeat);
* :mod:`pmgen.serve.replica` — a model worker process without HTTP (``pmgen serve --no-http``);
* :mod:`pmgen.serve.metrics` — ``/metrics`` in Prometheus' text format;
* :mod:`pmgen.serve.catalog` — catalog search and the target of a chat message;
* :mod:`pmgen.serve.bench` — ``pmgen bench-serve``: bounded load on loopback;
* ``static/`` — the page (plain HTML/JS/CSS, no build step).

Needs the ``serve`` extra: ``pip install 'pmgen[serve]'``.
"""
