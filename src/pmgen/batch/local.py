"""The local batch engine: every request of a batch file, one after another, in this process.

Finished requests are folders ``<out>/<request_id>/`` written atomically
(:func:`pmgen.paths.write_result_dir`); a re-run skips them. See :mod:`pmgen.data.requests` for the
batch file format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pmgen.data.requests import Request, read_batch
from pmgen.paths import UnsafePathError, check_id, inside, prepare_batch_root


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def run_batch(pmg: Any, batch: Path, out: Path, data_root: Path | None = None, console: Any = None,
              err: Any = None, requests: list[tuple[int, Request | Exception]] | None = None,
              alpha_of: Callable[[str], tuple[float, str] | None] | None = None) -> tuple[int, int]:
    """Run every request of a batch file into ``out/<request_id>/``; skip finished ones.

    Returns ``(done, failed)``. Failures (bad lines, unknown ids) are reported with their line number
    and do not stop the batch; ``out/index.jsonl`` lists every finished request's record path.
    ``requests`` (from :func:`read_batch`) skips re-reading the file. ``out`` must be new, empty, or
    a batch folder pmgen made (:func:`pmgen.paths.prepare_batch_root`); every request folder is
    verified to stay inside it, and a folder pmgen did not write is never replaced. ``alpha_of(user_id)``
    gives a user's learned ``(α, source)`` (or ``None``: the settings' α).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = console or Console()
    err = err or Console(stderr=True)
    parsed = list(read_batch(batch, data_root)) if requests is None else requests
    out = prepare_batch_root(out)
    done = failed = skipped = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("generating", total=len(parsed))
        for lineno, req in parsed:
            if isinstance(req, Exception):
                failed += 1
                err.print(f"[red]{batch}:{lineno}[/]: {_message(req)}", highlight=False, markup=False)
                bar.advance(task)
                continue
            try:
                folder = inside(out, check_id(req.request_id, "request_id"))
            except UnsafePathError as e:
                failed += 1
                err.print(f"[red]{batch}:{lineno}[/]: {e}", highlight=False, markup=False)
                bar.advance(task)
                continue
            if (folder / "record.json").is_file():
                skipped += 1
                done += 1
            else:
                try:
                    learned = alpha_of(req.user.user_id) if alpha_of is not None else None
                    res = pmg.generate(req.user, req.target, req.items, context=req.context,
                                       target_image=req.target_image, history_images=req.history_images,
                                       user_id=req.user.user_id, **({"seed": req.seed} if req.seed is not None else {}),
                                       **({"alpha": learned[0], "alpha_source": learned[1]} if learned else {}))
                    if req.ground_truth:
                        res.record.ground_truth_personalized = req.ground_truth
                    res.save(folder)
                    done += 1
                except (ValueError, OSError) as e:  # bad image, a foreign folder in the way, ...
                    failed += 1
                    err.print(f"[red]{batch}:{lineno}[/]: {_message(e)}", highlight=False, markup=False)
            bar.advance(task)
    index = [str(p.relative_to(out)) for p in sorted(out.glob("*/record.json"))]
    tmp = out / "index.jsonl.tmp"
    tmp.write_text("".join(json.dumps({"record": r}) + "\n" for r in index))
    tmp.replace(out / "index.jsonl")
    console.print(f"{done} done ({skipped} already finished before), {failed} failed → {out}")
    return done, failed
