"""pmgen: personalized multimodal generation (PMG, WWW 2024) on a laptop CPU.

    import pmgen
    pmg = pmgen.PMG.from_preset("sticker-tiny")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PMG", "Settings", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import pmgen` stays cheap (no torch) for the CLI
    if name in ("PMG", "Settings"):
        from pmgen import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'pmgen' has no attribute {name!r}")
