"""A throwaway PostgreSQL server (``initdb`` + ``pg_ctl`` on a temp folder) for the service tests and
``pmgen bench-serve --store postgresql``.

``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user on a folder
it owns (``runuser -u postgres``); as anyone else, as that user. Trust authentication, 127.0.0.1 only.

    with postgres_server() as admin_url:             # postgresql://pmgen@127.0.0.1:PORT/postgres
        url = create_database(admin_url, "t1")       # postgresql://pmgen@127.0.0.1:PORT/t1
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian's layout), or ``None``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a fresh server on a free port; yields the admin URL; stops it and removes its files."""
    bin_dir = pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb): "
                                "`make setup` installs it (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pmgen-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    try:
        subprocess.run(_as_owner([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "pmgen",
                                  "--no-sync"]), check=True, capture_output=True)
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
                                  "-w", "-t", "60", "start"]), check=True, capture_output=True)
        yield f"postgresql://pmgen@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def create_database(admin_url: str, name: str) -> str:
    """A new empty database on the server of ``admin_url``; its URL."""
    import psycopg

    with psycopg.connect(admin_url.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def wait_accepting(admin_url: str, timeout: float = 30) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(admin_url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
