"""Alembic migrations of the service's store (:mod:`pmgen.data.store`), run by ``Store.open`` on SQLite and PostgreSQL."""
