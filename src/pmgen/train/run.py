"""What every pmgen trainer shares: run-control settings, resume, checkpoints, RNG state, signals, logs.

**Resume rule (the same for every trainer).** A run keeps its state in its train dir
(``<train dir>/<checkpoint name>``). A command continues that run only when given ``--resume``;
without it, an existing checkpoint is an error (exit 2) that names ``--resume`` and ``--train-dir``,
so a run in progress is never overwritten or continued by accident. On ``--resume`` the run's own
settings come from its checkpoint: ``out``, ``minutes``, ``train_dir`` and ``data_dir`` are this
invocation's (:attr:`RunConfig.INVOCATION_FIELDS`), the other run-control fields keep the run's
values unless given again, and giving any other setting a new value is an error naming it.

Checkpoints are written atomically (temporary file, then rename), so a crash mid-write never
destroys the previous one; they carry the global Python, NumPy and torch RNG states.

This module stays free of torch at import time: the configs (and so the CLI) import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class RunConfig:
    """Run control shared by every trainer's config (validated on construction).

    Attributes:
        out: folder the trained model is exported to.
        minutes: wall-clock budget of this invocation, setup included (> 0).
        train_dir: checkpoint, caches and ``progress.log`` of the run; ``None`` → a folder per model
            under ``<pmgen cache dir>/train/``.
        data_dir: where the datasets are built; ``None`` → pmgen's data dir.
        checkpoint_minutes: wall-clock minutes between resume checkpoints (> 0).
        log_every: steps between progress lines (> 0).
        threads: torch intra-op threads (>= 1).
    """

    out: str
    minutes: float = 600.0
    train_dir: str | None = None
    data_dir: str | None = None
    checkpoint_minutes: float = 5.0
    log_every: int = 25
    threads: int = 2

    KIND: ClassVar[str] = "run"
    CHECKPOINT_NAME: ClassVar[str] = "last.pt"
    # Fields that may differ between a checkpoint and the invocation that resumes it.
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("out", "minutes", "train_dir", "data_dir", "checkpoint_minutes",
                                             "log_every", "threads")
    # Fields every invocation sets itself (their defaults when not given), also on resume.
    INVOCATION_FIELDS: ClassVar[tuple[str, ...]] = ("out", "minutes", "train_dir", "data_dir")

    def __post_init__(self) -> None:
        self.normalize()
        problems = [f"{name}={getattr(self, name)!r}: expected {expected}"
                    for ok, name, expected in self.checks() if not ok]
        if problems:
            raise ValueError(f"invalid {self.KIND} training config:\n  " + "\n  ".join(problems))

    def normalize(self) -> None:
        """Coerce values read from JSON or the command line (lists → tuples); runs before :meth:`checks`."""

    def checks(self) -> list[tuple[bool, str, str]]:
        """``(ok, field, expected)`` rules; subclasses add theirs to these."""
        return [(bool(str(self.out or "")), "out", "a folder path"),
                (self.minutes > 0, "minutes", "> 0"),
                (self.checkpoint_minutes > 0, "checkpoint_minutes", "> 0"),
                (self.log_every > 0, "log_every", "> 0"),
                (self.threads >= 1, "threads", ">= 1")]

    def to_json(self) -> dict[str, Any]:
        """Every field, tuples as lists (what checkpoints and exports store)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Each field's default as :meth:`to_json` writes it (fields without a default are left out)."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def default_train_dir(cls, values: Mapping[str, Any]) -> Path:
        """Train dir of a run whose settings are ``values`` when ``train_dir`` is not set."""
        from pmgen.paths import cache_dir

        return cache_dir() / "train" / cls.KIND

    @classmethod
    def train_dir_of(cls, values: Mapping[str, Any]) -> Path:
        return Path(values["train_dir"]) if values.get("train_dir") else cls.default_train_dir(values)

    @property
    def run_dir(self) -> Path:
        """The train dir this run uses (``train_dir`` or the model's default)."""
        return self.train_dir_of(dataclasses.asdict(self))

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / self.CHECKPOINT_NAME


def start_config(config_class: type[RunConfig], given: Mapping[str, Any], resume: bool) -> RunConfig:
    """The config of a new run (``given`` over the defaults) or, with ``resume``, of the run in ``given``'s
    train dir (see the module docstring for the rule).

    Raises:
        ValueError: a checkpoint exists without ``resume`` (or none with it), a setting of a run in
            progress changes, or a value is invalid; the message says which and what to do.
    """
    ckpt = config_class.train_dir_of(given) / config_class.CHECKPOINT_NAME
    if resume:
        if not ckpt.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt}")
        return config_class(**resume_config(ckpt, given, config_class.RUN_FIELDS))
    if ckpt.is_file():
        raise ValueError(f"a checkpoint already exists at {ckpt}: pass --resume to continue it, "
                         "or --train-dir for a new run")
    return config_class(**given)


def begin_run(config_class: type[RunConfig], given: Mapping[str, Any], resume: bool,
              log: Callable[[str], None]) -> RunConfig | None:
    """The start every ``pmgen train`` command shares: the model hub offline (``HF_HUB_OFFLINE=1`` unless
    set), the run's config (:func:`start_config`), torch's threads (``cfg.threads``) and the config logged.

    Returns ``None`` when the settings are refused (the message is printed to stderr; exit code 2).
    """
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = start_config(config_class, given, resume)
    except ValueError as e:
        print(e, file=sys.stderr)
        return None
    torch.set_num_threads(cfg.threads)
    log(f"config: {json.dumps(cfg.to_json())}")
    return cfg


def resume_config(path: Path, values: Mapping[str, Any], run_fields: Iterable[str]) -> dict[str, Any]:
    """Settings of the run whose checkpoint is ``path``, with the run control (``run_fields``) of ``values``.

    The checkpoint's own settings are the base, so ``--resume`` needs only the run control again.
    A checkpoint without settings (an older scorer checkpoint) gives ``values`` unchanged; the trainer
    then compares its own fingerprint.

    Raises:
        ValueError: naming every other setting in ``values`` that differs from the run's.
    """
    import torch

    run_fields = tuple(run_fields)
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("config")
    if saved is None:
        return dict(values)
    clash = [k for k, v in values.items() if k not in run_fields and saved.get(k) != v
             and not (isinstance(v, tuple) and list(v) == saved.get(k))]
    if clash:
        raise ValueError(f"--resume: cannot change {', '.join(clash)} of a run in progress")
    return {**saved, **{k: v for k, v in values.items() if k in run_fields}}


# ------------------------------------------------------------------ checkpoints and RNG state
def rng_state() -> dict[str, Any]:
    """The global Python, NumPy and torch RNG states."""
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (other keys of ``state`` are ignored)."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def atomic_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    import torch

    from pmgen.paths import write_file_atomically

    return write_file_atomically(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(path: Path, **state: Any) -> Path:
    """Save ``state`` plus the global RNG states (key ``"rng"``) to ``path`` atomically."""
    return atomic_save({**state, "rng": rng_state()}, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or ``None`` when there is none. RNG states are not restored:
    call :func:`set_rng_state` once the checkpoint is accepted."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------ logs and signals
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
