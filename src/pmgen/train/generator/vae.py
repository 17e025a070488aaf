"""Stages 1 and 1b of the generator recipe: the VAE, its decoder fine-tune, and the cached posteriors.

* **VAE** step: :class:`~diffusers.AutoencoderKL` on images in [-1, 1], L1 reconstruction of a
  posterior sample + ``kl_weight`` × the mean per-element KL; gradient norm clipped to 1.
* **Decoder** step: the encoder frozen (so latents, and any UNet trained on them, stay valid), the
  decoder tuned with an L1 loss weighted ``1 + w · saturation`` per pixel (saturation = (max − min)
  of the pixel's RGB in [0, 1]): plain L1 on a mostly white catalog leaves rare colours desaturated.
* :func:`posteriors`: the posterior (mean, std) of every image, computed once per VAE state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def load_vae_weights(path: Path) -> dict[str, torch.Tensor]:
    """VAE state dict (float32) from a trainer checkpoint file or an exported pipeline folder."""
    if path.is_file():
        state = torch.load(path, weights_only=False, mmap=True)
        if not isinstance(state, dict) or "vae" not in state:
            raise ValueError(f"vae_init={path}: not a generator trainer checkpoint (no 'vae' entry)")
        return {k: v.float() for k, v in state["vae"].items()}
    if (path / "vae" / "config.json").is_file():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(path / "vae", torch_dtype=torch.float32).state_dict()
    raise FileNotFoundError(f"vae_init={path}: expected a trainer checkpoint file or a pipeline folder with vae/")


def state_hash(module: torch.nn.Module) -> str:
    """16 hex digits of SHA-1 over a module's state dict (names and values): keys the latent caches."""
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], ``[B, 3, H, W]`` → ``[B]``."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


def vae_step(vae: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, x: torch.Tensor,
             gen: torch.Generator, kl_weight: float) -> float:
    """One optimizer step of stage 1 on images ``x`` ``[B, 3, H, W]`` in [-1, 1]; returns the L1 term."""
    vae.train().requires_grad_(True)
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator=gen)).sample
    rec_loss = (rec - x).abs().mean()
    kl = post.kl().mean() / post.mean[0].numel()
    loss = rec_loss + kl_weight * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(rec_loss.detach())


def decoder_parameters(vae: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What stage 1b trains: the decoder and the post-quantization convolution."""
    return [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]


def decoder_step(vae: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, x: torch.Tensor,
                 gen: torch.Generator, saturation_weight: float) -> float:
    """One optimizer step of stage 1b on images ``x`` in [-1, 1]; the encoder is left untouched."""
    vae.eval().requires_grad_(False)
    vae.decoder.train()
    for p in decoder_parameters(vae):
        p.requires_grad_(True)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=gen)
    rec = vae.decode(z).sample
    saturation = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2
    weight = 1 + saturation_weight * saturation
    loss = (weight * (rec - x).abs()).mean() / weight.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder_parameters(vae), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


@torch.no_grad()
def reconstruction_metrics(vae: torch.nn.Module, images: Callable[[torch.Tensor], torch.Tensor],
                           index: np.ndarray, batch: int = 64) -> dict[str, float]:
    """Mean L1 (on [0, 1]), PSNR and saturated-pixel L1 of posterior-mean reconstructions of the
    images ``index`` (``images(idx)`` gives them in [-1, 1]); ``{}`` for an empty index."""
    vae.eval()
    if len(index) == 0:
        return {}
    l1, ps, sat_err, sat_n = [], [], 0.0, 0
    for start in range(0, len(index), batch):
        x = images(torch.from_numpy(index[start:start + batch]))
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        a, b = (x + 1) / 2, (rec + 1) / 2
        l1.append((a - b).abs().flatten(1).mean(1))
        ps.append(psnr(a, b))
        saturated = ((a.amax(1) - a.amin(1)) > 0.3).unsqueeze(1).expand_as(a)
        sat_err += float((a - b).abs()[saturated].sum())
        sat_n += int(saturated.sum())
    return {"l1": float(torch.cat(l1).mean()), "psnr": float(torch.cat(ps).mean()),
            "saturated_l1": sat_err / max(sat_n, 1)}


@torch.no_grad()
def posteriors(vae: torch.nn.Module, images: Callable[[int, int], torch.Tensor], n: int, batch: int,
               progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) ``[n, C, h, w]`` of images ``images(start, end)`` (in [-1, 1]), ``batch``
    at a time; ``progress(done)`` every 10 batches."""
    means, stds = [], []
    for k, start in enumerate(range(0, n, batch)):
        x = images(start, min(start + batch, n))
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        if progress is not None and k % 10 == 0:
            progress(start + len(x))
    return torch.cat(means), torch.cat(stds)
