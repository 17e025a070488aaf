"""`pmgen models`: list, check and report the models of a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

# light imports: the trainers' settings classes and the service's commands load torch / FastAPI only when run
from pmgen.cli.app import (
    DataDirOpt,
    PresetOpt,
    SeedOpt,
    _fail,
    console,
    err,
    models_app,
)


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
        st = p.settings
        console.print(f"  settings      {p.image_size}px, strength {st.strength}, {st.num_inference_steps} steps, "
                      f"guidance {st.guidance_scale}, mode {st.mode}, α {st.alpha:.3g}", highlight=False)


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


@models_app.command("scorer-check")
def models_scorer_check(
    preset: PresetOpt = "sticker-tiny",
    scorer: Annotated[Optional[list[str]], typer.Option(
        help="Scorer folder or zoo:… (repeatable; default: the preset's selector and evaluator).")] = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """Do pmgen's scorers still know a sticker drawn smaller, in a corner? Held-out top-1 / top-5."""
    from pmgen.data.catalog import load_catalog
    from pmgen.models.scorer import Scorer
    from pmgen.models.text_encoder import TextEncoder
    from pmgen.paths import cache_dir
    from pmgen.presets import get_preset, resolve
    from pmgen.train.scorer.trainer import SMALL_SIZE, corner_check

    p = get_preset(preset)
    refs = scorer or [p.selector, p.evaluator]
    te = TextEncoder.minilm()
    models = {}
    for ref in refs:  # every scorer is loaded (or refused) before any is measured
        try:
            model = Scorer.load(Path(resolve(ref)), te).model
            if not {"holdout_seed", "holdout_groups", "seed"} <= set(model.cfg.info):
                raise ValueError("its config records no held-out split (not trained by `pmgen train scorer`)")
        except (FileNotFoundError, OSError, ValueError, KeyError) as e:
            _fail(f"--scorer {ref}: {e}")
        models[ref] = model
    catalog = load_catalog(data_dir_)
    table = Table("scorer", "held-out top-1 / top-5", f"at {SMALL_SIZE} px in a corner")
    for ref, model in models.items():
        r = corner_check(model, catalog, te, cache_dir() / "train" / "scorer-text")
        table.add_row(ref, f"{r['heldout_top1']:.3f} / {r['heldout_top5']:.3f}",
                      f"{r['heldout_small_top1']:.3f} / {r['heldout_small_top5']:.3f}")
    console.print(table)


@models_app.command("report")
def models_report(
    preset: PresetOpt = "sticker-tiny",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <generator folder>/report).")] = None,
    n_items: Annotated[int, typer.Option(help="Catalog items in the faithful / from-noise tests.")] = 150,
    seed: SeedOpt = None,
    data_dir_: DataDirOpt = None,
) -> None:
    """Quality figures of the sticker generator (faithful, editable, from noise, speed), graded by the evaluator."""
    from pmgen.eval.quality import quality_report
    from pmgen.presets import (
        get_preset,
        load_generator,
        load_scorer,
        load_text_encoder,
        resolve,
    )

    p = get_preset(preset)
    if p.generator_kind != "sticker":
        _fail("`models report` measures pmgen's own sticker generator (preset sticker-tiny)", 2)
    gen = load_generator(p)
    te = load_text_encoder(p, gen)
    ev = load_scorer(p, "evaluator", te)
    folder = out or Path(resolve(p.generator)) / "report"
    quality_report(gen, te, ev, folder, n_items=n_items, default_strength=p.settings.strength,
                   steps=p.settings.num_inference_steps, guidance=p.settings.guidance_scale, seed=seed or 0, data_root=data_dir_,
                   log=lambda m: console.print(m, highlight=False))
    console.print(f"[green]✓[/] {folder}/quality.json, strength_curve.png, samples.png")
