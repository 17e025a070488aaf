"""Probe: a second accuracy signal for the choice: the candidate's image similarity to the w = 0 baseline
(same selectors), averaged with d_t to the title. d_p as in ensemble.py's "-kw+hist" / "-hist" sets.

    python docs/probes/issue19-selectors/baseline_dt.py val100 [--sets ens2]   # runs/issue19/selectors/<split>
"""
import argparse
import json
import os
from pathlib import Path

import torch
from common import change, history_dp, load_selectors, means

ap = argparse.ArgumentParser()
ap.add_argument("split")
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
torch.set_num_threads(a.threads)
from pmgen.data import datasets  # noqa: E402
from pmgen.eval.evaluate import history_item_ids  # noqa: E402
from pmgen.presets import get_preset, load_preference_background  # noqa: E402
from pmgen.stages.select import argmax_z, background_embedding, to_unit, z_score  # noqa: E402

folder = Path("runs/issue19/selectors") / a.split
store = torch.load(folder / "candidates.pt", weights_only=False)
ds = datasets.load("sticker-users")
sel = load_selectors("zoo:sticker-tiny/selector+" + os.path.expanduser("~/.cache/pmgen/reference/selector-seed3"))
bg = background_embedding(sel, load_preference_background(get_preset("sticker-tiny")))
alphas, mixes = (0.8, 0.85, 0.9, 0.95), (0.0, 0.25, 0.5)
res = {(v, al, mx): [] for v in ("-hist", "-kw+hist") for al in alphas for mx in mixes}
base = []
for sid, st in store.items():
    im = st["images"].float()
    emb = sel.image_embeddings(im)
    titles = [ds.items[i].title for i in history_item_ids(ds.users[st["user_id"]])]
    dt_text = to_unit(emb @ sel.text_embeddings([st["target_text"]])[0])
    dt_base = to_unit(emb @ emb[0])
    base.append(st["metrics"][0])
    for v, dp in history_dp(sel, emb, titles, st["pref_text"], bg).items():
        for al in alphas:
            for mx in mixes:
                dt = (1 - mx) * dt_text + mx * dt_base
                res[(v, al, mx)].append(st["metrics"][argmax_z(z_score(dt, dp, al))])
b = means(base)
for v in ("-hist", "-kw+hist"):
    print(a.split, v[1:], "  ".join(f"{al}/{mx}:{change(res[(v, al, mx)], b)}" for al in alphas for mx in mixes))
print(json.dumps({"n": len(store)}))
