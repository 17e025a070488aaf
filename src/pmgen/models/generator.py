"""The generator role for ``sticker-tiny``: a small latent diffusion model on 64×64 stickers.

Three diffusers components, each its own object (nothing re-implemented):

* ``vae`` — :class:`diffusers.AutoencoderKL`, 64×64×3 images in [-1, 1] ↔ 16×16×4 latents;
* ``unet`` — :class:`diffusers.UNet2DConditionModel` on the latents, cross-attending to text-encoder
  token states ``[B, L, 384]`` only at the low resolutions (8×8 and 4×4; attention at high
  resolution is what costs on a CPU);
* ``scheduler`` — :class:`diffusers.DDIMScheduler` for sampling (training builds a
  :class:`diffusers.DDPMScheduler` from the same config).

On disk it is a diffusers-style folder::

    vae/  unet/  scheduler/      save_pretrained / from_pretrained of each component
    pmgen_generator.json          latent scaling factor, text length, image size, training notes

:class:`StickerGenerator` has two entry points, :meth:`~StickerGenerator.text_to_image` (from noise)
and :meth:`~StickerGenerator.image_to_image` (SDEdit from an init image, optionally with a strength
per pixel: :func:`outline_strengths` makes one that frees the white around a sticker). Both take precomputed
``prompt_embeds`` / ``negative_prompt_embeds`` (see :meth:`pmgen.models.text_encoder.TextEncoder.token_states`)
and an explicit ``generator`` or ``seed``; the same inputs give bit-identical images on the same
machine and thread count. "Same inputs" includes the batch: a row alone and inside a larger batch agree only
to float rounding (~1e-6, measured), so compare conditions (w = 0 vs w > 0) within one batch, or each alone.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIG_NAME = "pmgen_generator.json"
FORMAT = "pmgen-sticker-generator"
FORMAT_VERSION = 1
EXTRA_BASES = ("cond", "uncond")
"""What composed guidance adds its extra direction to: the prompt's prediction or the unconditional one."""

from pmgen.models.diffusion import (  # noqa: F401  (re-exported: the generator's public helpers)
    WHITE, Hold, Inversion, Masks, _masked, build_scheduler, build_unet, build_vae, count_parameters, guide,
    img2img_timesteps, latent_strengths, outline_strengths,
)

from pmgen.settings import INVERSIONS  # noqa: E402,F401  (re-exported)

GeneratorArg = torch.Generator | list[torch.Generator] | None


class StickerGenerator:
    """VAE + text-conditioned UNet + DDIM scheduler, sampling in float32 on the modules' device.

    Args:
        vae, unet, scheduler: diffusers components (see :func:`build_vae`, :func:`build_unet`,
            :func:`build_scheduler`).
        scaling_factor: latents are ``vae_mean * scaling_factor`` (≈ unit variance for the UNet).
        text_max_length: the token length the UNet was trained on; ``prompt_embeds`` should come
            from ``TextEncoder.token_states(texts, max_length=text_max_length)``.
        info: free metadata saved in ``pmgen_generator.json`` (text encoder name, training notes).
        name: recorded in outputs (the folder name when loaded with :meth:`from_pretrained`).
    """

    def __init__(self, vae: Any, unet: Any, scheduler: Any, scaling_factor: float = 1.0,
                 text_max_length: int = 32, info: dict[str, Any] | None = None, name: str = "sticker-generator"):
        if scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {scaling_factor}")
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.scaling_factor = float(scaling_factor)
        self.text_max_length = int(text_max_length)
        self.info = dict(info or {})
        self.name = name
        self._content_hash: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def content_hash(self) -> str:
        """Short hash of the VAE and UNet weights and the latent scaling (computed once)."""
        if self._content_hash is None:
            from pmgen.models import state_hash

            tensors = [(f"vae.{k}", v) for k, v in self.vae.state_dict().items()]
            tensors += [(f"unet.{k}", v) for k, v in self.unet.state_dict().items()]
            tensors.append(("scaling_factor", torch.tensor([self.scaling_factor], dtype=torch.float64)))
            self._content_hash = state_hash(tensors)
        return self._content_hash

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def image_size(self) -> int:
        return int(self.vae.config.sample_size)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StickerGenerator:
        self.vae.to(device=device, dtype=dtype)
        self.unet.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike[str], dtype: torch.dtype | None = None) -> Path:
        """Write ``vae/``, ``unet/``, ``scheduler/`` (safetensors) and ``pmgen_generator.json`` into ``path``.

        ``dtype=torch.float16`` halves the size (the shipped form); the in-memory model is unchanged.
        Everything is written to a sibling folder first, then each entry is swapped in by rename, so
        a crash never leaves a half-written component; other files in ``path`` are left alone.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, module in (("vae", self.vae), ("unet", self.unet)):
            if dtype is not None:
                module = copy.deepcopy(module)
                for tensor in (*module.parameters(), *module.buffers()):
                    tensor.data = tensor.data.to(dtype)
            module.save_pretrained(tmp / name, safe_serialization=True)
        self.scheduler.save_pretrained(tmp / "scheduler")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "scaling_factor": self.scaling_factor,
                "text_max_length": self.text_max_length, "image_size": self.image_size,
                "cross_attention_dim": self.cross_attention_dim,
                "parameters": {"vae": count_parameters(self.vae), "unet": count_parameters(self.unet)},
                "saved_dtype": str(dtype or self.dtype).replace("torch.", ""), "info": self.info}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        path.mkdir(parents=True, exist_ok=True)
        for entry in ("vae", "unet", "scheduler", CONFIG_NAME):
            target, old = path / entry, path / (entry + ".old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            if target.exists():
                target.rename(old)
            (tmp / entry).rename(target)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        tmp.rmdir()
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> StickerGenerator:
        """Load a folder written by :meth:`save_pretrained` (float32 by default, whatever was saved).

        Raises:
            FileNotFoundError: naming the missing file.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        path = Path(path)
        for needed in (CONFIG_NAME, "vae/config.json", "unet/config.json", "scheduler/scheduler_config.json"):
            if not (path / needed).is_file():
                raise FileNotFoundError(f"not a pmgen sticker generator folder: {path / needed} is missing "
                                        "(train one with `pmgen train generator`)")
        meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_NAME}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        vae = AutoencoderKL.from_pretrained(path / "vae", dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        return cls(vae, unet, scheduler, scaling_factor=meta["scaling_factor"],
                   text_max_length=meta.get("text_max_length", 32), info=meta.get("info", {}), name=path.name)

    # ------------------------------------------------------------------ latents <-> images
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float ``[B, 3, H, W]`` in [0, 1] → scaled latents ``[B, 4, H/4, W/4]`` (posterior mean)."""
        images = self._check_images(images)
        dist = self.vae.encode(images * 2 - 1).latent_dist
        return dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, 4, h, w]`` → images float32 ``[B, 3, 4h, 4w]`` clamped to [0, 1]."""
        out = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample
        return ((out.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def text_to_image(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
                      generator: GeneratorArg = None, seed: int | None = None, num_inference_steps: int = 20,
                      guidance_scale: float = 4.0, extra_prompt_embeds: torch.Tensor | None = None,
                      extra_guidance_scale: float = 0.0, extra_base: str = "cond") -> torch.Tensor:
        """Sample from noise under the condition.

        Args:
            prompt_embeds: float ``[B, L, D]`` token states (D = ``unet.config.cross_attention_dim``).
            negative_prompt_embeds: ``[B or 1, L, D]`` (e.g. the empty-string states); required when
                ``guidance_scale > 1`` (classifier-free guidance).
            generator: a ``torch.Generator`` (or one per row); or ``seed``: every row then gets the
                same noise from ``torch.Generator().manual_seed(seed)``, so rows differing only in
                their condition are compared like for like. Exactly one of the two is required.
            extra_prompt_embeds, extra_guidance_scale: composed guidance — adds
                ``extra_guidance_scale · (ε(extra) − ε(base))`` to the guided prediction (one more
                UNet call per step; nothing changes when the scale is 0). PMG's continuous weighting.
            extra_base: ``"cond"`` (ε(base) = ε(prompt): the direction the extra condition adds to
                the prompt) or ``"uncond"`` (ε(base) = ε(negative): the extra condition as a concept
                of its own, composed with the prompt — Composable Diffusion's AND; needs guidance).

        Returns:
            float32 ``[B, 3, 64, 64]`` in [0, 1].
        """
        cond, uncond = self.check_embeds(prompt_embeds, negative_prompt_embeds, guidance_scale)
        batch = cond.shape[0]
        gens = self.generators(generator, seed, batch)
        scheduler = self.new_scheduler(num_inference_steps)
        shape = (batch, self.unet.config.in_channels, *self.latent_hw())
        latents = self.randn(shape, gens) * scheduler.init_noise_sigma
        extra = self.check_extra(extra_prompt_embeds, batch, extra_base, uncond)
        return self.decode(self.denoise(latents, scheduler.timesteps, scheduler, cond, uncond, guidance_scale,
                                         extra, extra_guidance_scale, extra_base))

    @torch.no_grad()
    def image_to_image(self, init_images: torch.Tensor, prompt_embeds: torch.Tensor,
                       negative_prompt_embeds: torch.Tensor | None = None, *, strength: float = 0.6,
                       generator: GeneratorArg = None, seed: int | None = None, num_inference_steps: int = 20,
                       guidance_scale: float = 4.0, extra_prompt_embeds: torch.Tensor | None = None,
                       extra_guidance_scale: float = 0.0, extra_base: str = "cond",
                       strength_map: torch.Tensor | None = None) -> torch.Tensor:
        """SDEdit: encode ``init_images``, noise them to the timestep matching ``strength``, denoise
        under the condition.

        Args:
            init_images: float ``[B or 1, 3, 64, 64]`` in [0, 1] (one image is used for every row).
            strength: in [0, 1]; runs ``int(num_inference_steps * strength)`` of the
                ``num_inference_steps`` DDIM steps. 0 returns the VAE reconstruction, 1 ignores the
                init image's content.
            prompt_embeds, negative_prompt_embeds, generator, seed, num_inference_steps,
            guidance_scale, extra_prompt_embeds, extra_guidance_scale, extra_base: as in
                :meth:`text_to_image`.
            strength_map: optional per-pixel strengths, float ``[B or 1, 1, 64, 64]`` in [0, 1]
                (Differential Diffusion, Levin & Fried 2023): a pixel of strength ``s`` is held to
                the init image (noised to the current step) until the last ``int(steps · s)``
                steps, then denoised with the rest; ``strength`` is then unused. A uniform map
                equal to ``strength`` gives the same image as ``strength`` alone. See
                :func:`latent_strengths` for how the map meets the 16×16 latents.

        Returns:
            float32 ``[B, 3, 64, 64]`` in [0, 1].
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        cond, uncond = self.check_embeds(prompt_embeds, negative_prompt_embeds, guidance_scale)
        batch = cond.shape[0]
        images = self._check_images(init_images)
        if images.shape[0] not in (1, batch):
            raise ValueError(f"init_images has {images.shape[0]} images for {batch} prompts (expected 1 or {batch})")
        gens = self.generators(generator, seed, batch)
        init_latents = self.encode(images).expand(batch, -1, -1, -1)
        held = None
        if strength_map is not None:
            held = latent_strengths(strength_map, self.latent_hw(), batch).to(self.device)
            strength = round(float(held.max()), 6)  # the map is float32: 0.9 must still run int(20 · 0.9) steps
        scheduler = self.new_scheduler(num_inference_steps)
        timesteps = img2img_timesteps(scheduler, num_inference_steps, strength)
        if len(timesteps) == 0:
            return self.decode(init_latents)
        noise = self.randn(tuple(init_latents.shape), gens)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(batch))
        extra = self.check_extra(extra_prompt_embeds, batch, extra_base, uncond)
        hold = None if held is None else Hold(held, init_latents, noise, num_inference_steps)
        return self.decode(self.denoise(latents, timesteps, scheduler, cond, uncond, guidance_scale, extra,
                                         extra_guidance_scale, extra_base, hold))

    @torch.no_grad()
    def invert(self, init_images: torch.Tensor, prompt_embeds: torch.Tensor,
               negative_prompt_embeds: torch.Tensor | None = None, *, strength: float = 1.0,
               num_inference_steps: int = 20, guidance_scale: float = 4.0, method: str = "ddim",
               seed: int = 0) -> Inversion:
        """Invert ``init_images`` ``[B, 3, 64, 64]`` in [0, 1] under their source condition (``prompt_embeds``
        ``[B, L, D]``, e.g. each image's own name) for :meth:`edit`.

        Args:
            strength: in (0, 1]; the trajectory covers the last ``int(num_inference_steps · strength)``
                steps (1 = from pure noise: the most freedom for an edit).
            method: ``"ddim"`` (:class:`diffusers.DDIMInverseScheduler` under the source condition,
                unguided: the noise the model itself would have started from) or ``"noised"`` (the init
                noised with one noise drawn from ``seed``: no inversion pass, larger corrections).
            guidance_scale: the guidance :meth:`edit` will sample with (the corrections are computed
                under it, so the source condition reproduces the image at that guidance).

        Costs one unguided UNet pass per step (``"ddim"``) plus one guided pass per step.
        """
        from diffusers import DDIMInverseScheduler

        if method not in INVERSIONS:
            raise ValueError(f"inversion method must be one of {INVERSIONS}, got {method!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"inversion strength must be in (0, 1], got {strength}")
        cond, uncond = self.check_embeds(prompt_embeds, negative_prompt_embeds, guidance_scale)
        images = self._check_images(init_images)
        if images.shape[0] != cond.shape[0]:
            raise ValueError(f"init_images has {images.shape[0]} images for {cond.shape[0]} prompts")
        init = self.encode(images)
        scheduler = self.new_scheduler(num_inference_steps)
        timesteps = img2img_timesteps(scheduler, num_inference_steps, strength)
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} runs no step of {num_inference_steps}: raise it")
        if method == "ddim":
            inverse = DDIMInverseScheduler.from_config(scheduler.config)
            inverse.set_timesteps(num_inference_steps, device=self.device)
            traj = [init]
            for t in timesteps.flip(0):
                traj.append(inverse.step(self.predict(traj[-1], t, inverse, cond, None, 1.0), t, traj[-1]).prev_sample)
            traj = traj[::-1]
        else:
            noise = self.randn(tuple(init.shape), [torch.Generator().manual_seed(int(seed))])
            traj = [scheduler.add_noise(init, noise, t.reshape(1).repeat(init.shape[0])) for t in timesteps] + [init]
        corrections = torch.stack([
            traj[k + 1] - scheduler.step(self.predict(traj[k], t, scheduler, cond, uncond, guidance_scale), t,
                                         traj[k]).prev_sample
            for k, t in enumerate(timesteps)])
        return Inversion(init, traj[0], corrections, timesteps, num_inference_steps, float(guidance_scale), method)

    @torch.no_grad()
    def edit(self, inversion: Inversion, prompt_embeds: torch.Tensor,
             negative_prompt_embeds: torch.Tensor | None = None, *, extra_prompt_embeds: torch.Tensor | None = None,
             extra_guidance_scale: float | Sequence[float] = 0.0, extra_base: str = "cond",
             keep: float = 1.0) -> torch.Tensor:
        """Sample from an :class:`Inversion` (one row, or one per prompt) under a new condition.

        The sampler, steps and guidance are the inversion's. ``keep`` in [0, 1]: the share of the steps,
        from the first, that add the inversion's corrections (1 = all: the source condition reproduces
        the image; lower = the last steps are free to redraw details). ``extra_*`` as in
        :meth:`text_to_image`; ``extra_guidance_scale`` may give one scale per row (candidates at several
        preference weights in one batch). Returns float32 ``[B, 3, 64, 64]`` in [0, 1].
        """
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {keep}")
        g = inversion.guidance_scale
        cond, uncond = self.check_embeds(prompt_embeds, negative_prompt_embeds, g)
        batch = cond.shape[0]
        if len(inversion) not in (1, batch):
            raise ValueError(f"the inversion has {len(inversion)} rows for {batch} prompts (expected 1 or {batch})")
        inv = inversion.select([0] * batch) if len(inversion) == 1 and batch > 1 else inversion
        extra = self.check_extra(extra_prompt_embeds, batch, extra_base, uncond)
        scale: float | torch.Tensor = extra_guidance_scale  # type: ignore[assignment]
        if not isinstance(extra_guidance_scale, (int, float)):
            scale = torch.tensor([float(v) for v in extra_guidance_scale], dtype=self.dtype, device=self.device)
            if scale.numel() != batch:
                raise ValueError(f"extra_guidance_scale has {scale.numel()} values for {batch} prompts")
            scale = scale.view(-1, 1, 1, 1)
        scheduler = self.new_scheduler(inv.num_inference_steps)
        n_keep = round(keep * len(inv.timesteps))
        return self.decode(self.denoise(inv.start.to(self.device, self.dtype), inv.timesteps, scheduler, cond,
                                         uncond, g, extra, scale, extra_base,
                                         corrections=inv.corrections[:n_keep].to(self.device, self.dtype)))

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                uncond: torch.Tensor | None, guidance_scale: float, extra: torch.Tensor | None = None,
                extra_scale: float | torch.Tensor = 0.0, extra_base: str = "cond", hold: "Hold | None" = None,
                corrections: torch.Tensor | None = None, masks: "Masks | None" = None) -> torch.Tensor:
        """The sampler loop, one batch of latents ``[B, C, h, w]`` (the pipeline's candidates and the batch
        engines' fixed-shape chunks, :mod:`pmgen.batch.grouped`, both run it).

        Classifier-free guidance; with ``extra`` also ``extra_scale·(ε_extra − ε_base)`` (``extra_scale``
        one number or one per row ``[B, 1, 1, 1]``), ``ε_base`` being ``ε_cond`` or (``extra_base="uncond"``)
        ``ε_uncond``; with ``hold``, the pixels not yet released are reset to the noised init before each
        step; with ``corrections`` ``[K, B, C, h, w]``, ``corrections[k]`` is added after step ``k`` (an
        :class:`Inversion`'s); ``masks``: attention masks of padded conditions (rows of different lengths)."""
        first = scheduler.num_inference_steps - len(timesteps) // scheduler.order
        for k, t in enumerate(timesteps):
            if hold is not None:
                latents = hold(latents, first + k, t, scheduler)
            out = self.predict(latents, t, scheduler, cond, uncond, guidance_scale, extra, extra_scale, extra_base,
                               masks)
            latents = scheduler.step(out, t, latents).prev_sample
            if corrections is not None and k < len(corrections):
                latents = latents + corrections[k]
        return latents

    def predict(self, latents: torch.Tensor, t: torch.Tensor, scheduler: Any, cond: torch.Tensor,
                uncond: torch.Tensor | None, guidance_scale: float, extra: torch.Tensor | None = None,
                extra_scale: float | torch.Tensor = 0.0, extra_base: str = "cond",
                masks: "Masks | None" = None) -> torch.Tensor:
        """One step's guided model output (:func:`guide`) at ``latents``, timestep ``t``."""
        use_cfg = uncond is not None
        context = torch.cat([uncond, cond]) if use_cfg else cond
        mask = None
        if masks is not None:
            mask = torch.cat([masks.uncond, masks.cond]) if use_cfg else masks.cond
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]) if use_cfg else latents, t)
        out = self.unet(model_in, t, encoder_hidden_states=context, **_masked(mask)).sample
        out_extra = (self.unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=extra,
                               **_masked(masks.extra if masks is not None else None)).sample
                     if extra is not None and (isinstance(extra_scale, torch.Tensor) or extra_scale != 0.0) else None)
        return guide(out, guidance_scale, use_cfg, out_extra, extra_scale, extra_base)

    def check_extra(self, extra: torch.Tensor | None, batch: int, base: str = "cond",
                     uncond: torch.Tensor | None = None) -> torch.Tensor | None:
        if base not in EXTRA_BASES:
            raise ValueError(f"extra_base must be one of {EXTRA_BASES}, got {base!r}")
        if extra is None:
            return None
        if base == "uncond" and uncond is None:
            raise ValueError("extra_base='uncond' composes with the unconditional prediction: it needs "
                             "negative_prompt_embeds and guidance_scale > 1")
        dim = self.cross_attention_dim
        if extra.ndim != 3 or extra.shape[-1] != dim or extra.shape[0] not in (1, batch):
            raise ValueError(f"extra_prompt_embeds must be [{batch} or 1, L, {dim}], got {list(extra.shape)}")
        return extra.to(self.device, self.dtype).expand(batch, -1, -1)

    # ------------------------------------------------------------------ helpers
    def latent_hw(self) -> tuple[int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.image_size // factor, self.image_size // factor

    def new_scheduler(self, num_inference_steps: int) -> Any:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler

    def check_embeds(self, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dim = self.cross_attention_dim
        if cond.ndim != 3 or cond.shape[-1] != dim:
            raise ValueError(f"prompt_embeds must be [B, L, {dim}], got {list(cond.shape)}")
        cond = cond.to(self.device, self.dtype)
        if guidance_scale <= 1.0:
            return cond, None
        if uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative_prompt_embeds "
                             "(e.g. the text encoder's states of the empty string)")
        if uncond.ndim != 3 or uncond.shape[0] not in (1, cond.shape[0]) or uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"negative_prompt_embeds must be [{cond.shape[0]} or 1, {cond.shape[1]}, {dim}], "
                             f"got {list(uncond.shape)}")
        return cond, uncond.to(self.device, self.dtype).expand_as(cond)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (3, size, size):
            got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor [B, 3, {size}, {size}] in [0, 1], got {got} "
                             "(convert PIL images with StickerGenerator.pil_to_tensor)")
        return images.to(self.device, self.dtype)

    @staticmethod
    def generators(generator: GeneratorArg, seed: int | None, batch: int) -> list[torch.Generator]:
        if (generator is None) == (seed is None):
            raise ValueError("pass exactly one of generator= (a torch.Generator or a list, one per row) or seed=")
        if seed is not None:
            return [torch.Generator().manual_seed(int(seed)) for _ in range(batch)]
        if isinstance(generator, torch.Generator):
            return [generator]
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        return list(generator)

    def randn(self, shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
        """Noise drawn on the CPU (identical on every device), one generator per row or one for all."""
        if len(gens) == 1:
            noise = torch.randn(shape, generator=gens[0], dtype=torch.float32)
        else:
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in gens])
        return noise.to(self.device, self.dtype)

    # ------------------------------------------------------------------ PIL conversion
    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Any]:
        """Float ``[B, 3, H, W]`` in [0, 1] → a list of RGB ``PIL.Image``."""
        from PIL import Image

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]

    @staticmethod
    def pil_to_tensor(images: Sequence[Any], size: int | None = None) -> torch.Tensor:
        """RGB(A) PIL images → float32 ``[B, 3, H, W]`` in [0, 1]; RGBA is composited on white,
        ``size`` resizes (bicubic) when given."""
        from PIL import Image

        out = []
        for img in images:
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            img = img.convert("RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        return torch.stack(out).float() / 255.0
