"""Candidates of many requests in shared UNet batches, each row's numbers independent of the others.

:meth:`pmgen.pipeline.PMG.render` runs one generator call per candidate (UNet batch 2 with
classifier-free guidance). :func:`render_many` instead gathers the candidates ("rows") of several
plans and runs the UNet on chunks of them. Batching changes float sums: the CPU kernels choose their
blocking by tensor shape (measured on this AMD EPYC with torch 2.13: a row computed in a batch of
1, of 2–5, of 8 and of 16 gives four different results, ~2e-6 apart; the row's position inside a
batch and the content of the other rows change nothing; 1 vs 2 torch threads change nothing at a
fixed shape). So every chunk has one **fixed shape**, whatever the group:

* exactly ``batch_size`` rows — a partial chunk is filled with copies of its first row;
* text conditions padded (masked: ``encoder_attention_mask``) to a length bucket that depends on
  the row's own length only (``ceil(L / length_step) · length_step``).

A row's images are then a function of the row alone: bit-identical whether its request is rendered
alone or inside any group, at any position, by the local engine or by a Ray actor (tested in
``tests/test_batch.py``). They are not bit-identical to :meth:`PMG.render` (other shapes, masked
padding): the difference is float rounding, ≤ 1/255 on a few pixels when it shows at all (measured
in ``tests/test_batch.py`` and in ``pmgen bench --batch``'s ``vs_generate`` field).

Everything else is the single-request path's: the same noise per row (``torch.Generator`` seeded
with the request's seed, drawn on the CPU), the init image encoded alone, the same DDIM timesteps,
and each row decoded alone.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence, TYPE_CHECKING

import torch

from pmgen.models.generator import img2img_timesteps

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

DEFAULT_BATCH_SIZE = 8
DEFAULT_LENGTH_STEP = 32


@dataclass
class _Row:
    plan: int
    cand: int
    cond: torch.Tensor  # [L, D]
    uncond: torch.Tensor | None  # [L, D] (None without classifier-free guidance)
    extra: torch.Tensor | None  # [Le, D]
    extra_scale: float
    extra_base: str
    latents: torch.Tensor  # [1, C, h, w] noised start
    timesteps: torch.Tensor


def can_render_many(generator: Any) -> bool:
    """Whether :func:`render_many` knows this generator (pmgen's sticker generator); others go plan by plan."""
    from pmgen.models.generator import StickerGenerator

    return isinstance(generator, StickerGenerator)


def _bucket(length: int, step: int) -> int:
    return -(-length // step) * step


def render_many(pmg: PMG, plans: Sequence[Any], batch_size: int = DEFAULT_BATCH_SIZE,
                length_step: int = DEFAULT_LENGTH_STEP) -> list[torch.Tensor]:
    """Candidates of every plan (:meth:`pmgen.pipeline.PMG.plan`), ``[N_i, 3, H, W]`` each, in order.

    Rows of all plans that share sampler settings and a length bucket run together, ``batch_size``
    at a time (see the module docstring for why the shapes are fixed). A generator other than
    pmgen's sticker generator is rendered plan by plan (:meth:`PMG.render`).
    """
    if batch_size < 1 or length_step < 1:
        raise ValueError("batch_size and length_step must be >= 1")
    gen = pmg.generator
    if not can_render_many(gen):
        return [pmg.render(p) for p in plans]
    out: list[list[torch.Tensor | None]] = [[None] * len(p.conditions) for p in plans]
    # per-pixel strengths (surround_strength) hold pixels per row, an inversion starts each row from its own
    # trajectory (and adds exemplars): such a plan is rendered on its own
    alone = {i: pmg.render(p) for i, p in enumerate(plans) if p.init is not None
             and (p.settings.surround_strength is not None or p.settings.inversion != "off")}
    groups: dict[tuple, list[_Row]] = defaultdict(list)
    with torch.no_grad():
        for i, p in enumerate(plans):
            if i in alone:
                continue
            s = p.settings
            use_cfg = s.guidance_scale > 1.0
            scheduler = gen.new_scheduler(s.num_inference_steps)
            init_latents = gen.encode(p.init) if p.init is not None else None
            if init_latents is not None:
                timesteps = img2img_timesteps(scheduler, s.num_inference_steps, s.strength)
            else:
                timesteps = scheduler.timesteps
            for j, c in enumerate(p.conditions):
                cond, uncond = gen.check_embeds(c.prompt_embeds, c.negative_prompt_embeds, s.guidance_scale)
                if cond.shape[0] != 1:
                    raise ValueError("a condition is one row ([1, L, D])")
                if init_latents is not None and len(timesteps) == 0:  # strength 0: the VAE reconstruction
                    out[i][j] = gen.decode(init_latents)
                    continue
                noise = gen.randn((1, gen.unet.config.in_channels, *gen.latent_hw()),
                                   gen.generators(None, s.seed, 1))
                if init_latents is not None:
                    latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(1))
                else:
                    latents = noise * scheduler.init_noise_sigma
                extra = gen.check_extra(c.extra_prompt_embeds, 1, c.extra_base, uncond)
                use_extra = extra is not None and c.extra_scale != 0.0
                row = _Row(i, j, cond[0], uncond[0] if use_cfg else None, extra[0] if use_extra else None,
                           float(c.extra_scale) if use_extra else 0.0, c.extra_base, latents, timesteps)
                key = (s.num_inference_steps, tuple(timesteps.tolist()), float(s.guidance_scale), use_cfg,
                       _bucket(cond.shape[1], length_step),
                       _bucket(extra.shape[1], length_step) if use_extra else None,
                       c.extra_base if use_extra else None)
                groups[key].append(row)
        for key, rows in groups.items():
            for k in range(0, len(rows), batch_size):
                chunk = rows[k:k + batch_size]
                latents = _denoise_chunk(gen, chunk, key, batch_size)
                for r, lat in zip(chunk, latents):
                    out[r.plan][r.cand] = gen.decode(lat[None])
    return [alone[i] if i in alone else torch.cat(imgs) for i, imgs in enumerate(out)]  # type: ignore[arg-type]


def _pad(rows: Sequence[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[L_i, D]`` rows into ``[B, length, D]`` (zeros after each row) and its mask ``[B, length]``."""
    d = rows[0].shape[-1]
    x = rows[0].new_zeros((len(rows), length, d))
    mask = rows[0].new_zeros((len(rows), length))
    for i, r in enumerate(rows):
        x[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return x, mask


def _denoise_chunk(gen: Any, chunk: Sequence[_Row], key: tuple, batch_size: int) -> torch.Tensor:
    """Denoise ``chunk`` (filled to ``batch_size`` rows) with :meth:`StickerGenerator.denoise`, the
    conditions padded to the chunk's length bucket and masked."""
    from pmgen.models.generator import Masks

    steps, _, guidance_scale, use_cfg, length, extra_length, extra_base = key
    rows = list(chunk) + [chunk[0]] * (batch_size - len(chunk))
    latents = torch.cat([r.latents for r in rows])
    cond, cmask = _pad([r.cond for r in rows], length)
    uncond, umask = _pad([r.uncond for r in rows], length) if use_cfg else (None, None)  # type: ignore[misc]
    extra, emask, scale = None, None, 0.0
    if extra_length is not None:
        extra, emask = _pad([r.extra for r in rows], extra_length)  # type: ignore[misc]
        scale = torch.tensor([r.extra_scale for r in rows], dtype=latents.dtype).view(-1, 1, 1, 1)
    latents = gen.denoise(latents, rows[0].timesteps, gen.new_scheduler(steps), cond, uncond, guidance_scale,
                          extra, scale, extra_base or "cond", masks=Masks(cmask, umask, emask))
    return latents[: len(chunk)]
