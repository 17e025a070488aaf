"""Probe (issue 19): badge candidates from the badge-inpainting UNet (train_badge.py) vs the default.

For each val sample: the default plan (the preset's own; the first run's with --first-run-selection)
renders its 5 candidates; the badge method keeps the w = 0 baseline and draws, for w = 0.5 … 2, a
sticker of the preference keywords in a 20–28 px box (to 32 px with --box-max 32) in the baseline's
emptiest corner (the box at strength 1, everything else held to the baseline: Differential
Diffusion's hold), with the badge UNet seeing the baseline with the box whitened. Both candidate sets
are chosen by pmgen's own selection (pmg.finish) and graded by the evaluator. Rows are written like
`pmgen evaluate`'s (rows.jsonl) for re-selection.

    python docs/probes/issue19-badge/eval_badge.py --n 60 --out runs/issue19/badge/val [--unet DIR]
    # the second run (train_badge.py --box-max 32 --general 0.5 --box-only)
    python docs/probes/issue19-badge/eval_badge.py --n 6 --box-max 32 --out runs/issue19/badge/v2-val6 \
        --unet ~/.cache/pmgen/train/badge-probe-v2/export/unet
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pmgen import PMG
from pmgen.data import datasets
from pmgen.data.datasets.sticker_users import TASTES
from pmgen.data.requests import from_dataset
from pmgen.eval.evaluate import evaluation_samples, history_item_ids, CONTRAST_SELECTION
from pmgen.eval.grading import Grader
from pmgen.paths import cache_dir
from pmgen.presets import load_scorer
from pmgen.stages.condition import keywords_text

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=60)
ap.add_argument("--split", default="val")
ap.add_argument("--out", default="runs/issue19/badge/val")
ap.add_argument("--unet", default=str(cache_dir() / "train" / "badge-probe" / "export" / "unet"))
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lpips", action="store_true")
ap.add_argument("--first-run-selection", action="store_true", help="choose as the first run did (the default "
                "of then: the seed-1 selector, keywords against the background); otherwise the preset's own default")
ap.add_argument("--box-max", type=int, default=28, help="the box at w = 2 (px; 20 at w = 0.5), as trained")
ap.add_argument("--zoom", type=float, default=None, metavar="S", help="two-scale sampling instead of the badge UNet: "
                "the shipped generator draws the keywords' sticker at its own 64 px scale, that drawing (its ink, "
                "squared) goes into the box of the baseline, and the generator redraws the box at strength S "
                "(0 = the VAE's reconstruction of the layout), everything else held to the baseline")
ap.add_argument("--element", choices=["keywords", "soft"], default="keywords", help="with --zoom: the zoomed "
                "view's condition, the preference keywords alone or the plan's whole preference condition "
                "(the keywords and the soft embeddings: compose mode's extra condition)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

from diffusers import UNet2DConditionModel  # noqa: E402

pmg = PMG.from_preset("sticker-tiny", **({"selector": "zoo:sticker-tiny/selector"} if args.first_run_selection else {}))
gen = pmg.generator
unet9 = None if args.zoom is not None else UNet2DConditionModel.from_pretrained(args.unet).eval().requires_grad_(False)


class WithExtra(torch.nn.Module):
    """The 9-channel UNet behind the 4-channel call of StickerGenerator._denoise."""

    def __init__(self, unet, extra):
        super().__init__()
        self.unet, self.extra, self.config = unet, extra, unet.config

    def forward(self, x, t, encoder_hidden_states=None, **kw):
        e = self.extra.repeat(x.shape[0] // self.extra.shape[0], 1, 1, 1)
        return self.unet(torch.cat([x, e], 1), t, encoder_hidden_states=encoder_hidden_states, **kw)


ds = datasets.load("sticker-users")
grader = Grader(load_scorer(pmg.preset, "evaluator", pmg.text_encoder), datasets.load("stickers"),
                None, perceptual=False, tastes=[t.description for t in TASTES])
if args.lpips:
    from pmgen.eval.metrics import STLPIPS
    grader.lpips = STLPIPS("alex")
samples = evaluation_samples(ds, args.n, split=args.split)
overrides = {"use_soft": True, "mode": "compose", **(CONTRAST_SELECTION if args.first_run_selection else {})}
empty, _ = pmg.text_encoder.token_states([""], max_length=gen.text_max_length)


def corner_box(img: torch.Tensor, size: int) -> tuple[int, int]:
    """(x, y) of the size×size corner box with the least ink in ``img`` [1, 3, 64, 64]."""
    ink = 1 - img[0].min(0).values
    best = None
    for place in range(4):
        x = 0 if place % 2 == 0 else 64 - size
        y = 0 if place < 2 else 64 - size
        v = float(ink[y:y + size, x:x + size].sum())
        if best is None or v < best[0]:
            best = (v, x, y)
    return best[1], best[2]


def ink_square(img: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """The square around the ink of ``img`` [1, 3, 64, 64] (white background), ``pad`` px of margin."""
    ys, xs = torch.nonzero(img[0].min(0).values < 0.9, as_tuple=True)
    if len(ys) == 0:
        return img
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = min(64, max(y1 - y0, x1 - x0) + 2 * pad)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top, left = min(max(cy - side // 2, 0), 64 - side), min(max(cx - side // 2, 0), 64 - side)
    return img[:, :, top:top + side, left:left + side]


def badges(baseline: torch.Tensor, pref: list[str], weights, seed: int, preference=None) -> torch.Tensor:
    cond, _ = pmg.text_encoder.token_states([keywords_text(pref)], max_length=gen.text_max_length)
    steps = dict(num_inference_steps=pmg.settings.num_inference_steps, guidance_scale=pmg.settings.guidance_scale)
    view = preference if args.element == "soft" else cond
    blank = pmg.text_encoder.token_states([""], max_length=view.shape[1])[0] if args.zoom is not None else None
    element = None if args.zoom is None else ink_square(gen.text_to_image(view, blank, seed=seed, **steps))
    imgs = []
    real = gen.unet
    for w in weights:
        u = (w - 0.5) / 1.5
        size = 4 * round((20 + (args.box_max - 20) * u) / 4)
        x, y = corner_box(baseline, size)
        if element is not None:
            layout = baseline.clone()
            layout[:, :, y:y + size, x:x + size] = torch.nn.functional.interpolate(
                element, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
            smap = torch.zeros(1, 1, 64, 64)
            smap[:, :, y:y + size, x:x + size] = args.zoom
            imgs.append(gen.image_to_image(layout, cond, empty, strength_map=smap, seed=seed, **steps))
            continue
        masked = baseline.clone()
        masked[:, :, y:y + size, x:x + size] = 1.0
        smap = torch.zeros(1, 1, 64, 64)
        smap[:, :, y:y + size, x:x + size] = 1.0
        m = torch.zeros(1, 1, 16, 16)
        m[:, :, y // 4:(y + size) // 4, x // 4:(x + size) // 4] = 1
        extra = torch.cat([m, gen.encode(masked)], 1)
        gen.unet = WithExtra(unet9, extra)
        try:
            imgs.append(gen.image_to_image(baseline, cond, empty, strength_map=smap, seed=seed, **steps))
        finally:
            gen.unet = real
    return torch.cat(imgs)


rows = []
kept = {}
for n, s in enumerate(samples):
    req = from_dataset(ds, sample_id=s.sample_id)
    user = ds.users[s.user_id]
    hist = history_item_ids(user)
    taste = user.attributes.get("taste_description")
    plan = pmg.plan(req.user, req.target, req.items, context=req.context, target_image=req.target_image,
                    history_images=[ds.image_path(i) for i in hist], **overrides)
    images = pmg.render(plan)
    results = {"default": (pmg.finish(plan, images), images)}
    ws = [w for w in plan.settings.weights if w > 0]
    if plan.preference_keywords:
        bimgs = torch.cat([images[:1], badges(images[:1], plan.preference_keywords, ws, plan.settings.seed,
                                              plan.conditions[-1].extra_prompt_embeds)])
        results["badge"] = (pmg.finish(plan, bimgs), bimgs)
    for name, (res, imgs) in results.items():
        metrics = grader.grade(imgs, s, taste, hist)
        for i, (cand, mt) in enumerate(zip(res.record.candidates, metrics)):
            rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "method": name, "weight": cand.weight,
                         "d_t": cand.d_t, "d_p": cand.d_p, "chosen": i == res.chosen, **mt})
    if n < 12:
        kept[s.sample_id] = {k: v[1] for k, v in results.items()}
    print(f"{n + 1}/{len(samples)}", flush=True)
    with (out / "rows.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
torch.save({k: {m: v.half() for m, v in d.items()} for k, d in kept.items()}, out / "kept.pt")
print("done")
