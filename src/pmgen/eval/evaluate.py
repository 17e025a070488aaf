"""Evaluation on held-out sticker users, graded by the **evaluator** scorer (never the selector).

Every method generates the same samples with the same seeds and the same weight grid, and **every
candidate** is graded, so three views come from one run:

* **selected** — the candidate PMG's selection keeps (``z = α·log d_p + (1−α)·log d_t`` with the
  selector's scores): the method as a user gets it;
* **fixed weight** — the candidate at one preference weight (``w = 1``, ``w = 2``), no selection:
  the ablation view, isolating what the conditioning itself does;
* **α sweep** — the selection recomputed for α in [0, 1] from the recorded d_t / d_p: the
  accuracy-vs-personalization trade-off curve.

Metrics of an image (the evaluator is trained independently of the selector; catalog images 64×64):

* accuracy — ``acc_text``: evaluator similarity to the target item's name; ``acc_image``: evaluator
  image similarity to the target item's image; ``lpips_target`` (ST-LPIPS AlexNet, ↓) and
  ``ssim_target`` to the target image;
* recognizability — ``target_top1`` / ``target_top5``: the target's name ranks first / in the top 5
  of 100 catalog names (its own and 99 others, fixed per sample) by evaluator similarity;
  ``taste_top1``: the user's hidden taste ranks first among the 12 taste descriptions; ``both``:
  ``target_top5`` and ``taste_top1`` at once — "the target, in this user's taste";
* personalization — ``pers_image``: mean evaluator image similarity to the user's history images;
  ``lpips_history`` (↓), ``ssim_history``, ``ms_ssim_history``: means over the history images;
  ``pers_taste``: evaluator similarity to the user's hidden taste description (never shown to any
  model); ``gt_hit``: the image's nearest catalog item (evaluator embedding) is the sample's
  recorded personalized ground truth (samples that have one).

Aggregates are means with 95% bootstrap confidence intervals over users, and the relative gain over
the ``none`` method (no personalization).
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmgen.data.images import load_image
from pmgen.data.requests import from_dataset
from pmgen.data.schema import Dataset, Sample
from pmgen.stages.select import argmax_z, keeps_target, z_score

HIGHER_IS_BETTER = {"acc_text": True, "acc_image": True, "lpips_target": False, "ssim_target": True,
                    "target_top1": True, "target_top5": True,
                    "pers_image": True, "lpips_history": False, "ssim_history": True, "ms_ssim_history": True,
                    "pers_taste": True, "taste_top1": True, "gt_hit": True, "both": True}
ACCURACY = ("acc_text", "acc_image", "lpips_target", "ssim_target", "target_top1", "target_top5")
PERSONALIZATION = ("pers_image", "lpips_history", "ssim_history", "ms_ssim_history", "pers_taste", "taste_top1",
                   "gt_hit")
REFERENCE = "target image"
"""The pseudo-method of :func:`run_methods` ``reference=True``: the real target image, graded as is."""
N_NAMES = 100
"""Names the target is ranked among (``target_top1`` / ``target_top5``): its own and 99 other catalog names."""


@dataclass
class Method:
    """A named way of generating: settings overrides for :meth:`pmgen.PMG.generate`, and optionally
    another soft-prompt folder (the ablations' weights)."""

    name: str
    overrides: dict[str, Any]
    soft_prompt: str | None = None
    description: str = ""


def default_methods(soft_available: bool, ablations: dict[str, Path] | None = None) -> dict[str, Method]:
    """The methods ``pmgen evaluate`` knows; soft-embedding methods only when trained weights exist."""
    out = {
        "none": Method("none", {"weights": (0.0,)}, description="no personalization (the w = 0 baseline)"),
        "keywords": Method("keywords", {"use_soft": False, "mode": "concat"},
                           description="preference keywords only, paper weighting (repetition)"),
        "keywords-guidance": Method("keywords-guidance", {"use_soft": False, "mode": "guidance"},
                                    description="preference keywords only, composed-guidance weighting"),
    }
    if soft_available:
        out["soft"] = Method("soft", {"use_soft": True, "use_keywords": False, "history_weight": 1.0},
                             description="soft embeddings only (d_p from history images)")
        out["pmg"] = Method("pmg", {"use_soft": True, "mode": "concat"},
                            description="keywords + soft embeddings (the preset's default)")
    for name, folder in (ablations or {}).items():
        out[name] = Method(name, {"use_soft": True, "use_keywords": False, "history_weight": 1.0},
                           soft_prompt=str(folder), description=f"soft embeddings only, {name} weights")
    return out


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
    """Evaluator-based and perceptual metrics for generated images (catalog embeddings computed once)."""

    def __init__(self, evaluator: Any, catalog: Dataset, lpips: Any = None, perceptual: bool = True,
                 tastes: Sequence[str] = ()):
        self.evaluator = evaluator
        self.catalog = catalog
        self.lpips = lpips
        self.perceptual = perceptual
        self.tastes = list(tastes)  # every taste description, for ``taste_top1``
        self.ids = list(catalog.items)
        imgs = torch.cat([load_image(catalog.image_path(i), 64) for i in self.ids])
        self.images = imgs
        with torch.no_grad():
            self.catalog_emb = torch.cat([evaluator.image_embeddings(imgs[i:i + 512])
                                          for i in range(0, len(imgs), 512)])
        self.index = {iid: k for k, iid in enumerate(self.ids)}
        self._text: dict[str, torch.Tensor] = {}

    def image(self, item_id: str) -> torch.Tensor:
        return self.images[self.index[item_id]].unsqueeze(0)

    def text(self, text: str) -> torch.Tensor:
        if text not in self._text:
            self._text[text] = self.evaluator.text_embeddings([text])[0]
        return self._text[text]

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Evaluator embeddings ``[len(texts), E]`` (cached per text)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text]
        if missing:
            for t, e in zip(missing, self.evaluator.text_embeddings(missing)):
                self._text[t] = e
        return torch.stack([self._text[t] for t in texts])

    def names_for(self, target_id: str, n: int = N_NAMES) -> list[str]:
        """The target's name first, then ``n - 1`` other catalog names (not skin-tone variants, not
        containing or contained in the target's name), fixed per target."""
        title = self.catalog.items[target_id].title.lower()
        pool = sorted({it.title for it in self.catalog.items.values()
                       if not it.attributes.get("skintone") and it.title.lower() not in title
                       and title not in it.title.lower()})
        rng = random.Random(f"names:{target_id}")
        return [self.catalog.items[target_id].title] + rng.sample(pool, min(n - 1, len(pool)))

    @torch.no_grad()
    def grade(self, images: torch.Tensor, sample: Sample, user_taste: str | None, history_ids: list[str]
              ) -> list[dict[str, float]]:
        """Metrics of each generated image ``[N, 3, 64, 64]`` in [0, 1] (one dict per image)."""
        from pmgen.eval.metrics import ms_ssim, ssim

        n = images.shape[0]
        emb = self.evaluator.image_embeddings(images)
        target = self.catalog.items[sample.target_id]
        t_img = self.index[sample.target_id]
        cols: dict[str, torch.Tensor] = {
            "acc_text": emb @ self.text(target.title),
            "acc_image": emb @ self.catalog_emb[t_img],
        }
        names = emb @ self.texts(self.names_for(sample.target_id)).T  # [n, 100], column 0 = the target
        rank = (names[:, 1:] >= names[:, :1]).sum(1)  # other names scoring at least as high (ties count against)
        cols["target_top1"], cols["target_top5"] = (rank < 1).float(), (rank < 5).float()
        if user_taste and user_taste in self.tastes:
            tastes = emb @ self.texts(self.tastes).T
            mine = self.tastes.index(user_taste)
            cols["taste_top1"] = (tastes.argmax(1) == mine).float()
            cols["both"] = cols["target_top5"] * cols["taste_top1"]
        hist = [self.index[i] for i in history_ids if i in self.index]
        if hist:
            cols["pers_image"] = (emb @ self.catalog_emb[hist].T).mean(1)
        if user_taste:
            cols["pers_taste"] = emb @ self.text(user_taste)
        if sample.ground_truth_personalized:
            nearest = (emb @ self.catalog_emb.T).argmax(1)
            cols["gt_hit"] = (nearest == self.index[sample.ground_truth_personalized]).float()
        t_image = self.images[t_img].unsqueeze(0)
        if self.perceptual:
            cols["ssim_target"] = ssim(images, t_image)
        if self.lpips is not None:
            cols["lpips_target"] = self.lpips(images, t_image)
        if hist:
            h = self.images[hist]
            rep = images.repeat_interleave(len(hist), 0)
            hh = h.repeat(n, 1, 1, 1)
            if self.perceptual:
                cols["ssim_history"] = ssim(rep, hh).view(n, -1).mean(1)
                cols["ms_ssim_history"] = ms_ssim(rep, hh).view(n, -1).mean(1)
            if self.lpips is not None:
                cols["lpips_history"] = self.lpips(rep, hh).view(n, -1).mean(1)
        return [{k: float(v[i]) for k, v in cols.items()} for i in range(n)]


def history_item_ids(user: Any, limit: int = 12) -> list[str]:
    """The user's most recent distinct history items (the personalization reference images)."""
    from pmgen.stages.verbalize import newest_first

    out: list[str] = []
    for e in newest_first(user.events):
        if e.item_id and e.item_id not in out:
            out.append(e.item_id)
        if len(out) >= limit:
            break
    return out


def run_methods(pmg: Any, grader: Grader, ds: Dataset, samples: Sequence[Sample], methods: Sequence[Method],
                progress: Callable[[int, int], None] | None = None, keep_images: int = 0,
                soft_loader: Callable[[str], Any] | None = None, reference: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate every sample with every method and grade **every candidate**.

    Returns one row per (sample, method, candidate) — weight, the selector's d_t / d_p / z, whether
    it was chosen, and the metrics — and, for the first ``keep_images`` samples, the images
    (``{sample_id: {"target": ..., "ground_truth": ..., method: chosen image}}``) for the grid.
    ``soft_loader(folder)`` loads an ablation's soft-prompt weights (methods with ``soft_prompt``).
    ``reference=True`` also grades the target item's own image (method :data:`REFERENCE`, not
    generated): the ceiling of the accuracy metrics.
    """
    rows: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}
    softs: dict[str, Any] = {}
    for n, s in enumerate(samples):
        req = from_dataset(ds, sample_id=s.sample_id)
        user = ds.users[s.user_id]
        hist = history_item_ids(user)
        taste = user.attributes.get("taste_description")
        if n < keep_images:
            kept[s.sample_id] = {"target": grader.image(s.target_id)[0], "title": req.target.title,
                                 "taste": user.attributes.get("taste", ""),
                                 "ground_truth": (grader.image(s.ground_truth_personalized)[0]
                                                  if s.ground_truth_personalized else None)}
        if reference:
            mt = grader.grade(grader.image(s.target_id), s, taste, hist)[0]
            rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "method": REFERENCE, "weight": 0.0,
                         "d_t": float("nan"), "d_p": float("nan"), "chosen": True, **mt})
        for m in methods:
            if m.soft_prompt and m.soft_prompt not in softs:
                if soft_loader is None:
                    raise ValueError(f"method {m.name} needs a soft_loader for {m.soft_prompt}")
                softs[m.soft_prompt] = soft_loader(m.soft_prompt)
            res = pmg.generate(req.user, req.target, req.items, context=req.context,
                               target_image=req.target_image, history_images=[ds.image_path(i) for i in hist],
                               soft_prompt=softs.get(m.soft_prompt) if m.soft_prompt else None, **m.overrides)
            metrics = grader.grade(res.images, s, taste, hist)
            for i, (cand, mt) in enumerate(zip(res.record.candidates, metrics)):
                rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "method": m.name,
                             "weight": cand.weight, "d_t": cand.d_t, "d_p": cand.d_p,
                             "chosen": i == res.chosen, **mt})
            if n < keep_images:
                kept[s.sample_id][m.name] = res.chosen_image
                kept[s.sample_id][m.name + ":keywords"] = ", ".join(res.record.preference_keywords[:4])
        if progress is not None:
            progress(n + 1, len(samples))
    return rows, kept


# ------------------------------------------------------------------ views of the candidate rows
def selected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidate each method's selection kept."""
    return [r for r in rows if r["chosen"]]


def at_weight(rows: list[dict[str, Any]], weight: float) -> list[dict[str, Any]]:
    """The candidates at one preference weight (no selection)."""
    return [r for r in rows if abs(r["weight"] - weight) < 1e-9]


def reselect(rows: list[dict[str, Any]], alpha: float, min_accuracy: float = 0.0) -> list[dict[str, Any]]:
    """The candidate PMG's selection would keep at ``α`` (and ``min_accuracy``), recomputed from the
    recorded d_t and d_p with the pipeline's own rule (:func:`pmgen.stages.select.argmax_z`)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["sample_id"], r["method"]), []).append(r)
    out = []
    for cands in groups.values():
        cands = sorted(cands, key=lambda r: r["weight"])
        z = z_score(torch.tensor([c["d_t"] for c in cands]), torch.tensor([c["d_p"] for c in cands]), alpha)
        out.append(cands[argmax_z(z, keeps_target([c["d_t"] for c in cands], min_accuracy))])
    return out


def summarize(rows: list[dict[str, Any]], baseline: str | None = "none") -> dict[str, dict[str, Any]]:
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
        if "weight" in mr[0]:
            out[m]["mean_weight"] = statistics.fmean(r["weight"] for r in mr)
    if baseline and baseline in out:
        for m in methods:
            for metric, st in out[m].items():
                if not isinstance(st, dict):
                    continue
                b = out[baseline].get(metric, {}).get("mean")
                if b not in (None, 0):
                    st["gain_vs_" + baseline] = (st["mean"] - b) / abs(b)
    return out


def both_at_once(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, over its *personalized* results (selected candidate with ``w > 0``): the share in
    which the evaluator finds the target in its top 5 of 100 names **and** the user's taste first of
    the 12 — with a 95% CI over users, and how many results were personalized at all."""
    out: dict[str, dict[str, Any]] = {}
    sel = selected(rows)
    for m in dict.fromkeys(r["method"] for r in sel):
        mine = [r for r in sel if r["method"] == m and "both" in r]
        pers = [r for r in mine if r["weight"] > 0]
        mean, lo, hi = bootstrap_ci([r["both"] for r in pers], [r["user_id"] for r in pers])
        out[m] = {"mean": mean, "ci95": [lo, hi], "n": len(pers), "n_results": len(mine),
                  "personalized_share": len(pers) / len(mine) if mine else float("nan")}
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


def alpha_sweep(rows: list[dict[str, Any]], method: str, alphas: Sequence[float] | None = None,
                min_accuracy: float = 0.0) -> list[dict[str, Any]]:
    """For each α: the selected candidates' mean accuracy and personalization metrics (one method)."""
    alphas = list(alphas) if alphas is not None else [i / 10 for i in range(11)]
    mr = [r for r in rows if r["method"] == method]
    curve = []
    for a in alphas:
        pick = reselect(mr, a, min_accuracy)
        point: dict[str, Any] = {"alpha": a, "mean_weight": statistics.fmean(r["weight"] for r in pick)}
        for metric in HIGHER_IS_BETTER:
            vals = [r[metric] for r in pick if metric in r]
            if vals:
                point[metric] = statistics.fmean(vals)
        curve.append(point)
    return curve


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


# ------------------------------------------------------------------ outputs
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
                cells.append(f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                             + (f" ({gain:+.1%})" if gain is not None and name != baseline else ""))
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
    (out / "metrics.json").write_text(json.dumps(
        {"meta": meta, "selected": sel, "fixed_weight": {str(k): v for k, v in fixed.items()},
         "paired_margins_fixed_weight_vs_baseline": fixed_margins,
         "alpha_sweep": {"method": main_method, "default_alpha": alpha, "curve": curve},
         "both_at_once": both, 
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
    parts = [f"# pmgen evaluation\n\n{meta.get('n_samples')} held-out samples ({meta.get('n_users')} users) of "
             f"`sticker-users`, graded by the evaluator `{meta.get('evaluator')}` (never used for selection); "
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
        parts += [f"| {m} | {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {v['n']} of {v['n_results']} |"
                  if v["n"] else f"| {m} | – | 0 of {v['n_results']} |" for m, v in both.items()]
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
