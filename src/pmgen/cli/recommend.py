"""`pmgen evaluate-recommendation`: pmgen's outputs as features of a recommender (Cornac), with and without."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, TYPE_CHECKING

import typer

from pmgen.cli.app import DataDirOpt, PresetOpt, _fail, _load_pmg, _print_table, console, eval_command, progress_bar

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

QUICK_USERS = 150
QUICK_SEEDS = 2


@contextmanager
def _stage_progress() -> Iterator[Any]:
    """``progress(label, done, total)`` drawing one bar per stage (a new label closes the previous bar)."""
    with ExitStack() as stack:
        state: dict[str, Any] = {"label": None, "update": None}

        def progress(label: str, done: int, total: int) -> None:
            if label != state["label"]:
                stack.close()
                state["label"], state["update"] = label, stack.enter_context(progress_bar(label, total))
            state["update"](done, total)

        yield progress


def _feature_models(pmg: PMG, data: Any, need_images: bool) -> tuple[Any, dict[str, str]]:
    """A loaded PMG's models as :class:`~pmgen.eval.recommendation_features.FeatureModels` (+ their names)."""
    from pmgen.data.images import load_image
    from pmgen.eval.movielens import encoder_text_vectors
    from pmgen.eval.recommendation_features import GENERATION_WEIGHT, FeatureModels
    from pmgen.presets import load_scorer
    from pmgen.stages.keywords import Keywords, model_id

    extractor = pmg.extractor()
    size = int(pmg.generator.image_size)
    ids = {"llm": model_id(pmg.llm), "text_encoder": str(pmg.text_encoder.name)}
    kwargs: dict[str, Any] = {}
    if pmg.soft_prompt is not None:
        kwargs["soft"] = lambda events, items: pmg.soft_embeddings(events, items)
        ids["soft"] = f"{pmg.soft_prompt.name}@{pmg.soft_prompt.content_hash}"
    if need_images and data.has_images:
        tower = load_scorer(pmg.preset, "evaluator", pmg.text_encoder)

        def generate(events, item, keywords, soft):
            plan = pmg.plan(events, item, data.items, target_image=data.image_path(item),
                            keywords=Keywords(keywords=list(keywords)), soft=soft, weights=(0.0, GENERATION_WEIGHT))
            c = max(plan.conditions, key=lambda c: c.weight)  # w = 0 alone when nothing personalizes it
            return pmg.render_one(c, plan.settings, plan.init), float(c.weight)

        kwargs.update(image_vectors=tower.image_embeddings, generate=generate,
                      load_image=lambda item: load_image(data.image_path(item), size))
        ids.update(images=f"{tower.name}@{tower.content_hash}",
                   generator=f"{pmg.generator.name}@{pmg.generator.content_hash}|{pmg.selector.name}@"
                             f"{pmg.selector.content_hash}|{pmg.settings.mode}")
    return FeatureModels(keywords=extractor.extract, text_vectors=encoder_text_vectors(pmg.text_encoder),
                         extractor=extractor, ids=ids, **kwargs), ids


@eval_command("recommendation", "evaluate-recommendation")
def evaluate_recommendation(
    dataset: Annotated[str, typer.Option(help="movielens-100k, sticker-users or all.")] = "all",
    quick: Annotated[bool, typer.Option(help=f"A CI-sized run: the first {QUICK_USERS} users per dataset, "
                                             f"{QUICK_SEEDS} seeds, no baseline reproduction.")] = False,
    seeds: Annotated[int, typer.Option(help="Model seeds (0..N-1); the data split is fixed.", min=1, max=20)] = 5,
    models: Annotated[str, typer.Option(help="Base models, comma-separated: VBPR, BiVAECF.")] = "VBPR,BiVAECF",
    features: Annotated[str, typer.Option(help="Feature sets, comma-separated: none, text, soft, generated-images, "
                                               "real-images (the image sets on sticker-users only).")] =
        "none,text,soft,generated-images,real-images",
    baseline: Annotated[bool, typer.Option(help="Reproduce RecBole's published BPR figure on MovieLens-100k "
                                                "first (skipped by --quick).")] = True,
    users: Annotated[Optional[str], typer.Option(
        help="A slice 'a:b' of each dataset's users in id order (':300', '599:'); the split stays the whole "
             "data's, so their features come from a whole-data run's caches "
             f"(default: all; --quick: ':{QUICK_USERS}').")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder (recommendation.md, .json, .png).")] = Path(
        "runs/recommendation"),
    preset: PresetOpt = "sticker-tiny",
    data_dir_: DataDirOpt = None,
) -> None:
    """Do pmgen's keywords, soft embeddings and generated stickers improve a Cornac recommender? NDCG@10, Recall@10."""
    import time

    import torch

    from pmgen.data.schema import DataError
    from pmgen.eval import recommendation as rec
    from pmgen.eval import recommendation_report as report

    try:
        import cornac  # noqa: F401
    except ImportError:
        _fail("this command needs Cornac: pip install 'pmgen[rec]' (or `make setup`)")
    names = list(rec.DATASETS) if dataset == "all" else [dataset]
    if any(n not in rec.DATASETS for n in names):
        _fail(f"--dataset: choose movielens-100k, sticker-users or all, got {dataset!r}", 2)
    base = [m.strip() for m in models.split(",") if m.strip()]
    sets = [s.strip() for s in features.split(",") if s.strip()]
    bad = [m for m in base if m not in rec.BASE_MODELS] + [s for s in sets if s not in rec.FEATURE_SETS]
    if bad or not base:
        _fail(f"unknown model or feature set {bad}; models: {', '.join(rec.BASE_MODELS)}; "
              f"feature sets: {', '.join(rec.FEATURE_SETS)}", 2)
    users = users or (f":{QUICK_USERS}" if quick else None)
    seed_list = list(range(QUICK_SEEDS if quick else seeds))
    torch.set_num_threads(1)  # Cornac's small models run faster on one thread on a shared 2-core CPU
    t0 = time.perf_counter()
    pmg = _load_pmg(preset, {})
    results, base_result = [], None
    for name in names:
        try:
            data = rec.load_rec_data(name, data_dir_)
        except (DataError, FileNotFoundError) as e:
            _fail(str(e))
        try:
            chosen = rec.user_slice(data, users) if users else None
        except ValueError as e:
            _fail(f"--users: {e}", 2)
        if name == "movielens-100k" and baseline and not quick:  # on every user, as published
            console.print("reproducing RecBole's BPR figure on MovieLens-100k …")
            base_result = rec.reproduce_baseline(data, seed_list)
        fm, ids = _feature_models(pmg, data, any(s in rec.IMAGE_SETS for s in sets))
        with _stage_progress() as progress:
            r = rec.run_experiment(data, fm, seed_list, base, sets, users=chosen, progress=progress)
        r["users"] = users or "all"
        r["models"], r["preset"], r["quick"] = ids, preset, quick
        results.append(r)
        header, rows = report.recommendation_rows(r)
        _print_table(f"{name}: mean [95% CI] over users, {len(seed_list)} seeds", header, rows)
    js, md, png = report.write_recommendation_outputs(results, out, base_result)
    console.print(f"[green]✓[/] {js}, {md}, {png} ({(time.perf_counter() - t0) / 60:.1f} min)", highlight=False)
