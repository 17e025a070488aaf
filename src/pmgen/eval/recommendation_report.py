"""The report of ``pmgen evaluate-recommendation``: the feature table, the Markdown report and the plot of
:func:`pmgen.eval.recommendation.run_experiment` results (and of
:func:`~pmgen.eval.recommendation.reproduce_baseline`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pmgen.eval.recommendation import K

__all__ = ["plot_recommendation", "recommendation_markdown", "recommendation_rows", "write_recommendation_outputs"]

_METRICS = (("ndcg", f"NDCG@{K}"), ("recall", f"Recall@{K}"))


def recommendation_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the feature table of one dataset's :func:`run_experiment` result: per base model and
    feature set, NDCG@10 and Recall@10 (mean [95% CI]) and the paired gain over ``none`` [95% CI]."""
    from pmgen.eval.stats import format_ci

    header = ["model", "features", *(name for _, name in _METRICS), *(f"Δ {name} vs none" for _, name in _METRICS)]
    rows = []
    for model, res in result["results"].items():
        for s, st in res["summary"].items():
            d = res["paired"].get(s)
            rows.append([model, s, *(format_ci(st[m]) for m, _ in _METRICS),
                         *((format_ci(d[m], 4) if d else "—") for m, _ in _METRICS)])
    for model, st in result.get("references", {}).get("summary", {}).items():
        rows.append([model, "none (reference)", *(format_ci(st[m]) for m, _ in _METRICS), "—", "—"])
    return header, rows


def recommendation_markdown(results: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any] | None = None) -> str:
    """The report of ``pmgen evaluate-recommendation``: the baseline reproduction, then one table per dataset."""
    from pmgen.eval.keyword_bench import md_table
    from pmgen.eval.stats import format_ci

    lines = ["# pmgen's outputs as recommendation features", ""]
    if baseline:
        pub = baseline["published"]
        lines += ["## Published baseline reproduced", "",
                  f"{pub['source']}; Cornac BPR {baseline['params']}, seeds {baseline['seeds']}.", "",
                  md_table(["metric", "published", "pmgen + Cornac", "ratio", "within ±10%"],
                           [[name, f"{pub[key]:.4f}", format_ci(baseline[key], 4), f"{baseline[key]['ratio']:.3f}",
                             "yes" if baseline[key]["within_10pct"] else "no"]
                            for key, name in (("ndcg@10", "NDCG@10"), ("recall@10", "Recall@10"))]), ""]
    for r in results:
        c = r["counts"]
        lines += [f"## {r['dataset']}", "", r["protocol"] + ".", "",
                  f"{c['users']} users, {c['items']} items, {c['train']}/{c['val']}/{c['test']} train/val/test "
                  f"interactions, {c['test_users_ranked']} test users ranked; seeds {r['seeds']}.", ""]
        if r["skipped_sets"]:
            lines += [f"Not available here: {', '.join(r['skipped_sets'])} (no item images or no model for them).", ""]
        lines += [md_table(*recommendation_rows(r)), ""]
        gains = [(m, s, d["ndcg"]) for m, res in r["results"].items() for s, d in res["paired"].items()]
        above = [f"{m} + {s} (+{d['mean']:.4f} [{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}])"
                 for m, s, d in gains if d["ci95"][0] > 0]
        lines += [("NDCG@10 gains whose 95% interval lies above 0: " + "; ".join(above)) if above
                  else "No feature set has an NDCG@10 gain whose 95% interval lies above 0.", ""]
        if r.get("credit"):
            lines += [f"_{r['credit']}_", ""]
    lines += ["Δ: per-user paired differences against the same model without features (same seeds), 95% "
              "bootstrap intervals over users.", ""]
    return "\n".join(lines)


def plot_recommendation(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A PNG: per dataset, the NDCG@10 gain of each feature set over ``none`` per base model, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        sets = [s for s in r["feature_sets"] if s != "none"]
        models = list(r["results"])
        width = 0.8 / max(len(models), 1)
        for j, m in enumerate(models):
            ds = [r["results"][m]["paired"][s]["ndcg"] for s in sets]
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(sets))]
            means = [d["mean"] for d in ds]
            err = [[d["mean"] - d["ci95"][0] for d in ds], [d["ci95"][1] - d["mean"] for d in ds]]
            ax.bar(xs, means, width, yerr=err, capsize=3, label=m)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(sets)), sets, rotation=15)
        ax.set_title(f"{r['dataset']}: NDCG@{r['k']} gain over no features")
        ax.set_ylabel("Δ NDCG@10 (95% CI)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_recommendation_outputs(results: Sequence[Mapping[str, Any]], out: str | Path,
                                 baseline: Mapping[str, Any] | None = None) -> tuple[Path, Path, Path]:
    """``out/recommendation.json`` (everything), ``out/recommendation.md`` and ``out/recommendation.png``."""
    from pmgen.eval.keyword_bench import write_result

    js, md = write_result({"baseline": baseline, "results": list(results)}, out, "recommendation",
                          recommendation_markdown(results, baseline))
    return js, md, plot_recommendation(results, Path(out) / "recommendation.png")
