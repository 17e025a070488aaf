"""The soft-prompt trainer: the trainable encoder against a frozen generator, exact-resume checkpoints,
validation and export. The objective is in :mod:`pmgen.train.soft_prompt`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pmgen.stages.soft import SoftPromptConfig, SoftPromptEncoder
from pmgen.train.losses import diffusion_mse
from pmgen.train.run import load_checkpoint, save_checkpoint, set_rng_state
from pmgen.train.soft_prompt.config import SoftPromptTrainConfig
from pmgen.train.soft_prompt.data import SoftExamples, other_user_index

CHECKPOINT_FORMAT = "pmgen-soft-prompt-train"


def mean_token_norm(builder: Any, texts: Sequence[str]) -> float:
    """Mean L2 norm of the text encoder's real (non-padding) token states over ``texts``."""
    norms = []
    for text in texts:
        states, n_real, _ = builder.encode(text)
        norms.append(states[:max(n_real, 1)].norm(dim=-1))
    return float(torch.cat(norms).mean())


def objective(l_pos: torch.Tensor, l_neg: torch.Tensor, neg_weight: float, margin: float) -> torch.Tensor:
    """``mean(L_pos) + λ · mean(max(0, m + L_pos − L_neg))``: bounded below by ``mean(L_pos)``."""
    if neg_weight == 0:
        return l_pos.mean()
    return l_pos.mean() + neg_weight * F.relu(margin + l_pos - l_neg).mean()


class SoftPromptTrainer:
    """Trains a :class:`pmgen.stages.soft.SoftPromptEncoder` against a frozen generator (injected models).

    Args:
        cfg: the run's settings.
        llm: a :class:`pmgen.models.llm.LLM` (frozen).
        text_encoder: the generator's text encoder (``token_states``).
        generator: a :class:`pmgen.models.generator.StickerGenerator` (frozen; v- or ε-prediction).
        latents: scaled latents ``[N, C, h, w]`` of every image examples point to.
        train, val: the examples.
        text_max_length: token length of the target condition (the generator's).
        log: where progress lines go (besides ``progress.log``).
    """

    def __init__(self, cfg: SoftPromptTrainConfig, llm: Any, text_encoder: Any, generator: Any,
                 latents: torch.Tensor, train: SoftExamples, val: SoftExamples, text_max_length: int = 32,
                 log: Callable[[str], None] = print, llm_name: str = ""):
        from diffusers import DDPMScheduler

        from pmgen.stages.condition import ConditionBuilder

        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"need training and validation examples, got {len(train)} and {len(val)}")
        self.cfg, self.llm, self.generator, self.log = cfg, llm, generator, log
        self.latents = latents.float()
        self.train_ex, self.val_ex = train, val
        if cfg.branch == "preference" and not (train.preference_texts and val.preference_texts):
            raise ValueError("branch 'preference' needs the examples' preference keywords (with_preference_texts)")
        # the weighting mode whose condition the soft embeddings are trained in (it matters only for w > 0)
        self.builder = ConditionBuilder(text_encoder, text_max_length,
                                        "compose" if cfg.branch == "preference" else "concat")
        width = self.builder.width
        norm = mean_token_norm(self.builder, train.target_texts[:256]) if cfg.match_norm else 0.0
        torch.manual_seed(cfg.seed)
        self.encoder = self.build_encoder(width, norm, llm_name)
        generator.unet.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(generator.scheduler.config)
        groups = [{"params": [p for n, p in self.encoder.named_parameters() if not n.startswith("proj.")],
                   "lr": cfg.lr},
                  {"params": list(self.encoder.proj.parameters()), "lr": cfg.proj_lr}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.epoch, self.pos = 0, 0, 0
        self.order: list[int] | None = None
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.train_dir = cfg.run_dir
        self.train_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = cfg.checkpoint_path
        self.progress_path = self.train_dir / "progress.log"
        self._val_fixed = self._fixed_noise(len(val), seed=cfg.seed + 1)
        if cfg.init_from and not self.checkpoint_path.is_file():
            self.warm_start(Path(cfg.init_from))

    # ------------------------------------------------------------------ what trains (a subclass may swap it)
    def build_encoder(self, width: int, norm: float, llm_name: str = "") -> Any:
        """The trainable encoder: here the soft prompt around the frozen LLM."""
        cfg, llm = self.cfg, self.llm
        self.llm.model.requires_grad_(False)
        return SoftPromptEncoder(SoftPromptConfig(
            llm_name=llm_name or getattr(llm, "name", "") or "llm", llm_hidden=llm.hidden_size, text_width=width,
            prefix_length=cfg.prefix_length, n_img=cfg.n_img, use_img_tokens=cfg.use_img_tokens,
            budget_tokens=cfg.budget_tokens, norm=norm), llm)

    def encode(self, ex: SoftExamples, idx: Sequence[int]) -> torch.Tensor:
        """The condition vectors ``[B, n, D]`` of examples ``idx`` of ``ex`` (here: of their history texts)."""
        return self.encoder([ex.history_texts[i] for i in idx])

    def load_export(self, folder: Path) -> Any:
        """An exported encoder (for :meth:`warm_start`)."""
        return SoftPromptEncoder.load(Path(folder), self.llm)

    SHAPE_KEYS: tuple[str, ...] = ("llm_hidden", "text_width", "prefix_length", "n_img", "use_img_tokens",
                                   "budget_tokens")
    CHECKPOINT_FORMAT: str = CHECKPOINT_FORMAT

    # ------------------------------------------------------------------ pieces
    def _fixed_noise(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        g = torch.Generator().manual_seed(seed)
        t_hi = max(1, int(self.cfg.t_max * self.noise_scheduler.config.num_train_timesteps))
        t = torch.randint(0, t_hi, (n,), generator=g)
        noise = torch.randn((n, *self.latents.shape[1:]), generator=g)
        negs = [self.val_ex.negatives[i][int(torch.randint(0, len(self.val_ex.negatives[i]), (1,), generator=g))]
                for i in range(n)] if n == len(self.val_ex) else []
        return t, noise, negs

    def conditions(self, ex: SoftExamples, idx: Sequence[int], softs: torch.Tensor | None) -> torch.Tensor:
        """The generator conditions ``[B, L (+ n_img), D]`` of examples ``idx`` of ``ex`` with soft embeddings
        ``softs`` ``[B, n_img, D]`` (or ``None``), built by :class:`~pmgen.stages.condition.ConditionBuilder` as
        PMG builds them at inference.

        Branch ``target``: the w = 1 concat condition ``[T ; S]`` (no preference keywords), or the target
        alone (``softs=None``, w = 0). Branch ``preference``: compose mode's preference branch ``[P ; S]``
        (the extra condition of a compose w > 0), or the preference keywords alone (``softs=None``).
        """
        if self.cfg.branch == "target":
            w = 0.0 if softs is None else 1.0
            return torch.cat([self.builder.build([ex.target_texts[i]], [], w, None if softs is None else softs[k])
                              .prompt_embeds for k, i in enumerate(idx)])
        return torch.cat([self.builder.build([ex.target_texts[i]], [ex.preference_texts[i]], 1.0,
                                             None if softs is None else softs[k]).extra_prompt_embeds
                          for k, i in enumerate(idx)])

    def _losses(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-example generator loss ``[B]`` of clean latents ``x0`` under ``cond`` at timesteps ``t``."""
        return diffusion_mse(self.generator.unet, self.noise_scheduler, x0, noise, t, cond)

    def _next_batch(self) -> list[int]:
        out = []
        while len(out) < self.cfg.batch_size:
            if self.order is None or self.pos >= len(self.order):
                if self.order is not None:
                    self.epoch += 1
                g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
                self.order = torch.randperm(len(self.train_ex), generator=g).tolist()
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns the batch's loss, L_pos and L_neg."""
        cfg, ex = self.cfg, self.train_ex
        idx = self._next_batch()
        b = len(idx)
        self.encoder.train()
        soft = self.encode(ex, idx)
        cond = self.conditions(ex, idx, soft)
        t_hi = max(1, int(cfg.t_max * self.noise_scheduler.config.num_train_timesteps))
        t = torch.randint(0, t_hi, (b,), generator=self.gen)
        noise = torch.randn((b, *self.latents.shape[1:]), generator=self.gen)
        pos = self.latents[[ex.positives[i] for i in idx]]
        xs, conds, noises, ts = [pos], [cond], [noise], [t]
        if cfg.neg_weight > 0:
            negs = [ex.negatives[i][int(torch.randint(0, len(ex.negatives[i]), (1,), generator=self.gen))]
                    for i in idx]
            xs, conds, noises, ts = xs + [self.latents[negs]], conds + [cond], noises + [noise], ts + [t]
        other = other_user_index([ex.tastes[i] for i in idx])
        has_other = torch.tensor([o != k for k, o in enumerate(other)])
        if cfg.user_weight > 0:  # the same image under another user's soft embeddings
            xs, noises, ts = xs + [pos], noises + [noise], ts + [t]
            conds.append(self.conditions(ex, idx, soft[other]))
        losses = self._losses(torch.cat(xs), torch.cat(noises), torch.cat(ts), torch.cat(conds)).split(b)
        l_pos = losses[0]
        nan = torch.full_like(l_pos, float("nan"))
        l_neg = losses[1] if cfg.neg_weight > 0 else nan
        l_oth = losses[-1] if cfg.user_weight > 0 else nan
        loss = objective(l_pos, l_neg, cfg.neg_weight, cfg.margin)
        if cfg.user_weight > 0 and bool(has_other.any()):
            loss = loss + cfg.user_weight * (F.relu(cfg.user_margin + l_pos - l_oth) * has_other).sum() / b
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        return {"loss": float(loss.detach()), "pos": float(l_pos.detach().mean()),
                "neg": float(l_neg.detach().mean()), "other": float(l_oth.detach().mean())}

    @torch.no_grad()
    def validate(self, batch: int = 8) -> dict[str, float]:
        """``val_pos``, ``val_neg``, ``val_target_only`` (L_pos without the soft embeddings: the target alone,
        or for branch ``preference`` the preference keywords alone), ``val_gain``, ``val_other_user`` and
        ``val_user_gain`` on the fixed validation set."""
        self.encoder.eval()
        ex = self.val_ex
        t, noise, negs = self._val_fixed
        softs = torch.cat([self.encode(ex, range(s, min(len(ex), s + batch))).float()
                           for s in range(0, len(ex), batch)])
        other = other_user_index(ex.tastes)
        pos_l, neg_l, base_l, other_l = [], [], [], []
        for s in range(0, len(ex), batch):
            idx = list(range(s, min(len(ex), s + batch)))
            tgt = self.conditions(ex, idx, None)
            cond = self.conditions(ex, idx, softs[idx])
            x_pos = self.latents[[ex.positives[i] for i in idx]]
            pos_l.append(self._losses(x_pos, noise[idx], t[idx], cond))
            neg_l.append(self._losses(self.latents[[negs[i] for i in idx]], noise[idx], t[idx], cond))
            base_l.append(self._losses(x_pos, noise[idx], t[idx], tgt))
            other_l.append(self._losses(x_pos, noise[idx], t[idx],
                                        self.conditions(ex, idx, softs[[other[i] for i in idx]])))
        p, n, base, o = (torch.cat(v).mean().item() for v in (pos_l, neg_l, base_l, other_l))
        return {"val_pos": p, "val_neg": n, "val_target_only": base, "val_gain": base - p, "val_other_user": o,
                "val_user_gain": o - p}

    def warm_start(self, folder: Path) -> None:
        """Start from an exported soft prompt (``init_from``): its weights, step count and minutes.

        Not an exact resume: the optimizer starts afresh (the data order continues where the exported
        run left off, for the same seed and batch size); the shapes must match this run's.
        """
        try:
            theirs = self.load_export(Path(folder))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"init_from={folder}: {e}") from e
        cfg = theirs.cfg
        mine = self.encoder.cfg
        differ = [k for k in self.SHAPE_KEYS if getattr(cfg, k) != getattr(mine, k)]
        if differ:
            raise ValueError(f"init_from={folder} has another shape ({', '.join(differ)}) than this run")
        self.encoder.load_state_dict(theirs.trainable_state())
        info = cfg.info
        self.step = int(info.get("steps", 0))
        self.train_seconds = 60.0 * float(info.get("train_minutes", 0.0))
        seen = int(info.get("examples_seen", self.step * self.cfg.batch_size))
        self.epoch, self.pos = divmod(seen, len(self.train_ex))
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
        self.order = torch.randperm(len(self.train_ex), generator=g).tolist()
        self.log(f"warm start from {folder}: step {self.step}, {self.train_seconds / 60:.1f} min "
                 "(fresh optimizer state; data order continued)")

    # ------------------------------------------------------------------ state
    def _record(self, line: dict[str, Any]) -> None:
        self.history.append(line)
        with self.progress_path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def save_checkpoint(self) -> None:
        save_checkpoint(self.checkpoint_path, format=self.CHECKPOINT_FORMAT, config=self.cfg.to_json(),
                        encoder=self.encoder.trainable_state(), opt=self.opt.state_dict(), step=self.step,
                        epoch=self.epoch, pos=self.pos, order=self.order, gen=self.gen.get_state(),
                        train_seconds=self.train_seconds, history=self.history)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint (``False`` when there is none). Refuses another run's checkpoint."""
        state = load_checkpoint(self.checkpoint_path)
        if state is None:
            return False
        if state.get("format") != self.CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint_path} is not a {self.cfg.KIND} training checkpoint")
        mine, theirs = self.cfg.to_json(), state["config"]
        defaults = type(self.cfg).field_defaults()  # a setting added since the checkpoint was written: its default
        differ = [k for k in mine if k not in self.cfg.RUN_FIELDS and mine[k] != theirs.get(k, defaults.get(k))]
        if differ:
            raise ValueError(f"{self.checkpoint_path} was written with other settings ({', '.join(differ)}); "
                             "use another --train-dir for a new run")
        set_rng_state(state["rng"])
        self.encoder.load_state_dict(state["encoder"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.epoch, self.pos, self.order = state["step"], state["epoch"], state["pos"], state["order"]
        self.gen.set_state(state["gen"])
        self.train_seconds = state["train_seconds"]
        self.history = state["history"]
        return True

    def export(self, extra: dict[str, Any] | None = None) -> Path:
        """Write the trained encoder (+ training record) to ``cfg.out``."""
        vals = [h for h in self.history if "val_pos" in h]
        self.encoder.cfg.info = {"steps": self.step, "batch_size": self.cfg.batch_size,
                                 "examples_seen": self.step * self.cfg.batch_size,
                                 "train_examples": len(self.train_ex), "val_examples": len(self.val_ex),
                                 "train_minutes": round(self.train_seconds / 60, 1),
                                 "last_validation": vals[-1] if vals else None,
                                 "config": {k: v for k, v in self.cfg.to_json().items()
                                            if k not in ("out", "train_dir", "data_dir")},
                                 **(extra or {})}
        out = Path(self.cfg.out)
        self.encoder.save(out)
        return out

    # ------------------------------------------------------------------ loop
    def run(self, minutes: float | None = None, stop: Callable[[], bool] = lambda: False,
            progress: Any = None) -> None:
        """Train until ``max_steps``, the time budget or ``stop()``; validate, checkpoint and export."""
        cfg = self.cfg
        deadline = time.monotonic() + 60 * (cfg.minutes if minutes is None else minutes)
        last_ckpt = time.monotonic()
        if not any("val_pos" in h for h in self.history):
            self._validate_and_log()
        window: list[dict[str, float]] = []
        while self.step < cfg.max_steps and time.monotonic() < deadline and not stop():
            t0 = time.monotonic()
            window.append(self.train_step())
            self.train_seconds += time.monotonic() - t0
            if progress is not None:
                progress(self.step, window[-1])
            if self.step % cfg.log_every == 0:
                line = {"time": round(time.time()), "step": self.step, "epoch": self.epoch,
                        **{k: round(sum(w[k] for w in window) / len(window), 5) for k in window[0]},
                        "s_per_step": round(self.train_seconds / max(self.step, 1), 2)}
                self._record(line)
                window = []
            if self.step % cfg.val_every == 0:
                self._validate_and_log()
                self.save_checkpoint()
                last_ckpt = time.monotonic()
            elif time.monotonic() - last_ckpt > 60 * cfg.checkpoint_minutes:
                self.save_checkpoint()
                last_ckpt = time.monotonic()
        if not self.history or self.history[-1].get("step") != self.step or "val_pos" not in self.history[-1]:
            self._validate_and_log()
        self.save_checkpoint()
        self.export()
        self.write_card()
        self.log(f"stopped at step {self.step}; weights in {cfg.out}; checkpoint {self.checkpoint_path}")

    def write_card(self) -> None:
        """The exported folder's ``README.md`` and ``loss.png``."""
        from pmgen.train.soft_prompt.card import write_model_card

        write_model_card(self)

    def _validate_and_log(self) -> None:
        v = self.validate()
        self._record({"time": round(time.time()), "step": self.step, **{k: round(x, 5) for k, x in v.items()}})
        self.log(f"step {self.step}: validation " + ", ".join(f"{k} {x:.5f}" for k, x in v.items()))
