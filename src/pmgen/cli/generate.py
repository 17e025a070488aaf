"""`pmgen generate`, `demo`, `bench` and `feedback`: the main job and its feedback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pmgen.cli.app import (
    AlphaOpt,
    DataDirOpt,
    GeneratorOpt,
    HistOpt,
    KOpt,
    MinAccOpt,
    ModeOpt,
    PresetOpt,
    SeedOpt,
    SoftOpt,
    StepsOpt,
    StrengthOpt,
    WeightsOpt,
    _fail,
    _learned_alpha,
    _load_pmg,
    _names,
    _settings_overrides,
    _soft,
    app,
    console,
    err,
)

# light imports: the trainers' settings classes and the service's commands load torch / FastAPI only when run
from pmgen.cli.data import data_build
from pmgen.data import datasets
from pmgen.data.schema import DataError


@app.command()
def generate(
    dataset: Annotated[Optional[str], typer.Option(help="Built-in dataset to take the user and target from.")] = None,
    sample: Annotated[Optional[str], typer.Option(help="Sample id in --dataset (user, target and conversation).")] = None,
    user: Annotated[Optional[str], typer.Option(help="User id in --dataset.")] = None,
    target: Annotated[Optional[str], typer.Option(help="Target item id (in --dataset or --items).")] = None,
    behaviors: Annotated[Optional[Path], typer.Option(help="Your own data: a JSON file with one user "
                                                      "{'user_id', 'events': [...]} (needs --items and --target).")] = None,
    items: Annotated[Optional[Path], typer.Option(help="Items JSONL for --behaviors.")] = None,
    batch: Annotated[Optional[Path], typer.Option(help="A JSONL file of requests (see docs); resumable.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default runs/<request>).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    preset: PresetOpt = "sticker-tiny",
    weights: WeightsOpt = None, alpha: AlphaOpt = None, mode: ModeOpt = None, seed: SeedOpt = None,
    strength: StrengthOpt = None, steps: StepsOpt = None, keywords: KOpt = None, history_weight: HistOpt = None,
    min_accuracy: MinAccOpt = None,
    soft_prompt: SoftOpt = None, generator: GeneratorOpt = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """Generate a personalized image: chosen PNG, every candidate, record.json and report.html."""
    from pmgen.batch.local import run_batch
    from pmgen.data import requests as rq
    from pmgen.paths import UnsafePathError, check_batch_root, check_result_dir

    overrides = _settings_overrides(weights, alpha, mode, seed, strength, steps, keywords, history_weight, min_accuracy)
    if batch is not None:
        batch_out = out or Path("runs") / batch.stem
        try:
            check_batch_root(batch_out)
            parsed = list(rq.read_batch(batch, data_dir_))
        except (DataError, UnsafePathError) as e:
            _fail(str(e), 2)
        pmg = _load_pmg(preset, overrides, **_soft(soft_prompt, generator))
        try:
            done, failed = run_batch(pmg, batch, batch_out, data_dir_, console, err, requests=parsed,
                                        alpha_of=None if alpha is not None else _learned_alpha(pmg, data_dir_))
        except UnsafePathError as e:
            _fail(str(e), 2)
        if failed:
            _fail(f"{failed} request(s) failed; the {done} others are done (re-run to retry only the failed ones)")
        return
    try:
        if behaviors is not None:
            if items is None or target is None:
                _fail("--behaviors needs --items and --target", 2)
            req = rq.from_files(behaviors, items, target)
        elif dataset is not None:
            _names(dataset)
            req = rq.from_dataset(datasets.load(dataset, data_dir_), sample_id=sample, user_id=user, target_id=target)
        else:
            _fail("say what to generate: --dataset with --sample (or --user and --target), --behaviors with --items "
                  "and --target, or --batch", 2)
        folder = check_result_dir(out or Path("runs") / req.request_id)
    except (DataError, UnsafePathError) as e:
        _fail(str(e), 2)
    except (KeyError, ValueError) as e:
        _fail(str(e.args[0]) if e.args else str(e), 2)
    pmg = _load_pmg(preset, overrides, **_soft(soft_prompt, generator))
    learned = _learned_alpha(pmg, data_dir_)(req.user.user_id) if alpha is None else None
    try:
        res = pmg.generate(req.user, req.target, req.items, context=req.context, target_image=req.target_image,
                           history_images=req.history_images, user_id=req.user.user_id,
                           **({"seed": req.seed} if req.seed is not None else {}),
                           **({"alpha": learned[0], "alpha_source": learned[1]} if learned else {}))
        folder = res.save(folder)
    except ValueError as e:  # an image over the limits, an output folder that became foreign meanwhile
        _fail(str(e), 2)
    if as_json:
        print(json.dumps(res.record.to_json(), indent=2, ensure_ascii=False))
    else:
        c = res.record.chosen_candidate
        console.print(f"[green]✓[/] {folder}/chosen.png  (w = {c.weight:g}, d_t {c.d_t:.3f}, d_p {c.d_p:.3f})")
        console.print(f"  preference keywords: {', '.join(res.record.preference_keywords) or '-'}", highlight=False)
        console.print(f"  report: {folder}/report.html", highlight=False)
        for w in res.record.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    users: Annotated[int, typer.Option(help="How many users (different hidden tastes).")] = 4,
    target_key: Annotated[Optional[str], typer.Option(help="Conversational target (e.g. love, laughing, sad, celebrate); "
                                                      "'auto': the one with the most personalized ground truths.")] = "love",
    preset: PresetOpt = "sticker-tiny",
    weights: WeightsOpt = None, alpha: AlphaOpt = None, mode: ModeOpt = None, seed: SeedOpt = None,
    soft_prompt: SoftOpt = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """The main job (what `make demo` runs): different users, same target, one side-by-side picture."""
    from pmgen.demo import run_demo
    from pmgen.paths import UnsafePathError, check_batch_root

    overrides = _settings_overrides(weights, alpha, mode, seed, None, None, None, None)
    try:
        check_batch_root(out)
    except UnsafePathError as e:
        _fail(str(e), 2)
    data_build("all", data_dir_)
    pmg = _load_pmg(preset, overrides, **_soft(soft_prompt))
    ds = datasets.load("sticker-users", data_dir_)
    try:
        picture = run_demo(pmg, ds, out, users, None if target_key == "auto" else target_key,
                           log=lambda m: console.print(m, highlight=False))
    except KeyError as e:
        _fail(str(e.args[0]), 2)
    except (UnsafePathError, ValueError) as e:
        _fail(str(e), 2)
    console.print(f"[green]✓[/] picture: {picture}\n  pages: {out / 'index.html'}", highlight=False)


@app.command()
def bench(
    preset: PresetOpt = "sticker-tiny",
    n: Annotated[int, typer.Option(help="Repetitions per stage (medians are reported).")] = 5,
    cold: Annotated[bool, typer.Option(help="Also time `pmgen generate` in a fresh process.")] = True,
    json_out: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path("runs/bench.json"),
    data_dir_: DataDirOpt = None,
) -> None:
    """Per-stage latency (medians), warm/cold generate, throughput and peak memory vs. the CPU budgets."""
    from pmgen.eval.bench import run_bench

    data_build("sticker-users", data_dir_)
    res = run_bench(preset, n, data_dir_, cold, log=lambda m: console.print(m, highlight=False))
    t = Table("stage", "median", "budget", "ok")
    for name, st in res["stages"].items():
        if "median_s" in st:
            budget = res["budgets_s"].get(name)
            t.add_row(name, f"{st['median_s']:.3f} s", f"≤ {budget:g} s" if budget else "",
                      ("✓" if st["median_s"] <= budget else "✗") if budget else "")
        else:
            t.add_row(name, f"{st['value']:.2f}", "", "")
    for key in ("peak_rss_gb_in_process", "peak_rss_gb_cold_process"):
        if key in res:
            t.add_row(key, f"{res[key]:.2f} GB", f"≤ {res['budget_rss_gb']:g} GB",
                      "✓" if res[key] <= res["budget_rss_gb"] else "✗")
    console.print(t)
    m = res["machine"]
    console.print(f"{m['cpu']} · {m['cores']} cores · torch {m['torch']} ({m['torch_threads']} threads)",
                  highlight=False)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"written: {json_out}")

@app.command()
def feedback(
    run_dir: Annotated[Path, typer.Argument(help="A result folder of `pmgen generate` (holds record.json).")],
    pick: Annotated[Optional[int], typer.Option(help="The user picked candidate N (0 = the w = 0 baseline).")] = None,
    like: Annotated[Optional[int], typer.Option(help="The user liked candidate N.")] = None,
    dislike: Annotated[Optional[int], typer.Option(help="The user disliked candidate N.")] = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """Record a user's feedback on a result; their next generations use the α learned from it."""
    from pmgen.paths import check_id
    from pmgen.stages.feedback import balance_from_store, open_store
    from pmgen.stages.select import DEFAULT_ALPHA
    from pmgen.types import GenerationRecord

    given = [(s, n) for s, n in (("pick", pick), ("like", like), ("dislike", dislike)) if n is not None]
    if len(given) != 1:
        _fail("give exactly one of --pick N, --like N, --dislike N", 2)
    signal, candidate = given[0]
    path = run_dir / "record.json"
    try:
        record = GenerationRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
        check_id(record.user_id, "the record's user_id")
    except FileNotFoundError:
        _fail(f"{path}: not found (expected a result folder of `pmgen generate`)", 2)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, KeyError) as e:
        _fail(f"{path}: not a pmgen generation record ({e})", 2)
    if not 0 <= candidate < len(record.candidates):
        _fail(f"--{signal} {candidate}: the record has candidates 0..{len(record.candidates) - 1}", 2)
    store = open_store(data_dir_, create=True)
    import hashlib

    gen_id = "cli-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    if store.generation(gen_id) is None:
        store.add_generation(gen_id, record.user_id, {"source": "cli", "run_dir": str(run_dir.resolve())})
        store.finish(gen_id, record.to_json())
    store.add_feedback(gen_id, record.user_id, candidate, record.candidates[candidate].weight, signal)
    b = balance_from_store(store, record.user_id, DEFAULT_ALPHA)
    console.print(f"[green]✓[/] {signal} w = {record.candidates[candidate].weight:g} for user {record.user_id}: "
                  f"α {b.posterior.mean:.2f} ± {b.posterior.std:.2f} from {b.n_events} feedback event(s) "
                  "(used by their next generations)", highlight=False)
