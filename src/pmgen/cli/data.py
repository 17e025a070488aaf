"""`pmgen data`: build, show and validate datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pmgen.cli.app import DataDirOpt, _fail, _names, console, data_app, err
from pmgen.data import datasets
from pmgen.data.schema import DataError, Dataset
from pmgen.data.validate import validate_file, validate_folder
from pmgen.paths import data_dir

# light imports: the trainers' settings classes and the service's commands load torch / FastAPI only when run
from pmgen.stages.verbalize import verbalize_history


@data_app.command("list")
def data_list(data_dir_: DataDirOpt = None) -> None:
    """List the built-in datasets and whether they are built."""
    root = data_dir(data_dir_)
    t = Table("dataset", "built", "counts")
    for n in datasets.NAMES:
        meta = root / n / "dataset.json"
        counts = json.loads(meta.read_text())["counts"] if meta.is_file() else {}
        t.add_row(n, "yes" if meta.is_file() else "no", ", ".join(f"{k}={v}" for k, v in counts.items()
                                                                   if not isinstance(v, dict)))
    console.print(t)
    console.print(f"data directory: {root}")


@data_app.command("build")
def data_build(
    name: Annotated[str, typer.Argument(help=f"all, or one of: {', '.join(datasets.NAMES)}")],
    data_dir_: DataDirOpt = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if already built.")] = False,
    size: Annotated[Optional[list[int]], typer.Option(help="stickers only: extra image size(s) besides 64, "
                                                      "e.g. --size 128.")] = None,
) -> None:
    """Build dataset(s) from the installed registry packages (skipped when already built)."""
    root = data_dir(data_dir_)
    for n in _names(name):
        opts = {"sizes": (64, *size)} if (n == "stickers" and size) else {}
        try:
            folder = datasets.build(n, root, force=force, **opts)
        except FileNotFoundError as e:
            _fail(str(e))
        meta = json.loads((folder / "dataset.json").read_text())
        console.print(f"[green]✓[/] {n}: {folder}  " + ", ".join(
            f"{k}={v}" for k, v in meta["counts"].items() if not isinstance(v, dict)))


def summarize(ds: Dataset, n_examples: int = 2, seed: int = 0) -> None:
    """Print counts and a few verbalized examples of a loaded dataset."""
    meta = ds.meta
    console.rule(f"[bold]{ds.name}")
    if meta.get("description"):
        console.print(meta["description"])
    for k, v in meta.get("counts", {}).items():
        console.print(f"  {k}: {v}")
    if meta.get("license"):
        console.print(f"  [dim]{meta['license']}[/]")
    rng = random.Random(seed)
    if ds.samples:
        for s in rng.sample(ds.samples, min(n_examples, len(ds.samples))):
            user = ds.users[s.user_id]
            hist = verbalize_history(user.events, ds.items, budget_tokens=60, detail_words=3)
            console.print(f"\n[bold]sample {s.sample_id}[/] (user {s.user_id}, split {s.split}, "
                          f"{hist.n_events} events, newest first):", highlight=False)
            console.print(hist.text, highlight=False)
            for e in s.context:
                console.print(f"  {e.speaker}: {e.text}", highlight=False)
            console.print(f"  → target: {ds.items[s.target_id].title} [{s.target_id}]", highlight=False)
            if s.ground_truth_personalized:
                gt = ds.items[s.ground_truth_personalized]
                console.print(f"  → personalized ground truth: {gt.title} [{gt.id}]", highlight=False)
            if s.heldout:
                console.print("  → held-out likes: " + "; ".join(ds.items[i].title for i in s.heldout[:5]),
                              highlight=False)
    elif ds.users:
        for u in rng.sample(list(ds.users.values()), min(n_examples, len(ds.users))):
            hist = verbalize_history(u.events, ds.items, budget_tokens=60)
            console.print(f"\n[bold]user {u.user_id}[/]:", highlight=False)
            console.print(hist.text, highlight=False)
    elif ds.items:
        for it in rng.sample(list(ds.items.values()), min(n_examples + 2, len(ds.items))):
            console.print(f"  [{it.id}] {it.title} — {it.text[:100]}", highlight=False)


@data_app.command("show")
def data_show(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(datasets.NAMES)}")],
    data_dir_: DataDirOpt = None,
    n: Annotated[int, typer.Option(help="How many examples to print.")] = 2,
    sheet: Annotated[Optional[Path], typer.Option(help="stickers: where to write the contact sheet PNG "
                                                  "(default: <dataset>/contact_sheet.png).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for picking examples.")] = 0,
) -> None:
    """Print counts and a few examples; for stickers also write a contact sheet PNG."""
    _names(name)
    try:
        ds = datasets.load(name, data_dir_)
    except DataError as e:
        _fail(str(e))
    summarize(ds, n, seed)
    if name == "stickers":
        from pmgen.data.datasets.stickers import contact_sheet

        rng = random.Random(seed)
        picks = rng.sample([i for i in ds.items.values() if not i.attributes.get("skintone")], 120)
        out = sheet or (ds.root / "contact_sheet.png")
        contact_sheet([ds.image_path(i) for i in picks], [i.title for i in picks], out,
                      title=f"{len(ds.items)} OpenMoji stickers (random 120)")
        console.print(f"\ncontact sheet: {out}")


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="A items/users/samples JSONL file, or a dataset folder.")],
    kind: Annotated[Optional[str], typer.Option(help="items, users or samples (default: from name/content).")] = None,
    items: Annotated[Optional[Path], typer.Option(help="Items file to check item ids against "
                                                  "(default: items.jsonl beside the file).")] = None,
    rating_min: Annotated[float, typer.Option(help="Lowest valid rating.")] = 1.0,
    rating_max: Annotated[float, typer.Option(help="Highest valid rating.")] = 5.0,
) -> None:
    """Check a data file (or folder) and report every problem with file, line, field and expectation."""
    if path.is_dir():
        report = validate_folder(path, rating_scale=(rating_min, rating_max))
    else:
        report = validate_file(path, kind=kind, items_path=items, rating_scale=(rating_min, rating_max))
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    for p in report.problems:
        console.print(str(p), highlight=False, markup=False)
    counts = ", ".join(f"{v} {k}" for k, v in report.counts.items())
    if report.problems:
        _fail(f"{len(report.problems)} problem(s) found in {path} ({counts} valid)")
    console.print(f"[green]OK[/] {path}: {counts}, no problems")
