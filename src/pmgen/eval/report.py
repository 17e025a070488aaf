"""The outputs of ``pmgen evaluate``: ``metrics.json``, ``report.md`` (tables with 95% intervals over
users), ``tradeoff.png``, ``alpha_sweep.png`` and ``samples.png``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pmgen.eval.evaluate import REFERENCE
from pmgen.eval.grading import ACCURACY, HIGHER_IS_BETTER, PERSONALIZATION
from pmgen.eval.stats import format_ci
from pmgen.eval.summary import (
    alpha_sweep,
    at_weight,
    both_at_once,
    candidate_ceiling,
    paired_margin,
    selected,
    summarize,
)


def markdown_table(summary: dict[str, dict[str, Any]], metrics: Sequence[str], baseline: str | None) -> str:
    """A Markdown table: one row per method, ``mean [lo, hi] (gain)`` per metric."""
    metrics = [m for m in metrics if any(m in st for st in summary.values())]
    lines = ["| method | " + " | ".join(f"{m} ({'↑' if HIGHER_IS_BETTER[m] else '↓'})" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name, st in summary.items():
        cells = []
        for m in metrics:
            if m in st:
                v = st[m]
                gain = v.get(f"gain_vs_{baseline}") if baseline else None
                cells.append(format_ci(v) + (f" ({gain:+.1%})" if gain is not None and name != baseline else ""))
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARGIN_METRICS = ("acc_text", "lpips_target", "pers_image", "lpips_history", "pers_taste", "gt_hit")


def margin_table(rows: list[dict[str, Any]], baseline: str, metrics: Sequence[str] = MARGIN_METRICS) -> str:
    """Markdown: per method, the paired mean difference to ``baseline`` (same samples) with a 95% CI."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != baseline]
    lines = ["| method − " + baseline + " | " + " | ".join(f"Δ {m} ({'↑' if HIGHER_IS_BETTER[m] else '↓'})"
                                                          for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for m in methods:
        cells = []
        for metric in metrics:
            mean, lo, hi = paired_margin(rows, m, baseline, metric)
            cells.append("-" if mean != mean else f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_tradeoff(points: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]],
                  curve: list[tuple[float, float, float]] | None, path: Path, x: str = "pers_image",
                  y: str = "acc_text", default_alpha: float | None = None, title: str = "") -> Path:
    """Accuracy change (y) vs personalization change (x) relative to the baseline: each method's
    paired mean with its 95% interval (``points[name] = ((x, lo, hi), (y, lo, hi))``) and the α
    sweep (``curve = [(alpha, x, y), ...]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    for k, (name, ((mx, xlo, xhi), (my, ylo, yhi))) in enumerate(points.items()):
        ax.errorbar(mx, my, xerr=[[mx - xlo], [xhi - mx]], yerr=[[my - ylo], [yhi - my]], fmt="o", capsize=3,
                    color=f"C{k}", label=name)
    if curve:
        ax.plot([c[1] for c in curve], [c[2] for c in curve], "-", color="0.5", lw=1, zorder=0,
                label="α sweep (0 → 1)")
        for a, cx, cy in curve:
            if a in (curve[0][0], curve[-1][0]) or (default_alpha is not None and abs(a - default_alpha) < 0.051):
                ax.annotate(f"α={a:.1f}", (cx, cy), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"personalization: change in {x} vs. no personalization")
    ax.set_ylabel(f"accuracy: change in {y} vs. no personalization")
    ax.set_title(title or "paired change vs. no personalization (95% CIs over users)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_alpha(curve: list[dict[str, Any]], path: Path, default_alpha: float,
               metrics: Sequence[str] = ("acc_text", "pers_image", "pers_taste")) -> Path:
    """Metrics of the selected candidates as α goes from 0 (all accuracy) to 1 (all personalization)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(3.0 * (len(metrics) + 1), 2.8))
    a = [p["alpha"] for p in curve]
    for ax, m in zip(axes, [*metrics, "mean_weight"]):
        ax.plot(a, [p.get(m, float("nan")) for p in curve], "o-", ms=3)
        ax.axvline(default_alpha, color="0.6", ls=":", lw=1)
        ax.set_xlabel("α")
        ax.set_title(m, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def image_grid(kept: dict[str, Any], methods: Sequence[str], path: Path) -> Path:
    """Rows = samples; columns = target, ground truth (if any), then each method's chosen image."""
    from PIL import Image, ImageDraw

    from pmgen.models.generator import StickerGenerator

    cell, pad, head, label_w = 64, 4, 16, 150
    cols = ["target", "ground_truth", *methods]
    w = label_w + len(cols) * (cell + pad)
    h = head + len(kept) * (cell + pad + 12)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        draw.text((label_w + j * (cell + pad), 2), c[:11], fill="black")
    for i, (sid, row) in enumerate(kept.items()):
        y = head + i * (cell + pad + 12)
        draw.text((2, y + 4), f"{row['title'][:24]}", fill="black")
        draw.text((2, y + 20), f"taste: {row['taste']}", fill="gray")
        for j, c in enumerate(cols):
            img = row.get(c)
            if img is None:
                continue
            canvas.paste(StickerGenerator.to_pil(img.unsqueeze(0))[0].resize((cell, cell)),
                         (label_w + j * (cell + pad), y))
            kw = row.get(c + ":keywords")
            if kw:
                draw.text((label_w + j * (cell + pad), y + cell), kw[:11], fill="gray")
    canvas.save(path)
    return path


def write_outputs(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], kept: dict[str, Any] | None = None,
                  main_method: str | None = None, ablation_weights: Sequence[float] = (1.0, 2.0)) -> Path:
    """``metrics.json``, ``report.md`` (tables with intervals), ``tradeoff.png``, ``alpha_sweep.png``,
    ``samples.png``. Returns the report path."""
    out.mkdir(parents=True, exist_ok=True)
    baseline = "none" if any(r["method"] == "none" for r in rows) else None
    sel = summarize(selected(rows), baseline)
    base_rows = [r for r in rows if r["method"] == baseline and r["chosen"]] if baseline else []
    fixed = {}
    for w in ablation_weights:
        fw = [r for r in at_weight(rows, w) if r["method"] != baseline]
        if fw:
            fixed[w] = summarize(base_rows + fw, baseline)
    alpha = float(meta.get("alpha", 2 / 3))
    curve = alpha_sweep(rows, main_method, min_accuracy=float(meta.get("min_accuracy", 0.0))) if main_method else []
    margins = {}
    if baseline:
        for m in sel:
            if m != baseline:
                margins[m] = {k: list(paired_margin(selected(rows), m, baseline, k)) for k in HIGHER_IS_BETTER}
    fixed_margins: dict[str, Any] = {}
    if baseline:
        for w in fixed:
            fw = base_rows + [r for r in at_weight(rows, w) if r["method"] != baseline]
            fixed_margins[str(w)] = {m: {k: list(paired_margin(fw, m, baseline, k)) for k in HIGHER_IS_BETTER}
                                     for m in dict.fromkeys(r["method"] for r in fw) if m != baseline}
    both = both_at_once(rows)
    generated = [r for r in rows if r["method"] != REFERENCE]
    ceiling = candidate_ceiling(generated, baseline) if baseline else {}
    told = candidate_ceiling(generated, baseline, by=("oracle_taste", "oracle_title")) if baseline else {}
    (out / "metrics.json").write_text(json.dumps(
        {"meta": meta, "selected": sel, "fixed_weight": {str(k): v for k, v in fixed.items()},
         "paired_margins_fixed_weight_vs_baseline": fixed_margins,
         "alpha_sweep": {"method": main_method, "default_alpha": alpha, "curve": curve},
         "both_at_once": both, "candidate_ceiling": ceiling, "candidate_ceiling_told_selector": told,
         "paired_margins_vs_baseline": margins, "rows": rows}, indent=2) + "\n")
    if baseline:
        points = {m: (tuple(v["pers_image"]), tuple(v["acc_text"])) for m, v in margins.items()
                  if "pers_image" in sel.get(m, {})}
        b = sel[baseline]
        deltas = [(p["alpha"], p["pers_image"] - b["pers_image"]["mean"], p["acc_text"] - b["acc_text"]["mean"])
                  for p in curve if "pers_image" in p and "pers_image" in b]
        plot_tradeoff(points, deltas, out / "tradeoff.png", default_alpha=alpha,
                      title=f"{meta.get('n_samples')} held-out users, evaluator scores: change vs. {baseline} "
                            "(95% CIs)")
    if curve:
        plot_alpha(curve, out / "alpha_sweep.png", alpha)
    if kept:
        image_grid(kept, [m for m in sel if m != REFERENCE], out / "samples.png")
    seed = meta.get("users_seed") or 0
    users = "`sticker-users`" + (f" drawn with seed {seed} (users no model or setting has seen)" if seed else "")
    parts = [f"# pmgen evaluation\n\n{meta.get('n_samples')} held-out samples ({meta.get('n_users')} users) of "
             f"{users}, graded by the evaluator `{meta.get('evaluator')}` (never used for selection); "
             f"means with 95% bootstrap intervals over users; in parentheses the change relative to `{baseline}`.\n",
             "## Methods\n", *[f"- `{k}`: {v}" for k, v in meta.get("method_descriptions", {}).items()],
             "\n## Selected candidate (what a user gets)\n", "Accuracy:\n", markdown_table(sel, ACCURACY, baseline),
             "\nPersonalization:\n", markdown_table(sel, PERSONALIZATION, baseline)]
    if baseline:
        parts += ["\nPaired differences to the baseline (same samples and seeds; 95% CIs over users):\n",
                  margin_table(selected(rows), baseline)]
    if any(v["n_results"] for v in both.values()):
        parts += ["\n## Both at once: the target *and* the user's taste\n",
                  "Among personalized results (chosen w > 0): the evaluator ranks the target's name in its top 5 of "
                  "100 names and the user's hidden taste first of the 12 (95% CI over users).\n",
                  "| method | both at once | personalized results |", "|---|---|---|"]
        parts += [f"| {m} | {format_ci(v)} | {v['n']} of {v['n_results']} |"
                  if v["n"] else f"| {m} | – | 0 of {v['n_results']} |" for m, v in both.items()]
    if ceiling:
        parts += ["\n## Candidate-pool ceiling (an oracle, not a method)\n",
                  f"What a selection that could see the evaluator's grades would get from each method's candidates: "
                  f"the most taste (`pers_taste`) while accuracy (`acc_text`) stays ≥ 95% of `{baseline}`. Far above "
                  "the selected row: the selector misses better candidates; close to it: the generator made none. "
                  "Optimistic (choosing by the grader also picks its noise). The second oracle chooses with the "
                  "*selector* told the target's name and the user's hidden taste (texts no method sees) and is "
                  "graded the same way: the gap between the two is mostly the evaluator's own noise (another model disagrees), "
                  "which no selector can be expected to find; the gap below it, mostly the methods' texts (keywords, "
                  "not the truth).\n",
                  "| method | oracle | acc_text | pers_taste | gt_hit | lpips_history | both at once | mean weight |",
                  "|---|---|---|---|---|---|---|---|"]
        for judge, table in (("evaluator", ceiling), ("selector, told", told)):
            for m, v in table.items():
                parts.append(f"| {m} | {judge} | {v['acc_text']:.3f} ({v['acc_text_gain']:+.1%}) | "
                             f"{v['pers_taste']:.3f} ({v['pers_taste_gain']:+.1%}) | "
                             f"{v.get('gt_hit', float('nan')):.3f} | {v.get('lpips_history', float('nan')):.3f} "
                             f"({v.get('lpips_history_gain', float('nan')):+.1%}) | {v['both_personalized']:.3f} | "
                             f"{v['mean_weight']:.2f} |")
    for w, summ in fixed.items():
        parts += [f"\n## Fixed preference weight w = {w:g} (no selection; the ablation view)\n",
                  markdown_table(summ, ("acc_text", "lpips_target", *PERSONALIZATION), baseline)]
        if baseline:
            parts += ["\nPaired differences to the baseline:\n",
                      margin_table(base_rows + [r for r in at_weight(rows, w) if r["method"] != baseline], baseline)]
    if curve:
        parts += [f"\n## α sweep (`{main_method}`; default α = {alpha:.2f})\n",
                  "| α | mean weight | acc_text | pers_image | pers_taste | gt_hit |", "|---|---|---|---|---|---|"]
        for p in curve:
            parts.append(f"| {p['alpha']:.1f} | {p['mean_weight']:.2f} | {p.get('acc_text', float('nan')):.3f} | "
                         f"{p.get('pers_image', float('nan')):.3f} | {p.get('pers_taste', float('nan')):.3f} | "
                         f"{p.get('gt_hit', float('nan')):.3f} |")
        parts.append("\n![α sweep](alpha_sweep.png)")
    parts.append("\n![trade-off](tradeoff.png)\n\n![samples](samples.png)\n")
    report = out / "report.md"
    report.write_text("\n".join(parts))
    return report
