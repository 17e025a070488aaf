"""The ``pmgen`` command line.

    pmgen data build all            # build every built-in dataset (cached; rebuilt only when missing)
    pmgen data show sticker-users   # counts and examples
    pmgen data validate my/users.jsonl
    pmgen demo                      # the main job (what `make demo` runs)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pmgen import datasets
from pmgen.data import DataError, Dataset
from pmgen.paths import data_dir
from pmgen.validate import validate_file, validate_folder
# light imports: the trainers' settings classes and the service's commands load torch / FastAPI only when run
from pmgen.config import config_options
from pmgen.serve.cli import bench_serve, serve
from pmgen.train.generator.config import GeneratorTrainConfig
from pmgen.train.scorer.config import ScorerTrainConfig
from pmgen.train.soft_prompt.config import SoftPromptTrainConfig
from pmgen.verbalize import verbalize_history

app = typer.Typer(help="pmgen: personalized multimodal generation (PMG) on a laptop CPU.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Build, inspect and validate datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Inspect and check the models of a preset.", no_args_is_help=True)
app.add_typer(models_app, name="models")
train_app = typer.Typer(help="Train the models pmgen ships (runs resumably; see each --help).", no_args_is_help=True)
app.add_typer(train_app, name="train")
# piped output (logs, CI) gets wide lines instead of rich's 80-column default
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Dataset directory "
                                                    "(default: $PMGEN_DATA_DIR or ~/.cache/pmgen/data).")]


def _fail(message: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _names(name: str) -> list[str]:
    if name == "all":
        return list(datasets.NAMES)
    if name not in datasets.NAMES:
        _fail(f"unknown dataset {name!r}; choose one of: all, {', '.join(datasets.NAMES)}", 2)
    return [name]


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
        from pmgen.datasets.stickers import contact_sheet

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


_OPTION_OF = {"weights": "--weights", "alpha": "--alpha", "mode": "--mode", "seed": "--seed",
              "strength": "--strength", "num_inference_steps": "--steps", "k": "--keywords",
              "history_weight": "--history-weight", "min_accuracy": "--min-accuracy"}


def _settings_overrides(weights: Optional[str], alpha: Optional[float], mode: Optional[str], seed: Optional[int],
                        strength: Optional[float], steps: Optional[int], k: Optional[int],
                        history_weight: Optional[float], min_accuracy: Optional[float] = None) -> dict:
    """The generation settings given as options, checked before any model loads (exit 2 naming the option)."""
    from pmgen.pipeline import Settings
    from pmgen.select import weight_grid

    out: dict = {}
    if weights is not None:
        try:
            out["weights"] = tuple(weight_grid(weights))
        except ValueError as e:
            _fail(f"--weights: {e}", 2)
    for key, val in (("alpha", alpha), ("mode", mode), ("seed", seed), ("strength", strength),
                     ("num_inference_steps", steps), ("k", k), ("history_weight", history_weight),
                     ("min_accuracy", min_accuracy)):
        if val is not None:
            out[key] = val
    for key, val in out.items():
        try:
            Settings(**{key: val})
        except (ValueError, TypeError) as e:
            _fail(f"{_OPTION_OF[key]}: {e}", 2)
    return out


def _load_pmg(preset: str, overrides: dict, no_cache: bool = False, **preset_overrides):
    import dataclasses

    from pmgen.models.llm import ModelNotAvailable
    from pmgen.pipeline import PMG

    try:
        pmg = PMG.from_preset(preset, keyword_cache=None if no_cache else "default", **preset_overrides)
    except KeyError as e:
        _fail(str(e.args[0]), 2)
    except (FileNotFoundError, ModelNotAvailable) as e:
        _fail(f"{e}\n(`pmgen models check --preset {preset}` lists every model and what is missing)")
    try:
        pmg.settings = dataclasses.replace(pmg.settings, **overrides)
    except (ValueError, TypeError) as e:
        _fail(str(e), 2)
    return pmg


WeightsOpt = Annotated[Optional[str], typer.Option(help="Candidate preference weights, e.g. '0,1,2' (0 is always "
                                                   "included: the non-personalized baseline). Default 0,0.5,1,1.5,2.")]
AlphaOpt = Annotated[Optional[float], typer.Option(
    help="Balance α in z = α·log d_p + (1−α)·log d_t. Default: the user's α learned from feedback "
         "(`pmgen feedback`, the service) when there is some, else the preset's (2/3).")]
ModeOpt = Annotated[Optional[str], typer.Option(help="Weighting mode: concat (paper) or guidance (continuous).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Noise seed shared by all candidates (default 0).")]
StrengthOpt = Annotated[Optional[float], typer.Option(help="Image-to-image strength (default: the preset's).")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Sampler steps (default: the preset's).")]
KOpt = Annotated[Optional[int], typer.Option("--keywords", help="Number of preference keywords (default 8).")]
HistOpt = Annotated[Optional[float], typer.Option(help="Share of history-image similarity in d_p (default 0).")]
MinAccOpt = Annotated[Optional[float], typer.Option(
    help="Choose only candidates whose d_t is at least this share of the w = 0 baseline's (0 = no guard).")]
SoftOpt = Annotated[Optional[str], typer.Option(
    help="Soft-prompt weights (folder or zoo:..., e.g. zoo:sticker-tiny/soft-prompt) for the soft preference "
         "embeddings, or 'off' (default: the preset's).")]
PresetOpt = Annotated[str, typer.Option(help="Model preset (see `pmgen models list`).")]
GeneratorOpt = Annotated[Optional[str], typer.Option(
    help="Generator weights to use instead of the preset's (a folder or zoo:..., e.g. "
         "zoo:sticker-tiny/generator-compose).")]


def _learned_alpha(pmg, data_root: Optional[Path]):
    """``user_id → (α, source)`` from the feedback in the shared store, or ``None`` for a user without any."""
    from pmgen.feedback import balance_from_store, open_store

    store = open_store(data_root)

    def alpha_of(user_id: str):
        if store is None:
            return None
        b = balance_from_store(store, user_id, pmg.settings.alpha)
        return b.alpha(pmg.settings.alpha) if b.n_events else None

    return alpha_of


def _soft(soft_prompt: Optional[str], generator: Optional[str] = None) -> dict:
    """Preset overrides: soft-prompt weights (or ``off``) and generator weights, when given."""
    out: dict = {}
    if soft_prompt is not None:
        out["soft_prompt"] = "" if soft_prompt.strip().lower() in ("off", "none", "") else soft_prompt
    if generator is not None:
        out["generator"] = generator
    return out


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
    from pmgen import requests as rq

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
            done, failed = rq.run_batch(pmg, batch, batch_out, data_dir_, console, err, requests=parsed,
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
    from pmgen.bench import run_bench

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
def evaluate(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/eval"),
    n_samples: Annotated[int, typer.Option(help="Held-out samples (one per user).")] = 60,
    quick: Annotated[bool, typer.Option(help="A small subset (8 samples, weights 0,1,2) for CI-sized checks.")] = False,
    methods: Annotated[Optional[str], typer.Option(
        help="Comma-separated methods (default: every one whose models exist): none, keywords, keywords-guidance, "
             "soft, pmg, and the soft-prompt ablations found in the zoo.")] = None,
    lpips: Annotated[bool, typer.Option(help="Also ST-LPIPS to target and history (slower).")] = True,
    keep_images: Annotated[int, typer.Option(help="Samples shown in samples.png.")] = 8,
    split: Annotated[str, typer.Option(help="Users to evaluate on: test (report numbers) or val (choose settings "
                                            "without touching the test users).")] = "test",
    soft_prompt: SoftOpt = None,
    preset: PresetOpt = "sticker-tiny",
    weights: WeightsOpt = None, alpha: AlphaOpt = None, seed: SeedOpt = None, strength: StrengthOpt = None,
    history_weight: HistOpt = None, min_accuracy: MinAccOpt = None, generator: GeneratorOpt = None,
    reference: Annotated[bool, typer.Option(help="Also grade the real target images (the accuracy ceiling).")] = True,
    data_dir_: DataDirOpt = None,
) -> None:
    """PMG vs. no personalization (and the ablations) on held-out sticker users, graded by the evaluator."""
    import time as _time

    from pmgen.evaluate import Grader, default_methods, evaluation_samples, run_methods, write_outputs
    from pmgen.presets import load_scorer, soft_prompt_ablations
    from pmgen.soft import SoftPromptEncoder

    overrides = _settings_overrides(weights or ("0,1,2" if quick else None), alpha, None, seed, strength, None, None,
                                    history_weight, min_accuracy)
    pmg = _load_pmg(preset, overrides, **_soft(soft_prompt, generator))
    ablations = soft_prompt_ablations(pmg.preset)
    known = default_methods(pmg.soft_prompt is not None, ablations)
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(known)
    bad = [m for m in names if m not in known]
    if bad:
        _fail(f"unknown or unavailable method(s) {bad}; available with preset {preset}: {', '.join(known)}"
              + ("" if pmg.soft_prompt is not None else " (soft-embedding methods need trained soft-prompt weights)"),
              2)
    ds = datasets.load("sticker-users", data_dir_)
    if split not in ("test", "val"):
        _fail(f"--split must be test or val, got {split!r}", 2)
    samples = evaluation_samples(ds, 8 if quick else n_samples, split=split)
    evaluator = load_scorer(pmg.preset, "evaluator", pmg.text_encoder)
    lp = None
    if lpips:
        from pmgen.metrics import STLPIPS

        lp = STLPIPS("alex")
    from pmgen.datasets.sticker_users import TASTES

    grader = Grader(evaluator, datasets.load("stickers", data_dir_), lp, tastes=[t.description for t in TASTES])
    from rich.progress import Progress

    t0 = _time.perf_counter()
    with Progress(console=console) as bar:
        task = bar.add_task(f"evaluating {len(names)} methods", total=len(samples))
        rows, kept = run_methods(pmg, grader, ds, samples, [known[m] for m in names],
                                 progress=lambda i, n: bar.update(task, completed=i), keep_images=keep_images,
                                 soft_loader=lambda f: SoftPromptEncoder.load(Path(f), pmg.llm), reference=reference)
    main = "pmg" if "pmg" in names else "keywords" if "keywords" in names else None
    meta = {"split": split, "n_samples": len(samples), "n_users": len({s.user_id for s in samples}), "methods": names,
            "method_descriptions": {**{m: known[m].description for m in names},
                                    **({"target image": "the real target image, not generated (the accuracy ceiling)"} if reference else {})},
            "evaluator": evaluator.name, "alpha": pmg.settings.alpha,
            "min_accuracy": pmg.settings.min_accuracy, "weights": list(pmg.settings.weights),
            "settings": {k: str(v) for k, v in vars(pmg.settings).items()}, "models": pmg.models(pmg.soft_prompt),
            "seconds": round(_time.perf_counter() - t0, 1)}
    report = write_outputs(out, rows, meta, kept, main_method=main)
    console.print(report.read_text().split("## Fixed")[0], highlight=False)
    console.print(f"[green]✓[/] {out}/report.md, metrics.json, tradeoff.png, alpha_sweep.png, samples.png "
                  f"({meta['seconds']:.0f} s)")


def _load_keyword_models(preset: str, text_encoder: bool = True):
    """The preset, its LLM and (optionally) its text encoder; a clear error when one cannot be loaded."""
    from pmgen.models.llm import ModelNotAvailable
    from pmgen.presets import get_preset, load_llm, load_text_encoder

    try:
        p = get_preset(preset)
    except KeyError as e:
        _fail(str(e.args[0]), 2)
    try:
        llm = load_llm(p)
        te = load_text_encoder(p) if text_encoder else None
    except (FileNotFoundError, ModelNotAvailable, ValueError) as e:
        _fail(f"{e}\n(`pmgen models check --preset {preset}` lists every model and what is missing)")
    return p, llm, te


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    t = Table(*header, title=title)
    for r in rows:
        t.add_row(*r)
    console.print(t)


@app.command("evaluate-movielens")
def evaluate_movielens(
    n_users: Annotated[Optional[int], typer.Option(help="Test users (seeded subset; default: every test user "
                                                   "with held-out likes, ~95).", min=1)] = None,
    out: Annotated[Path, typer.Option(help="Output folder (movielens.json, movielens.md).")] = Path("runs/eval"),
    k: Annotated[int, typer.Option("--k", help="Cut-off of HR@k and NDCG@k.", min=1)] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the user subset, the random ranking and the bootstrap.")] = 0,
    budget_tokens: Annotated[int, typer.Option(help="Token budget of the history the LLM reads (newest first; "
                                                     "MovieLens histories are long).", min=16)] = 512,
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Do the LLM's preference keywords predict real MovieLens users' later likes? HR@k / NDCG@k per method."""
    from rich.progress import Progress

    from pmgen.preference_eval import (encoder_text_vectors, movielens_benchmark, movielens_table,
                                       write_movielens_outputs)
    from pmgen.preferences import KeywordCache, PreferenceExtractor, model_id

    try:
        ds = datasets.load("movielens", data_dir_)
    except (DataError, FileNotFoundError) as e:
        _fail(str(e))
    p, llm, te = _load_keyword_models(preset)
    extractor = PreferenceExtractor(llm, k=8, cache=KeywordCache(), budget_tokens=budget_tokens)
    with Progress(console=console) as bar:
        task = bar.add_task("preference keywords", total=n_users)
        try:
            result = movielens_benchmark(ds, encoder_text_vectors(te), extractor.extract, n_users=n_users, k=k,
                                         seed=seed, progress=lambda i, n: bar.update(task, completed=i, total=n))
        except ValueError as e:
            _fail(str(e))
    result["models"] = {"llm": model_id(llm), "text_encoder": str(getattr(te, "name", type(te).__name__))}
    result["preset"] = p.name
    result["budget_tokens"] = budget_tokens
    result["credit"] = ds.meta.get("license", "")
    js, md = write_movielens_outputs(result, out)
    header, rows = movielens_table(result)
    _print_table(f"MovieLens-100k, {result['n_users']} test users (mean [95% CI])", header, rows)
    t = result["timing_s"]
    console.print(f"keywords: {t['keywords_per_user']:.2f} s per user ({result['counts']['keywords_cached']} cached, "
                  f"{result['counts']['keyword_fallbacks']} with a fallback); movie vectors {t['item_vectors']:.1f} s",
                  highlight=False)
    console.print(f"[green]✓[/] {js}, {md}", highlight=False)


@app.command()
def feedback(
    run_dir: Annotated[Path, typer.Argument(help="A result folder of `pmgen generate` (holds record.json).")],
    pick: Annotated[Optional[int], typer.Option(help="The user picked candidate N (0 = the w = 0 baseline).")] = None,
    like: Annotated[Optional[int], typer.Option(help="The user liked candidate N.")] = None,
    dislike: Annotated[Optional[int], typer.Option(help="The user disliked candidate N.")] = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """Record a user's feedback on a result; their next generations use the α learned from it."""
    from pmgen.feedback import balance_from_store, open_store
    from pmgen.paths import check_id
    from pmgen.select import DEFAULT_ALPHA
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


@app.command("evaluate-feedback")
def evaluate_feedback(
    n_users: Annotated[int, typer.Option(help="Users per split (seeded subset).", min=1)] = 40,
    rounds: Annotated[int, typer.Option(help="Requests (and picks) per user.", min=1)] = 10,
    noise: Annotated[float, typer.Option(help="Std of the simulated users' pick noise (utility units).",
                                         min=0.0)] = 0.01,
    out: Annotated[Path, typer.Option(help="Output folder (feedback.json, feedback.md, feedback_regret.png; "
                                           "candidate caches, resumable).")] = Path("runs/eval"),
    seed: Annotated[int, typer.Option(help="Seed of the users, their hidden α*, the noise and the bootstrap.")] = 0,
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Simulated users with a hidden α*: does learning each user's α from their picks beat one α for all?"""
    from rich.progress import Progress

    from pmgen import feedback_eval as fe
    from pmgen.datasets.sticker_users import TASTES
    from pmgen.evaluate import Grader
    from pmgen.presets import load_scorer

    pmg = _load_pmg(preset, {})
    ds = datasets.load("sticker-users", data_dir_)
    grader = Grader(load_scorer(pmg.preset, "evaluator", pmg.text_encoder), datasets.load("stickers", data_dir_),
                    perceptual=False, tastes=[t.description for t in TASTES])
    tables = {}
    with Progress(console=console) as bar:
        for split in ("val", "test"):
            task = bar.add_task(f"candidates ({split} users)", total=n_users * rounds)
            tables[split] = fe.candidate_rounds(pmg, grader, ds, split, n_users, rounds,
                                                out / f"feedback_candidates_{split}.jsonl", seed,
                                                progress=lambda i, n, t=task: bar.update(t, completed=i))
    stars = {s: fe.simulated_users(list(t), seed=seed + (0 if s == "test" else 1)) for s, t in tables.items()}
    temperature = fe.tune_temperature(tables["val"], stars["val"], noise, seed)
    global_alpha = fe.tune_global_alpha(tables["val"], stars["val"], noise, seed)
    rows = fe.simulate(tables["test"], stars["test"], noise, global_alpha=global_alpha, temperature=temperature,
                       seed=seed)
    summary = fe.summarize(rows)
    separable = [r["separable"] for r in rows if r["method"] == "fixed"]
    result = {"split": "test", "n_users": len(tables["test"]), "n_rounds": rounds, "noise": noise,
              "global_alpha": global_alpha, "temperature": temperature,
              "separable_share": sum(separable) / max(len(separable), 1), "summary": summary, "rows": rows,
              "models": pmg.models(), "evaluator": grader.evaluator.name}
    js, md = fe.write_outputs(out, result)
    console.print(md.read_text(), highlight=False, markup=False)
    console.print(f"[green]✓[/] {js}, {md}, {out / 'feedback_regret.png'}", highlight=False)


@app.command("evaluate-leaks")
def evaluate_leaks(
    n_users: Annotated[Optional[int], typer.Option(help="Users (seeded subset; default: every user of the split).",
                                                   min=1)] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path, typer.Option(help="Output folder (leaks.json, leaks.md).")] = Path("runs/eval"),
    seed: Annotated[int, typer.Option(help="Seed of the user subset and the bootstrap.")] = 0,
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Few-shot leaks, fallbacks and the hidden taste in the preference keywords of sticker users."""
    from rich.progress import Progress

    from pmgen.preference_eval import evaluation_users, leak_check, leak_table, write_leak_outputs
    from pmgen.preferences import KeywordCache, PreferenceExtractor, few_shot_keywords, model_id

    if split not in ("train", "val", "test"):
        _fail(f"unknown split {split!r}; choose train, val or test", 2)
    try:
        ds = datasets.load("sticker-users", data_dir_)
        users = evaluation_users(ds, n_users, split, seed)
    except (DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    p, llm, _ = _load_keyword_models(preset, text_encoder=False)
    extractor = PreferenceExtractor(llm, k=8, cache=KeywordCache())
    with Progress(console=console) as bar:
        task = bar.add_task("keywords", total=len(users))
        try:
            result = leak_check(users, ds.items, extractor.extract, few_shot_keywords(extractor.prompt_version),
                                seed=seed, progress=lambda i, n: bar.update(task, completed=i))
        except ValueError as e:
            _fail(str(e))
    result = {"dataset": "sticker-users", "split": split, "preset": p.name, "models": {"llm": model_id(llm)}, **result}
    js, md = write_leak_outputs(result, out)
    header, rows = leak_table(result)
    _print_table(f"Keyword leaks, {result['n_users']} sticker-users {split} users (mean [95% CI])", header, rows)
    console.print(f"[green]✓[/] {js}, {md}", highlight=False)


@app.command("evaluate-stability")
def evaluate_stability(
    n_users: Annotated[int, typer.Option(help="Test users (seeded subset).", min=1)] = 30,
    out: Annotated[Path, typer.Option(help="Output folder (stability.json, stability.md).")] = Path("runs/eval"),
    dataset: Annotated[str, typer.Option(help="sticker-users or movielens.")] = "sticker-users",
    seed: Annotated[int, typer.Option(help="Seed of the user subset, the perturbations and the bootstrap.")] = 0,
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Are preference keywords stable when the history is reordered or loses one event? (Jaccard per user)."""
    from rich.progress import Progress

    from pmgen.preference_eval import evaluation_users, keyword_stability, stability_table, write_stability_outputs
    from pmgen.preferences import KeywordCache, PreferenceExtractor, model_id

    if dataset not in ("sticker-users", "movielens"):
        _fail(f"unknown dataset {dataset!r} for the stability benchmark; choose sticker-users or movielens", 2)
    try:
        ds = datasets.load(dataset, data_dir_)
        users = evaluation_users(ds, n_users, "test", seed)
    except (DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    p, llm, _ = _load_keyword_models(preset, text_encoder=False)
    extractor = PreferenceExtractor(llm, k=8, cache=KeywordCache())
    with Progress(console=console) as bar:
        task = bar.add_task("keywords (3 histories per user)", total=len(users))
        try:
            result = keyword_stability(users, ds.items, extractor.extract, seed=seed,
                                       progress=lambda i, n: bar.update(task, completed=i))
        except ValueError as e:
            _fail(str(e))
    result = {"dataset": dataset, "preset": p.name, "models": {"llm": model_id(llm)}, **result}
    js, md = write_stability_outputs(result, out)
    header, rows = stability_table(result)
    _print_table(f"Keyword stability, {result['n_users']} {dataset} test users (mean [95% CI])", header, rows)
    console.print(f"{result['timing_s']['per_user']:.2f} s per user (3 extractions, cached ones are free); "
                  f"{result['counts']['keyword_fallbacks']} extractions used a fallback", highlight=False)
    console.print(f"[green]✓[/] {js}, {md}", highlight=False)


@models_app.command("list")
def models_list() -> None:
    """List the presets and the model each one names per role."""
    from pmgen.presets import PRESETS, ROLES

    for p in PRESETS.values():
        console.rule(f"[bold]{p.name}")
        console.print(p.description, highlight=False)
        for role in ROLES:
            console.print(f"  {role:13s} {getattr(p, role)}", highlight=False)
        console.print(f"  soft_prompt   {p.soft_prompt or '(off: no trained soft prompt in this preset)'}",
                      highlight=False)
        console.print(f"  settings      {p.image_size}px, strength {p.strength}, {p.num_inference_steps} steps, "
                      f"guidance {p.guidance_scale}", highlight=False)


@models_app.command("check")
def models_check(
    preset: Annotated[str, typer.Option(help="Preset to check.")] = "sticker-tiny",
) -> None:
    """Load every model of a preset offline; print name, size, content hash and load time.

    Exits non-zero, naming what is missing, when any model cannot be loaded.
    """
    from pmgen.presets import check_preset, get_preset

    try:
        p = get_preset(preset)
    except KeyError as e:
        _fail(str(e.args[0]), 2)
    t = Table("role", "model", "parameters", "size on disk", "content hash", "load s", "status")
    statuses = check_preset(p)
    for st in statuses:
        t.add_row(st.role, st.name or st.ref, f"{st.parameters / 1e6:.2f} M" if st.parameters else "-",
                  f"{st.size_bytes / 2**20:.1f} MiB" if st.size_bytes else "-", st.content_hash or "-",
                  f"{st.load_seconds:.2f}" if st.ok else "-", "[green]ok[/]" if st.ok else "[red]missing[/]")
    console.print(t)
    bad = [st for st in statuses if not st.ok]
    for st in bad:
        err.print(f"[red]{st.role}[/] ({st.ref}): {st.error}", highlight=False)
    if bad:
        _fail(f"{len(bad)} model(s) of preset '{p.name}' could not be loaded offline")


@models_app.command("report")
def models_report(
    preset: PresetOpt = "sticker-tiny",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <generator folder>/report).")] = None,
    n_items: Annotated[int, typer.Option(help="Catalog items in the faithful / from-noise tests.")] = 150,
    seed: SeedOpt = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """Quality figures of the sticker generator (faithful, editable, from noise, speed), graded by the evaluator."""
    from pmgen.models.quality import quality_report
    from pmgen.presets import get_preset, load_generator, load_scorer, load_text_encoder, resolve

    p = get_preset(preset)
    if p.generator_kind != "sticker":
        _fail("`models report` measures pmgen's own sticker generator (preset sticker-tiny)", 2)
    gen = load_generator(p)
    te = load_text_encoder(p, gen)
    ev = load_scorer(p, "evaluator", te)
    folder = out or Path(resolve(p.generator)) / "report"
    quality_report(gen, te, ev, folder, n_items=n_items, default_strength=p.strength, steps=p.num_inference_steps,
                   guidance=p.guidance_scale, seed=seed or 0, data_root=data_dir_,
                   log=lambda m: console.print(m, highlight=False))
    console.print(f"[green]✓[/] {folder}/quality.json, strength_curve.png, samples.png")



ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run whose checkpoint is in the train dir "
                                         "(its settings come from the checkpoint; only run control may change).")]


@train_app.command("scorer")
@config_options(ScorerTrainConfig, always=ScorerTrainConfig.INVOCATION_FIELDS)
def train_scorer(given: dict, resume: ResumeOpt = False) -> None:
    """Train the selector or evaluator scorer on the sticker catalog."""
    from pmgen.train.scorer.main import main as scorer_main

    raise typer.Exit(scorer_main(given, resume=resume))


@train_app.command("generator")
@config_options(GeneratorTrainConfig, always=GeneratorTrainConfig.INVOCATION_FIELDS)
def train_generator(given: dict, resume: ResumeOpt = False,
                    write_card: Annotated[bool, typer.Option("--write-card", help="Only (re)write the model card of --out from "
                                                             "the training logs, then exit.")] = False) -> None:
    """Train the sticker generator (from scratch, or a composition fine-tune with --init-from)."""
    from pmgen.train.generator.main import main as generator_main

    raise typer.Exit(generator_main(given, resume=resume, write_card=write_card))


@train_app.command("soft-prompt")
@config_options(SoftPromptTrainConfig, always=SoftPromptTrainConfig.INVOCATION_FIELDS)
def train_soft_prompt(given: dict, resume: ResumeOpt = False,
                      preset: Annotated[str, typer.Option(help="Preset whose LLM, text encoder and generator "
                                                          "to use.")] = "sticker-tiny") -> None:
    """Train the soft preference embeddings against the preset's frozen generator."""
    from pmgen.train.soft_prompt.main import main as soft_main

    raise typer.Exit(soft_main(given, resume=resume, preset=preset))


app.command("serve")(serve)
app.command("bench-serve")(bench_serve)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
