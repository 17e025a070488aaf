"""The evaluation commands: `pmgen evaluate`, `evaluate-movielens`, `-feedback`, `-leaks`, `-stability`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

# light imports: the trainers' settings classes and the service's commands load torch / FastAPI only when run
from pmgen.cli.app import (
    AlphaOpt,
    DataDirOpt,
    EvaluatorOpt,
    GeneratorOpt,
    SelectorOpt,
    HistOpt,
    MinAccOpt,
    PresetOpt,
    SeedOpt,
    SoftOpt,
    StrengthOpt,
    SurroundOpt,
    WeightsOpt,
    _fail,
    eval_command,
    _load_keyword_models,
    _load_pmg,
    _print_table,
    _settings_overrides,
    _soft,
    console,
    progress_bar,
)
from pmgen.data import datasets
from pmgen.data.schema import DataError


@eval_command("personalization", "evaluate")
def evaluate(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/eval"),
    n_samples: Annotated[int, typer.Option(help="Held-out samples (one per user first, then each user's next one).",
                                           min=1)] = 60,
    skip_samples: Annotated[int, typer.Option(help="Skip the first samples of that order (100 = every user's second "
                                                   "request: targets an earlier 100-sample run never saw).",
                                              min=0)] = 0,
    quick: Annotated[bool, typer.Option(help="A small subset (8 samples, weights 0,1,2) for CI-sized checks.")] = False,
    methods: Annotated[Optional[str], typer.Option(
        help="Comma-separated methods (default: every one whose models exist): none, keywords, keywords-guidance, "
             "soft, pmg, pmg-compose, pmg-contrast, pmg-compose-contrast, pmg-compose-history, pmg-compose-both, "
             "pmg-guidance-contrast (with a "
             "preference background), keywords+images, pmg+images, pmg+images-compose (with a history-image "
             "encoder) and the soft-prompt ablations found in the zoo.")] = None,
    lpips: Annotated[bool, typer.Option(help="Also ST-LPIPS to target and history (slower).")] = True,
    keep_images: Annotated[int, typer.Option(help="Samples shown in samples.png.")] = 8,
    split: Annotated[str, typer.Option(help="Users to evaluate on: test (report numbers) or val (choose settings "
                                            "without touching the test users).")] = "test",
    users_seed: Annotated[int, typer.Option(
        help="Draw the synthetic users with this seed: 0 = the users pmgen's models and settings were made with; "
             "another seed builds a new population (sticker-users-seed{N}) that no model or setting has seen, "
             "for a fresh held-out test.", min=0, max=2**31 - 1)] = 0,
    soft_prompt: SoftOpt = None,
    preset: PresetOpt = "sticker-tiny",
    weights: WeightsOpt = None, alpha: AlphaOpt = None, seed: SeedOpt = None, strength: StrengthOpt = None,
    history_weight: HistOpt = None, min_accuracy: MinAccOpt = None, surround_strength: SurroundOpt = None,
    generator: GeneratorOpt = None,
    selector: SelectorOpt = None, evaluator: EvaluatorOpt = None,
    reference: Annotated[bool, typer.Option(help="Also grade the real target images (the accuracy ceiling).")] = True,
    data_dir_: DataDirOpt = None,
) -> None:
    """PMG vs. no personalization (and the ablations) on held-out sticker users, graded by the evaluator."""
    import time as _time

    from pmgen.eval.evaluate import default_methods, evaluation_samples, run_methods
    from pmgen.eval.grading import sticker_grader
    from pmgen.eval.report import write_outputs
    from pmgen.presets import load_scorer, soft_prompt_ablations
    from pmgen.stages.soft import SoftPromptEncoder

    overrides = _settings_overrides(weights or ("0,1,2" if quick else None), alpha, None, seed, strength, None, None,
                                    history_weight, min_accuracy, surround_strength=surround_strength)
    pmg = _load_pmg(preset, overrides, **_soft(soft_prompt, generator, selector, evaluator))
    ablations = soft_prompt_ablations(pmg.preset)
    known = default_methods(pmg.soft_prompt is not None, ablations, pmg.history_encoder is not None,
                            bool(pmg.preset.preference_background))
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(known)
    bad = [m for m in names if m not in known]
    if bad:
        _fail(f"unknown or unavailable method(s) {bad}; available with preset {preset}: {', '.join(known)}"
              + ("" if pmg.soft_prompt is not None else " (soft-embedding methods need trained soft-prompt weights)")
              + (f" (history-image methods: {pmg.history_encoder_refused})" if pmg.history_encoder_refused else ""),
              2)
    if split not in ("test", "val"):
        _fail(f"--split must be test or val, got {split!r}", 2)
    ds = datasets.load("sticker-users", data_dir_, seed=users_seed)
    samples = evaluation_samples(ds, 8 if quick else n_samples, split=split, skip=skip_samples)
    if not samples:
        _fail(f"--skip-samples {skip_samples}: the {split} split has no samples left after it", 2)
    try:
        evaluator_model = load_scorer(pmg.preset, "evaluator", pmg.text_encoder)
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(f"--evaluator {pmg.preset.evaluator}: {e}")
    lp = None
    if lpips:
        from pmgen.eval.metrics import STLPIPS

        lp = STLPIPS("alex")
    grader = sticker_grader(evaluator_model, data_dir_, lp)
    t0 = _time.perf_counter()
    with progress_bar(f"evaluating {len(names)} methods", len(samples)) as update:
        rows, kept = run_methods(pmg, grader, ds, samples, [known[m] for m in names],
                                 progress=update, keep_images=keep_images,
                                 soft_loader=lambda f: SoftPromptEncoder.load(Path(f), pmg.llm), reference=reference)
    main = "pmg" if "pmg" in names else "keywords" if "keywords" in names else None
    meta = {"split": split, "users_seed": users_seed, "n_samples": len(samples), "skip_samples": skip_samples,
            "n_users": len({s.user_id for s in samples}), "methods": names,
            "method_descriptions": {**{m: known[m].description for m in names},
                                    **({"target image": "the real target image, not generated (the accuracy ceiling)"} if reference else {})},
            "evaluator": evaluator_model.name, "evaluator_weights": pmg.preset.evaluator, "alpha": pmg.settings.alpha,
            "min_accuracy": pmg.settings.min_accuracy, "weights": list(pmg.settings.weights),
            "settings": {k: str(v) for k, v in vars(pmg.settings).items()},
            "models": pmg.models(pmg.soft_prompt, pmg.history_encoder),
            "seconds": round(_time.perf_counter() - t0, 1)}
    report = write_outputs(out, rows, meta, kept, main_method=main)
    console.print(report.read_text().split("## Fixed")[0], highlight=False)
    console.print(f"[green]✓[/] {out}/report.md, metrics.json, tradeoff.png, alpha_sweep.png, samples.png "
                  f"({meta['seconds']:.0f} s)")

@eval_command("movielens", "evaluate-movielens")
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
    from pmgen.eval.movielens import (
        encoder_text_vectors,
        movielens_benchmark,
        movielens_table,
        write_movielens_outputs,
    )
    from pmgen.stages.keywords import KeywordCache, PreferenceExtractor, model_id

    try:
        ds = datasets.load("movielens", data_dir_)
    except (DataError, FileNotFoundError) as e:
        _fail(str(e))
    p, llm, te = _load_keyword_models(preset)
    extractor = PreferenceExtractor(llm, k=8, cache=KeywordCache(), budget_tokens=budget_tokens)
    result = _with_progress("preference keywords", n_users, lambda progress: movielens_benchmark(
        ds, encoder_text_vectors(te), extractor.extract, n_users=n_users, k=k, seed=seed, progress=progress))
    result["models"] = {"llm": model_id(llm), "text_encoder": str(getattr(te, "name", type(te).__name__))}
    result["preset"] = p.name
    result["budget_tokens"] = budget_tokens
    result["credit"] = ds.meta.get("license", "")
    t = result["timing_s"]
    _show_result(result, out, write_movielens_outputs, movielens_table,
                 f"MovieLens-100k, {result['n_users']} test users (mean [95% CI])",
                 f"keywords: {t['keywords_per_user']:.2f} s per user ({result['counts']['keywords_cached']} cached, "
                 f"{result['counts']['keyword_fallbacks']} with a fallback); movie vectors {t['item_vectors']:.1f} s")

@eval_command("text", "evaluate-text")
def evaluate_text(
    n_users: Annotated[int, typer.Option(help="Held-out MovieLens test users (in id order).", min=1, max=2000)] = 100,
    weights: WeightsOpt = None, alpha: AlphaOpt = None,
    out: Annotated[Path, typer.Option(help="Output folder (text.json, text.md).")] = Path("runs/eval/text"),
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Personalized pitches on MovieLens-100k: taste gain and faithfulness against the plain pitch."""
    import json

    from pmgen.eval.stats import format_ci
    from pmgen.eval.text import run_text_eval

    try:
        ds = datasets.load("movielens", data_dir_)
    except (DataError, FileNotFoundError) as e:
        _fail(str(e))
    pmg = _load_pmg(preset, {"budget_tokens": 512})  # MovieLens histories are long (as `pmgen eval movielens`)
    ws = tuple(float(x) for x in weights.split(",")) if weights else (0.0, 1.0, 2.0)
    result = _with_progress("pitches", n_users, lambda progress: run_text_eval(
        pmg, ds, n_users=n_users, weights=ws, alpha=alpha, progress=progress))
    s = result["summary"]
    header = ["text", "taste (names a genre the user over-represents)", "faithful", "taste gain vs plain",
              "faithful / plain"]
    rows = [["plain (w = 0)", format_ci(s["plain_taste"]), format_ci(s["plain_faithful"]), "–", "–"]]
    for which, label in (("chosen", "chosen by z"), ("w1", "w = 1")):
        rows.append([label, format_ci(s[f"{which}_taste"]), format_ci(s[f"{which}_faithful"]),
                     format_ci(s[f"{which}_taste_gain"]), f"{s[f'{which}_faithful_ratio']:.3f}"])
    _print_table(f"MovieLens-100k, {result['n_users']} test users: one-line pitches (mean [95% CI])", header, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "| user's top genres | movie | plain | personalized (chosen) |", "|---|---|---|---|"]
    for r in result["rows"][:8]:
        esc = [str(x).replace("|", "\\|") for x in (", ".join(r["user_top_genres"]), r["target"],
                                                       r["plain"]["text"], r["chosen"]["text"])]
        lines.append("| " + " | ".join(esc) + " |")
    (out / "text.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"[green]✓[/] {out / 'text.json'}, {out / 'text.md'} "
                  f"({result['seconds'] / max(1, result['n_users']):.1f} s per user)", highlight=False)


@eval_command("feedback", "evaluate-feedback")
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
    from pmgen.eval import feedback as fe
    from pmgen.eval.grading import sticker_grader
    from pmgen.presets import load_scorer

    pmg = _load_pmg(preset, {})
    ds = datasets.load("sticker-users", data_dir_)
    grader = sticker_grader(load_scorer(pmg.preset, "evaluator", pmg.text_encoder), data_dir_, perceptual=False)
    tables = {}
    for split in ("val", "test"):
        with progress_bar(f"candidates ({split} users)", n_users * rounds) as update:
            tables[split] = fe.candidate_rounds(pmg, grader, ds, split, n_users, rounds,
                                                out / f"feedback_candidates_{split}.jsonl", seed, progress=update)
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


@eval_command("judge", "evaluate-judge")
def evaluate_judge(
    n_samples: Annotated[int, typer.Option(help="Samples (one per user, as `pmgen evaluate` picks them).",
                                           min=1, max=1000)] = 60,
    split: Annotated[str, typer.Option(help="val or test.")] = "val",
    out: Annotated[Path, typer.Option(help="Output folder (judge.json, judge.md, judge_examples.png).")] = Path(
        "runs/eval"),
    seed: Annotated[int, typer.Option(help="Seed of the taste elements, their corners and the bootstrap.")] = 0,
    lpips: Annotated[bool, typer.Option(help="Also ST-LPIPS to the user's history images, and a row for a sticker "
                                             "the user sent (against the rest of the history); slower.")] = False,
    evaluator: EvaluatorOpt = None,
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """What can the evaluator credit as "the target, in this user's taste"? Real images and composites, no generation."""
    from pmgen.eval.evaluate import evaluation_samples
    from pmgen.eval.grading import sticker_grader
    from pmgen.eval.judge import bound_sentence, judge_check, judge_table, write_judge_outputs
    from pmgen.presets import get_preset, load_scorer
    from pmgen.composites import heldout_from_sticker_users

    if split not in ("val", "test"):
        _fail(f"--split must be val or test, got {split!r}", 2)
    try:
        p = get_preset(preset, **_soft(None, evaluator=evaluator))
    except (KeyError, ValueError) as e:
        _fail(str(e.args[0]) if e.args else str(e), 2)
    try:
        ev = load_scorer(p, "evaluator")
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(f"--evaluator {p.evaluator}: {e}")
    try:
        ds = datasets.load("sticker-users", data_dir_)
        grader = sticker_grader(ev, data_dir_, perceptual=False)
    except (DataError, FileNotFoundError) as e:
        _fail(str(e))
    if lpips:
        from pmgen.eval.metrics import STLPIPS

        grader.lpips = STLPIPS("alex")
    samples = evaluation_samples(ds, n_samples, split=split)
    _, truths = heldout_from_sticker_users(ds.samples)
    result = _with_progress("grading", len(samples), lambda progress: judge_check(
        grader, ds, samples, truths, seed=seed, progress=progress, history=lpips))
    result = {**result, "split": split, "evaluator": ev.name, "evaluator_weights": p.evaluator}
    _show_result(result, out, write_judge_outputs, judge_table,
                 f"What the evaluator credits, {result['n_samples']} {split} samples (mean [95% CI])",
                 "\n".join(x for x in (bound_sentence(result),
                                       f"{out / 'judge_examples.png'}: the images of the first samples") if x))


@eval_command("leaks", "evaluate-leaks")
def evaluate_leaks(
    n_users: Annotated[Optional[int], typer.Option(help="Users (seeded subset; default: every user of the split).",
                                                   min=1)] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path, typer.Option(help="Output folder (leaks.json, leaks.md).")] = Path("runs/eval"),
    seed: Annotated[int, typer.Option(help="Seed of the user subset and the bootstrap.")] = 0,
    multilingual: Annotated[bool, typer.Option(help="Also the 12 hand-written users whose taste is written only in "
                                                   "another language (English keywords? taste named?).")] = True,
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Few-shot leaks, fallbacks and the hidden taste in the preference keywords of sticker users."""
    from pmgen.eval.leaks import leak_check, leak_table, multilingual_check, write_leak_outputs
    from pmgen.stages.keywords import few_shot_keywords, model_id

    if split not in ("train", "val", "test"):
        _fail(f"unknown split {split!r}; choose train, val or test", 2)
    ds, users, p, llm, extractor = _keyword_benchmark_inputs("sticker-users", split, n_users, seed, preset, data_dir_)
    result = _with_progress("keywords", len(users), lambda progress: leak_check(
        users, ds.items, extractor.extract, few_shot_keywords(extractor.prompt_version), seed=seed, progress=progress))
    result = {"dataset": "sticker-users", "split": split, "preset": p.name, "models": {"llm": model_id(llm)}, **result}
    if multilingual:
        result["multilingual"] = multilingual_check(ds.items, extractor.extract, seed=seed)
    _show_result(result, out, write_leak_outputs, leak_table,
                 f"Keyword leaks, {result['n_users']} sticker-users {split} users (mean [95% CI])")


@eval_command("stability", "evaluate-stability")
def evaluate_stability(
    n_users: Annotated[int, typer.Option(help="Test users (seeded subset).", min=1)] = 30,
    out: Annotated[Path, typer.Option(help="Output folder (stability.json, stability.md).")] = Path("runs/eval"),
    dataset: Annotated[str, typer.Option(help="sticker-users or movielens.")] = "sticker-users",
    seed: Annotated[int, typer.Option(help="Seed of the user subset, the perturbations and the bootstrap.")] = 0,
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Are preference keywords stable when the history is reordered or loses one event? (Jaccard per user)."""
    from pmgen.eval.stability import (
        keyword_stability,
        stability_table,
        write_stability_outputs,
    )
    from pmgen.stages.keywords import model_id

    if dataset not in ("sticker-users", "movielens"):
        _fail(f"unknown dataset {dataset!r} for the stability benchmark; choose sticker-users or movielens", 2)
    ds, users, p, llm, extractor = _keyword_benchmark_inputs(dataset, "test", n_users, seed, preset, data_dir_)
    result = _with_progress("keywords (3 histories per user)", len(users), lambda progress: keyword_stability(
        users, ds.items, extractor.extract, seed=seed, progress=progress))
    result = {"dataset": dataset, "preset": p.name, "models": {"llm": model_id(llm)}, **result}
    _show_result(result, out, write_stability_outputs, stability_table,
                 f"Keyword stability, {result['n_users']} {dataset} test users (mean [95% CI])",
                 f"{result['timing_s']['per_user']:.2f} s per user (3 extractions, cached ones are free); "
                 f"{result['counts']['keyword_fallbacks']} extractions used a fallback")


# ------------------------------------------------------------------ what the keyword benchmarks share
def _keyword_benchmark_inputs(dataset: str, split: str, n_users: Optional[int], seed: int, preset: str,
                              data_dir_: Optional[Path]) -> tuple[Any, list[Any], Any, Any, Any]:
    """The dataset, its evaluation users (a seeded subset), the preset, its LLM and a keyword extractor
    over it (k = 8, cached); every failure is a clear error."""
    from pmgen.eval.keyword_bench import evaluation_users
    from pmgen.stages.keywords import KeywordCache, PreferenceExtractor

    try:
        ds = datasets.load(dataset, data_dir_)
        users = evaluation_users(ds, n_users, split, seed)
    except (DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    p, llm, _ = _load_keyword_models(preset, text_encoder=False)
    return ds, users, p, llm, PreferenceExtractor(llm, k=8, cache=KeywordCache())


def _with_progress(label: str, total: Optional[int], run: Callable[[Callable[[int, int], None]], Any]) -> Any:
    """``run(progress)`` under a progress bar; a ``ValueError`` it raises is a clear error."""
    with progress_bar(label, total) as update:
        try:
            return run(update)
        except ValueError as e:
            _fail(str(e))


def _show_result(result: dict[str, Any], out: Path, write: Callable[[Any, Path], tuple[Path, Path]],
                 table: Callable[[Any], tuple[list[str], list[list[str]]]], title: str, note: str = "") -> None:
    """Write a benchmark's JSON and Markdown, print its table (and ``note``) and where it went."""
    js, md = write(result, out)
    header, rows = table(result)
    _print_table(title, header, rows)
    if note:
        console.print(note, highlight=False)
    console.print(f"[green]✓[/] {js}, {md}", highlight=False)
