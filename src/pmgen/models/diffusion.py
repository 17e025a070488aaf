"""The sampler's building blocks around :class:`pmgen.models.generator.StickerGenerator`: timesteps,
per-pixel strengths, guidance, attention masks of padded conditions, inversions, and the diffusers
components (VAE, UNet, scheduler) of a new generator. Re-exported by :mod:`pmgen.models.generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

def img2img_timesteps(scheduler: Any, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The last ``int(num_inference_steps · strength)`` timesteps of ``scheduler`` (SDEdit's start)."""
    n_run = min(int(num_inference_steps * strength), num_inference_steps)
    return scheduler.timesteps[(num_inference_steps - n_run) * scheduler.order:]


def latent_strengths(strength_map: torch.Tensor, latent_hw: tuple[int, int], batch: int) -> torch.Tensor:
    """Per-pixel strengths ``[B or 1, 1, H, W]`` in [0, 1] → ``[batch, 1, h, w]`` at the latent size.

    Each latent pixel takes the **lowest** strength of the image pixels it covers (a min-pool), so a
    region held to the init image stays held wherever any of it falls."""
    if (not isinstance(strength_map, torch.Tensor) or strength_map.ndim != 4 or strength_map.shape[1] != 1
            or strength_map.shape[0] not in (1, batch)):
        got = list(strength_map.shape) if isinstance(strength_map, torch.Tensor) else type(strength_map).__name__
        raise ValueError(f"strength_map must be a float tensor [{batch} or 1, 1, H, W], got {got}")
    m = strength_map.detach().float().cpu()
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError("strength_map values must be in [0, 1]")
    h, w = latent_hw
    if m.shape[-2] % h or m.shape[-1] % w:
        raise ValueError(f"strength_map size {list(m.shape[-2:])} is not a multiple of the latent size {[h, w]}")
    m = -torch.nn.functional.max_pool2d(-m, (m.shape[-2] // h, m.shape[-1] // w))
    return m.expand(batch, -1, -1, -1)


WHITE = 0.94
"""A pixel whose every channel is at least this is background (stickers are drawn on white)."""


def outline_strengths(init: torch.Tensor, inside: float, outside: float, grow: int = 1) -> torch.Tensor:
    """A strength map ``[B, 1, H, W]`` for ``init`` ``[B, 3, H, W]`` in [0, 1]: ``inside`` on the
    sticker's pixels (any channel below :data:`WHITE`, grown by ``grow`` px), ``outside`` on the white
    around it. An init without white background gets ``inside`` everywhere (plain SDEdit)."""
    ink = (init.detach().float().amin(dim=1, keepdim=True) < WHITE).float()
    if grow > 0:
        ink = torch.nn.functional.max_pool2d(ink, 2 * grow + 1, 1, grow)
    return ink * float(inside) + (1 - ink) * float(outside)


class Hold:
    """Differential Diffusion's per-pixel release: before the step with global index ``i`` (of ``n``),
    a latent pixel of strength ``s`` keeps the init latents noised to that step unless ``n − i ≤ n·s``.
    With every ``s`` equal to the SDEdit strength nothing is ever held (the plain SDEdit sample)."""

    def __init__(self, strengths: torch.Tensor, init_latents: torch.Tensor, noise: torch.Tensor, n: int):
        self.strengths, self.init_latents, self.noise, self.n = strengths, init_latents, noise, n

    def __call__(self, latents: torch.Tensor, i: int, t: torch.Tensor, scheduler: Any) -> torch.Tensor:
        free = self.strengths * self.n >= (self.n - i) - 1e-4  # float32 strengths: 0.9 · 20 is 17.99999
        if bool(free.all()):
            return latents
        held = scheduler.add_noise(self.init_latents, self.noise, t.reshape(1).repeat(latents.shape[0]))
        return torch.where(free.to(latents.device), latents, held.to(latents.dtype))


def guide(out: torch.Tensor, guidance_scale: float, use_cfg: bool, out_extra: torch.Tensor | None = None,
          extra_scale: float | torch.Tensor = 0.0, extra_base: str = "cond") -> torch.Tensor:
    """The guided prediction from one step's UNet outputs (one place for the sampler and the batch engine).

    ``out`` is ``[ε_uncond ; ε_cond]`` with classifier-free guidance (``use_cfg``), else ``ε_cond``;
    with ``out_extra`` (composed guidance) ``extra_scale·(ε_extra − ε_base)`` is added, ``ε_base``
    being ``ε_cond`` or, for ``extra_base="uncond"``, ``ε_uncond``.
    """
    if use_cfg:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance_scale * (out_cond - out_uncond)
    else:
        out_uncond, out_cond = out, out  # no unconditional prediction: check_extra refuses "uncond" then
    if out_extra is not None:
        out = out + extra_scale * (out_extra - (out_uncond if extra_base == "uncond" else out_cond))
    return out


def build_vae(block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
              latent_channels: int = 4, norm_num_groups: int = 32, image_size: int = 64) -> Any:
    """An :class:`~diffusers.AutoencoderKL` downsampling by ``2 ** (len(block_out_channels) - 1)``.

    The default (0.9M parameters) maps 64×64×3 to 16×16×4. No attention in the mid block: at 16×16
    it adds cost and nothing measurable on stickers.
    """
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=image_size,
        mid_block_add_attention=False, scaling_factor=1.0,
    )


def build_unet(block_out_channels: Sequence[int] = (64, 128, 192), layers_per_block: int = 1,
               attention_levels: int = 2, cross_attention_dim: int = 384, head_dim: int = 32,
               latent_channels: int = 4, latent_size: int = 16, norm_num_groups: int = 32) -> Any:
    """A :class:`~diffusers.UNet2DConditionModel` with cross-attention only at the lowest resolutions.

    Args:
        block_out_channels: channels per resolution level, highest resolution first.
        attention_levels: how many of the lowest-resolution levels get (self + cross) attention
            transformer blocks; the others are plain ResNet blocks.
        head_dim: channels per attention head (heads = channels // head_dim).
    """
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    if not 1 <= attention_levels <= n:
        raise ValueError(f"attention_levels must be in 1..{n}, got {attention_levels}")
    down = ("DownBlock2D",) * (n - attention_levels) + ("CrossAttnDownBlock2D",) * attention_levels
    up = ("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * (n - attention_levels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(max(1, c // head_dim) for c in block_out_channels),
        norm_num_groups=norm_num_groups,
    )


@dataclass(frozen=True)
class Masks:
    """Attention masks ``[B, L]`` (1 = a real token) of padded conditions, for :meth:`StickerGenerator.denoise`."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    extra: torch.Tensor | None = None


def _masked(mask: torch.Tensor | None) -> dict[str, Any]:
    """The UNet's keyword for a mask; none at all without one (the unpadded path stays as it was)."""
    return {} if mask is None else {"encoder_attention_mask": mask}


def build_scheduler(prediction_type: str = "v_prediction") -> Any:
    """The sampling scheduler: DDIM over a 1000-step scaled-linear schedule rescaled to zero terminal
    SNR, "trailing" timestep spacing (so text-to-image starts from pure noise, as trained)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=0, prediction_type=prediction_type,
        timestep_spacing="trailing", rescale_betas_zero_snr=True,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Inversion:
    """Init images inverted into the sampler's trajectory under a source condition
    (:meth:`StickerGenerator.invert`).

    Sampling from ``start`` over ``timesteps`` under the source condition and ``guidance_scale``,
    adding ``corrections[k]`` after step ``k``, lands on ``init_latents`` (to float rounding): the image
    is reproduced, every detail the VAE keeps included. Under another condition the same corrections
    keep the image's layout while the condition changes what it shows (the noise maps of edit-friendly
    inversion, Huberman-Spiegelglas et al. 2024, here on a deterministic DDIM sampler).

    Tensors: ``init_latents`` and ``start`` ``[B, C, h, w]``, ``corrections`` ``[K, B, C, h, w]``,
    ``timesteps`` ``[K]``.
    """

    init_latents: torch.Tensor
    start: torch.Tensor
    corrections: torch.Tensor
    timesteps: torch.Tensor
    num_inference_steps: int
    guidance_scale: float
    method: str = "ddim"

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def select(self, rows: Sequence[int]) -> Inversion:
        """The inversion of the given rows (repeats allowed: one row per candidate)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return Inversion(self.init_latents[idx], self.start[idx], self.corrections[:, idx], self.timesteps,
                         self.num_inference_steps, self.guidance_scale, self.method)
