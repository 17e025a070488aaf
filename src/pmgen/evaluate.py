"""Evaluation on held-out sticker users, graded by the **evaluator** scorer (never the selector).

Per sample, for the chosen image of each method (same users, same seeds):

* accuracy — ``acc_text``: evaluator similarity to the target item's name; ``lpips_target``:
  ST-LPIPS (AlexNet) to the target item's image (lower = closer);
* personalization — ``pers_image``: mean evaluator image similarity to the user's history images;
  ``lpips_history``: mean ST-LPIPS to them; ``pers_taste``: evaluator similarity to the user's
  hidden taste description (never shown to any model); ``gt_hit``: whether the generated image's
  nearest catalog item (evaluator image embedding) is the recorded personalized ground truth
  (samples that have one).

Aggregates are means with 95% bootstrap confidence intervals over users.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pmgen.data import Dataset, Sample
from pmgen.pipeline import _load_image
from pmgen.requests import from_dataset

HIGHER_IS_BETTER = {"acc_text": True, "lpips_target": False, "pers_image": True, "lpips_history": False,
                    "pers_taste": True, "gt_hit": True}


@dataclass
class Method:
    """A named way of generating: settings overrides passed to :meth:`pmgen.PMG.generate`."""

    name: str
    overrides: dict[str, Any]


def bootstrap_ci(values: Sequence[float], groups: Sequence[str] | None = None, n: int = 1000, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Mean and 95% bootstrap interval, resampling ``groups`` (users) with replacement when given."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    keys = list(groups) if groups is not None else list(range(len(vals)))
    by: dict[Any, list[float]] = {}
    for k, v in zip(keys, vals):
        by.setdefault(k, []).append(v)
    units = list(by.values())
    rng = random.Random(seed)
    means = []
    for _ in range(n):
        pick = [units[rng.randrange(len(units))] for _ in units]
        flat = [v for u in pick for v in u]
        means.append(sum(flat) / len(flat))
    means.sort()
    return statistics.fmean(vals), means[int(0.025 * n)], means[int(0.975 * n) - 1]


class Grader:
    """Evaluator-based metrics for generated images (catalog embeddings computed once)."""

    def __init__(self, evaluator: Any, catalog: Dataset, lpips: Any = None):
        self.evaluator = evaluator
        self.catalog = catalog
        self.lpips = lpips
        self.ids = list(catalog.items)
        imgs = torch.cat([_load_image(catalog.image_path(i), 64) for i in self.ids])
        self.catalog_emb = torch.cat([evaluator.image_embeddings(imgs[i:i + 512]) for i in range(0, len(imgs), 512)])
        self.index = {iid: k for k, iid in enumerate(self.ids)}

    def image(self, item_id: str) -> torch.Tensor:
        return _load_image(self.catalog.image_path(item_id), 64)

    def grade(self, image: torch.Tensor, sample: Sample, user_taste: str | None, history_ids: list[str]) -> dict[str, float]:
        """Metrics of one generated image ``[1, 3, 64, 64]`` in [0, 1]."""
        ev = self.evaluator
        emb = ev.image_embeddings(image)
        target = self.catalog.items[sample.target_id]
        out = {"acc_text": float(emb @ ev.text_embeddings([target.title]).T)}
        if history_ids:
            h = self.catalog_emb[[self.index[i] for i in history_ids]]
            out["pers_image"] = float((emb @ h.T).mean())
        if user_taste:
            out["pers_taste"] = float(emb @ ev.text_embeddings([user_taste]).T)
        if sample.ground_truth_personalized:
            nearest = self.ids[int((emb @ self.catalog_emb.T).argmax())]
            out["gt_hit"] = float(nearest == sample.ground_truth_personalized)
        if self.lpips is not None:
            out["lpips_target"] = float(self.lpips(image, self.image(sample.target_id)))
            if history_ids:
                hist = torch.cat([self.image(i) for i in history_ids])
                out["lpips_history"] = float(self.lpips(image, hist).mean())
        return out


def history_item_ids(user: Any, limit: int = 12) -> list[str]:
    from pmgen.verbalize import newest_first

    out: list[str] = []
    for e in newest_first(user.events):
        if e.item_id and e.item_id not in out:
            out.append(e.item_id)
        if len(out) >= limit:
            break
    return out


def run_methods(pmg: Any, grader: Grader, ds: Dataset, samples: Sequence[Sample], methods: Sequence[Method],
                log: Callable[[str], None] = print, progress: Any = None) -> list[dict[str, Any]]:
    """Generate every sample with every method and grade the chosen images; one row per (sample, method)."""
    rows = []
    for n, s in enumerate(samples):
        req = from_dataset(ds, sample_id=s.sample_id)
        user = ds.users[s.user_id]
        hist = history_item_ids(user)
        for m in methods:
            res = pmg.generate(req.user, req.target, req.items, context=req.context, target_image=req.target_image,
                               **m.overrides)
            metrics = grader.grade(res.chosen_image.unsqueeze(0), s, user.attributes.get("taste_description"), hist)
            rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "method": m.name,
                         "chosen_weight": res.record["candidates"][res.chosen]["weight"], **metrics})
        if progress is not None:
            progress(n + 1, len(samples))
    return rows


def summarize(rows: list[dict[str, Any]], baseline: str | None = None) -> dict[str, dict[str, Any]]:
    """Per method and metric: mean, 95% CI over users, n, and relative gain over ``baseline``."""
    out: dict[str, dict[str, Any]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        out[m] = {}
        for metric in HIGHER_IS_BETTER:
            vals = [(r[metric], r["user_id"]) for r in mr if metric in r]
            if not vals:
                continue
            mean, lo, hi = bootstrap_ci([v for v, _ in vals], [u for _, u in vals])
            out[m][metric] = {"mean": mean, "ci95": [lo, hi], "n": len(vals)}
    if baseline and baseline in out:
        for m in methods:
            for metric, st in out[m].items():
                b = out[baseline].get(metric, {}).get("mean")
                if b not in (None, 0):
                    st["gain_vs_" + baseline] = (st["mean"] - b) / abs(b)
    return out


def paired_margin(rows: list[dict[str, Any]], a: str, b: str, metric: str) -> tuple[float, float, float]:
    """Mean of (a − b) over samples both methods graded, with a 95% bootstrap CI over users."""
    by = {(r["sample_id"], r["method"]): r for r in rows}
    diffs, users = [], []
    for (sid, m), r in by.items():
        if m == a and (sid, b) in by and metric in r and metric in by[(sid, b)]:
            diffs.append(r[metric] - by[(sid, b)][metric])
            users.append(r["user_id"])
    return bootstrap_ci(diffs, users)


DEFAULT_METHODS = {
    "none": {"weights": (0.0,)},
    "pmg-concat": {"mode": "concat"},
    "pmg-guidance": {"mode": "guidance"},
}


def evaluation_samples(ds: Dataset, n: int, split: str = "test", seed: int = 0) -> list[Sample]:
    """``n`` samples of a split, one per user first (fixed seed), ground-truth samples favoured."""
    samples = ds.split(split)
    rng = random.Random(seed)
    by_user: dict[str, list[Sample]] = {}
    for s in samples:
        by_user.setdefault(s.user_id, []).append(s)
    users = sorted(by_user)
    rng.shuffle(users)
    picked = []
    for u in users:
        ss = sorted(by_user[u], key=lambda s: (s.ground_truth_personalized is None, s.sample_id))
        picked.append(ss[0])
    return picked[:n]


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> Path:
    """``metrics.json`` (rows, summary, settings) and ``report.md`` (the table with intervals)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n")
    metrics = [m for m in HIGHER_IS_BETTER if any(m in st for st in summary.values())]
    lines = ["| method | " + " | ".join(f"{m} ({'↑' if HIGHER_IS_BETTER[m] else '↓'})" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name, st in summary.items():
        cells = []
        for m in metrics:
            if m in st:
                v = st[m]
                gain = next((g for k, g in v.items() if k.startswith("gain_vs_")), None)
                cells.append(f"{v['mean']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]"
                             + (f" ({gain:+.1%})" if gain is not None and name != meta.get("baseline") else ""))
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text(
        f"# pmgen evaluation\n\n{meta.get('n_samples')} held-out samples ({meta.get('n_users')} users), "
        f"evaluator `{meta.get('evaluator')}`; means with 95% bootstrap intervals over users; "
        f"gain relative to `{meta.get('baseline')}`.\n\n" + "\n".join(lines) + "\n")
    return out / "report.md"
