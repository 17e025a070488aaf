"""Probe: the α × d_t-guard grid (reselect with min_accuracy) per selection set, for one split folder.

    python docs/probes/issue19-selectors/guard.py val100    # runs/issue19/selectors/<split>/rows.jsonl
"""
import json
import sys

from common import change, none_of

from pmgen.eval.summary import reselect

split = sys.argv[1]
rows = [json.loads(line) for line in open(f"runs/issue19/selectors/{split}/rows.jsonl")]
base = none_of(rows)
for m in ("default", "ens2-hist", "ens2-kw+hist"):
    mr = [r for r in rows if r["method"] == m]
    cells = [f"{a}/{g}:{change(reselect(mr, a, g), base)}" for a in (0.85, 0.9, 0.95) for g in (0.75, 0.8, 0.85, 0.88)]
    print(split, m, "  ".join(cells))
