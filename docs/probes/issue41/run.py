"""Issue 41 probe: structure-kept edits (inversion) and retrieved exemplars, on val users.

    python docs/probes/issue41/run.py --split val --n 60 --out runs/issue41/val
    python docs/probes/issue41/run.py --analyze runs/issue41/val

Each variant is a `pmgen evaluate` method (the default's settings plus overrides); every candidate is
graded by the evaluator (rows.jsonl). --analyze re-selects at α and prints, per variant: accuracy
and taste vs none, "both at once" over all requests, and the candidate ceiling (best candidate per
request, same metric).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

DEFAULT = {"use_soft": True, "mode": "compose", "target_text": "title", "contrast": 1.0, "preference_text": "history"}
VARIANTS = {
    "none": {"weights": (0.0,)},
    "default": DEFAULT,
    "none-inv": {"weights": (0.0,), "inversion": "ddim"},
    "inv": {**DEFAULT, "inversion": "ddim"},
    "inv-keep.5": {**DEFAULT, "inversion": "ddim", "keep": 0.5},
    "inv-noised": {**DEFAULT, "inversion": "noised"},
    "inv+x2": {**DEFAULT, "inversion": "ddim", "exemplars": 2},
    "inv+x2-w0": {**DEFAULT, "inversion": "ddim", "exemplars": 2, "exemplar_weight": 0.5},
    "inv+x4f": {**DEFAULT, "inversion": "ddim", "exemplars": 4, "exemplar_floor": 0.85},
    "inv.6-low": {**DEFAULT, "inversion": "ddim", "inversion_strength": 0.6, "weights": (0.0, 0.25, 0.5, 0.75, 1.0)},
    "inv.6-low+x4f": {**DEFAULT, "inversion": "ddim", "inversion_strength": 0.6, "weights": (0.0, 0.25, 0.5, 0.75, 1.0),
                      "exemplars": 4, "exemplar_floor": 0.85, "exemplar_weight": 0.5},
    "x3": {**DEFAULT, "inversion": "ddim", "weights": (0.0, 1.0), "exemplars": 3},
}


def run(args: argparse.Namespace) -> None:
    from pmgen import PMG
    from pmgen.data import datasets
    from pmgen.eval.evaluate import Method, evaluation_samples, run_methods
    from pmgen.eval.grading import sticker_grader
    from pmgen.presets import get_preset, load_scorer

    pmg = PMG.from_preset("sticker-tiny")
    ds = datasets.load("sticker-users", seed=args.users_seed) if args.users_seed else datasets.load("sticker-users")
    grader = sticker_grader(load_scorer(get_preset("sticker-tiny"), "evaluator", pmg.text_encoder), perceptual=False)
    samples = evaluation_samples(ds, args.n, args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    for name in names:
        path = out / f"{name}.jsonl"
        if path.exists():
            continue
        m = Method(name, dict(VARIANTS[name]))
        rows, _ = run_methods(pmg, grader, ds, samples, [m],
                              progress=lambda i, n: print(f"{name} {i}/{n}", file=sys.stderr, flush=True))
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(path)


def analyze(folder: Path, alphas: list[float], floor: float) -> None:
    from pmgen.eval.summary import reselect

    rows = {p.stem: [json.loads(l) for l in p.open()] for p in sorted(folder.glob("*.jsonl"))}
    common = set.intersection(*({r["sample_id"] for r in rs} for rs in rows.values()))  # like for like
    rows = {k: [r for r in rs if r["sample_id"] in common] for k, rs in rows.items()}
    print(f"{len(common)} requests in every variant")
    none = {r["sample_id"]: r for r in rows.get("none", [])}
    acc0 = statistics.fmean(r["acc_text"] for r in none.values()) if none else float("nan")
    taste0 = statistics.fmean(r["pers_taste"] for r in none.values()) if none else float("nan")
    print(f"{'variant':14s} {'α':>5s} {'acc':>7s} {'taste':>7s} {'both':>6s} {'top5':>6s} {'x-chosen':>8s} {'ceiling':>7s}")
    for name, rs in rows.items():
        by: dict[str, list] = {}
        for r in rs:
            by.setdefault(r["sample_id"], []).append(r)
        ceiling = statistics.fmean(max(c.get("both", 0) for c in cs) for cs in by.values())
        for a in alphas:
            pick = reselect(rs, a, floor)
            acc = statistics.fmean(r["acc_text"] for r in pick)
            taste = statistics.fmean(r["pers_taste"] for r in pick)
            both = statistics.fmean(r.get("both", 0) for r in pick)
            top5 = statistics.fmean(r["target_top5"] for r in pick)
            xs = statistics.fmean(1.0 if "start" in r else 0.0 for r in pick)
            print(f"{name:14s} {a:5.2f} {acc / acc0 - 1:+7.1%} {taste / taste0 - 1:+7.1%} {both:6.3f} {top5:6.3f} "
                  f"{xs:8.2f} {ceiling:7.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--users-seed", type=int, default=0)
    ap.add_argument("--out", default="runs/issue41/val")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--analyze")
    ap.add_argument("--alphas", default="0.5,0.667,0.8")
    ap.add_argument("--floor", type=float, default=0.0)
    a = ap.parse_args()
    if a.analyze:
        analyze(Path(a.analyze), [float(x) for x in a.alphas.split(",")], a.floor)
    else:
        run(a)
