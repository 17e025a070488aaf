"""How often do the retrieved exemplars themselves (the real catalog images, not redrawn) hold both the
target and the user's hidden taste, by the evaluator? No generation: seconds.

    python docs/probes/issue41/retrieval_only.py --split val --n 60
"""
import argparse
import statistics

import torch

from pmgen.data import datasets
from pmgen.data.images import load_image
from pmgen.data.schema import recent_item_ids
from pmgen.eval.evaluate import evaluation_samples, history_item_ids
from pmgen.eval.grading import sticker_grader
from pmgen.paths import cache_dir
from pmgen.pipeline import HISTORY_NAMES
from pmgen.presets import get_preset, load_generator, load_scorer, load_text_encoder
from pmgen.stages.retrieve import ExemplarIndex
from pmgen.stages.select import preference_vector

ap = argparse.ArgumentParser()
ap.add_argument("--split", default="val")
ap.add_argument("--n", type=int, default=60)
ap.add_argument("--users-seed", type=int, default=0)
ap.add_argument("--pref", default="names", choices=["names", "images", "both"],
                help="the user's side: history names (the selector's text tower), history images (its image "
                     "tower, the mean of the index rows of the recent history items) or both averaged")
ap.add_argument("--exclude-history", action="store_true", help="never return an item of the user's history")
a = ap.parse_args()
p = get_preset("sticker-tiny")
te = load_text_encoder(p, load_generator(p))
sel = load_scorer(p, "selector", te)
grader = sticker_grader(load_scorer(p, "evaluator", te), perceptual=False)
ds = datasets.load("sticker-users", seed=a.users_seed) if a.users_seed else datasets.load("sticker-users")
index = ExemplarIndex.build(sel, ds.items, lambda i: load_image(ds.image_path(i), 64) if ds.items[i].image else None,
                            cache_dir=cache_dir() / "exemplars")
samples = evaluation_samples(ds, a.n, a.split)
for alpha in (0.5, 2 / 3, 0.8):
    for floor in (0.0, 0.85, 0.9, 0.95):
        hits = {k: [] for k in (1, 2, 4, 8)}
        acc = []
        for s in samples:
            user = ds.users[s.user_id]
            names = [ds.items[i].title for i in recent_item_ids(user.events, HISTORY_NAMES) if i in ds.items]
            hist_ids = [i for i in recent_item_ids(user.events, HISTORY_NAMES) if i in index.row]
            pn = preference_vector(sel, "", names, "history")
            pi = torch.nn.functional.normalize(index.embeddings[[index.row[i] for i in hist_ids]].mean(0), dim=0) \
                if hist_ids else pn
            pv = {"names": pn, "images": pi, "both": (pn + pi) / 2}[a.pref]
            tv = sel.text_embeddings([ds.items[s.target_id].title])[0]
            found = index.search(tv, pv, 8, alpha, min_target=floor, target_item=s.target_id,
                                 exclude=history_item_ids(user) if a.exclude_history else ())
            if not found:
                for k in hits:
                    hits[k].append(0.0)
                continue
            imgs = torch.cat([grader.image(e.item_id) for e in found])
            m = grader.grade(imgs, s, user.attributes.get("taste_description"), history_item_ids(user))
            acc.append(m[0]["acc_text"])
            for k in hits:
                hits[k].append(max(r.get("both", 0) for r in m[:k]))
        print(f"α {alpha:.2f} floor {floor:.2f}: both among top-k exemplars " +
              " ".join(f"k{k} {statistics.fmean(v):.3f}" for k, v in hits.items()) +
              f"  | top-1 acc_text {statistics.fmean(acc):.3f}")
