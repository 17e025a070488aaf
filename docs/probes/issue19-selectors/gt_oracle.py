"""Probe (issue 19): the best ground-truth hit rate the default's candidates hold at the accuracy floor.

An oracle (the evaluator's own grades) keeps the w = 0 baseline, or gives a user the personalized candidate
that the evaluator takes for the recorded personalized sticker (its nearest catalog item), cheapest
accuracy first, while the mean accuracy stays ≥ 95% of the baseline's (pmgen.eval.judge.substitution_bound).
Reads the candidate stores of `ensemble.py candidates`; nothing is rendered.

    python docs/probes/issue19-selectors/gt_oracle.py runs/issue19/selectors/val runs/issue19/selectors/test \\
        runs/issue19/selectors/users1
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from pmgen.eval.judge import substitution_bound

for folder in sys.argv[1:]:
    store = torch.load(Path(folder) / "candidates.pt", weights_only=False)
    samples = []
    for entry in store.values():
        base, *others = entry["metrics"]  # the w = 0 baseline first, as rendered
        samples.append((base["acc_text"], base.get("gt_hit"), [(m["acc_text"], m["gt_hit"]) for m in others
                                                                if "gt_hit" in m]))
    b = substitution_bound(samples)
    none = [h for _, h, _ in samples if h is not None]
    print(f"{folder}: {len(samples)} samples, {b['n_with_ground_truth']} with a ground truth; w = 0 hit "
          f"{sum(none) / len(none):.3f}; oracle at accuracy >= 95%: {b['gt_hit']:.3f} ({b['swaps']} swapped, "
          f"accuracy kept {b['accuracy_kept']:.1%})")
