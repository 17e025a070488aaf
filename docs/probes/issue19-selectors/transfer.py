"""Probe (issue 19): an α rule that carries over from val to new requests.

The α that maximized taste at accuracy ≥ −5% on the first 100 val requests overshot on the first 100
test requests (−8.6% instead of −4%). With 18 targets shared by val and test, the cause is not the
targets but the noise of picking the best α on 100 requests (the winner's curse). This script applies
one rule to pooled row files (e.g. each val user's first and second request) and reports every α with
the 95% bootstrap interval (resampling users) of the accuracy change:

    rule: among the α grid, the largest taste gain whose accuracy-change interval lies above −5%
          (the floor met with 97.5% confidence on the rows given), per selection set.

    python docs/probes/issue19-selectors/transfer.py runs/issue19/selectors/val100 runs/issue19/selectors/val-alt
    python docs/probes/issue19-selectors/transfer.py runs/issue19/selectors/test-alt --at ens2-hist=0.8
"""
from __future__ import annotations

import argparse
import json
import statistics

from common import METRICS, none_of

from pmgen.eval.stats import bootstrap_ci
from pmgen.eval.summary import reselect

ALPHAS = (0.5, 0.55, 0.6, 0.65, 2 / 3, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95)
FLOOR = -5.0

ap = argparse.ArgumentParser()
ap.add_argument("folders", nargs="+", help="folders with rows.jsonl (the same selection sets in each)")
ap.add_argument("--methods", default="default,ens2-hist,ens2-kw+hist,seed3-hist")
ap.add_argument("--at", action="append", default=[], help="set=α: report only this α for the set")
args = ap.parse_args()

rows = [json.loads(line) for f in args.folders for line in open(f"{f}/rows.jsonl")]
base = none_of(rows)
none = {r["sample_id"]: r for r in rows if r["method"] == "default" and r["weight"] == 0}
fixed = {k: float(v) for k, v in (s.split("=", 1) for s in args.at)}
print(f"{len(none)} requests, {len({r['user_id'] for r in none.values()})} users; none: "
      + ", ".join(f"{k} {base[k]:.4f}" for k in METRICS))


def stats(chosen: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per metric: the change vs none in percent, with its 95% interval over users."""
    out = {}
    for k in METRICS:
        diff = [100 * (r[k] - none[r["sample_id"]][k]) / base[k] for r in chosen]
        out[k] = bootstrap_ci(diff, [r["user_id"] for r in chosen])
    return out


for m in args.methods.split(","):
    mr = [r for r in rows if r["method"] == m]
    if not mr:
        print(f"{m}: no rows")
        continue
    best = None
    for a in ([fixed[m]] if m in fixed else ALPHAS):
        chosen = reselect(mr, a)
        st = stats(chosen)
        acc, taste = st["acc_text"], st["pers_taste"]
        pers = [r.get("both", 0.0) for r in chosen if r["weight"] > 0]
        both = statistics.fmean(pers) if pers else float("nan")
        ok = acc[1] >= FLOOR
        print(f"{m:14s} α {a:.3f}  accuracy {acc[0]:+6.1f}% [{acc[1]:+5.1f}, {acc[2]:+5.1f}]  "
              f"taste {taste[0]:+6.1f}% [{taste[1]:+5.1f}, {taste[2]:+5.1f}]  both|w>0 {both:.3f}  "
              + ("ok" if ok else ""))
        if ok and (best is None or taste[0] > best[1]):
            best = (a, taste[0], acc[0])
    if best and m not in fixed:
        print(f"{m:14s} RULE → α {best[0]:.3f}: accuracy {best[2]:+.1f}%, taste {best[1]:+.1f}%")
