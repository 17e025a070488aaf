"""The scorer trainer: contrastive image tower against frozen text vectors, resumable; its model card.

See :mod:`pmgen.train.scorer` for the recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pmgen.data.catalog import ImageCatalog, load_catalog
from pmgen.data.schema import Item
from pmgen.models.scorer import DualEncoder, ScorerConfig, candidate_matrix, topk_hits
from pmgen.train.run import atomic_save, load_checkpoint, save_checkpoint, set_rng_state
from pmgen.train.scorer.config import AUGMENT_DEFAULTS, ROLE_DEFAULTS, ScorerTrainConfig


def text_variants(item: Item) -> list[str]:
    """Training texts of one sticker: its name, a caption, name + tags, and aliases."""
    title = item.title
    tags = [t for t in item.attributes.get("tags", []) if t.lower() not in title.lower()][:5]
    out = [title, f"a sticker of {title}"]
    if tags:
        out.append(f"{title}: {', '.join(tags)}")
    out += [a for a in item.attributes.get("aliases", []) if a.lower() != title.lower()][:2]
    return list(dict.fromkeys(out))


def pooled_text_vectors(texts: list[str], text_encoder: Any, cache: Path) -> torch.Tensor:
    """MiniLM pooled vectors ``[T, 384]`` of ``texts``, cached on disk by content hash."""
    key = hashlib.sha256(("\n".join(texts) + "|" + text_encoder.name).encode()).hexdigest()[:16]
    path = cache / f"text_vectors_{key}.pt"
    if path.is_file():
        return torch.load(path)
    vecs = torch.cat([text_encoder.pooled(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    atomic_save(vecs, path)
    return vecs


def catalog_texts(items: list[Item], text_encoder: Any, cache: Path
                  ) -> tuple[list[list[str]], dict[str, int], torch.Tensor, torch.Tensor]:
    """Each item's text variants, every distinct text's index, their pooled vectors (cached in
    ``cache``) and each item's title index."""
    variants = [text_variants(it) for it in items]
    flat = sorted({t for v in variants for t in v} | {it.title for it in items})
    index = {t: i for i, t in enumerate(flat)}
    vecs = pooled_text_vectors(flat, text_encoder, cache)
    return variants, index, vecs, torch.tensor([index[it.title] for it in items])


def corner_check(model: DualEncoder, catalog: ImageCatalog, text_encoder: Any, cache: Path) -> dict[str, float]:
    """A trained scorer's held-out image→text top-1 / top-5 among 100 names, as drawn and drawn at
    :data:`SMALL_SIZE` px in a corner (:func:`shrunk`), on its own held-out groups (the holdout seed
    and group count its training recorded) — the check its training log reports, for any scorer."""
    info = model.cfg.info
    _, _, vecs, title_idx = catalog_texts(catalog.items, text_encoder, cache)
    n_groups = len(set(catalog.groups))
    _, held_idx, _ = holdout_split(catalog.groups, info["holdout_seed"], (info["holdout_groups"] + 0.5) / n_groups)
    small = shrunk_rows(catalog.images, held_idx)
    out = evaluate(model, catalog.images, vecs, title_idx, held_idx, catalog.groups, seed=info["seed"])
    out.update(evaluate(model, small, vecs, title_idx, held_idx, catalog.groups, seed=info["seed"],
                        name="heldout_small"))
    return out


def holdout_split(groups: list[str], seed: int, fraction: float) -> tuple[set[str], list[int], dict[str, list[int]]]:
    """The held-out catalog groups (a ``fraction`` of them, shuffled by ``seed``), the indices of their
    items, and the training items by group."""
    uniq = sorted(set(groups))
    random.Random(seed).shuffle(uniq)
    held = set(uniq[: int(len(uniq) * fraction)])
    train_groups: dict[str, list[int]] = {}
    held_idx = []
    for i, g in enumerate(groups):
        if g in held:
            held_idx.append(i)
        else:
            train_groups.setdefault(g, []).append(i)
    return held, held_idx, train_groups


def augment(x: torch.Tensor, gen: torch.Generator, zoom_min: float = 0.85, zoom_max: float = 1.1,
            roam: float = 0.0) -> torch.Tensor:
    """Zoom ``zoom_min``–``zoom_max`` and shift on white, then blur (p 0.3) and noise (p 0.3). ``x`` in [0, 1].

    The shift is up to ``0.08 + roam·max(0, 1/zoom − 1)`` (grid units): with ``roam`` 1 a shrunk sticker
    may sit anywhere in the frame, up to its edges (a sticker drawn smaller, in a corner, beside
    another); with 0 it stays near the centre (the shipped scorers' training)."""
    b = x.shape[0]
    s = torch.empty(b).uniform_(zoom_min, zoom_max, generator=gen)
    t = torch.empty(b, 2).uniform_(-1.0, 1.0, generator=gen) * (0.08 + roam * (1 / s - 1).clamp(min=0)).unsqueeze(1)
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


SMALL_SIZE = 48
"""Side (px of 64) of the held-out "drawn smaller, in a corner" check (:func:`shrunk`)."""


def shrunk(images: torch.Tensor, size: int = SMALL_SIZE) -> torch.Tensor:
    """uint8 images ``[N, 3, H, W]`` drawn at ``size`` px in the top-left corner, on white: how a
    target looks beside a second object. The scorers' own check of whether they still know it."""
    small = F.interpolate(images.float(), size=(size, size), mode="area").round().to(torch.uint8)
    out = torch.full_like(images, 255)
    out[:, :, :size, :size] = small
    return out


def shrunk_rows(images: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """A copy of ``images`` whose rows ``idx`` are :func:`shrunk` (only those rows are ever scored)."""
    out = images.clone()
    out[idx] = shrunk(images[idx])
    return out


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def train(cfg: ScorerTrainConfig, log: Callable[[str], None] = print, catalog: ImageCatalog | None = None,
          text_encoder: Any = None, resume: bool = False, stop: Callable[[], bool] = lambda: False
          ) -> dict[str, Any] | None:
    """Train one scorer (with ``resume``: continue its checkpoint in ``cfg.run_dir``) and write it to
    ``cfg.out``; returns the final metrics, or ``None`` when the time budget or ``stop()`` ended the
    run first (it is then checkpointed, not exported: ``--resume`` finishes it).

    ``catalog`` and ``text_encoder`` default to the sticker catalog and MiniLM.

    Raises:
        ValueError: ``resume`` and the checkpoint was made with other settings.
    """
    from pmgen.models.text_encoder import TextEncoder

    torch.set_num_threads(cfg.threads)
    work = cfg.run_dir
    work.mkdir(parents=True, exist_ok=True)
    catalog = catalog if catalog is not None else load_catalog(cfg.data_dir)
    items, images, groups = catalog.items, catalog.images, catalog.groups
    text_encoder = text_encoder if text_encoder is not None else TextEncoder.minilm()
    variants, index, vecs, title_idx = catalog_texts(items, text_encoder, work.parent / "scorer-text")

    held, held_idx, train_groups = holdout_split(groups, cfg.holdout_seed, cfg.holdout_fraction)
    group_keys = sorted(train_groups)
    small = shrunk_rows(images, held_idx)
    views = None
    if cfg.generated_strengths:
        from pmgen.train.scorer.generated import generated_views

        views = generated_views(catalog, cfg.generated_strengths, cfg.seed, work.parent / "scorer-views", log=log,
                                stop=stop)
        if views is None:
            log("stopped while drawing the generator views; the same command continues them (they are cached)")
            return None

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
    ckpt_path = cfg.checkpoint_path
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None and state.get("config_key") != _config_key(cfg):
        raise ValueError(f"{ckpt_path} was made with other settings: resume with the same settings or start a new "
                         "run with another --train-dir")
    if state is not None:
        set_rng_state(state["rng"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        rng.setstate(state["py_rng"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
        log(f"resumed {cfg.role} from step {step}")

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                        gen=gen.get_state(), py_rng=rng.getstate(), step=step, history=history,
                        seconds=seconds, config_key=_config_key(cfg), config=cfg.to_json())

    last_ckpt = time.time()
    deadline = time.monotonic() + 60 * cfg.minutes
    model.train()
    while step < cfg.steps and time.monotonic() < deadline and not stop():
        t_step = time.time()
        keys = rng.sample(group_keys, cfg.batch_size)
        idx = torch.tensor([rng.choice(train_groups[k]) for k in keys])
        txt = torch.tensor([index[rng.choice(variants[i])] for i in idx.tolist()])
        x = images[idx].clone()
        if views is not None:
            use = torch.rand(len(idx), generator=gen) < cfg.generated_fraction
            if use.any():
                which = torch.randint(len(views), (int(use.sum()),), generator=gen)
                x[use] = views[which, idx[use]]
        x = augment(x.float() / 255, gen, cfg.zoom_min, cfg.zoom_max, cfg.roam)
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
            rec.update(evaluate(model, small, vecs, title_idx, held_idx, groups, seed=cfg.seed, name="heldout_small"))
            if views is not None:
                rec.update(evaluate(model, views[0], vecs, title_idx, held_idx, groups, seed=cfg.seed,
                                    name="heldout_generated"))
            model.train()
            log(json.dumps(rec))
        elif step % cfg.log_every == 0:
            log(json.dumps(rec))
        history.append(rec)
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    if step < cfg.steps:
        log(f"stopped at step {step} of {cfg.steps}; checkpoint {ckpt_path} (continue with --resume)")
        return None
    model.eval()
    final = evaluate(model, images, vecs, title_idx, held_idx, groups, seed=cfg.seed)
    final.update(evaluate(model, small, vecs, title_idx, held_idx, groups, seed=cfg.seed, name="heldout_small"))
    if views is not None:
        final.update(evaluate(model, views[0], vecs, title_idx, held_idx, groups, seed=cfg.seed,
                              name="heldout_generated"))
    final_train = evaluate(model, images, vecs, title_idx,
                           [i for g in group_keys for i in train_groups[g]][::4], groups, seed=cfg.seed)
    model.cfg.info = {
        "role": cfg.role, "seed": cfg.seed, "holdout_seed": cfg.holdout_seed,
        "holdout_groups": len(held), "holdout_items": len(held_idx), "train_items": len(items) - len(held_idx),
        "steps": step, "batch_size": cfg.batch_size,
        "train_minutes": round(seconds / 60, 1),
        "heldout": final, "train_subset": {k.replace("heldout", "train"): v for k, v in final_train.items()},
        "final_loss": history[-1]["loss"],
        "generated_strengths": list(cfg.generated_strengths or ()), "generated_fraction": cfg.generated_fraction,
        "augment": {"zoom_min": cfg.zoom_min, "zoom_max": cfg.zoom_max, "roam": cfg.roam},
    }
    model.save(Path(cfg.out))
    write_model_card(cfg, model, history)
    log(json.dumps({"done": True, **model.cfg.info}))
    return model.cfg.info


def _config_key(cfg: ScorerTrainConfig) -> str:
    # the run-control fields may change on resume (the same key as before they were RunConfig fields)
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in cfg.RUN_FIELDS}
    if not cfg.generated_strengths:  # a catalog-only run keeps the key it had before these settings existed
        d.pop("generated_strengths"), d.pop("generated_fraction")
    for name, before in AUGMENT_DEFAULTS.items():  # so does a run with the original augmentation
        if d.get(name) == before:
            d.pop(name)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model: DualEncoder, images: torch.Tensor, vecs: torch.Tensor, title_idx: torch.Tensor,
             idx: list[int], groups: list[str], seed: int, n_candidates: int = 100,
             name: str = "heldout") -> dict[str, float]:
    """Image→text top-1/top-5 among ``n_candidates`` names (the true one + others of other groups),
    as ``{name}_top1`` and ``{name}_top5``."""
    emb = torch.cat([model.encode_images(images[idx[i:i + 256]].float() / 255) for i in range(0, len(idx), 256)])
    cands = candidate_matrix(idx, groups, title_idx.tolist(), n_candidates, seed)
    txt = model.encode_text_vectors(vecs)
    sims = torch.einsum("nd,ncd->nc", emb, txt[cands])
    hits = topk_hits(sims)
    return {f"{name}_top1": round(hits[1], 4), f"{name}_top5": round(hits[5], 4)}


def generated_rows(info: dict[str, Any]) -> str:
    """Model-card rows of a run trained on generator views too (empty for a catalog-only run)."""
    if not info.get("generated_strengths"):
        return ""
    h = info["heldout"]
    return (f"| generator views of the catalog | strengths {info['generated_strengths']}, "
            f"{info['generated_fraction']:.0%} of each batch |\n"
            f"| held-out generator views (strength {info['generated_strengths'][0]:g}) top-1 / top-5 | "
            f"{h['heldout_generated_top1']:.3f} / {h['heldout_generated_top5']:.3f} |\n")


def generated_options(cfg: ScorerTrainConfig) -> str:
    if not cfg.generated_strengths:
        return ""
    return (f" --generated-strengths {','.join(f'{s:g}' for s in cfg.generated_strengths)}"
            f" --generated-fraction {cfg.generated_fraction:g}")


def steps_option(cfg: ScorerTrainConfig) -> str:
    """`` --steps N`` when the run's steps are not its role's default (the card's command must reproduce it)."""
    return "" if cfg.steps == ROLE_DEFAULTS.get(cfg.role, {}).get("steps") else f" --steps {cfg.steps}"


def seed_options(cfg: ScorerTrainConfig) -> str:
    """`` --seed N --holdout-seed M`` for the seeds that are not the role's defaults."""
    return "".join(f" --{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("seed", "holdout_seed")
                   if getattr(cfg, k) != ROLE_DEFAULTS.get(cfg.role, {}).get(k))


def augment_options(cfg: ScorerTrainConfig) -> str:
    return "".join(f" --{k.replace('_', '-')} {getattr(cfg, k):g}" for k, v in AUGMENT_DEFAULTS.items()
                   if getattr(cfg, k) != v)


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
| held-out, drawn at {SMALL_SIZE} px in a corner, top-1 / top-5 | {info['heldout']['heldout_small_top1']:.3f} / {info['heldout']['heldout_small_top5']:.3f} |
| training-item image→text top-1 / top-5 (100 names) | {info['train_subset']['train_top1']:.3f} / {info['train_subset']['train_top5']:.3f} |
| augmentation | zoom {cfg.zoom_min:g}–{cfg.zoom_max:g}, roam {cfg.roam:g} |
{generated_rows(info)}| training time | {info['train_minutes']} min wall clock on a 2-core CPU |

Reproduce: `pmgen train scorer --role {cfg.role}{seed_options(cfg)}{steps_option(cfg)}{generated_options(cfg)}{augment_options(cfg)}` (seed {cfg.seed}).

![loss](loss.png)
"""
    (out / "README.md").write_text(card)
