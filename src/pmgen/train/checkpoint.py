"""Exact-resume checkpoints shared by pmgen's trainers.

A checkpoint holds whatever state dicts the trainer passes plus the Python, NumPy and torch RNG
states, and is written atomically (temporary file, then rename), so a crash mid-write never
destroys the previous checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, **state: Any) -> None:
    """Save ``state`` (plus global RNG states) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, "rng": rng_state()}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """Load a checkpoint (restoring global RNG states), or ``None`` when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state


def resume_config(path: Path, values: dict[str, Any], run_fields: Sequence[str]) -> dict[str, Any]:
    """Settings of the run whose checkpoint is ``path``, with the run control (``run_fields``) of ``values``.

    The checkpoint's own settings are the base, so ``--resume`` needs only the run control again.

    Raises:
        ValueError: naming every other setting in ``values`` that differs from the run's.
    """
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["config"]
    clash = [k for k, v in values.items() if k not in run_fields and saved.get(k) != v
             and not (isinstance(v, tuple) and list(v) == saved.get(k))]
    if clash:
        raise ValueError(f"--resume: cannot change {', '.join(clash)} of a run in progress")
    return {**saved, **{k: v for k, v in values.items() if k in run_fields}}


# ------------------------------------------------------------------ --set KEY=VALUE overrides
def _parse_value(field_: dataclasses.Field, text: str) -> Any:
    default = field_.default
    if isinstance(default, tuple):
        kind = type(default[0]) if default else float
        return tuple(kind(x) for x in text.split(",") if x.strip())
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if text.lower() == "none" and (default is None or "None" in str(field_.type)):
        return None
    if isinstance(default, int) or "int" in str(field_.type):
        return int(text)
    if isinstance(default, float) or "float" in str(field_.type):
        return float(text)
    return text


def parse_overrides(pairs: Sequence[str], config_class: type) -> dict[str, Any]:
    """``["lr=1e-4", "unet_channels=64,128,192"]`` → values typed like ``config_class``'s fields
    (a dataclass); unknown keys and unparsable values exit with a message naming the field."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        if key not in fields:
            raise SystemExit(f"--set: unknown config field {key!r}; known: {', '.join(sorted(fields))}")
        try:
            out[key] = _parse_value(fields[key], value)
        except ValueError as e:
            raise SystemExit(f"--set {key}: {e}") from None
    return out


# ------------------------------------------------------------------ what every trainer's CLI shares
def add_run_arguments(parser: argparse.ArgumentParser, out_help: str, default_minutes: float,
                      train_dir_help: str, config_name: str) -> None:
    """``--out``, ``--minutes``, ``--resume``, ``--train-dir``, ``--data-dir`` and ``--set KEY=VALUE``."""
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--minutes", type=float, default=default_minutes,
                        help=f"wall-clock budget of this run (default {default_minutes:g})")
    parser.add_argument("--resume", action="store_true", help="continue from <train dir>/last.pt")
    parser.add_argument("--train-dir", default=None, help=train_dir_help)
    parser.add_argument("--data-dir", default=None, help="dataset folder root (default: pmgen's data dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a {config_name} field (repeatable), e.g. --set lr=1e-4")


def stamped_log(msg: str) -> None:
    """Print a progress line with the wall-clock time (what the trainers' logs look like)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stop_on_signals(log: Callable[[str], None]) -> Callable[[], bool]:
    """Turn SIGTERM / SIGINT into a flag the training loop polls (it then checkpoints and stops)."""
    flag = {"stop": False}

    def on_signal(signum: int, _frame: object) -> None:
        log(f"signal {signum}: checkpointing and stopping")
        flag["stop"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return lambda: flag["stop"]
