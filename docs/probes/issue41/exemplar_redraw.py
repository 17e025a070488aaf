"""Do the retrieved exemplars keep "both" when the generator redraws them? The real image against the
redraw under the target + preference condition at several inversion strengths (no target candidates).

    OMP_NUM_THREADS=1 python docs/probes/issue41/exemplar_redraw.py --n 30 --strengths 1,0.6,0.3
"""
import argparse
import statistics

import torch

from pmgen import PMG
from pmgen.data import datasets
from pmgen.data.requests import from_dataset
from pmgen.eval.evaluate import evaluation_samples, history_item_ids
from pmgen.eval.grading import sticker_grader
from pmgen.presets import get_preset, load_scorer

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=30)
ap.add_argument("--split", default="val")
ap.add_argument("--strengths", default="1,0.6,0.3")
ap.add_argument("--k", type=int, default=4)
ap.add_argument("--floor", type=float, default=0.85)
a = ap.parse_args()
pmg = PMG.from_preset("sticker-tiny")
ds = datasets.load("sticker-users")
grader = sticker_grader(load_scorer(get_preset("sticker-tiny"), "evaluator", pmg.text_encoder), perceptual=False)
strengths = [float(x) for x in a.strengths.split(",")]
both = {"real": [], **{s: [] for s in strengths}}
acc = {"real": [], **{s: [] for s in strengths}}
for n, s in enumerate(evaluation_samples(ds, a.n, a.split)):
    req = from_dataset(ds, sample_id=s.sample_id)
    user = ds.users[s.user_id]
    taste = user.attributes.get("taste_description")
    hist = history_item_ids(user)
    plan = pmg.plan(req.user, req.target, req.items, context=req.context, target_image=req.target_image,
                    item_images=req.item_image, inversion="ddim", exemplars=a.k, exemplar_floor=a.floor, weights=(0.0,))
    if not plan.exemplars:
        for key in both:
            both[key].append(0.0)
        continue
    real = grader.grade(plan.exemplar_init, s, taste, hist)
    both["real"].append(max(m.get("both", 0) for m in real))
    acc["real"].append(statistics.fmean(m["acc_text"] for m in real))
    c0, c = plan.conditions[0], plan.exemplar_condition
    names = torch.stack([pmg.builder("compose").encode(e.title)[0] for e in plan.exemplars])
    for st in strengths:
        inv = pmg.generator.invert(plan.exemplar_init, names, c0.negative_prompt_embeds, strength=st,
                                   num_inference_steps=20, guidance_scale=4.0)
        k = len(plan.exemplars)
        imgs = pmg.generator.edit(inv, c.prompt_embeds.expand(k, -1, -1), c.negative_prompt_embeds,
                                  extra_prompt_embeds=c.extra_prompt_embeds.expand(k, -1, -1),
                                  extra_guidance_scale=c.extra_scale, extra_base=c.extra_base)
        m = grader.grade(imgs, s, taste, hist)
        both[st].append(max(r.get("both", 0) for r in m))
        acc[st].append(statistics.fmean(r["acc_text"] for r in m))
    print(n + 1, {str(k): round(statistics.fmean(v), 3) for k, v in both.items()}, flush=True)
print("both among the exemplars (best of k):", {str(k): round(statistics.fmean(v), 3) for k, v in both.items()})
print("mean acc_text of the exemplars:", {str(k): round(statistics.fmean(v), 3) for k, v in acc.items() if v})
