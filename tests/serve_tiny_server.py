"""A ``pmgen serve`` on tiny random models and a toy catalog, for the kill test and the browser test.

    python tests/serve_tiny_server.py --state DIR --port 8765

Models and catalog are built under ``DIR/models`` and ``DIR/catalog`` (seconds); the service's
store and images under ``DIR/serve`` — the same on every start, so a restart resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--slow", type=float, default=0.0, help="seconds added to each candidate (a slower model)")
    a = p.parse_args()
    import uvicorn
    from serve_helpers import build_tiny_pmg, write_toy_data

    from pmgen.serve.app import create_app

    catalog = write_toy_data(a.state / "catalog")
    pmg = build_tiny_pmg(a.state / "models")
    if a.slow > 0:
        import time

        fast = pmg.generator.image_to_image

        def slow(*args, **kw):
            time.sleep(a.slow)
            return fast(*args, **kw)

        pmg.generator.image_to_image = slow
    app = create_app(pmg, catalog, root=a.state / "serve", queue_size=a.queue_size)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
