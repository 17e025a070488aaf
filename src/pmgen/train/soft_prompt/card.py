"""The soft prompt's model card: ``loss.png`` and ``README.md`` in the exported folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


# `trainer` below is a :class:`pmgen.train.soft_prompt.trainer.SoftPromptTrainer` (not imported: the trainer imports this module)
Trainer = Any


def _option(name: str, value: Any) -> str:
    """The command-line spelling of one setting (``--max-steps 480``, ``--no-match-norm``)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def reproduce_options(cfg: Any) -> str:
    """The options that reproduce a run: ``--max-steps`` and every setting off its default."""
    fields = type(cfg).__dataclass_fields__
    return " ".join(_option(k, v) for k, v in cfg.to_json().items()
                    if k == "max_steps" or (k not in type(cfg).RUN_FIELDS and v != fields[k].default))


def plot_losses(trainer: Trainer, title: str) -> None:
    """``loss.png`` in ``cfg.out``: train L_pos and the validation losses over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(Path(trainer.cfg.out) / "loss.png", dpi=110)
    plt.close(fig)


def write_model_card(trainer: Trainer) -> None:
    """``loss.png`` (train loss, validation L_pos / L_neg / target-only) and ``README.md`` in ``cfg.out``."""
    cfg, out = trainer.cfg, Path(trainer.cfg.out)
    plot_losses(trainer, f"soft prompt: prefix {cfg.prefix_length}, [IMG] {cfg.n_img}"
                + ("" if cfg.use_img_tokens else " (pooled, no [IMG])"))
    va = [h for h in trainer.history if "val_pos" in h]
    last = va[-1] if va else {}
    first = va[0] if va else {}
    info = trainer.encoder.cfg.info
    overrides = reproduce_options(cfg)
    card = f"""# sticker-tiny soft prompt{'' if cfg.prefix_length and cfg.use_img_tokens else ' (ablation)'}

The bias-correction LLM's trained parts: a P-Tuning-v2 prefix ({cfg.prefix_length} positions per
layer), {cfg.n_img} [IMG] embeddings {'appended after the prompt' if cfg.use_img_tokens else '(unused: pooled prompt states instead)'}
and a linear map into the text encoder's width, around the frozen {trainer.encoder.cfg.llm_name}. Trained
against the frozen sticker generator (`{trainer.generator.info.get('name', 'zoo:sticker-tiny/generator')}`,
UNet step {trainer.generator.info.get('trained_steps', '?')}) on the train users of `sticker-users`,
{"in compose mode's preference branch `[P ; S]` (the user's preference keywords, then the soft embeddings, no target), on held-out taste stickers: use it with `--mode compose`." if cfg.branch == "preference" else "in PMG's w = 1 condition `[T ; S]` (target keywords, then the soft embeddings)."}
{f"Warm-started from `{cfg.init_from}`: its steps and minutes are counted in the table." if cfg.init_from else ""}

| | |
|---|---|
| training examples / validation users | {len(trainer.train_ex)} / {len(trainer.val_ex)} |
| steps × batch | {trainer.step} × {cfg.batch_size} (epoch {trainer.epoch}) |
| objective | L_pos + {cfg.neg_weight:g}·hinge(negative image, m = {cfg.margin:g}) + {cfg.user_weight:g}·hinge(other user's soft, m = {cfg.user_margin:g}) |
| soft vector norm | {f"{trainer.encoder.cfg.norm:.2f} (the text encoder's mean token norm)" if trainer.encoder.cfg.norm else "unconstrained"} |
| training time | {info.get('train_minutes')} min on a 2-core CPU ({cfg.threads} thread{'' if cfg.threads == 1 else 's'}) |
| validation L_pos at start → end | {first.get('val_pos', float('nan')):.5f} → {last.get('val_pos', float('nan')):.5f} |
| validation L_neg at end | {last.get('val_neg', float('nan')):.5f} |
| validation loss without soft ({"preference keywords alone" if cfg.branch == "preference" else "target alone"}) | {last.get('val_target_only', float('nan')):.5f} |
| val_gain (without − with soft) | {last.get('val_gain', float('nan')):+.5f} |
| val_user_gain (another user's soft − own) | {last.get('val_user_gain', float('nan')):+.5f} |

Reproduce: `pmgen train soft-prompt --out {out.as_posix()} {overrides}`.

![loss](loss.png)
"""
    (out / "README.md").write_text(card)
