"""The generator trainer: the whole training state, one step of each stage, validation, export and
exact-resume checkpoints. The recipe is in :mod:`pmgen.train.generator`; the VAE stages' maths in
:mod:`pmgen.train.generator.vae`, the UNet's loss in :mod:`pmgen.train.losses`, the checks of a
checkpoint before resuming (and the warm start from an export) in :mod:`pmgen.train.generator.checkpoint`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmgen.models.generator import StickerGenerator, build_scheduler, build_unet, build_vae, count_parameters
from pmgen.train.generator.card import export_milestone, export_pipeline, log_milestone, pick_sample_rows
from pmgen.train.generator.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_export, read_checkpoint
from pmgen.train.generator.config import GeneratorTrainConfig
from pmgen.train.generator.data import TrainData, text_states_cached
from pmgen.train.generator.vae import (decoder_parameters, decoder_step, load_vae_weights, posteriors,
                                       reconstruction_metrics, state_hash, vae_step)
from pmgen.train.losses import diffusion_loss
from pmgen.train.run import atomic_save, rng_state, set_rng_state

STAGES = ("vae", "decoder", "unet")


class GeneratorTrainer:
    """Holds the whole training state; :meth:`run` trains until the budget, :meth:`save_checkpoint`
    / :meth:`load_checkpoint` make it resumable bit-exactly.

    Args:
        cfg: the run's config.
        data: images and texts (``load_train_data(cfg)`` for the real run).
        text_encoder: a :class:`~pmgen.models.text_encoder.TextEncoder` (or anything with the same
            ``token_states``); ``None`` loads ``cfg.text_encoder`` / MiniLM.
        log: where progress lines go (besides ``progress.log``).
        composites: a :class:`pmgen.composites.CompositeSet` (required when
            ``cfg.composite_share > 0``; ``load_composites`` for the real run).
    """

    def __init__(self, cfg: GeneratorTrainConfig, data: TrainData, text_encoder: Any = None,
                 log: Callable[[str], None] = print, composites: Any = None):
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.cfg = cfg
        self.data = data
        self.log = log
        self.train_dir = cfg.run_dir
        self.train_dir.mkdir(parents=True, exist_ok=True)
        self.progress_path = self.train_dir / "progress.log"
        self.data_fingerprint = data.fingerprint()
        if cfg.composite_share > 0 and composites is None:
            raise ValueError("composite_share > 0 needs composites (pmgen.composites.load_composites)")
        self.composites = composites if cfg.composite_share > 0 else None
        self.n_composite = round(cfg.composite_share * cfg.batch_size) if self.composites is not None else 0
        self.comp_epoch, self.comp_pos = 0, 0
        self._comp_order: np.ndarray | None = None
        self.comp_mean: torch.Tensor | None = None
        self.comp_std: torch.Tensor | None = None

        torch.manual_seed(cfg.seed)  # model init only; every later draw uses self.gen
        self.vae = build_vae(cfg.vae_channels, norm_num_groups=cfg.vae_norm_groups,
                             image_size=int(data.images.shape[-1]))
        warm = load_export(Path(cfg.init_from)) if cfg.init_from and not self.checkpoint_path.is_file() else None
        if warm is not None:
            self.vae.load_state_dict(warm["vae"])
        elif cfg.vae_init and (Path(cfg.vae_init).exists() or not self.checkpoint_path.is_file()):
            # (when resuming, the checkpoint carries the VAE: vae_init may be gone by then)
            self.vae.load_state_dict(load_vae_weights(Path(cfg.vae_init)))
        down = 2 ** (len(cfg.vae_channels) - 1)
        if text_encoder is None:
            from pmgen.models.text_encoder import TextEncoder

            text_encoder = TextEncoder(cfg.text_encoder) if cfg.text_encoder else TextEncoder.minilm()
        self.text_dim = int(text_encoder.hidden_size)
        self.encoder_id = f"{getattr(text_encoder, 'name', '?')}:{getattr(text_encoder, 'path', '?')}"
        self.unet = build_unet(cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
                               attention_levels=cfg.unet_attention_levels, cross_attention_dim=self.text_dim,
                               head_dim=cfg.unet_head_dim, latent_size=int(data.images.shape[-1]) // down,
                               norm_num_groups=cfg.unet_norm_groups)
        if warm is not None:
            self.unet.load_state_dict(warm["unet"])
        self.sampler_scheduler = build_scheduler(cfg.prediction_type)
        self.noise_scheduler = DDPMScheduler.from_config(self.sampler_scheduler.config)
        export_mb = (count_parameters(self.vae) + count_parameters(self.unet)) * 2 / 2**20
        if export_mb > cfg.max_export_mb:
            raise ValueError(f"the fp16 pipeline would take {export_mb:.1f} MB > max_export_mb={cfg.max_export_mb}; "
                             "shrink unet_channels / unet_layers_per_block")

        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.vae_sched = get_scheduler("cosine", self.vae_opt, num_warmup_steps=min(100, cfg.vae_steps // 10),
                                       num_training_steps=max(1, int(cfg.vae_steps / 0.9)))
        self.dec_opt = torch.optim.AdamW(decoder_parameters(self.vae), lr=cfg.decoder_lr, weight_decay=0.0)
        self.dec_sched = get_scheduler("cosine", self.dec_opt, num_warmup_steps=min(50, cfg.decoder_steps // 10),
                                       num_training_steps=max(1, cfg.decoder_steps))
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "cosine":
            self.sched = get_scheduler("cosine", self.opt, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=int(cfg.max_steps or 1))
        else:
            self.sched = get_scheduler("constant_with_warmup", self.opt, num_warmup_steps=cfg.warmup_steps)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_decay, foreach=True)

        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.stage = "vae" if cfg.vae_steps > 0 else "decoder" if cfg.decoder_steps > 0 else "unet"
        self.vae_step = 0
        self.dec_step = 0
        self.step = 0
        self.epoch = 0
        self.pos = 0
        self.scaling_factor: float | None = None
        self.train_seconds = 0.0
        self.last_export_step = -1
        if warm is not None:
            self.stage, self.step, self.scaling_factor = "unet", warm["step"], warm["scaling_factor"]
            self.vae_step, self.dec_step = warm["vae_steps"], warm["decoder_steps"]
            self.train_seconds = warm["train_seconds"]
            self.last_export_step = self.step
            log(f"warm start from {cfg.init_from}: UNet step {self.step}, {self.train_seconds / 3600:.2f} h "
                "(fresh optimizer state and data order)")
        self._order: np.ndarray | None = None
        self.lat_mean: torch.Tensor | None = None
        self.lat_std: torch.Tensor | None = None

        # Token states: item texts (cached on disk), the empty string, and the sample grid's texts.
        self.text = text_states_cached(text_encoder, self.encoder_id, data, cfg.text_max_length, self.train_dir, log)
        self.sample_rows = pick_sample_rows(self.data.texts)
        texts = [t for _, a, b in self.sample_rows for t in (a, b)]
        states, _ = text_encoder.token_states(texts, max_length=cfg.text_max_length)
        self.sample_states = states.to(torch.float16).float()  # same rounding as training states
        self.builder: Any = None
        if self.composites is not None:
            from pmgen.stages.condition import ConditionBuilder

            self.builder = ConditionBuilder(text_encoder, cfg.text_max_length, "concat")
        if self.stage == "unet":
            self._enter_unet_stage()

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, STAGES.index(self.stage), epoch])
        index = self.data.train_index
        if self.stage == "unet":
            keep = ~self.data.skintone[index] | (rng.random(len(index)) < self.cfg.skintone_keep)
            index = index[keep]
        return rng.permutation(index)

    def _next_batch(self, size: int) -> torch.Tensor:
        out: list[np.ndarray] = []
        need = size
        while need > 0:
            if self._order is None:
                self._order = self._epoch_order(self.epoch)
            take = self._order[self.pos:self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= len(self._order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return torch.from_numpy(np.concatenate(out))

    def _next_composites(self, size: int) -> list[int]:
        """Indices into ``composites.train``: a fresh permutation per composite epoch."""
        assert self.composites is not None
        out: list[int] = []
        while len(out) < size:
            if self._comp_order is None:
                rng = np.random.default_rng([self.cfg.seed, 99, self.comp_epoch])
                self._comp_order = rng.permutation(len(self.composites.train))
            take = self._comp_order[self.comp_pos:self.comp_pos + size - len(out)]
            out += take.tolist()
            self.comp_pos += len(take)
            if self.comp_pos >= len(self._comp_order):
                self.comp_epoch, self.comp_pos, self._comp_order = self.comp_epoch + 1, 0, None
        return out

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data.images[idx].float() / 127.5 - 1.0

    # ------------------------------------------------------------------ stage 1: VAE
    def vae_train_step(self) -> float:
        loss = vae_step(self.vae, self.vae_opt, self.vae_sched, self._images(self._next_batch(self.cfg.vae_batch_size)),
                        self.gen, self.cfg.vae_kl_weight)
        self.vae_step += 1
        return loss

    def vae_metrics(self, index: np.ndarray | None = None, batch: int = 64) -> dict[str, float]:
        """Mean L1 (on [0, 1]) and PSNR of posterior-mean reconstructions of held-out images."""
        return reconstruction_metrics(self.vae, self._images, self.data.heldout_index if index is None else index,
                                      batch)

    def decoder_train_step(self) -> float:
        """One step of stage 1b; the encoder (and so every latent) is left untouched."""
        loss = decoder_step(self.vae, self.dec_opt, self.dec_sched,
                            self._images(self._next_batch(self.cfg.vae_batch_size)), self.gen,
                            self.cfg.decoder_saturation_weight)
        self.dec_step += 1
        return loss

    def _finish_vae_stage(self) -> None:
        metrics = self.vae_metrics()
        done = self.stage
        if self.stage == "vae" and self.cfg.decoder_steps > 0:
            self.stage, self.epoch, self.pos, self._order = "decoder", 0, 0, None
        else:
            self._enter_unet_stage()
        step = self.vae_step if done == "vae" else self.dec_step
        self._record({"time": round(time.time()), "stage": f"{done}_done", "step": step,
                      "scaling_factor": self.scaling_factor, **{f"heldout_{k}": v for k, v in metrics.items()}})
        self.log(f"{done} stage done after {step} steps: held-out {metrics}"
                 + (f"; latent scaling factor {self.scaling_factor:.4f}" if self.scaling_factor else ""))

    def _enter_unet_stage(self) -> None:
        """Freeze the VAE, cache every image's posterior, set the latent scaling factor."""
        self.vae.eval().requires_grad_(False)
        if self.stage != "unet":
            self.stage, self.epoch, self.pos, self._order = "unet", 0, 0, None
        vae_hash = state_hash(self.vae)
        path = self.train_dir / f"latents-{vae_hash}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            self.lat_mean, self.lat_std = cached["mean"], cached["std"]
        else:
            self.lat_mean, self.lat_std = posteriors(self.vae, lambda i, j: self._images(torch.arange(i, j)),
                                                     len(self.data.ids), 128)
            atomic_save({"mean": self.lat_mean, "std": self.lat_std}, path)
        if self.scaling_factor is None:
            train = self.lat_mean[torch.from_numpy(self.data.train_index)]
            self.scaling_factor = float(1.0 / train.std())
        if self.composites is not None:
            self._cache_composite_latents(vae_hash)

    def _cache_composite_latents(self, vae_hash: str) -> None:
        """Posterior (mean, std) of every composite image (training then validation), cached on disk."""
        comps = self.composites
        path = self.train_dir / f"composite-latents-{vae_hash}-{comps.fingerprint()}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
        else:
            specs = [*comps.train, *comps.val]
            self.log(f"encoding {len(specs)} composite images (cached at {path})")
            t0 = time.monotonic()
            mean, std = posteriors(
                self.vae, lambda i, j: comps.images(specs[i:j]).float() / 127.5 - 1.0, len(specs), 256,
                lambda done: self.log(f"composite latents {done}/{len(specs)} ({time.monotonic() - t0:.0f} s)"))
            cached = {"mean": mean, "std": std}
            atomic_save(cached, path)
        self.comp_mean, self.comp_std = cached["mean"], cached["std"]

    # ------------------------------------------------------------------ stage 2: UNet
    def _loss(self, unet: torch.nn.Module, latents: torch.Tensor, context: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (min-SNR weighted loss, plain MSE); ``mask`` ``[B, L]`` marks real context tokens."""
        return diffusion_loss(unet, self.noise_scheduler, latents, noise, timesteps, context, mask, self.cfg.snr_gamma)

    def composite_condition(self, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, negative_prompt_embeds), each ``[L, D]``: what PMG feeds for this composite."""
        c = self.builder.build(spec.target_keywords, spec.preference_keywords, spec.weight)
        return c.prompt_embeds[0], c.negative_prompt_embeds[0]

    def _composite_step(self) -> float:
        """A step whose batch mixes catalog rows (32-token text states) and composite rows (builder
        conditions of any length): contexts are zero-padded to the longest and masked."""
        cfg, g = self.cfg, self.gen
        idx = self._next_batch(cfg.batch_size - self.n_composite)
        cidx = self._next_composites(self.n_composite)
        specs = [self.composites.train[i] for i in cidx]
        cm = torch.from_numpy(np.asarray(cidx, dtype=np.int64))
        mean = torch.cat([self.lat_mean[idx], self.comp_mean[cm]])
        std = torch.cat([self.lat_std[idx], self.comp_std[cm]])
        b = len(mean)
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling_factor
        counts = self.text.counts[idx]
        pick = (torch.rand(len(idx), generator=g) * counts).long().clamp(max=counts - 1)
        drop = torch.rand(b, generator=g) < cfg.cond_drop
        rows = [self.text.empty[0] if drop[k] else s for k, s in
                enumerate(self.text.states[self.text.offsets[idx] + pick].float())]
        for k, spec in enumerate(specs):
            cond, neg = self.composite_condition(spec)
            rows.append(neg if drop[len(idx) + k] else cond)
        length = max(r.shape[0] for r in rows)
        context = torch.zeros(b, length, rows[0].shape[-1])
        mask = torch.zeros(b, length)
        for k, r in enumerate(rows):
            context[k, :r.shape[0]] = r
            mask[k, :r.shape[0]] = 1
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        return self._unet_update(self._loss(self.unet, latents, context, noise, timesteps, mask)[0])

    def _unet_update(self, weighted: torch.Tensor) -> float:
        """Optimizer, LR schedule and EMA step on the mean of the per-example ``weighted`` losses."""
        loss = weighted.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.step(self.unet.parameters())
        self.step += 1
        return float(loss.detach())

    def unet_train_step(self) -> float:
        assert self.lat_mean is not None and self.lat_std is not None and self.scaling_factor is not None
        if self.n_composite > 0:
            self.unet.train()
            return self._composite_step()
        self.unet.train()
        cfg, g = self.cfg, self.gen
        idx = self._next_batch(cfg.batch_size)
        b = len(idx)
        mean, std = self.lat_mean[idx], self.lat_std[idx]
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling_factor
        counts = self.text.counts[idx]
        pick = (torch.rand(b, generator=g) * counts).long().clamp(max=counts - 1)
        context = self.text.states[self.text.offsets[idx] + pick].float()
        drop = torch.rand(b, generator=g) < cfg.cond_drop
        context[drop] = self.text.empty
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        return self._unet_update(self._loss(self.unet, latents, context, noise, timesteps)[0])

    def ema_unet(self) -> torch.nn.Module:
        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        return unet.eval().requires_grad_(False)

    @torch.no_grad()
    def val_loss(self, unet: torch.nn.Module, timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> dict[str, float]:
        """Held-out loss at fixed timesteps, fixed noise, first text of each item (lower is better)."""
        index = self.data.heldout_index
        if len(index) == 0 or self.lat_mean is None:
            return {}
        g = torch.Generator().manual_seed(1234)
        weighted, plain = [], []
        for start in range(0, len(index), 64):
            idx = torch.from_numpy(index[start:start + 64])
            latents = self.lat_mean[idx] * self.scaling_factor
            context = self.text.states[self.text.offsets[idx]].float()
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=g)
                w, m = self._loss(unet, latents, context, noise, torch.full((len(idx),), t, dtype=torch.long))
                weighted.append(w)
                plain.append(m)
        out = {"val_loss": float(torch.cat(weighted).mean()), "val_mse": float(torch.cat(plain).mean())}
        if self.composites is not None and self.composites.val and self.comp_mean is not None:
            out.update(self.val_composite_loss(unet, timesteps))
        return out

    @torch.no_grad()
    def val_composite_loss(self, unet: torch.nn.Module, timesteps: Sequence[int] = (100, 300, 500, 700, 900)
                           ) -> dict[str, float]:
        """The same loss on composites of held-out targets (never trained on), one row at a time."""
        g = torch.Generator().manual_seed(4321)
        n_train = len(self.composites.train)
        weighted = []
        for k, spec in enumerate(self.composites.val):
            latents = self.comp_mean[n_train + k:n_train + k + 1] * self.scaling_factor
            cond, _ = self.composite_condition(spec)
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=g)
                w, _ = self._loss(unet, latents, cond[None], noise, torch.tensor([t]))
                weighted.append(w)
        return {"val_composite_loss": float(torch.cat(weighted).mean())}

    # ------------------------------------------------------------------ export and samples
    def pipeline(self, unet: torch.nn.Module | None = None) -> StickerGenerator:
        """The pipeline to export: the VAE, ``unet`` (default: the EMA weights) and the run's info."""
        return export_pipeline(self, unet)

    def milestone(self) -> dict[str, float]:
        """Export the EMA pipeline (fp16) to ``cfg.out``, write the sample grid, return val metrics."""
        return export_milestone(self)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.train_dir / "last.pt"

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.cfg.to_json(),
            "data_fingerprint": self.data_fingerprint, "stage": self.stage, "vae_step": self.vae_step,
            "step": self.step, "epoch": self.epoch, "pos": self.pos, "scaling_factor": self.scaling_factor,
            "train_seconds": self.train_seconds, "last_export_step": self.last_export_step,
            "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict(), "vae_sched": self.vae_sched.state_dict(),
            "dec_step": self.dec_step, "dec_opt": self.dec_opt.state_dict(), "dec_sched": self.dec_sched.state_dict(),
            "unet": self.unet.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict(),
            "comp_epoch": self.comp_epoch, "comp_pos": self.comp_pos,
            "composite_fingerprint": self.composites.fingerprint() if self.composites is not None else None,
            "rng": {"trainer": self.gen.get_state(), **rng_state()},
        }
        return state

    def save_checkpoint(self) -> Path:
        atomic_save(self.state_dict(), self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self, path: Path | None = None) -> None:
        state = read_checkpoint(path or self.checkpoint_path, self.cfg, self.data_fingerprint,
                                self.composites.fingerprint() if self.composites is not None else None)
        self.vae.load_state_dict(state["vae"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.vae_sched.load_state_dict(state["vae_sched"])
        self.dec_step = state["dec_step"]
        self.dec_opt.load_state_dict(state["dec_opt"])
        self.dec_sched.load_state_dict(state["dec_sched"])
        self.unet.load_state_dict(state["unet"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.ema.load_state_dict(state["ema"])
        self.vae_step, self.step = state["vae_step"], state["step"]
        self.epoch, self.pos, self._order = state["epoch"], state["pos"], None
        self.comp_epoch, self.comp_pos, self._comp_order = state.get("comp_epoch", 0), state.get("comp_pos", 0), None
        self.scaling_factor = state["scaling_factor"]
        self.train_seconds = state["train_seconds"]
        self.last_export_step = state["last_export_step"]
        self.stage = state["stage"]
        self.gen.set_state(state["rng"]["trainer"])
        set_rng_state(state["rng"])
        if self.stage == "unet":
            self._enter_unet_stage()

    # ------------------------------------------------------------------ main loop
    def _record(self, line: dict[str, Any]) -> None:
        with self.progress_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def run(self, minutes: float | None = None, stop: Callable[[], bool] = lambda: False) -> None:
        """Train until ``minutes`` (default ``cfg.minutes``) have passed, ``cfg.max_steps`` UNet steps
        are done, or ``stop()`` is true; then checkpoint (and export if the UNet trained)."""
        cfg = self.cfg
        start = time.monotonic()
        deadline = start + 60 * (cfg.minutes if minutes is None else minutes)
        last_ckpt = time.monotonic()
        window: list[float] = []
        window_t = 0.0  # seconds spent in the steps of the window (checkpoints and exports excluded)

        def done() -> bool:
            return (time.monotonic() >= deadline or stop()
                    or (cfg.max_steps is not None and self.stage == "unet" and self.step >= cfg.max_steps))

        while not done():
            t0 = time.monotonic()
            if self.stage == "vae":
                loss = self.vae_train_step()
                step, lr = self.vae_step, self.vae_sched.get_last_lr()[0]
            elif self.stage == "decoder":
                loss = self.decoder_train_step()
                step, lr = self.dec_step, self.dec_sched.get_last_lr()[0]
            else:
                loss = self.unet_train_step()
                step, lr = self.step, self.sched.get_last_lr()[0]
            self.train_seconds += time.monotonic() - t0
            window_t += time.monotonic() - t0
            window.append(loss)
            if step % cfg.log_every == 0:
                per_step = window_t / len(window)
                line = {"time": round(time.time()), "stage": self.stage, "step": step,
                        "loss": round(sum(window) / len(window), 5), "lr": lr, "s_per_step": round(per_step, 3),
                        "epoch": self.epoch}
                if self.stage in ("vae", "decoder") and step % (cfg.log_every * 8) == 0:
                    line.update({f"heldout_{k}": round(v, 4) for k, v in self.vae_metrics().items()})
                self._record(line)
                self.log(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in line.items() if k != "time"))
                window, window_t = [], 0.0
            if ((self.stage == "vae" and self.vae_step >= cfg.vae_steps)
                    or (self.stage == "decoder" and self.dec_step >= cfg.decoder_steps)):
                self._finish_vae_stage()
                self.save_checkpoint()
                last_ckpt = time.monotonic()
                window, window_t = [], 0.0
            elif self.stage == "unet" and self.step % cfg.milestone_steps == 0:
                self._milestone()
            if time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_minutes:
                self.save_checkpoint()
                last_ckpt = time.monotonic()
        if self.stage == "unet" and self.step > 0 and self.last_export_step != self.step:
            self._milestone()
        self.save_checkpoint()
        self.log(f"stopped at stage {self.stage}, VAE step {self.vae_step}, decoder step {self.dec_step}, "
                 f"UNet step {self.step}; "
                 f"checkpoint {self.checkpoint_path}")

    def _milestone(self) -> None:
        log_milestone(self)
