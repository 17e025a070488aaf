"""Alembic's environment for pmgen's store: always run from :meth:`pmgen.data.store.Store.open` on the
connection it passes in ``config.attributes["connection"]`` (no ``alembic.ini``, no URL here)."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=True)  # batch: ALTER TABLE works on SQLite too
with context.begin_transaction():
    context.run_migrations()
