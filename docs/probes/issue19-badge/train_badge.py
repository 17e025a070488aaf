"""Probe (issue 19): a badge-inpainting UNet. Fine-tuned from the shipped sticker generator with 5 more
input channels (box mask + latents of the image with the box whitened, zero-initialised), on badge
composites of training targets (pmgen.composites.render, mode badge): the target full size, a taste
sticker in a corner box; the condition describes only what goes in the box (a taste keyword list, or
the element's title). Val/test targets and ground truths are never targets or elements.

    python docs/probes/issue19-badge/train_badge.py --minutes 60 [--resume]

Second run (v2, the changes the first run's result asked for): boxes up to 32 px, half of the rows a
general "draw X small" (any training sticker in the box, captioned with its own title), and the loss only
on the box (the rest is given to the UNet; it need not be redrawn):

    python docs/probes/issue19-badge/train_badge.py --box-max 32 --general 0.5 --box-only \
        --dir ~/.cache/pmgen/train/badge-probe-v2 --minutes 60 [--resume]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from pmgen.data import datasets
from pmgen.data.datasets.sticker_users import TASTES
from pmgen.data.images import load_image
from pmgen.models.generator import StickerGenerator
from pmgen.models.text_encoder import TextEncoder
from pmgen.paths import cache_dir
from pmgen.presets import ZOO
from pmgen.stages.condition import keywords_text
from pmgen import composites as C
from pmgen.train.losses import min_snr_weight
from pmgen.train.run import atomic_save

ap = argparse.ArgumentParser()
ap.add_argument("--minutes", type=float, default=60)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--resume", action="store_true")
ap.add_argument("--dir", default=str(cache_dir() / "train" / "badge-probe"))
ap.add_argument("--box-weight", type=float, default=4.0)
ap.add_argument("--box-max", type=int, default=28, help="the largest box (px; the smallest is 20)")
ap.add_argument("--general", type=float, default=0.0, help="share of rows with any training sticker in the box, "
                "captioned with its own title (general 'draw X small')")
ap.add_argument("--box-only", action="store_true", help="the loss only inside the box")
args = ap.parse_args()
torch.set_num_threads(args.threads)
run = Path(args.dir)
run.mkdir(parents=True, exist_ok=True)

gen = StickerGenerator.from_pretrained(ZOO / "sticker-tiny/generator")
vae, sf = gen.vae, gen.scaling_factor
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

cfg = dict(gen.unet.config)
cfg["in_channels"] = 9
unet = UNet2DConditionModel.from_config(cfg)
sd = gen.unet.state_dict()
w = sd["conv_in.weight"]
sd["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:])], 1)
unet.load_state_dict(sd)
noise_sched = DDPMScheduler.from_config(gen.scheduler.config)
te = TextEncoder.minilm()

ds = datasets.load("sticker-users")
items = ds.items
held_t, held_gt = C.heldout_from_sticker_users(ds.samples)
held = held_t | held_gt
cache: dict[str, np.ndarray] = {}


def img(i: str) -> np.ndarray:
    if i not in cache:
        cache[i] = (load_image(ds.image_path(i), 64)[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return cache[i]


targets = [i for i in sorted(items) if i not in held and not items[i].attributes.get("skintone")
           and items[i].attributes.get("group") not in ("flags", "component")]
pools = {t.name: [i for i in sorted(items) if t.matches(items[i]) and i not in held
                  and not items[i].attributes.get("skintone")] for t in TASTES}
kw_pools = {t.name: C.taste_keyword_pool(t, [items[i] for i in pools[t.name]]) for t in TASTES}
print(f"{len(targets)} targets, taste pools {[len(v) for v in pools.values()]}", flush=True)
text_cache: dict[str, torch.Tensor] = {}


def states(text: str) -> torch.Tensor:
    if text not in text_cache:
        s, _ = te.token_states([text], max_length=gen.text_max_length)
        text_cache[text] = s[0]
    return text_cache[text]


def box_of(size: int, place: int) -> tuple[int, int, int]:
    x = 0 if place % 2 == 0 else 64 - size
    y = 0 if place < 2 else 64 - size
    return x, y, size


def latent_box_mask(x: int, y: int, s: int) -> torch.Tensor:
    m = torch.zeros(1, 16, 16)
    m[:, y // 4:(y + s + 3) // 4, x // 4:(x + s + 3) // 4] = 1
    return m


def make_row(rng: random.Random):
    taste = rng.choice(TASTES)
    while True:
        t = rng.choice(targets)
        if not taste.matches(items[t]):
            break
    el = rng.choice(pools[taste.name])
    u = rng.random()
    place = rng.randrange(4)
    if args.general > 0 and rng.random() < args.general:  # any training sticker, named by its own title
        el = rng.choice(targets)
        while el == t:
            el = rng.choice(targets)
    x, y, s = box_of(round(20 + (args.box_max - 20) * u), place)  # the first run: 20–28 px, as composites.render
    canvas = img(t).astype(np.float32)
    C._paste(canvas, img(el), s, x, y)
    comp = (canvas.clip(0, 255) + 0.5).astype(np.uint8)
    masked = img(t).copy()
    masked[y:y + s, x:x + s] = 255
    general = el not in pools[taste.name]
    text = items[el].title if general or rng.random() >= 0.5 \
        else keywords_text(C.pick_keywords(kw_pools[taste.name], rng, taste.name))
    return comp, masked, latent_box_mask(x, y, s), text


opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
ema = copy.deepcopy(unet).requires_grad_(False)
step, seconds = 0, 0.0
rng = random.Random(0)
g = torch.Generator().manual_seed(0)
ck = run / "last.pt"
if args.resume and ck.is_file():
    st = torch.load(ck, weights_only=False)
    unet.load_state_dict(st["unet"])
    ema.load_state_dict(st["ema"])
    opt.load_state_dict(st["opt"])
    step, seconds = st["step"], st["seconds"]
    rng.setstate(st["rng"])
    g.set_state(st["g"])
    torch.set_rng_state(st["torch"])
    print(f"resumed at step {step}", flush=True)
empty = states("")


def save() -> None:
    atomic_save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                 "seconds": seconds, "rng": rng.getstate(), "g": g.get_state(), "torch": torch.get_rng_state()}, ck)
    out = run / "export"
    out.mkdir(exist_ok=True)
    ema.save_pretrained(out / "unet")
    (out / "info.json").write_text(json.dumps({"step": step, "seconds": seconds, "batch": args.batch,
                                               "lr": args.lr, "box_weight": args.box_weight,
                                               "box_max": args.box_max, "general": args.general,
                                               "box_only": args.box_only}))


unet.train()
start = time.monotonic()
last_ck = start
losses = []
while time.monotonic() - start < 60 * args.minutes:
    t0 = time.monotonic()
    rows = [make_row(rng) for _ in range(args.batch)]
    with torch.no_grad():
        comp = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
        masked = torch.from_numpy(np.stack([r[1] for r in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = vae.encode(comp).latent_dist.mean * sf
        mlat = vae.encode(masked).latent_dist.mean * sf
    mask = torch.stack([r[2] for r in rows])
    drop = torch.rand(len(rows), generator=g) < 0.1
    ctx = torch.stack([empty if drop[k] else states(r[3]) for k, r in enumerate(rows)])
    noise = torch.randn(lat.shape, generator=g)
    ts = torch.randint(0, noise_sched.config.num_train_timesteps, (len(rows),), generator=g)
    noisy = noise_sched.add_noise(lat, noise, ts)
    target = noise_sched.get_velocity(lat, noise, ts)
    pred = unet(torch.cat([noisy, mask, mlat], 1), ts, encoder_hidden_states=ctx).sample
    err = (pred - target).pow(2).mean(1, keepdim=True)
    if args.box_only:
        per_row = (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    else:
        per_row = (err * (1 + args.box_weight * mask)).flatten(1).mean(1)
    loss = (min_snr_weight(noise_sched, ts, 5.0) * per_row).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    for pg in opt.param_groups:
        pg["lr"] = args.lr * min(1.0, (step + 1) / 100)
    opt.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), unet.parameters()):
            pe.mul_(0.995).add_(p.detach(), alpha=0.005)
    step += 1
    seconds += time.monotonic() - t0
    losses.append(float(loss.detach()))
    if step % 25 == 0:
        print(json.dumps({"time": time.strftime("%H:%M:%S"), "step": step, "loss": round(sum(losses) / len(losses), 5),
                          "s_per_step": round(seconds / max(step, 1), 3)}), flush=True)
        losses = []
    if time.monotonic() - last_ck > 300:
        save()
        last_ck = time.monotonic()
save()
print(f"done at step {step}, {seconds / 60:.1f} min", flush=True)
