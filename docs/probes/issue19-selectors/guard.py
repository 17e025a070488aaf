"""Probe: the α × d_t-guard grid (reselect with min_accuracy) per selection set, for one split folder.

    python docs/probes/issue19-selectors/guard.py val100    # runs/issue19/selectors/<split>/rows.jsonl
"""
import json
import statistics
import sys
from pmgen.eval.summary import reselect
split=sys.argv[1]
rows=[json.loads(line) for line in open(f"runs/issue19/selectors/{split}/rows.jsonl")]
none=[r for r in rows if r["method"]=="default" and r["weight"]==0]
b={k:statistics.fmean(r[k] for r in none) for k in ("acc_text","pers_taste")}
for m in ("default","ens2-hist","ens2-kw+hist"):
    mr=[r for r in rows if r["method"]==m]
    out=[]
    for a in (0.85,0.9,0.95):
        for g in (0.75,0.8,0.85,0.88):
            sel=reselect(mr,a,g)
            acc=(statistics.fmean(r["acc_text"] for r in sel)/b["acc_text"]-1)*100
            t=(statistics.fmean(r["pers_taste"] for r in sel)/b["pers_taste"]-1)*100
            out.append(f"{a}/{g}:{acc:+.1f}/{t:+.1f}")
    print(split,m,"  ".join(out))
