"""One ``pmgen train scorer`` run: settings → train (or continue) → export."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from pmgen.train.run import stamped_log, start_config, stop_on_signals
from pmgen.train.scorer.config import ScorerTrainConfig


def main(given: Mapping[str, Any], resume: bool = False, log: Callable[[str], None] = stamped_log) -> int:
    """Train (or, with ``resume``, continue) the scorer ``given`` describes; exit code (2: bad settings)."""
    from pmgen.train.scorer.trainer import train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = start_config(ScorerTrainConfig, given, resume)
        train(cfg, log=log, resume=resume, stop=stop_on_signals(log))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    return 0
