"""Generator views of the catalog: what the selector sees at selection time, for its training.

PMG's selector scores the generator's candidates, not clean catalog art: at 64 px the generator's
img2img outputs are smoother, with shifted colours and redrawn details. A selector trained only on
the catalog misjudges them (``pmgen evaluate``'s candidate-pool ceiling shows how much better an
oracle picks among the same candidates). :func:`generated_views` draws each catalog item through the
shipped generator — image-to-image from the item's own image, conditioned on the item's own target
keywords (preference weight 0), at each of ``strengths`` — so the scorer learns to name generated
images too. No user, taste or evaluation label is involved: only the catalog and its names.

The views are cached in the run's train dir, keyed by the generator's content hash, the strengths
and the seed, and written every few minutes while they are made, so an interrupted run continues
where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pmgen.data.catalog import ImageCatalog
from pmgen.train.run import atomic_save

CHUNK = 64


def views_key(generator_hash: str, strengths: Sequence[float], seed: int, n_items: int) -> str:
    text = f"{generator_hash}|{','.join(f'{s:g}' for s in strengths)}|{seed}|{n_items}|{CHUNK}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def generated_views(catalog: ImageCatalog, strengths: Sequence[float], seed: int, cache: Path,
                    log: Callable[[str], None] = print, stop: Callable[[], bool] = lambda: False,
                    preset: str = "sticker-tiny", save_minutes: float = 3.0,
                    parts: Any = None) -> torch.Tensor | None:
    """uint8 ``[len(strengths), N, 3, H, W]``: every catalog item drawn by the preset's generator at
    each strength (w = 0, 20 steps, the preset's guidance). ``None`` when ``stop()`` ended it first
    (the finished rows are kept in ``cache`` and reused by the next call).

    ``parts`` — ``(generator, condition builder, target_keywords)`` — defaults to the preset's own.
    """
    from pmgen.pipeline import Settings
    from pmgen.stages.keywords import target_keywords

    if parts is None:
        from pmgen.presets import get_preset, load_generator, load_text_encoder
        from pmgen.stages.condition import ConditionBuilder

        p = get_preset(preset)
        gen = load_generator(p)
        builder = ConditionBuilder(load_text_encoder(p, gen), p.text_max_length)
        guidance = p.guidance_scale
    else:
        gen, builder, guidance = parts
    n = len(catalog.items)
    k = Settings().n_target_keywords  # the pipeline's own target-keyword count
    key = views_key(gen.content_hash, strengths, seed, n)
    path = Path(cache) / f"generated_views_{key}.pt"
    state = torch.load(path) if path.is_file() else {"images": None, "done": 0}
    images = state["images"]
    if images is None:
        images = torch.zeros(len(strengths), n, *catalog.images.shape[1:], dtype=torch.uint8)
    total = len(strengths) * n
    done = state["done"]
    if done < total:
        log(f"generator views of the catalog: {done}/{total} done, strengths {list(strengths)} (cached in {path})")
    t0, last = time.monotonic(), time.monotonic()
    start = done
    while done < total and not stop():
        si, s0 = divmod(done, n)
        s1 = min(n, s0 + CHUNK)
        conds = [builder.build(list(target_keywords(item=it, k=k).keywords), [], 0.0) for it in catalog.items[s0:s1]]
        out = gen.image_to_image(catalog.images[s0:s1].float() / 255, torch.cat([c.prompt_embeds for c in conds]),
                                 torch.cat([c.negative_prompt_embeds for c in conds]), strength=strengths[si],
                                 seed=seed + 7919 * si + s0, num_inference_steps=20, guidance_scale=guidance)
        images[si, s0:s1] = (out.clamp(0, 1) * 255).round().to(torch.uint8)
        done += s1 - s0
        now = time.monotonic()
        if now - last > 60 * save_minutes or done == total:
            atomic_save({"images": images, "done": done}, path)
            last = now
            rate = (done - start) / max(now - t0, 1e-9)
            log(f"generator views: {done}/{total} ({(total - done) / max(rate, 1e-9) / 60:.1f} min left)")
    if done < total:
        atomic_save({"images": images, "done": done}, path)
        return None
    return images
