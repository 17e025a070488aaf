"""Progress of long work, on a terminal and in logs.

A rich progress bar draws nothing while the output is a file (a log, CI, ``nohup``): a run of an
hour would show no sign of life until it ends. :func:`progress_bar` draws the live bar on a
terminal and otherwise prints a plain line at every tenth of the work with the time left.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional


@contextmanager
def progress_bar(label: str, total: Optional[int], console: Any, columns: tuple[Any, ...] = (),
                 start: int = 0) -> Iterator[Callable[..., None]]:
    """Yield ``update(done, total=None)`` (``done`` counts all the work, ``total`` may change).

    Args:
        label: what is counted ("generating", "evaluating 4 methods").
        total: the amount of work (``None``: unknown until the first update that gives it).
        console: the rich console to draw on.
        columns: rich progress columns (default: rich's).
        start: work already done before this run (requests finished earlier): shown, but not used
            for the time left.
    """
    from rich.progress import Progress

    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total, completed=start)
        state = {"total": total, "shown": 0, "t0": time.perf_counter()}

        def update(done: int, total_: Optional[int] = None) -> None:
            if total_ is not None:
                state["total"] = total_
            bar.update(task, completed=done, total=state["total"])
            n = state["total"]
            if console.is_terminal or not n or done <= start:
                return
            tenth = min(10, done * 10 // n)
            if tenth > state["shown"] or done == n:
                state["shown"] = tenth
                elapsed = time.perf_counter() - state["t0"]
                left = elapsed / (done - start) * (n - done)
                console.print(f"{label}: {done}/{n} ({elapsed / 60:.1f} min, ~{left / 60:.1f} min left)",
                              highlight=False)

        yield update
