"""The diffusion training loss, shared by the generator and soft-prompt trainers.

For clean latents ``x0``, noise ``ε`` and timesteps ``t`` the UNet sees ``x_t = add_noise(x0, ε, t)`` and
predicts the scheduler's target: ``v = α_t ε − σ_t x0`` (``v_prediction``) or ``ε`` (``epsilon``).
The per-example loss is the mean squared error over every latent element; the min-SNR-γ weight
(Hang et al., 2023) is ``min(SNR_t, γ) / (SNR_t + 1)`` for v-prediction and ``min(SNR_t, γ) / SNR_t``
for ε-prediction.
"""

from __future__ import annotations

import torch


def diffusion_mse(unet: torch.nn.Module, scheduler: object, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example MSE ``[B]`` of the UNet's prediction of the scheduler's target.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or anything with its call signature).
        scheduler: a diffusers training scheduler (``add_noise``, ``get_velocity``,
            ``config.prediction_type`` of ``"v_prediction"`` or ``"epsilon"``).
        latents: clean latents ``[B, C, h, w]`` (already scaled).
        noise: ``[B, C, h, w]``.
        timesteps: int64 ``[B]``.
        context: text condition ``[B, L, D]``.
        mask: ``[B, L]``, 1 for real context tokens (``None``: all are real).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def min_snr_weight(scheduler: object, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight ``[B]`` of ``timesteps`` for the scheduler's prediction type."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def diffusion_loss(unet: torch.nn.Module, scheduler: object, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                   snr_gamma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (min-SNR weighted loss, plain MSE), each ``[B]``; arguments as :func:`diffusion_mse`."""
    mse = diffusion_mse(unet, scheduler, latents, noise, timesteps, context, mask)
    return min_snr_weight(scheduler, timesteps, snr_gamma) * mse, mse
