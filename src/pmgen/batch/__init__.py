"""Batch engines: run a file of generation requests (local: :mod:`pmgen.batch.local`)."""
