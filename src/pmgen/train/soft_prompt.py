"""``pmgen train soft-prompt``: train the bias-correction LLM's prefix, [IMG] tokens and linear map.

Everything else is frozen: the LLM, the text encoder and the generator. One training example is a
sticker user of the train split, their verbalized history (what the soft prompt reads), the
target's keywords (what the generator is told to draw) and a **positive image** that reflects the
user's taste: the recorded ground-truth personalized sticker (laughing + cats → *cat with tears of
joy*). By default only samples that have one are used (``positives="ground-truth"``); with
``positives="all"`` the others contribute one of the user's own taste stickers, held out of the
history it is paired with (an ablation: those images are unrelated to the target text).

Objective, for soft embeddings ``S`` of the history and target token states ``T``:

    L_pos = ‖v̂(x_pos, t | [T ; S]) − v‖²          (the generator's v-prediction loss)
    L_neg = ‖v̂(x_neg, t | [T ; S]) − v‖²          (a random catalog sticker outside the user's taste,
                                                     same noise and timestep)
    L_oth = ‖v̂(x_pos, t | [T ; S_other]) − v‖²  (the same image, another user's soft embeddings: a
                                                     user of the batch with another taste)
    loss  = L_pos + λ · max(0, m + L_pos − L_neg) + μ · max(0, m_u + L_pos − L_oth)

The hinge is the released code's "minus 0.5 × the negative loss", bounded: once the user's sticker
is reconstructed better than a random one by the margin ``m`` it stops pushing, so the soft
embeddings carry the user's taste rather than growing without bound. The second hinge asks the
user's own soft embeddings to beat another user's on the user's sticker: without it (μ = 0, the
first trained weights) most of what was learned was one user-independent vector (soft embeddings
of different users had cosine 0.93–0.99) that helps any reconstruction and overrides the target at
inference. With ``match_norm`` every soft vector is rescaled to the text encoder's mean token norm.
Timesteps are drawn from the first ``t_max`` (default 80%) of the schedule: at inference the
generator edits the target's image at the preset's strength (0.6 by default), so only those noise
levels are ever used.

Validation (held-out users of the val split, fixed noise and timesteps): ``val_pos`` (L_pos),
``val_neg``, ``val_gain`` = L_pos with the target alone − L_pos with ``[T ; S]``, and
``val_user_gain`` = L_pos with *another* user's soft embeddings (a validation user of a different
taste) − L_pos with the user's own. ``val_gain`` also counts what any appended vectors do to the
generator; ``val_user_gain`` is what the soft embeddings know about *this* user.

Checkpoints (every few minutes and at each validation) hold the trainable weights, the optimizer,
the step, the data order and every RNG, so ``--resume`` continues exactly. The exported folder
(``config.json``, ``soft_prompt.safetensors``, ``README.md``, ``loss.png``) is what presets load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pmgen.soft import SoftPromptConfig, SoftPromptEncoder
from pmgen.train.checkpoint import (add_run_arguments, load_checkpoint, parse_overrides, resume_config,
                                    save_checkpoint, stamped_log, stop_on_signals)

CHECKPOINT_FORMAT = "pmgen-soft-prompt-train"


@dataclass
class SoftPromptTrainConfig:
    """Settings of one soft-prompt training run.

    Run control (may change on ``--resume``): ``out``, ``minutes``, ``max_steps``, ``train_dir``,
    ``data_dir``, ``checkpoint_minutes``, ``log_every``, ``threads``.

    Attributes:
        out: folder the trained weights are exported to.
        minutes: wall-clock budget of this run.
        max_steps: stop after this many optimizer steps (the planned length of the run).
        train_dir: resume state and logs (default ``<cache dir>/train/soft-prompt-<name of out>``).
        prefix_length, n_img, use_img_tokens: the encoder's shape (see :class:`pmgen.soft.SoftPromptConfig`).
        budget_tokens: token budget of the verbalized history (newest events first).
        batch_size: users per step.
        lr: AdamW learning rate of the prefix and [IMG] embeddings; ``proj_lr`` of the linear map.
        neg_weight, margin: λ and m of the hinge (``neg_weight = 0`` drops the negative term).
        user_weight, user_margin: μ and m_u of the other-user hinge (``user_weight = 0`` drops it).
        match_norm: rescale every soft vector to the text encoder's mean token-state norm.
        positives: ``"all"`` (ground truth where recorded, else a held-out taste item) or
            ``"ground-truth"`` (only samples with a recorded personalized version of the target: the
            held-out taste items are unrelated to the target text, and learning to draw them teaches
            the soft embeddings to override the target).
        t_max: share of the noise schedule timesteps are drawn from.
        val_users: validation examples (one per val-split user, fixed).
        val_every: steps between validations.
        seed: data order, noise and initialization.
        init_from: warm start from an exported soft-prompt folder of the same shape (e.g. the
            committed zoo weights, when the resume checkpoint is gone): its weights, step count and
            minutes carry on, the data order continues where its run left off (same seed), the
            optimizer starts afresh. Ignored when ``train_dir`` holds a checkpoint.
    """

    out: str
    minutes: float = 90.0
    max_steps: int = 480
    train_dir: str | None = None
    data_dir: str | None = None
    checkpoint_minutes: float = 5.0
    log_every: int = 10
    threads: int = 2
    prefix_length: int = 4
    n_img: int = 4
    use_img_tokens: bool = True
    budget_tokens: int = 96
    batch_size: int = 4
    lr: float = 3e-3
    proj_lr: float = 1e-3
    neg_weight: float = 0.5
    margin: float = 0.02
    user_weight: float = 1.0
    user_margin: float = 0.02
    match_norm: bool = True
    positives: str = "ground-truth"
    t_max: float = 0.8
    val_users: int = 48
    val_every: int = 120
    seed: int = 0
    init_from: str | None = None

    RUN_FIELDS = ("out", "minutes", "max_steps", "train_dir", "data_dir", "checkpoint_minutes", "log_every",
                  "threads")

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                problems.append(f"{name} must be {what}, got {getattr(self, name)!r}")

        need(self.minutes > 0, "minutes", "> 0")
        need(self.max_steps >= 1, "max_steps", ">= 1")
        need(self.prefix_length >= 0, "prefix_length", ">= 0")
        need(self.n_img >= 1, "n_img", ">= 1")
        need(self.budget_tokens >= 16, "budget_tokens", ">= 16")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(self.proj_lr > 0, "proj_lr", "> 0")
        need(self.neg_weight >= 0, "neg_weight", ">= 0")
        need(self.margin >= 0, "margin", ">= 0")
        need(self.user_weight >= 0, "user_weight", ">= 0")
        need(self.positives in ("all", "ground-truth"), "positives", "'all' or 'ground-truth'")
        need(self.user_margin >= 0, "user_margin", ">= 0")
        need(0 < self.t_max <= 1, "t_max", "in (0, 1]")
        need(self.val_users >= 1, "val_users", ">= 1")
        need(self.val_every >= 1, "val_every", ">= 1")
        need(self.threads >= 1, "threads", ">= 1")
        need(self.checkpoint_minutes > 0, "checkpoint_minutes", "> 0")
        if problems:
            raise ValueError("invalid soft-prompt training config: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class SoftExamples:
    """Training or validation examples: texts plus indices into a shared latent table."""

    sample_ids: list[str]
    user_ids: list[str]
    history_texts: list[str]
    target_texts: list[str]
    positives: list[int]  # row of ``latents``
    negatives: list[list[int]]  # rows a negative may be drawn from (outside the user's taste)
    positive_kind: list[str]  # "ground truth" or "held-out taste item"
    tastes: list[str]  # the user's hidden taste (for the other-user validation baseline)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, index: Sequence[int]) -> SoftExamples:
        return SoftExamples(*[[getattr(self, f.name)[i] for i in index] for f in dataclasses.fields(self)])


def build_examples(ds: Any, split: str, count_tokens: Callable[[str], int], budget_tokens: int, seed: int,
                   item_rows: dict[str, int], n_target_keywords: int = 5) -> SoftExamples:
    """Examples of one split of ``sticker-users`` (see the module docstring for the positive image).

    ``item_rows`` maps catalog item ids to rows of the latent table; items without a row are never used.
    """
    from pmgen.condition import keywords_text
    from pmgen.datasets.sticker_users import TASTES, taste_by_name
    from pmgen.preferences import target_keywords
    from pmgen.verbalize import verbalize_history

    rng = random.Random(seed)
    base = [it for it in ds.items.values() if not it.attributes.get("skintone") and it.id in item_rows]
    in_taste = {t.name: {it.id for it in base if t.matches(it)} for t in TASTES}
    out = SoftExamples([], [], [], [], [], [], [], [])
    for s in ds.split(split):
        user = ds.users[s.user_id]
        taste = taste_by_name(user.attributes["taste"])
        events = list(user.events)
        if s.ground_truth_personalized and s.ground_truth_personalized in item_rows:
            pos, kind = s.ground_truth_personalized, "ground truth"
        else:
            own = sorted({e.item_id for e in events if e.item_id and e.item_id in in_taste[taste.name]})
            if not own:
                continue
            pos, kind = rng.choice(own), "held-out taste item"
            events = [e for e in events if e.item_id != pos]
        text = verbalize_history(events, ds.items, budget_tokens, count_tokens=count_tokens).text
        target = ds.items[s.target_id]
        tkw = target_keywords(item=target, conversation=list(s.context) or None, k=n_target_keywords).keywords
        negatives = sorted(item_rows[it.id] for it in base if it.id not in in_taste[taste.name] and it.id != pos)
        out.sample_ids.append(s.sample_id)
        out.user_ids.append(s.user_id)
        out.history_texts.append(text)
        out.target_texts.append(keywords_text(tkw))
        out.positives.append(item_rows[pos])
        out.negatives.append(negatives)
        out.positive_kind.append(kind)
        out.tastes.append(taste.name)
    return out


def with_positives(ex: SoftExamples, which: str) -> SoftExamples:
    """All examples (``"all"``) or only those whose positive is the recorded ground truth."""
    if which == "all":
        return ex
    if which != "ground-truth":
        raise ValueError(f"positives must be 'all' or 'ground-truth', got {which!r}")
    return ex.subset([i for i, k in enumerate(ex.positive_kind) if k == "ground truth"])


def other_user_index(tastes: Sequence[str]) -> list[int]:
    """For each example, the next example (cyclically) whose user has another taste (itself if none has)."""
    n = len(tastes)
    return [next((j % n for j in range(i + 1, i + n) if tastes[j % n] != tastes[i]), i) for i in range(n)]


def one_per_user(ex: SoftExamples, n: int, seed: int) -> SoftExamples:
    """At most ``n`` examples, one per user (ground-truth examples preferred), in a fixed order."""
    first: dict[str, int] = {}
    for i, (u, kind) in enumerate(zip(ex.user_ids, ex.positive_kind)):
        if u not in first or (kind == "ground truth" and ex.positive_kind[first[u]] != "ground truth"):
            first[u] = i
    index = sorted(first.values())
    random.Random(seed).shuffle(index)
    return ex.subset(sorted(index[:n]))


# ---------------------------------------------------------------------------------------------- trainer
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
    """Trains a :class:`pmgen.soft.SoftPromptEncoder` against a frozen generator (injected models).

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

        from pmgen.condition import ConditionBuilder

        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"need training and validation examples, got {len(train)} and {len(val)}")
        self.cfg, self.llm, self.generator, self.log = cfg, llm, generator, log
        self.latents = latents.float()
        self.train_ex, self.val_ex = train, val
        self.builder = ConditionBuilder(text_encoder, text_max_length)
        width = self.builder.width
        norm = mean_token_norm(self.builder, train.target_texts[:256]) if cfg.match_norm else 0.0
        torch.manual_seed(cfg.seed)
        self.encoder = SoftPromptEncoder(SoftPromptConfig(
            llm_name=llm_name or getattr(llm, "name", "") or "llm", llm_hidden=llm.hidden_size, text_width=width,
            prefix_length=cfg.prefix_length, n_img=cfg.n_img, use_img_tokens=cfg.use_img_tokens,
            budget_tokens=cfg.budget_tokens, norm=norm), llm)
        llm.model.requires_grad_(False)
        generator.unet.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(generator.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        groups = [{"params": [p for n, p in self.encoder.named_parameters() if not n.startswith("proj.")],
                   "lr": cfg.lr},
                  {"params": list(self.encoder.proj.parameters()), "lr": cfg.proj_lr}]
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.epoch, self.pos = 0, 0, 0
        self.order: list[int] | None = None
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.train_dir = Path(cfg.train_dir) if cfg.train_dir else default_train_dir(cfg.out)
        self.train_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.train_dir / "last.pt"
        self.progress_path = self.train_dir / "progress.log"
        self._val_fixed = self._fixed_noise(len(val), seed=cfg.seed + 1)
        if cfg.init_from and not self.checkpoint_path.is_file():
            self.warm_start(Path(cfg.init_from))

    # ------------------------------------------------------------------ pieces
    def _fixed_noise(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        g = torch.Generator().manual_seed(seed)
        t_hi = max(1, int(self.cfg.t_max * self.noise_scheduler.config.num_train_timesteps))
        t = torch.randint(0, t_hi, (n,), generator=g)
        noise = torch.randn((n, *self.latents.shape[1:]), generator=g)
        negs = [self.val_ex.negatives[i][int(torch.randint(0, len(self.val_ex.negatives[i]), (1,), generator=g))]
                for i in range(n)] if n == len(self.val_ex) else []
        return t, noise, negs

    def _targets(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.builder.encode(t)[0] for t in texts])

    def _losses(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per-example generator loss ``[B]`` of clean latents ``x0`` under ``cond`` at timesteps ``t``."""
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        target = self.noise_scheduler.get_velocity(x0, noise, t) if self.prediction_type == "v_prediction" else noise
        pred = self.generator.unet(noisy, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)

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
        soft = self.encoder([ex.history_texts[i] for i in idx])
        cond = torch.cat([self._targets([ex.target_texts[i] for i in idx]), soft.float()], dim=1)
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
            conds.append(torch.cat([cond[:, :cond.shape[1] - soft.shape[1]], soft.float()[other]], dim=1))
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
        """``val_pos``, ``val_neg``, ``val_target_only``, ``val_gain``, ``val_other_user`` and
        ``val_user_gain`` on the fixed validation set."""
        self.encoder.eval()
        ex = self.val_ex
        t, noise, negs = self._val_fixed
        softs = torch.cat([self.encoder(ex.history_texts[s:s + batch]).float() for s in range(0, len(ex), batch)])
        other = other_user_index(ex.tastes)
        pos_l, neg_l, base_l, other_l = [], [], [], []
        for s in range(0, len(ex), batch):
            idx = list(range(s, min(len(ex), s + batch)))
            tgt = self._targets([ex.target_texts[i] for i in idx])
            cond = torch.cat([tgt, softs[idx]], dim=1)
            x_pos = self.latents[[ex.positives[i] for i in idx]]
            pos_l.append(self._losses(x_pos, noise[idx], t[idx], cond))
            neg_l.append(self._losses(self.latents[[negs[i] for i in idx]], noise[idx], t[idx], cond))
            base_l.append(self._losses(x_pos, noise[idx], t[idx], tgt))
            other_l.append(self._losses(x_pos, noise[idx], t[idx],
                                        torch.cat([tgt, softs[[other[i] for i in idx]]], dim=1)))
        p, n, base, o = (torch.cat(v).mean().item() for v in (pos_l, neg_l, base_l, other_l))
        return {"val_pos": p, "val_neg": n, "val_target_only": base, "val_gain": base - p, "val_other_user": o,
                "val_user_gain": o - p}

    def warm_start(self, folder: Path) -> None:
        """Start from an exported soft prompt (``init_from``): its weights, step count and minutes.

        Not an exact resume: the optimizer starts afresh (the data order continues where the exported
        run left off, for the same seed and batch size); the shapes must match this run's.
        """
        try:
            theirs = SoftPromptEncoder.load(Path(folder), self.llm)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"init_from={folder}: {e}") from e
        cfg = theirs.cfg
        mine = self.encoder.cfg
        differ = [k for k in ("llm_hidden", "text_width", "prefix_length", "n_img", "use_img_tokens", "budget_tokens")
                  if getattr(cfg, k) != getattr(mine, k)]
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
        save_checkpoint(self.checkpoint_path, format=CHECKPOINT_FORMAT, config=self.cfg.to_json(),
                        encoder=self.encoder.trainable_state(), opt=self.opt.state_dict(), step=self.step,
                        epoch=self.epoch, pos=self.pos, order=self.order, gen=self.gen.get_state(),
                        train_seconds=self.train_seconds, history=self.history)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint (``False`` when there is none). Refuses another run's checkpoint."""
        state = load_checkpoint(self.checkpoint_path)
        if state is None:
            return False
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.checkpoint_path} is not a soft-prompt training checkpoint")
        mine, theirs = self.cfg.to_json(), state["config"]
        differ = [k for k in mine if k not in SoftPromptTrainConfig.RUN_FIELDS and mine[k] != theirs.get(k)]
        if differ:
            raise ValueError(f"{self.checkpoint_path} was written with other settings ({', '.join(differ)}); "
                             "use another --train-dir for a new run")
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
        write_model_card(self)
        self.log(f"stopped at step {self.step}; weights in {cfg.out}; checkpoint {self.checkpoint_path}")

    def _validate_and_log(self) -> None:
        v = self.validate()
        self._record({"time": round(time.time()), "step": self.step, **{k: round(x, 5) for k, x in v.items()}})
        self.log(f"step {self.step}: validation " + ", ".join(f"{k} {x:.5f}" for k, x in v.items()))


def default_train_dir(out: str | Path) -> Path:
    from pmgen.paths import cache_dir

    return cache_dir() / "train" / f"soft-prompt-{Path(out).name}"


def write_model_card(trainer: SoftPromptTrainer) -> None:
    """``loss.png`` (train loss, validation L_pos / L_neg / target-only) and ``README.md`` in ``cfg.out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, out = trainer.cfg, Path(trainer.cfg.out)
    tr = [h for h in trainer.history if "loss" in h]
    va = [h for h in trainer.history if "val_pos" in h]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if tr:
        ax.plot([h["step"] for h in tr], [h["pos"] for h in tr], lw=0.7, alpha=0.6, label="train L_pos")
    for key, style in (("val_pos", "o-"), ("val_neg", "s--"), ("val_target_only", ":"), ("val_other_user", "^-.")):
        pts = [(h["step"], h[key]) for h in va if key in h]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("val_", "val ").replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("generator loss")
    ax.legend(fontsize=7)
    ax.set_title(f"soft prompt: prefix {cfg.prefix_length}, [IMG] {cfg.n_img}"
                 + ("" if cfg.use_img_tokens else " (pooled, no [IMG])"))
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    last = va[-1] if va else {}
    first = va[0] if va else {}
    info = trainer.encoder.cfg.info
    overrides = " ".join(f"--set {k}={v}" for k, v in cfg.to_json().items()
                         if k == "max_steps" or (k not in SoftPromptTrainConfig.RUN_FIELDS
                                                 and v != SoftPromptTrainConfig.__dataclass_fields__[k].default))
    card = f"""# sticker-tiny soft prompt{'' if cfg.prefix_length and cfg.use_img_tokens else ' (ablation)'}

The bias-correction LLM's trained parts: a P-Tuning-v2 prefix ({cfg.prefix_length} positions per
layer), {cfg.n_img} [IMG] embeddings {'appended after the prompt' if cfg.use_img_tokens else '(unused: pooled prompt states instead)'}
and a linear map into the text encoder's width, around the frozen {trainer.encoder.cfg.llm_name}. Trained
against the frozen sticker generator (`{trainer.generator.info.get('name', 'zoo:sticker-tiny/generator')}`,
UNet step {trainer.generator.info.get('trained_steps', '?')}) on the train users of `sticker-users`.

| | |
|---|---|
| training examples / validation users | {len(trainer.train_ex)} / {len(trainer.val_ex)} |
| steps × batch | {trainer.step} × {cfg.batch_size} (epoch {trainer.epoch}) |
| objective | L_pos + {cfg.neg_weight:g}·hinge(negative image, m = {cfg.margin:g}) + {cfg.user_weight:g}·hinge(other user's soft, m = {cfg.user_margin:g}) |
| soft vector norm | {f"{trainer.encoder.cfg.norm:.2f} (the text encoder's mean token norm)" if trainer.encoder.cfg.norm else "unconstrained"} |
| training time | {info.get('train_minutes')} min on a 2-core CPU ({cfg.threads} threads) |
| validation L_pos at start → end | {first.get('val_pos', float('nan')):.5f} → {last.get('val_pos', float('nan')):.5f} |
| validation L_neg at end | {last.get('val_neg', float('nan')):.5f} |
| validation target-only loss | {last.get('val_target_only', float('nan')):.5f} |
| val_gain (target-only − with soft) | {last.get('val_gain', float('nan')):+.5f} |
| val_user_gain (another user's soft − own) | {last.get('val_user_gain', float('nan')):+.5f} |

Reproduce: `pmgen train soft-prompt --out {out.as_posix()} {overrides}`.

![loss](loss.png)
"""
    (out / "README.md").write_text(card)


# ---------------------------------------------------------------------------------------------- CLI
def prepare(cfg: SoftPromptTrainConfig, preset: str = "sticker-tiny", log: Callable[[str], None] = print
            ) -> SoftPromptTrainer:
    """Load the preset's frozen models and the ``sticker-users`` examples, and build a trainer."""
    from pmgen import datasets
    from pmgen.presets import get_preset, load_generator, load_llm, load_text_encoder
    from pmgen.train.scorer import load_catalog

    p = get_preset(preset)
    t0 = time.monotonic()
    gen = load_generator(p)
    te = load_text_encoder(p, gen)
    llm = load_llm(p)
    items, images, _ = load_catalog(Path(cfg.data_dir) if cfg.data_dir else None)
    ds = datasets.load("sticker-users", cfg.data_dir)
    rows = {it.id: k for k, it in enumerate(items)}
    with torch.no_grad():
        latents = torch.cat([gen.encode(images[i:i + 256].float() / 255) for i in range(0, len(items), 256)])
    train = build_examples(ds, "train", llm.count_tokens, cfg.budget_tokens, cfg.seed, rows)
    train = with_positives(train, cfg.positives)
    val = one_per_user(build_examples(ds, "val", llm.count_tokens, cfg.budget_tokens, cfg.seed, rows),
                       cfg.val_users, cfg.seed)
    n_gt = sum(k == "ground truth" for k in train.positive_kind)
    log(f"{len(train)} training examples ({n_gt} with a ground-truth sticker), {len(val)} validation users; "
        f"models and latents ready in {time.monotonic() - t0:.0f} s")
    return SoftPromptTrainer(cfg, llm, te, gen, latents, train, val, p.text_max_length, log=log,
                             llm_name=getattr(llm, "name", "smollm2"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pmgen train soft-prompt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "folder for the trained weights (config.json, safetensors, card)", 90.0,
                      "checkpoints and logs (default <cache dir>/train/soft-prompt-<name of --out>)",
                      "SoftPromptTrainConfig")
    parser.add_argument("--preset", default="sticker-tiny", help="preset whose LLM, text encoder and generator to use")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = (Path(args.train_dir) if args.train_dir else default_train_dir(args.out)) / "last.pt"
    if ckpt.is_file() and not args.resume:
        print(f"a checkpoint already exists at {ckpt}: pass --resume to continue it, or --train-dir for a new run",
              file=sys.stderr)
        return 2
    if args.resume and not ckpt.is_file():
        print(f"--resume: no checkpoint at {ckpt}", file=sys.stderr)
        return 2
    values = {"out": args.out, "minutes": args.minutes, "train_dir": args.train_dir, "data_dir": args.data_dir,
              **parse_overrides(args.overrides, SoftPromptTrainConfig)}
    try:
        if args.resume:  # the run's own settings are the base: only run control may be --set again
            values = resume_config(ckpt, values, SoftPromptTrainConfig.RUN_FIELDS)
        cfg = SoftPromptTrainConfig(**values)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    torch.set_num_threads(cfg.threads)

    log = stamped_log
    log(f"config: {json.dumps(cfg.to_json())}")
    trainer = prepare(cfg, args.preset, log)
    if args.resume:
        try:
            trainer.load_checkpoint()
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        log(f"resumed at step {trainer.step} (epoch {trainer.epoch})")
    stop = stop_on_signals(log)
    from tqdm import tqdm

    with tqdm(total=cfg.max_steps, initial=trainer.step, desc="soft prompt", unit="step",
              mininterval=5, file=sys.stderr) as bar:
        def progress(step: int, losses: dict[str, float]) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", pos=f"{losses['pos']:.4f}", refresh=False)

        trainer.run(stop=stop, progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
