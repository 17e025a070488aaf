"""Helpers of the service tests: a toy catalog, the tiny PMG outside pytest, a server subprocess."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
from PIL import Image

from pmgen.data.schema import Dataset, Event, Item, User

TESTS = Path(__file__).parent


def toy_catalog(toy_data) -> Dataset:
    root, items, _user = toy_data
    return Dataset(name="toy", root=Path(root), items=dict(items), users={}, samples=[])


def write_toy_data(root: Path) -> Dataset:
    """The same 4-item catalog as the ``toy_data`` fixture, for a server subprocess."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    colors = {"a": (250, 200, 0), "b": (200, 80, 0), "c": (0, 120, 255), "d": (230, 30, 60)}
    titles = {"a": "grinning face", "b": "cat face", "c": "blue heart", "d": "red heart"}
    items = {}
    for iid, col in colors.items():
        im = Image.new("RGB", (64, 64), "white")
        im.paste(Image.new("RGB", (30, 30), col), (17, 17))
        im.save(root / "img" / f"{iid}.png")
        items[iid] = Item(iid, titles[iid], "tags: test", image=f"img/{iid}.png")
    return Dataset(name="toy", root=root, items=items, users={}, samples=[])


def build_tiny_pmg(root: Path):
    """The ``tiny_pmg`` fixture of conftest.py, outside pytest (for a server subprocess)."""
    import torch
    from tiny_models import tiny_sticker_generator, write_tiny_bert, write_tiny_llama

    from pmgen.models.llm import LLM
    from pmgen.models.scorer import DualEncoder, Scorer, ScorerConfig
    from pmgen.models.text_encoder import TextEncoder
    from pmgen.pipeline import PMG, Settings
    from pmgen.stages.keywords import KeywordCache
    from pmgen.presets import get_preset

    torch.manual_seed(0)
    te = TextEncoder(write_tiny_bert(root / "bert"))
    gen = tiny_sticker_generator(text_max_length=16)
    selector = Scorer(DualEncoder(ScorerConfig(widths=(8, 16), embed_dim=16, text_dim=32)), te, name="tiny-selector")
    llm = LLM.from_pretrained(write_tiny_llama(root / "llama"))
    preset = get_preset("sticker-tiny", text_max_length=16)
    settings = Settings(weights=(0.0, 1.0, 2.0), num_inference_steps=3, strength=0.6, guidance_scale=3.0, k=4)
    return PMG(preset, llm, te, gen, selector, settings=settings, keyword_cache=KeywordCache(root / "kw.sqlite"))


def png_bytes(size: int = 64, color=(200, 80, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width × height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app: Any, config: Callable[[Any, int], Any] | None = None) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a background thread; yields the base URL.

    ``config(app, port)`` makes the ``uvicorn.Config`` (default: uvicorn's own defaults)."""
    import uvicorn

    port = free_port()
    cfg = config(app, port) if config else uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                         timeout_graceful_shutdown=5)
    srv = uvicorn.Server(cfg)
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(30)


def start_server(state: Path, port: int, log: Path, queue_size: int = 64, slow: float = 0.0,
                 store_url: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``tests/serve_tiny_server.py`` as a subprocess on 127.0.0.1:``port``, its output in ``log``
    (``extra``: more of its options, e.g. ``("--workers", "0")`` or ``("--worker-only",)``)."""
    cmd = [sys.executable, str(TESTS / "serve_tiny_server.py"), "--state", str(state), "--port", str(port),
           "--queue-size", str(queue_size), "--slow", str(slow), *(("--store", store_url) if store_url else ()),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=TESTS)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(f"{base}/readyz", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {base} not ready after {timeout} s")


__all__ = [
    "Event",
    "User",
    "bomb_png",
    "build_tiny_pmg",
    "free_port",
    "json",
    "png_bytes",
    "running_server",
    "start_server",
    "toy_catalog",
    "wait_ready",
    "write_toy_data",
]
