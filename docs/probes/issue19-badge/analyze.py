"""Summaries of eval_badge.py rows: selected result per method vs none, best taste at accuracy >= -5% (α sweep),
both at once, evaluator-oracle ceiling.

    python docs/probes/issue19-badge/analyze.py rows.jsonl [--union]

--union adds "default+badge": one choice among the default's 5 candidates and the badge method's 4 (its
α 2/3 line is re-chosen, as the best-α line always is)."""
import json, sys, statistics
from pmgen.eval.summary import reselect, candidate_ceiling

rows = [json.loads(l) for l in open(sys.argv[1])]
none = [dict(r, method="none", chosen=True) for r in rows if r["method"] == "default" and r["weight"] == 0]
if "--union" in sys.argv[2:]:  # badge weights shifted by 10 so that the two sets' weights never collide
    rows += [dict(r, method="default+badge", weight=r["weight"] + (10 if r["method"] == "badge" else 0),
                  chosen=False) for r in rows if r["method"] == "default" or (r["method"] == "badge" and r["weight"] > 0)]
rows = rows + none
methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
base = {k: statistics.fmean(r[k] for r in none if k in r) for k in ("acc_text", "pers_taste", "gt_hit", "target_top5", "lpips_history")
        if any(k in r for r in none)}
def line(name, sel):
    out = {k: statistics.fmean(r[k] for r in sel if k in r) for k in base}
    pers = [r for r in sel if r["weight"] > 0]
    both = statistics.fmean(r["both"] for r in pers) if pers else float("nan")
    rel = lambda k: (out[k] - base[k]) / base[k] * 100
    s = f"{name:28s} acc {out['acc_text']:.3f} ({rel('acc_text'):+.1f}%) taste {out['pers_taste']:.3f} ({rel('pers_taste'):+.1f}%) " \
        f"gt {out['gt_hit']:.3f} top5 {out['target_top5']:.3f} both {both:.3f} ({len(pers)} pers)"
    if "lpips_history" in out:
        s += f" lpips_hist {rel('lpips_history'):+.1f}%"
    print(s)
print(f"n samples {len(none)}; none: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))
for m in methods:
    mr = [r for r in rows if r["method"] == m]
    line(m + " (alpha 2/3)", reselect(mr, 2 / 3) if m == "default+badge" else [r for r in mr if r["chosen"]])
    best = None
    for a in [i / 40 for i in range(41)]:
        sel = reselect(mr, a)
        acc = statistics.fmean(r["acc_text"] for r in sel)
        if acc >= 0.95 * base["acc_text"]:
            t = statistics.fmean(r["pers_taste"] for r in sel)
            if best is None or t > best[0]:
                best = (t, a, sel)
    if best:
        line(f"{m} best a={best[1]:.3f}", best[2])
    c = candidate_ceiling([r for r in rows if r["method"] in (m, "none")])
    if m in c:
        cc = c[m]
        print(f"   oracle ceiling: " + ", ".join(f"{k} {v['mean']:.3f}" if isinstance(v, dict) and 'mean' in v else f"{k} {v}" for k, v in cc.items() if k in ("acc_text", "pers_taste", "both", "gt_hit")))
