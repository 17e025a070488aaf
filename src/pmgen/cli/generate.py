"""`pmgen generate`, `demo`, `bench` and `feedback`: the main job and its feedback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from pmgen.cli.app import (
    AlphaOpt,
    ContrastOpt,
    DataDirOpt,
    GeneratorOpt,
    HistOpt,
    KOpt,
    MinAccOpt,
    ModeOpt,
    PrefTextOpt,
    InversionOpt,
    ExemplarsOpt,
    KeepOpt,
    PresetOpt,
    SeedOpt,
    SelectorOpt,
    SoftOpt,
    StepsOpt,
    StrengthOpt,
    SurroundOpt,
    TargetTextOpt,
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


MODALITIES = ("image", "text", "both")


def _with_image_fit(pmg, res, text_result) -> dict:
    """The text's record, with its fit to the chosen image (the selector's ``s(image · text)``)."""
    from pmgen.stages.select import to_unit

    out = text_result.to_json()
    out["image_fit"] = round(float(to_unit(pmg.selector.text_similarity(res.chosen_image[None], [out["text"]])[0, 0])), 6)
    return out


def _text_only(pmg, req, folder: Path, alpha, as_json: bool) -> None:
    """``--modality text``: the text candidates and the chosen one in ``folder/text.json``."""
    from pmgen.paths import write_file_atomically

    res = pmg.generate_text(req.user, req.target, req.items, alpha=alpha)
    out = {"user_id": req.user.user_id, "target_id": req.target.id, "target_title": req.target.title,
           **res.to_json()}
    folder.mkdir(parents=True, exist_ok=True)
    write_file_atomically(folder / "text.json", lambda tmp: Path(tmp).write_text(
        json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))
    if as_json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return
    console.print(f"[green]✓[/] {escape(res.text)}", highlight=False)
    for c in res.candidates:
        console.print(f"  w = {c.weight:g}: {escape(c.text)}  (d_t {c.d_t:.3f}, d_p {c.d_p:.3f})", highlight=False)
    console.print(f"  preference keywords: {', '.join(res.keywords) or '-'}; {folder / 'text.json'}", highlight=False)


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
    min_accuracy: MinAccOpt = None, target_text: TargetTextOpt = None, contrast: ContrastOpt = None,
    surround_strength: SurroundOpt = None, preference_text: PrefTextOpt = None,
    inversion: InversionOpt = None, exemplars: ExemplarsOpt = None, keep: KeepOpt = None,
    soft_prompt: SoftOpt = None, generator: GeneratorOpt = None, selector: SelectorOpt = None,
    history_images: Annotated[Optional[bool], typer.Option(
        "--history-images/--no-history-images",
        help="Add the history-image tokens (the user's history stickers through the preset's trained "
             "history-image encoder) to the condition; off by default.")] = None,
    engine: Annotated[str, typer.Option(help="Batch engine: local (this process, requests in groups) or ray "
                                        "(Ray Data: LLM actors and generator actors in parallel; needs pmgen\\[ray]).")] = "local",
    group_size: Annotated[int, typer.Option(help="Batch: requests per group (keywords of a group's cache misses in "
                                            "one LLM call, its candidates in shared UNet batches); 1 = one "
                                            "request at a time, exactly `pmgen generate`'s images.")] = 8,
    ray_address: Annotated[Optional[str], typer.Option(help="--engine ray: address of an existing Ray cluster "
                                                       "(`ray start --head` prints it); default: a local Ray.")] = None,
    actors: Annotated[Optional[int], typer.Option(help="--engine ray: generator actors (default: the cluster's "
                                                  "CPUs minus the LLM actors).")] = None,
    llm_actors: Annotated[int, typer.Option(help="--engine ray: keyword / soft-embedding (LLM) actors.")] = 1,
    stats: Annotated[Optional[Path], typer.Option(help="Batch: write the run's timings (per-request latency, "
                                                  "wall time, candidates) to this JSON file.")] = None,
    modality: Annotated[str, typer.Option(help="image (the default), text (a one-line pitch of the target in "
                                          "this user's taste, from the same keywords and weights) or both "
                                          "(the text is chosen under the same α and its fit to the chosen "
                                          "image is recorded).")] = "image",
    data_dir_: DataDirOpt = None,
) -> None:
    """Generate a personalized image (and/or text): chosen PNG, every candidate, record.json and report.html."""
    from pmgen.data import requests as rq
    from pmgen.paths import UnsafePathError, check_result_dir

    overrides = _settings_overrides(weights, alpha, mode, seed, strength, steps, keywords, history_weight, min_accuracy,
                                    target_text, contrast, surround_strength, preference_text,
                                    inversion, exemplars, keep)
    if history_images is not None:
        overrides["use_history_images"] = history_images
    if modality not in MODALITIES:
        _fail(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}", 2)
    if batch is not None and modality != "image":
        _fail("--modality text|both is for single requests (batch files make images)", 2)
    if batch is not None:
        _batch(batch, out, preset, overrides, alpha, soft_prompt, generator, selector, engine, group_size, ray_address,
               actors, llm_actors, stats, data_dir_)
        return
    if engine != "local" or ray_address is not None or actors is not None:
        _fail("--engine, --ray-address and --actors apply to --batch runs", 2)
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
    pmg = _load_pmg(preset, overrides, **_soft(soft_prompt, generator, selector))
    kwargs = req.generate_kwargs(_learned_alpha(pmg, data_dir_) if alpha is None else None)
    if modality == "text":
        _text_only(pmg, req, folder, kwargs.get("alpha"), as_json)
        return
    try:
        res = pmg.generate(req.user, req.target, req.items, **kwargs)
        if modality == "both":
            res.record.text = _with_image_fit(pmg, res, pmg.generate_text(req.user, req.target, req.items,
                                                                         alpha=res.record.alpha))
        folder = res.save(folder)
    except ValueError as e:  # an image over the limits, an output folder that became foreign meanwhile
        _fail(str(e), 2)
    if as_json:
        print(json.dumps(res.record.to_json(), indent=2, ensure_ascii=False))
    else:
        c = res.record.chosen_candidate
        start = f", redrawn from {c.start_title!r}" if c.start is not None else ""
        console.print(f"[green]✓[/] {folder}/chosen.png  (w = {c.weight:g}{escape(start)}, d_t {c.d_t:.3f}, "
                      f"d_p {c.d_p:.3f})")
        console.print(f"  preference keywords: {', '.join(res.record.preference_keywords) or '-'}", highlight=False)
        if res.record.text:
            console.print(f"  text: {escape(res.record.text['text'])}  (fit to the image "
                          f"{res.record.text['image_fit']:.3f})", highlight=False)
        console.print(f"  report: {folder}/report.html", highlight=False)
        for w in res.record.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False)


def _batch(batch: Path, out: Optional[Path], preset: str, overrides: dict, alpha: Optional[float],
           soft_prompt: Optional[str], generator: Optional[str], selector: Optional[str], engine: str, group_size: int,
           ray_address: Optional[str], actors: Optional[int], llm_actors: int, stats_path: Optional[Path],
           data_dir_: Optional[Path]) -> None:
    """`pmgen generate --batch`: every option and the batch file checked before any model loads."""
    from types import SimpleNamespace

    from pmgen.data import requests as rq
    from pmgen.paths import UnsafePathError, check_batch_root
    from pmgen.pipeline import Settings

    if engine not in ("local", "ray"):
        _fail(f"--engine must be 'local' or 'ray', got {engine!r}", 2)
    if engine == "local" and (ray_address is not None or actors is not None):
        _fail("--ray-address and --actors need --engine ray", 2)
    if group_size < 1 or (actors is not None and actors < 1) or llm_actors < 1:
        _fail("--group-size, --actors and --llm-actors must be >= 1", 2)
    if engine == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            _fail("--engine ray needs Ray: pip install 'pmgen[ray]' (or run `make setup`)", 2)
    batch_out = out or Path("runs") / batch.stem
    try:
        check_batch_root(batch_out)
        parsed = list(rq.read_batch(batch, data_dir_))
    except (DataError, UnsafePathError) as e:
        _fail(str(e), 2)
    run_stats: dict = {}
    try:
        if engine == "local":
            from pmgen.batch.local import run_batch

            pmg = _load_pmg(preset, overrides, **_soft(soft_prompt, generator, selector))
            done, failed = run_batch(pmg, batch, batch_out, data_dir_, console, err, requests=parsed,
                                     alpha_of=None if alpha is not None else _learned_alpha(pmg, data_dir_),
                                     group_size=group_size, stats=run_stats)
        else:
            from pmgen.batch.ray_engine import PresetFactory, run_batch_ray

            factory = PresetFactory(preset, overrides, _soft(soft_prompt, generator, selector), "default")
            learned = None if alpha is not None else _learned_alpha(SimpleNamespace(settings=Settings(**overrides)),
                                                                    data_dir_)
            done, failed = run_batch_ray(factory, batch, batch_out, data_dir_, console, err, requests=parsed,
                                         alpha_of=learned, group_size=group_size, actors=actors,
                                         llm_actors=llm_actors, address=ray_address, stats=run_stats)
    except UnsafePathError as e:
        _fail(str(e), 2)
    if stats_path is not None:
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        stats_path.write_text(json.dumps({"engine": engine, "group_size": group_size, "done": done,
                                          "failed": failed, **run_stats}, indent=2) + "\n")
    if failed:
        _fail(f"{failed} request(s) failed; the {done} others are done (re-run to retry only the failed ones)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    users: Annotated[int, typer.Option(help="How many users (different hidden tastes).")] = 4,
    target_key: Annotated[Optional[str], typer.Option(help="Conversational target (e.g. love, laughing, sad, celebrate); "
                                                      "'auto': the one with the most personalized ground truths.")] = "love",
    preset: PresetOpt = "sticker-tiny",
    weights: WeightsOpt = None, alpha: AlphaOpt = None, mode: ModeOpt = None, seed: SeedOpt = None,
    target_text: TargetTextOpt = None, contrast: ContrastOpt = None, preference_text: PrefTextOpt = None,
    soft_prompt: SoftOpt = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """The main job (what `make demo` runs): different users, same target, one side-by-side picture.
    The paper's selection for comparison:
    `--mode concat --target-text keywords --preference-text keywords --contrast 0`."""
    from pmgen.demo import run_demo
    from pmgen.paths import UnsafePathError, check_batch_root

    overrides = _settings_overrides(weights, alpha, mode, seed, None, None, None, None,
                                    target_text=target_text, contrast=contrast, preference_text=preference_text)
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
    batch: Annotated[Optional[int], typer.Option(help="Benchmark the batch engines instead: N requests (5 weights) "
                                                 "through each --engine, side by side.")] = None,
    engine: Annotated[str, typer.Option(help="--batch: engines to compare, in order: local1 (one request at a "
                                        "time, the engine before groups), local (grouped), ray.")] = "local,ray",
    group_size: Annotated[int, typer.Option(help="--batch: requests per group.")] = 8,
    actors: Annotated[Optional[int], typer.Option(help="--batch: Ray generator actors (default: CPUs − 1).")] = None,
    keyword_cache: Annotated[str, typer.Option(help="--batch: cold (every engine starts with an empty keyword "
                                               "cache) or warm (a filled copy each).")] = "cold",
    mode: ModeOpt = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """Per-stage latency (medians), warm/cold generate, throughput and peak memory vs. the CPU budgets;
    with --batch N, the batch engines side by side (stickers/s, p50 latency, peak memory, same images)."""
    from pmgen.eval.bench import run_bench

    mode = _settings_overrides(None, None, mode, None, None, None, None, None).get("mode")  # exit 2 if bad
    if mode is not None and batch is not None:
        _fail("--mode: the batch engines are timed with the preset's weighting mode (leave --mode out with --batch)", 2)
    data_build("sticker-users", data_dir_)
    if batch is not None:
        _bench_batch(batch, tuple(e.strip() for e in engine.split(",") if e.strip()), preset, group_size, actors,
                     keyword_cache, json_out, data_dir_)
        return
    res = run_bench(preset, n, data_dir_, cold, log=lambda m: console.print(m, highlight=False), mode=mode)
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

def _bench_batch(n: int, engines: tuple, preset: str, group_size: int, actors: Optional[int], keyword_cache: str,
                 json_out: Path, data_dir_: Optional[Path]) -> None:
    import os

    from pmgen.eval.bench import BATCH_ENGINES, run_batch_bench

    if n < 1 or group_size < 1 or (actors is not None and actors < 1):
        _fail("--batch, --group-size and --actors must be >= 1", 2)
    bad = [e for e in engines if e not in BATCH_ENGINES]
    if bad or not engines:
        _fail(f"--engine: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(BATCH_ENGINES)}", 2)
    if keyword_cache not in ("cold", "warm"):
        _fail("--keyword-cache must be cold or warm", 2)
    res = run_batch_bench(n, engines, preset, data_dir_, group_size, actors, keyword_cache,
                          log=lambda m: console.print(m, highlight=False))
    t = Table("engine", "stickers/s", "requests/s", "end to end", "p50 latency", "peak memory (all processes)",
              "load avg (1 min) before → after", title=f"{n} requests × 5 weights, keywords {keyword_cache}")
    for name, r in res["engines"].items():
        t.add_row(name, f"{r['stickers_per_s']:.2f}", f"{r['requests_per_s']:.3f}",
                  f"{r['stickers_per_s_end_to_end']:.2f}/s", f"{r['p50_latency_s']:.1f} s",
                  f"{r['peak_rss_gb_all_processes']:.2f} GB",
                  f"{r['load_avg_before'][0]:.2f} → {r['load_avg_after'][0]:.2f}")
    console.print(t)
    for name, r in res["engines"].items():
        for key, cmp in r.items():
            if key.startswith("vs_"):
                console.print(f"{name} {key}: same chosen candidate (index, keywords) "
                              f"{cmp['same_chosen_candidate']}/{cmp['of_chosen']}, chosen.png pixel-identical "
                              f"{cmp['identical_chosen']}/{cmp['of_chosen']}, candidates pixel-identical "
                              f"{cmp['identical_candidates']}/{cmp['of_candidates']}, largest pixel difference "
                              f"{cmp['max_pixel_diff']}/255", highlight=False)
    if "ray_vs_local_throughput" in res:
        console.print(f"Ray / local throughput: {res['ray_vs_local_throughput']:.2f}", highlight=False)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"written: {json_out} ({os.cpu_count()} CPUs)")


@app.command()
def feedback(
    run_dir: Annotated[Path, typer.Argument(help="A result folder of `pmgen generate` (holds record.json).")],
    pick: Annotated[Optional[int], typer.Option(help="The user picked candidate N (0 = the w = 0 baseline).")] = None,
    like: Annotated[Optional[int], typer.Option(help="The user liked candidate N.")] = None,
    dislike: Annotated[Optional[int], typer.Option(help="The user disliked candidate N.")] = None,
    data_dir_: DataDirOpt = None,
    store_url: Annotated[Optional[str], typer.Option("--store", help="SQLAlchemy URL of the store, as given to "
                                                     "`pmgen serve --store` (default: the SQLite store under the "
                                                     "data directory).")] = None,
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
    if store_url:
        from sqlalchemy.exc import SQLAlchemyError

        from pmgen.data.store import Store

        try:
            store = Store.open(store_url)
        except (ImportError, SQLAlchemyError) as e:  # a bad URL, a missing driver, a server that is not there
            _fail(f"--store {store_url}: {type(e).__name__}: {e}", 2)
    else:
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
