"""``pmgen models report``: the sticker generator's quality figures, graded by the **evaluator**.

Protocol (100 candidate names per image: the true one + 99 names of items of other groups):

* **real**: the evaluator's top-5 rate on the catalog images themselves (the ceiling);
* **faithful**: image-to-image from an item's image conditioned on its own name, top-5 rate;
* **editable**: image-to-image from item A's image conditioned on a related item B's name
  (grinning face → grinning cat, red heart → green heart, …): share of pairs where the evaluator
  ranks B's name above A's;
* **from noise**: text-to-image top-5 rate on catalog names the generator trained on, and on the
  names it never saw (its held-out items), separately;
* **speed**: median seconds per 64×64 sticker, image-to-image at the default strength and
  text-to-image.

Faithful and editable are measured over a strength sweep (the trade-off curve the default is chosen
from). Outputs: ``quality.json``, ``strength_curve.png`` and ``samples.png`` (init | same-name
img2img | other-name img2img | text-to-image).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pmgen.models.scorer import candidate_matrix, topk_hits

# (A, B): B is A's relative — the personalization a small generator must manage
EDIT_PAIRS: tuple[tuple[str, str], ...] = (
    ("grinning face", "grinning cat"), ("face with tears of joy", "cat with tears of joy"),
    ("smiling face with heart-eyes", "smiling cat with heart-eyes"), ("kissing face", "kissing cat"),
    ("crying face", "crying cat"), ("enraged face", "pouting cat"), ("face screaming in fear", "weary cat"),
    ("red heart", "green heart"), ("red heart", "blue heart"), ("yellow heart", "purple heart"),
    ("orange heart", "black heart"), ("blue heart", "broken heart"), ("sun", "sun with face"),
    ("full moon", "full moon face"), ("new moon", "new moon face"), ("cloud", "cloud with rain"),
    ("cloud", "cloud with snow"), ("cloud", "cloud with lightning"), ("dog face", "cat face"),
    ("cat face", "tiger face"), ("monkey face", "see-no-evil monkey"), ("grinning face", "grinning face with sweat"),
    ("slightly smiling face", "upside-down face"), ("thumbs up", "thumbs down"), ("red apple", "green apple"),
    ("soccer ball", "basketball"), ("automobile", "police car"), ("snowman", "snowman without snow"),
    ("person running", "woman running"), ("man dancing", "woman dancing"), ("white flower", "wilted flower"),
    ("hot face", "cold face"),
)
STRENGTHS = (0.3, 0.45, 0.6, 0.75, 0.9)


def _batched(fn: Callable[[int, int], torch.Tensor], n: int, bs: int) -> torch.Tensor:
    return torch.cat([fn(i, min(n, i + bs)) for i in range(0, n, bs)])


def quality_report(generator: Any, text_encoder: Any, evaluator: Any, out: Path, n_items: int = 150,
                   strengths: tuple[float, ...] = STRENGTHS, default_strength: float = 0.6, steps: int = 20,
                   guidance: float = 4.0, seed: int = 0, data_root: Path | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute the figures above and write them (and the pictures) into ``out``."""
    from pmgen.data.catalog import load_catalog
    from pmgen.models.generator import StickerGenerator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(data_root)
    items, images, groups = catalog.items, catalog.images, catalog.groups
    titles = [it.title for it in items]
    uniq_titles = sorted(set(titles))
    tindex = {t: i for i, t in enumerate(uniq_titles)}
    text_ids = [tindex[t] for t in titles]
    by_title = {}
    for k, it in enumerate(items):
        if not it.attributes.get("skintone"):
            by_title.setdefault(it.title, k)
    base = [k for k, it in enumerate(items) if not it.attributes.get("skintone")]
    rng = random.Random(seed)
    pick = sorted(rng.sample(base, min(n_items, len(base))))
    cands = candidate_matrix(pick, groups, text_ids, 100, seed)
    txt = evaluator.text_embeddings(uniq_titles)
    L = getattr(generator, "text_max_length", 32)
    empty = text_encoder.token_states([""], max_length=L)[0]
    state_cache: dict[str, torch.Tensor] = {}

    def states(texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in state_cache]
        if todo:
            st = text_encoder.token_states(todo, max_length=L)[0]
            state_cache.update(zip(todo, st))
        return torch.stack([state_cache[t] for t in texts])

    def img(k: list[int]) -> torch.Tensor:
        return images[k].float() / 255

    def top5(gen_imgs: torch.Tensor, rows: list[int]) -> float:
        emb = evaluator.image_embeddings(gen_imgs)
        sims = torch.einsum("nd,ncd->nc", emb, txt[cands[rows]])
        return topk_hits(sims)[5]

    res: dict[str, Any] = {"n_items": len(pick), "candidates": 100, "steps": steps, "guidance": guidance,
                           "default_strength": default_strength, "evaluator": getattr(evaluator, "name", "")}
    real = top5(img(pick), list(range(len(pick))))
    res["real_top5"] = real
    log(f"real images: evaluator top-5 {real:.3f} ({len(pick)} items, 100 names each)")

    pairs = [(by_title[a], by_title[b]) for a, b in EDIT_PAIRS if a in by_title and b in by_title]
    res["edit_pairs"] = len(pairs)
    curve = []
    bs = 16
    for s in strengths:
        def faithful_batch(i: int, j: int, s: float = s) -> torch.Tensor:
            rows = pick[i:j]
            return generator.image_to_image(img(rows), states([titles[k] for k in rows]), empty, strength=s,
                                            seed=seed, num_inference_steps=steps, guidance_scale=guidance)
        gen = _batched(faithful_batch, len(pick), bs)
        f = top5(gen, list(range(len(pick))))
        a_idx = [a for a, _ in pairs]
        b_idx = [b for _, b in pairs]
        edited = generator.image_to_image(img(a_idx), states([titles[b] for b in b_idx]), empty, strength=s, seed=seed,
                                          num_inference_steps=steps, guidance_scale=guidance)
        emb = evaluator.image_embeddings(edited)
        sim_a = (emb * txt[[tindex[titles[a]] for a in a_idx]]).sum(-1)
        sim_b = (emb * txt[[tindex[titles[b]] for b in b_idx]]).sum(-1)
        e = float((sim_b > sim_a).float().mean())
        curve.append({"strength": s, "faithful_top5": f, "faithful_ratio": f / real if real else 0.0, "editable": e})
        log(f"strength {s:.2f}: faithful top-5 {f:.3f} ({f / max(real, 1e-9):.0%} of real), editable {e:.3f}")
    res["strength_curve"] = curve

    heldout_ids: set[str] = set()
    cfg = (getattr(generator, "info", {}) or {}).get("config", {})
    if cfg.get("holdout"):
        import numpy as np

        from pmgen.data.catalog import choose_heldout

        mask = choose_heldout(catalog.ids, catalog.skintone, int(cfg["holdout"]))
        heldout_ids = {items[k].id for k in np.flatnonzero(mask)}
    seen_rows = [r for r, k in enumerate(pick) if items[k].id not in heldout_ids]
    held = [k for k, it in enumerate(items) if it.id in heldout_ids]
    t2i = _batched(lambda i, j: generator.text_to_image(states([titles[k] for k in pick[i:j]]), empty, seed=seed,
                                                        num_inference_steps=steps, guidance_scale=guidance),
                   len(pick), bs)
    res["from_noise_top5_trained_names"] = top5(t2i[seen_rows], seen_rows) if seen_rows else None
    if held:
        held_c = candidate_matrix(held, groups, text_ids, 100, seed)
        t2i_h = _batched(lambda i, j: generator.text_to_image(states([titles[k] for k in held[i:j]]), empty, seed=seed,
                                                              num_inference_steps=steps, guidance_scale=guidance),
                         len(held), bs)
        emb = evaluator.image_embeddings(t2i_h)
        res["from_noise_top5_heldout_names"] = topk_hits(torch.einsum("nd,ncd->nc", emb, txt[held_c]))[5]
        res["heldout_names"] = len(held)
        real_h = topk_hits(torch.einsum("nd,ncd->nc", evaluator.image_embeddings(img(held)), txt[held_c]))[5]
        res["real_top5_heldout_items"] = real_h
    log(f"from noise: top-5 {res['from_noise_top5_trained_names']} on trained names, "
        f"{res.get('from_noise_top5_heldout_names')} on {len(held)} held-out names")

    one = img(pick[:1])
    cond = states([titles[pick[0]]])
    times_i2i, times_t2i = [], []
    for _ in range(5):
        t = time.perf_counter()
        generator.image_to_image(one, cond, empty, strength=default_strength, seed=seed, num_inference_steps=steps,
                                 guidance_scale=guidance)
        times_i2i.append(time.perf_counter() - t)
        t = time.perf_counter()
        generator.text_to_image(cond, empty, seed=seed, num_inference_steps=steps, guidance_scale=guidance)
        times_t2i.append(time.perf_counter() - t)
    res["speed_s"] = {"img2img_default_strength_median": statistics.median(times_i2i),
                      "text_to_image_median": statistics.median(times_t2i), "steps": steps,
                      "threads": torch.get_num_threads()}
    log(f"speed: img2img {res['speed_s']['img2img_default_strength_median']:.3f} s, text-to-image "
        f"{res['speed_s']['text_to_image_median']:.3f} s per sticker ({steps} steps)")

    _plot_curve(curve, real, default_strength, out / "strength_curve.png")
    rows = pairs[:8]
    a_idx = [a for a, _ in rows]
    same = generator.image_to_image(img(a_idx), states([titles[a] for a in a_idx]), empty, strength=default_strength,
                                    seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    other = generator.image_to_image(img(a_idx), states([titles[b] for _, b in rows]), empty,
                                     strength=default_strength, seed=seed, num_inference_steps=steps,
                                     guidance_scale=guidance)
    t2i_b = generator.text_to_image(states([titles[b] for _, b in rows]), empty, seed=seed,
                                    num_inference_steps=steps, guidance_scale=guidance)
    cols = []
    for r, (a, b) in enumerate(rows):
        pil = StickerGenerator.to_pil(torch.stack([img([a])[0], same[r], other[r], t2i_b[r]]))
        strip = _hstack(pil)
        cols.append({"image": strip, "caption": f"{titles[a][:18]} -> {titles[b][:18]}"})
    _grid(cols, out / "samples.png", f"init | same name | other name | text-to-image (strength {default_strength})")
    (out / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _hstack(pils: list[Any]) -> Any:
    from PIL import Image

    w = sum(p.width for p in pils)
    out = Image.new("RGB", (w + 4 * (len(pils) - 1), pils[0].height), "white")
    x = 0
    for p in pils:
        out.paste(p, (x, 0))
        x += p.width + 4
    return out


def _grid(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    from pmgen.report import CREDIT

    scale = 2
    w = max(r["image"].width for r in rows) * scale
    h = rows[0]["image"].height * scale
    sheet = Image.new("RGB", (w + 260, 30 + len(rows) * (h + 6) + 16), "white")
    d = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    d.text((6, 6), title, fill="black", font=font)
    for i, r in enumerate(rows):
        y = 30 + i * (h + 6)
        sheet.paste(r["image"].resize((r["image"].width * scale, h), Image.Resampling.NEAREST), (6, y))
        d.text((w + 16, y + h // 2 - 7), r["caption"], fill="black", font=font)
    d.text((6, sheet.height - 15), CREDIT, fill=(120, 120, 120), font=ImageFont.load_default(size=10))
    sheet.save(out)


def _plot_curve(curve: list[dict[str, Any]], real: float, default: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [c["strength"] for c in curve]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(s, [c["faithful_top5"] for c in curve], "o-", label="faithful: top-5 (own name)")
    ax.plot(s, [c["editable"] for c in curve], "s-", label="editable: B ranked above A")
    ax.axhline(real, color="gray", ls="--", lw=0.8, label=f"real images top-5 ({real:.2f})")
    ax.axhline(0.9 * real, color="C0", ls=":", lw=0.8, label="faithful bar (90% of real)")
    ax.axhline(0.4, color="C1", ls=":", lw=0.8, label="editable bar (40%)")
    ax.axvline(default, color="k", lw=0.6)
    ax.set_xlabel("image-to-image strength")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("sticker-tiny generator: faithful vs. editable (evaluator)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
