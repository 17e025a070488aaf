"""What a generator run shows and ships: sample grids, the exported pipeline folder and its model card
(``README.md``, ``loss.png``, ``samples/``), rebuilt from ``progress.log`` alone when needed."""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pmgen.models.generator import StickerGenerator, build_scheduler

# `trainer` below is a :class:`pmgen.train.generator.trainer.GeneratorTrainer` (not imported: the trainer imports this module)
Trainer = Any

TRAINING_LOG = "training_log.jsonl"  # copy of the run's progress.log inside the exported folder

# Rows of the sample grid: (item title, another catalog title to edit it towards). Items missing
# from the data (tests, other catalogs) are replaced by the first training items.
SAMPLE_PAIRS: tuple[tuple[str, str], ...] = (
    ("grinning face", "grinning cat"),
    ("face with tears of joy", "cat with tears of joy"),
    ("smiling face with heart-eyes", "smiling cat with heart-eyes"),
    ("cat face", "dog face"),
    ("red heart", "green heart"),
    ("pizza", "hamburger"),
    ("rocket", "airplane"),
    ("soccer ball", "basketball"),
    ("potted plant", "cactus"),
    ("sun", "crescent moon"),
)


# ------------------------------------------------------------------ sample grids
def pick_sample_rows(texts: Sequence[Sequence[str]]) -> list[tuple[int, str, str]]:
    """(item index, its text, another text) for the grid, from :data:`SAMPLE_PAIRS` (each item's first
    text is its title); falls back to the first items."""
    by_title = {t[0].lower(): k for k, t in enumerate(texts)}
    rows = [(by_title[a], texts[by_title[a]][0], texts[by_title[b]][0])
            for a, b in SAMPLE_PAIRS if a in by_title and b in by_title]
    if len(rows) < 2:
        n = min(len(texts), 3)
        rows = [(k, texts[k][0], texts[(k + 1) % len(texts)][0]) for k in range(n)]
    return rows

@torch.no_grad()
def sample_grid(trainer: Trainer, gen: StickerGenerator) -> Any:
    """A PIL image: one row per sample item; columns: init | img2img same text (first strength)
    | img2img other text (each strength) | text-to-image same text."""
    from PIL import Image, ImageDraw

    cfg = trainer.cfg
    n = len(trainer.sample_rows)
    init = torch.stack([trainer.data.images[k] for k, _, _ in trainer.sample_rows]).float() / 255
    same, other = trainer.sample_states[0::2], trainer.sample_states[1::2]
    empty = trainer.text.empty
    kw = {"seed": cfg.seed, "num_inference_steps": cfg.sample_steps, "guidance_scale": cfg.sample_guidance}
    cols = [("init", init),
            (f"same {cfg.sample_strengths[0]}",
             gen.image_to_image(init, same, empty, strength=cfg.sample_strengths[0], **kw))]
    for s in cfg.sample_strengths:
        cols.append((f"other {s}", gen.image_to_image(init, other, empty, strength=s, **kw)))
    cols.append(("txt2img", gen.text_to_image(same, empty, **kw)))
    size, head = init.shape[-1], 12
    grid = Image.new("RGB", (size * len(cols), head + size * n), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, images) in enumerate(cols):
        draw.text((c * size + 2, 0), name, fill=(0, 0, 0))
        for r, img in enumerate(StickerGenerator.to_pil(images)):
            grid.paste(img, (c * size, head + r * size))
    return grid

def composite_sample_specs(val: Sequence[Any], n: int = 12) -> list[Any]:
    """One validation composite per taste (held-out targets), then the first others, up to ``n``."""
    picked, tastes = [], set()
    for s in val:
        if s.taste not in tastes:
            picked.append(s)
            tastes.add(s.taste)
    picked += [s for s in val if s not in picked]
    return picked[:n]

@torch.no_grad()
def composite_sample_grid(trainer: Trainer, gen: StickerGenerator,
                          weights: Sequence[float] = (0.0, 0.5, 1.0, 2.0), strength: float = 0.6) -> Any:
    """A PIL image: one row per held-out target × taste; columns: the target | img2img at
    ``strength`` with the builder's condition at each weight (w = 0: the target alone) | the
    composite the row's spec would have been (reference only, never trained on)."""
    from PIL import Image, ImageDraw

    specs = composite_sample_specs(trainer.composites.val)
    index = {i: k for k, i in enumerate(trainer.data.ids)}
    init = torch.stack([trainer.data.images[index[s.target]] for s in specs]).float() / 255
    kw = {"seed": trainer.cfg.seed, "num_inference_steps": trainer.cfg.sample_steps,
          "guidance_scale": trainer.cfg.sample_guidance}
    cols = [("target", init)]
    for w in weights:
        outs = []
        for k, s in enumerate(specs):
            c = trainer.builder.build(s.target_keywords, s.preference_keywords, w)
            outs.append(gen.image_to_image(init[k:k + 1], c.prompt_embeds, c.negative_prompt_embeds,
                                           strength=strength, **kw))
        cols.append((f"w={w:g}", torch.cat(outs)))
    cols.append(("composite", trainer.composites.images(specs).float() / 255))
    size, head, label = init.shape[-1], 12, 70
    grid = Image.new("RGB", (label + size * len(cols), head + size * len(specs)), "white")
    draw = ImageDraw.Draw(grid)
    for r, s in enumerate(specs):
        draw.text((2, head + r * size + size // 2 - 6), s.taste[:11], fill=(0, 0, 0))
    for c, (name, images) in enumerate(cols):
        draw.text((label + c * size + 2, 0), name, fill=(0, 0, 0))
        for r, img in enumerate(StickerGenerator.to_pil(images)):
            grid.paste(img, (label + c * size, head + r * size))
    return grid


# ------------------------------------------------------------------ export
def export_pipeline(trainer: Trainer, unet: torch.nn.Module | None = None) -> StickerGenerator:
    """The pipeline to export: the VAE, ``unet`` (default: the EMA weights) and the run's info
    (its config without the machine-specific folders)."""
    t = trainer
    assert t.scaling_factor is not None
    info = {"text_encoder": t.encoder_id.split(":")[0], "trained_steps": t.step, "vae_steps": t.vae_step,
            "decoder_steps": t.dec_step, "train_hours": round(t.train_seconds / 3600, 2),
            "data": "OpenMoji (https://openmoji.org), CC BY-SA 4.0", "config": t.cfg.to_json()}
    info["config"].pop("out", None)
    info["config"].pop("train_dir", None)
    info["config"].pop("data_dir", None)
    return StickerGenerator(copy.deepcopy(t.vae), unet if unet is not None else t.ema_unet(),
                            build_scheduler(t.cfg.prediction_type), t.scaling_factor, t.cfg.text_max_length, info)


def export_milestone(trainer: Trainer) -> dict[str, float]:
    """Export the EMA pipeline (fp16) to ``cfg.out`` with ``samples.png`` / ``samples.json`` (the grid
    also goes to ``<train dir>/samples/``); returns the validation metrics and the export size."""
    unet = trainer.ema_unet()
    metrics = trainer.val_loss(unet)
    gen = trainer.pipeline(unet)
    out = Path(trainer.cfg.out)
    gen.save_pretrained(out, dtype=torch.float16)
    grid = composite_sample_grid(trainer, gen) if trainer.composites is not None else sample_grid(trainer, gen)
    (trainer.train_dir / "samples").mkdir(exist_ok=True)
    grid.save(trainer.train_dir / "samples" / f"step_{trainer.step:07d}.png")
    grid.save(out / "samples.png")
    rows = ([{"item": s.target, "taste": s.taste, "target_keywords": list(s.target_keywords),
              "preference_keywords": list(s.preference_keywords)} for s in composite_sample_specs(trainer.composites.val)]
            if trainer.composites is not None else
            [{"item": trainer.data.ids[k], "text": a, "other": b} for k, a, b in trainer.sample_rows])
    (out / "samples.json").write_text(json.dumps({"step": trainer.step, "rows": rows, "seed": trainer.cfg.seed},
                                                 indent=1) + "\n", encoding="utf-8")
    trainer.last_export_step = trainer.step
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
    metrics["export_mb"] = size_mb
    return metrics


def log_milestone(trainer: Trainer) -> None:
    """:meth:`GeneratorTrainer.milestone`, then its ``progress.log`` line, a copy of the log in the
    export and the model card (a card problem is logged, never raised)."""
    t0 = time.monotonic()
    metrics = trainer.milestone()
    line = {"time": round(time.time()), "stage": "milestone", "step": trainer.step,
            **{k: round(v, 5) for k, v in metrics.items()}, "seconds": round(time.monotonic() - t0, 1)}
    trainer._record(line)
    trainer.log(f"milestone at step {trainer.step}: {metrics} -> {trainer.cfg.out}")
    # the committed export keeps its own copy of the training log, so the model card (loss curve,
    # compute) can be rebuilt on a machine where the cache directory is gone
    shutil.copy2(trainer.progress_path, Path(trainer.cfg.out) / TRAINING_LOG)
    try:
        write_model_card(Path(trainer.cfg.out), trainer.train_dir)
    except Exception as e:  # noqa: BLE001 - a card problem must never stop training
        trainer.log(f"model card not written: {e}")


# ------------------------------------------------------------------ model card
def _read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_model_card(out: Path, train_dir: Path, keep_grids: int = 4) -> Path:
    """``loss.png``, ``samples/step_*.png`` (the last ``keep_grids`` milestones) and ``README.md`` in ``out``.

    Reads the exported pipeline's ``pmgen_generator.json`` and the run's ``progress.log`` (plus the
    VAE stage's log when the VAE came from another run through ``vae_init``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, train_dir = Path(out), Path(train_dir)
    meta = json.loads((out / "pmgen_generator.json").read_text())
    info, cfg = meta["info"], meta["info"]["config"]
    lines = _read_progress(train_dir / "progress.log") or _read_progress(out / TRAINING_LOG)
    if not lines:
        raise FileNotFoundError(f"no training log in {train_dir / 'progress.log'} or {out / TRAINING_LOG}: "
                                "the model card is written from it")
    vae_lines = [x for x in lines if x["stage"] in ("vae", "vae_done")]
    vae_source = "this run"
    if not vae_lines and cfg.get("vae_init"):
        other = Path(cfg["vae_init"]).parent / "progress.log"
        vae_lines = [x for x in _read_progress(other) if x["stage"] in ("vae", "vae_done")]
        vae_source = f"run `{Path(cfg['vae_init']).parent.name}` (vae_init)"
    dec = [x for x in lines if x["stage"] == "decoder"]
    unet = [x for x in lines if x["stage"] == "unet"]
    miles = [x for x in lines if x["stage"] == "milestone"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, rows, title in ((axes[0], [x for x in vae_lines if x["stage"] == "vae"], "VAE (L1 + KL)"),
                            (axes[1], dec, "decoder (saturation-weighted L1)")):
        ax.plot([x["step"] for x in rows], [x["loss"] for x in rows], lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[2].plot([x["step"] for x in unet], [x["loss"] for x in unet], lw=0.6, alpha=0.7, label="train (min-SNR)")
    axes[2].plot([x["step"] for x in miles], [x["val_loss"] for x in miles], "o-", ms=3, label="held-out")
    axes[2].set_title("UNet (v-prediction)", fontsize=9)
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    grids = sorted((train_dir / "samples").glob("step_*.png"))[-keep_grids:]
    shutil.rmtree(out / "samples", ignore_errors=True)
    if grids:
        (out / "samples").mkdir()
        for g in grids:
            shutil.copy2(g, out / "samples" / g.name)
    vae_done = next((x for x in vae_lines if x["stage"] == "vae_done"), {})
    dec_done = next((x for x in lines if x["stage"] == "decoder_done"), {})
    vae_steps = vae_done.get("step", info.get("vae_steps", 0))
    sec = {name: sum(x["s_per_step"] * cfg["log_every"] for x in rows if "s_per_step" in x)
           for name, rows in (("vae", [x for x in vae_lines if x["stage"] == "vae"]), ("decoder", dec),
                              ("unet", unet))}
    cpu_h = sum(sec.values()) / 3600
    last_val = miles[-1] if miles else {}
    grid_list = "\n".join(f"- [`samples/{g.name}`](samples/{g.name})" for g in grids)
    # one run with the same recipe (the shipped weights may have come from chained runs via vae_init)
    overrides = f"--vae-steps {vae_steps} --decoder-steps {info.get('decoder_steps', 0)}"
    card = f"""# sticker-tiny generator

A small latent diffusion model trained by pmgen on this 2-core CPU, from scratch, on the OpenMoji
catalog (CC BY-SA 4.0): 64×64 stickers, text condition = all-MiniLM-L6-v2 token states (384-d,
{meta['text_max_length']} tokens). PMG uses it mainly for **image-to-image**: the target item's
sticker is the init and the preference condition edits it (see `pmgen models report` for the
faithful / editable / from-noise figures).

| | |
|---|---|
| VAE | AutoencoderKL, {meta['parameters']['vae'] / 1e6:.2f} M parameters, 64×64×3 ↔ 16×16×4; {vae_steps} steps × {cfg['vae_batch_size']} ({vae_source}); held-out PSNR {vae_done.get('heldout_psnr', float('nan')):.1f} dB |
| decoder fine-tune | {info.get('decoder_steps', 0)} steps, encoder frozen, L1 weighted ×(1 + {cfg['decoder_saturation_weight']:g}·saturation); held-out PSNR {dec_done.get('heldout_psnr', float('nan')):.1f} dB, saturated-pixel L1 {dec_done.get('heldout_saturated_l1', float('nan')):.4f} |
| UNet | UNet2DConditionModel, {meta['parameters']['unet'] / 1e6:.2f} M parameters, channels {cfg['unet_channels']}, cross-attention at the {cfg['unet_attention_levels']} lowest resolutions; {cfg['prediction_type']}, min-SNR-{cfg['snr_gamma']:g}, EMA {cfg['ema_decay']}, text dropped {cfg['cond_drop']:.0%} of the time |
| UNet steps × batch | **{info['trained_steps']}** × {cfg['batch_size']} (AdamW, lr {cfg['lr']:g} {cfg['lr_schedule']}) |
| held-out loss at the last milestone | {last_val.get('val_loss', float('nan')):.4f} (v-MSE {last_val.get('val_mse', float('nan')):.4f}) |
| compute | ≈ {cpu_h:.1f} CPU-hours of wall clock on 2 cores (VAE {sec['vae'] / 3600:.1f} h, decoder {sec['decoder'] / 3600:.1f} h, UNet {sec['unet'] / 3600:.1f} h) |
| data | {info.get('data', 'OpenMoji')} — every catalog sticker except {cfg['holdout']} held-out items; skin-tone variants thinned to {cfg['skintone_keep']:.0%} |
| weights | fp16 safetensors, {sum(f.stat().st_size for f in out.rglob('*.safetensors')) / 2**20:.1f} MB |

Samples at the latest milestone (`samples.png`; columns: init | same name at strength
{cfg['sample_strengths'][0]} | another name at {', '.join(map(str, cfg['sample_strengths']))} | text-to-image):

![samples](samples.png)

Loss curves: ![loss](loss.png)

Sample grids at earlier milestones:

{grid_list or '(none yet)'}

Reproduce (resumable; each run continues the last checkpoint in `~/.cache/pmgen/train/generator/`):

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator {overrides}
    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator --resume    # continue

Rewrite this card from the training logs: `pmgen train generator --out <folder> --write-card`.
"""
    if cfg.get("composite_share", 0) > 0:
        card = _composite_card(out, meta, cfg, last_val, cpu_h, grid_list)
    (out / "README.md").write_text(card)
    return out / "README.md"


def _composite_card(out: Path, meta: dict[str, Any], cfg: dict[str, Any], last_val: dict[str, Any], cpu_h: float,
                    grid_list: str) -> str:
    """The model card of a composition fine-tune (``composite_share > 0``)."""
    info = meta["info"]
    size_mb = sum(f.stat().st_size for f in out.rglob('*.safetensors')) / 2**20
    return f"""# sticker-tiny generator-compose

The `sticker-tiny` generator fine-tuned to draw **the target, in the user's taste** (issue 19,
lever "teach composition"). Same architecture as `../generator` (UNet2DConditionModel
{meta['parameters']['unet'] / 1e6:.2f} M parameters, AutoencoderKL {meta['parameters']['vae'] / 1e6:.2f} M, frozen), started
from its weights (`init_from`), trained on batches of which {cfg['composite_share']:.0%} are **composites**
(`pmgen.composites`) and the rest plain OpenMoji catalog stickers (so single objects are not
forgotten).

A composite is a catalog sticker (the target) shown with an element of one of the 12 hidden tastes
of `sticker-users` — modes {', '.join(cfg['composite_modes'])}: a taste sticker as a corner badge,
held at the side, the taste's palette, a faint pattern of taste stickers behind it, or the catalog's
own "X in Y" pairs (face ↔ cat face, man/woman/person ↔ their sports and music activities, hearts
and shapes in colours, skin tones). Its condition is what PMG feeds at inference:
`ConditionBuilder.build(target keywords, preference keywords, w)` in concat mode, w ∈
{list(cfg['composite_weights'])} (the element grows with w), preference keywords drawn from the
taste's name, searches, description and catalog tags (soft embeddings are not part of these
conditions). **Held out:** no composite has as its target a target item of a val/test sample of
`sticker-users` or one of the generator's {cfg['holdout']} held-out items, and those items (and the
val/test ground-truth stickers) never appear as taste elements; nothing is pasted onto outputs.

| | |
|---|---|
| UNet steps × batch | **{info['trained_steps']}** × {cfg['batch_size']} (of which {round(cfg['composite_share'] * cfg['batch_size'])} composites), AdamW lr {cfg['lr']:g} |
| composites | {cfg['composite_count']} training composites, seed {cfg['seed']} |
| held-out loss at the last milestone | catalog {last_val.get('val_loss', float('nan')):.4f}; composites of held-out targets {last_val.get('val_composite_loss', float('nan')):.4f} |
| compute | ≈ {cpu_h:.1f} h of wall clock (base run included), {cfg['threads']} thread(s) |
| weights | fp16 safetensors, {size_mb:.1f} MB |

Samples at the latest milestone (`samples.png`): one row per held-out target × taste; columns:
the target | image-to-image at strength 0.6, seed {cfg['seed']}, with the condition at w = 0 (target
alone), 0.5, 1, 2 | the composite that spec describes (for reference; never trained on).

![samples](samples.png)

Loss curves: ![loss](loss.png)

Sample grids at earlier milestones:

{grid_list or '(none yet)'}

Continue (resumable; the state is in `~/.cache/pmgen/train/generator-compose/`):

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator-compose \\
        --train-dir ~/.cache/pmgen/train/generator-compose --resume --minutes 600

Start over from the shipped generator:

    pmgen train generator --out src/pmgen/zoo/sticker-tiny/generator-compose \\
        --train-dir ~/.cache/pmgen/train/generator-compose --minutes 600 \\
        --init-from src/pmgen/zoo/sticker-tiny/generator --composite-share {cfg['composite_share']:g} \\
        --batch-size {cfg['batch_size']} --threads {cfg['threads']} --lr {cfg['lr']:g} \\
        --warmup-steps {cfg['warmup_steps']} --milestone-steps {cfg['milestone_steps']} \\
        --checkpoint-minutes {cfg['checkpoint_minutes']:g}

Rewrite this card from the training logs: `pmgen train generator --out <this folder> --write-card
--train-dir ~/.cache/pmgen/train/generator-compose`.
"""
