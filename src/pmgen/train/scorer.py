"""Train a CLIP-style scorer (selector or evaluator) on the OpenMoji catalog.

    python -m pmgen.train.scorer --role selector          # ~10–20 min on 2 cores
    python -m pmgen.train.scorer --role evaluator

The image tower learns to match each sticker with texts drawn from its name, aliases and tags,
against the frozen all-MiniLM-L6-v2 pooled vectors (symmetric InfoNCE, learned temperature).
Skin-tone variants of one emoji form one group: a batch never holds two of a group, and a group is
either trained on or held out. The two roles differ in seed, architecture and held-out groups.
Augmentations (small zoom/shift on white, blur, noise) make the scorer robust to generated images.

Resume state lives in ``<cache dir>/train/scorer-<role>/``; the shippable model (fp16) goes to
``--out`` (default ``src/pmgen/zoo/sticker-tiny/<role>``) with a model card and loss curve.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pmgen.data import Item
from pmgen.models.scorer import DualEncoder, ScorerConfig, candidate_matrix, topk_hits
from pmgen.paths import cache_dir
from pmgen.train.checkpoint import load_checkpoint, save_checkpoint

ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "selector": {"arch": "resnet", "widths": (32, 64, 128, 256), "depth": 1, "seed": 1, "holdout_seed": 101,
                 "steps": 1500},
    "evaluator": {"arch": "convnext", "widths": (32, 64, 128, 256), "depth": 1, "seed": 2, "holdout_seed": 202,
                  "steps": 800},
}


@dataclass
class ScorerTrainConfig:
    """Settings of one scorer training run.

    Attributes:
        role: ``selector`` or ``evaluator``; fills in the architecture, seeds and steps below when
            they are left at ``None``.
        out: folder for the shippable model (default ``src/pmgen/zoo/sticker-tiny/<role>`` when run from a
            checkout, else ``<cache dir>/zoo/sticker-tiny/<role>``).
        arch, widths, depth, embed_dim: image tower (see :class:`pmgen.models.scorer.ScorerConfig`).
        seed: initialization, batch order and augmentation seed.
        holdout_seed, holdout_fraction: which catalog groups are held out from training.
        batch_size, steps, lr, weight_decay, warmup: optimization (AdamW, cosine decay after warmup).
        eval_every: steps between held-out loss / accuracy checks.
        checkpoint_minutes: minutes between resume checkpoints.
        threads: torch CPU threads.
        resume: continue from the checkpoint in the cache directory when there is one.
        data_root: dataset directory holding ``stickers`` (default: pmgen's data directory).
    """

    role: str = "selector"
    out: Path | None = None
    arch: str | None = None
    widths: tuple[int, ...] | None = None
    depth: int | None = None
    embed_dim: int = 256
    seed: int | None = None
    holdout_seed: int | None = None
    holdout_fraction: float = 0.1
    batch_size: int = 128
    steps: int | None = None
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    eval_every: int = 250
    checkpoint_minutes: float = 3.0
    threads: int = 2
    resume: bool = True
    data_root: Path | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLE_DEFAULTS:
            raise ValueError(f"role must be one of {tuple(ROLE_DEFAULTS)}, got {self.role!r}")
        for k, v in ROLE_DEFAULTS[self.role].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if not 0 < self.holdout_fraction < 0.5:
            raise ValueError(f"holdout_fraction must be in (0, 0.5), got {self.holdout_fraction}")
        if self.batch_size < 8 or (self.steps or 0) < 1 or self.lr <= 0:
            raise ValueError("batch_size >= 8, steps >= 1 and lr > 0 are required")
        if self.out is None:
            repo_zoo = Path(__file__).resolve().parents[1] / "zoo"
            base = repo_zoo if repo_zoo.parent.joinpath("cli.py").is_file() else cache_dir() / "zoo"
            self.out = base / "sticker-tiny" / self.role
        self.out = Path(self.out)


def text_variants(item: Item) -> list[str]:
    """Training texts of one sticker: its name, a caption, name + tags, and aliases."""
    title = item.title
    tags = [t for t in item.attributes.get("tags", []) if t.lower() not in title.lower()][:5]
    out = [title, f"a sticker of {title}"]
    if tags:
        out.append(f"{title}: {', '.join(tags)}")
    out += [a for a in item.attributes.get("aliases", []) if a.lower() != title.lower()][:2]
    return list(dict.fromkeys(out))


def load_catalog(data_root: Path | None = None) -> tuple[list[Item], torch.Tensor, list[str]]:
    """Catalog items, their 64×64 images as uint8 ``[N, 3, 64, 64]``, and each item's group key."""
    from PIL import Image

    from pmgen import datasets

    ds = datasets.load("stickers", data_root)
    items = list(ds.items.values())
    imgs = np.stack([np.asarray(Image.open(ds.image_path(it)).convert("RGB")) for it in items])
    groups = [it.attributes.get("skintone_base") or it.id for it in items]
    return items, torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), groups


def pooled_text_vectors(texts: list[str], text_encoder: Any, cache: Path) -> torch.Tensor:
    """MiniLM pooled vectors ``[T, 384]`` of ``texts``, cached on disk by content hash."""
    key = hashlib.sha256(("\n".join(texts) + "|" + text_encoder.name).encode()).hexdigest()[:16]
    path = cache / f"text_vectors_{key}.pt"
    if path.is_file():
        return torch.load(path)
    vecs = torch.cat([text_encoder.pooled(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(vecs, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return vecs


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Zoom 0.85–1.1 and shift ±8% on white, then blur (p 0.3) and noise (p 0.3). ``x`` in [0, 1]."""
    b = x.shape[0]
    s = torch.empty(b).uniform_(0.85, 1.1, generator=gen)
    t = torch.empty(b, 2).uniform_(-0.08, 0.08, generator=gen)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = 1 - F.grid_sample(1 - x, grid, padding_mode="zeros", align_corners=False)  # pad with white
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        size = int(torch.randint(20, 40, (1,), generator=gen))
        small = F.interpolate(x[blur], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x[blur] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    noisy = torch.rand(b, generator=gen) < 0.3
    if noisy.any():
        x[noisy] = x[noisy] + 0.04 * torch.randn(x[noisy].shape, generator=gen)
    return x.clamp(0, 1)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train(cfg: ScorerTrainConfig, log: Callable[[str], None] = print,
          catalog: tuple[list[Item], torch.Tensor, list[str]] | None = None, text_encoder: Any = None,
          work: Path | None = None) -> dict[str, Any]:
    """Train (or resume) one scorer and write it to ``cfg.out``; returns the final metrics.

    ``catalog`` (items, uint8 images ``[N, 3, 64, 64]``, group keys), ``text_encoder`` and ``work``
    (the resume folder) default to the sticker catalog, MiniLM and ``<cache dir>/train/scorer-<role>``.
    """
    from pmgen.models.text_encoder import TextEncoder

    torch.set_num_threads(cfg.threads)
    work = work or cache_dir() / "train" / f"scorer-{cfg.role}"
    work.mkdir(parents=True, exist_ok=True)
    items, images, groups = catalog if catalog is not None else load_catalog(cfg.data_root)
    text_encoder = text_encoder if text_encoder is not None else TextEncoder.minilm()
    variants = [text_variants(it) for it in items]
    flat = sorted({t for v in variants for t in v} | {it.title for it in items})
    index = {t: i for i, t in enumerate(flat)}
    vecs = pooled_text_vectors(flat, text_encoder, work.parent / "scorer-text")
    title_idx = torch.tensor([index[it.title] for it in items])

    uniq = sorted(set(groups))
    random.Random(cfg.holdout_seed).shuffle(uniq)
    held = set(uniq[: int(len(uniq) * cfg.holdout_fraction)])
    train_groups: dict[str, list[int]] = {}
    held_idx = []
    for i, g in enumerate(groups):
        if g in held:
            held_idx.append(i)
        else:
            train_groups.setdefault(g, []).append(i)
    group_keys = sorted(train_groups)

    torch.manual_seed(cfg.seed)
    model_cfg = ScorerConfig(arch=cfg.arch, widths=cfg.widths, depth=cfg.depth, embed_dim=cfg.embed_dim,
                             text_dim=vecs.shape[1], text_encoder=text_encoder.name)
    model = DualEncoder(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    step, history, seconds = 0, [], 0.0
    ckpt_path = work / "resume.pt"
    state = load_checkpoint(ckpt_path) if cfg.resume else None
    if state is not None and state.get("config_key") == _config_key(cfg):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        rng.setstate(state["py_rng"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
        log(f"resumed {cfg.role} from step {step}")
    elif state is not None:
        log(f"ignoring checkpoint {ckpt_path}: it was made with other settings")

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                        gen=gen.get_state(), py_rng=rng.getstate(), step=step, history=history,
                        seconds=seconds, config_key=_config_key(cfg))

    last_ckpt = time.time()
    model.train()
    while step < cfg.steps:
        t_step = time.time()
        keys = rng.sample(group_keys, cfg.batch_size)
        idx = torch.tensor([rng.choice(train_groups[k]) for k in keys])
        txt = torch.tensor([index[rng.choice(variants[i])] for i in idx.tolist()])
        x = augment(images[idx].float() / 255, gen)
        loss = clip_loss(model.encode_images(x), model.encode_text_vectors(vecs[txt]), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        seconds += time.time() - t_step
        rec: dict[str, Any] = {"step": step, "loss": round(loss.item(), 4), "lr": round(sched.get_last_lr()[0], 6),
                               "s_per_step": round(seconds / step, 3)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            rec.update(evaluate(model, images, vecs, title_idx, held_idx, groups, seed=cfg.seed))
            model.train()
            log(json.dumps(rec))
        elif step % 25 == 0:
            log(json.dumps(rec))
        history.append(rec)
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    model.eval()
    final = evaluate(model, images, vecs, title_idx, held_idx, groups, seed=cfg.seed)
    final_train = evaluate(model, images, vecs, title_idx,
                           [i for g in group_keys for i in train_groups[g]][::4], groups, seed=cfg.seed)
    model.cfg.info = {
        "role": cfg.role, "seed": cfg.seed, "holdout_seed": cfg.holdout_seed,
        "holdout_groups": len(held), "holdout_items": len(held_idx), "train_items": len(items) - len(held_idx),
        "steps": step, "batch_size": cfg.batch_size,
        "train_minutes": round(seconds / 60, 1),
        "heldout": final, "train_subset": {k.replace("heldout", "train"): v for k, v in final_train.items()},
        "final_loss": history[-1]["loss"],
    }
    model.save(cfg.out)
    write_model_card(cfg, model, history)
    log(json.dumps({"done": True, **model.cfg.info}))
    return model.cfg.info


def _config_key(cfg: ScorerTrainConfig) -> str:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "resume", "threads",
                                                                              "checkpoint_minutes", "data_root")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model: DualEncoder, images: torch.Tensor, vecs: torch.Tensor, title_idx: torch.Tensor,
             idx: list[int], groups: list[str], seed: int, n_candidates: int = 100) -> dict[str, float]:
    """Image→text top-1/top-5 among ``n_candidates`` names (the true one + others of other groups)."""
    emb = torch.cat([model.encode_images(images[idx[i:i + 256]].float() / 255) for i in range(0, len(idx), 256)])
    cands = candidate_matrix(idx, groups, title_idx.tolist(), n_candidates, seed)
    txt = model.encode_text_vectors(vecs)
    sims = torch.einsum("nd,ncd->nc", emb, txt[cands])
    hits = topk_hits(sims)
    return {"heldout_top1": round(hits[1], 4), "heldout_top5": round(hits[5], 4)}


def write_model_card(cfg: ScorerTrainConfig, model: DualEncoder, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(cfg.out)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8, label="train loss")
    ev = [h for h in history if "heldout_top5" in h]
    ax2 = ax.twinx()
    ax2.plot([h["step"] for h in ev], [h["heldout_top5"] for h in ev], "o-", color="C1", label="held-out top-5")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax2.set_ylabel("held-out top-5 (100 names)")
    ax.set_title(f"{cfg.role}: {cfg.arch} {list(cfg.widths or ())}")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    info = model.cfg.info
    n_params = sum(p.numel() for p in model.parameters())
    card = f"""# sticker-tiny {cfg.role}

A CLIP-style dual encoder: a {cfg.arch} image tower ({n_params / 1e6:.2f} M parameters with the
projection heads) trained contrastively against frozen all-MiniLM-L6-v2 sentence vectors on the
OpenMoji catalog (CC BY-SA 4.0). {'Used by PMG to score candidates (d_t, d_p).' if cfg.role == 'selector'
else 'Used only to grade results, never for selection.'}

| | |
|---|---|
| held-out groups / items | {info['holdout_groups']} / {info['holdout_items']} (seed {info['holdout_seed']}) |
| training items | {info['train_items']} |
| steps × batch | {info['steps']} × {info['batch_size']} |
| final train loss | {info['final_loss']} |
| held-out image→text top-1 / top-5 (100 names) | {info['heldout']['heldout_top1']:.3f} / {info['heldout']['heldout_top5']:.3f} |
| training-item image→text top-1 / top-5 (100 names) | {info['train_subset']['train_top1']:.3f} / {info['train_subset']['train_top5']:.3f} |
| training time | {info['train_minutes']} min wall clock on a 2-core CPU |

Reproduce: `pmgen train scorer --role {cfg.role}` (seed {cfg.seed}).

![loss](loss.png)
"""
    (out / "README.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="pmgen train scorer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", default="selector", choices=tuple(ROLE_DEFAULTS))
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-resume", action="store_true")
    a = p.parse_args(argv)
    cfg = ScorerTrainConfig(role=a.role, out=a.out, steps=a.steps, batch_size=a.batch_size, threads=a.threads,
                            resume=not a.no_resume)
    train(cfg, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
