"""Evaluation on held-out sticker users, graded by the **evaluator** scorer (never the selector).

Every method generates the same samples with the same seeds and the same weight grid, and **every
candidate** is graded, so three views come from one run:

* **selected** — the candidate PMG's selection keeps (``z = α·log d_p + (1−α)·log d_t`` with the
  selector's scores): the method as a user gets it;
* **fixed weight** — the candidate at one preference weight (``w = 1``, ``w = 2``), no selection:
  the ablation view, isolating what the conditioning itself does;
* **α sweep** — the selection recomputed for α in [0, 1] from the recorded d_t / d_p: the
  accuracy-vs-personalization trade-off curve.

The images are graded by :class:`pmgen.eval.grading.Grader` (the metrics are listed there); the
views and summaries of the candidate rows are in :mod:`pmgen.eval.summary`, the report and plots in
:mod:`pmgen.eval.report`. Aggregates are means with 95% bootstrap confidence intervals over users,
and the relative gain over the ``none`` method (no personalization).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

from pmgen.data.requests import from_dataset
from pmgen.data.schema import Dataset, Sample
from pmgen.eval.grading import Grader

if TYPE_CHECKING:
    from pmgen.pipeline import PMG

REFERENCE = "target image"
"""The pseudo-method of :func:`run_methods` ``reference=True``: the real target image, graded as is."""


@dataclass
class Method:
    """A named way of generating: settings overrides for :meth:`pmgen.PMG.generate`, and optionally
    another soft-prompt folder (the ablations' weights)."""

    name: str
    overrides: dict[str, Any]
    soft_prompt: str | None = None
    description: str = ""


PAPER_SELECTION = {"target_text": "keywords", "contrast": 0.0, "preference_text": "keywords"}
"""d_t to the target keywords, d_p to the preference keywords alone (the paper's selection)."""
CONTRAST_SELECTION = {"target_text": "title", "contrast": 1.0, "preference_text": "keywords"}
"""d_t to the target's title, d_p to the preference keywords measured against the preset's preference
background."""


KEPT = {"inversion": "ddim", "exemplars": 4, "exemplar_floor": 0.85}
"""The structure-kept start (issue 41): the target's DDIM inversion, and retrieved exemplars."""
SDEDIT = {"inversion": "off", "exemplars": 0}
"""How candidates started before issue 41 (SDEdit noise at the strength): pinned by every other method."""


def default_methods(soft_available: bool, ablations: dict[str, Path] | None = None,
                    history_available: bool = False, background_available: bool = False) -> dict[str, Method]:
    """The methods ``pmgen evaluate`` knows; soft-embedding, history-image and background methods only
    when their trained weights / file exist. Each pins its weighting and selection, so a method means
    the same whatever the preset's defaults are."""
    out = {
        "none": Method("none", {"weights": (0.0,)}, description="no personalization (the w = 0 baseline)"),
        "keywords": Method("keywords", {"use_soft": False, "mode": "concat", **PAPER_SELECTION},
                           description="preference keywords only, paper weighting (repetition)"),
        "keywords-guidance": Method("keywords-guidance", {"use_soft": False, "mode": "guidance", **PAPER_SELECTION},
                                    description="preference keywords only, composed-guidance weighting"),
    }
    if soft_available:
        out["soft"] = Method("soft", {"use_soft": True, "use_keywords": False, "history_weight": 1.0,
                                      **PAPER_SELECTION},
                             description="soft embeddings only (d_p from history images)")
        out["pmg"] = Method("pmg", {"use_soft": True, "mode": "concat", **PAPER_SELECTION},
                            description="keywords + soft embeddings, the paper's weighting and selection")
        out["pmg-compose"] = Method("pmg-compose", {"use_soft": True, "mode": "compose", **PAPER_SELECTION},
                                    description="keywords + soft embeddings composed with the target (AND guidance)")
    if soft_available and background_available:
        out["pmg-contrast"] = Method("pmg-contrast", {"use_soft": True, "mode": "concat", **CONTRAST_SELECTION},
                                     description="pmg, chosen by d_t to the title and d_p against other users' "
                                                 "preferences (contrast)")
        out["pmg-compose-contrast"] = Method("pmg-compose-contrast",
                                             {"use_soft": True, "mode": "compose", **CONTRAST_SELECTION},
                                             description="pmg-compose chosen with contrast (the sticker-tiny default)")
        out["pmg-compose-history"] = Method("pmg-compose-history",
                                            {"use_soft": True, "mode": "compose", **CONTRAST_SELECTION,
                                             "preference_text": "history"},
                                            description="pmg-compose chosen by d_p to the names of the user's "
                                                        "recent history items")
        out["pmg-compose-both"] = Method("pmg-compose-both",
                                         {"use_soft": True, "mode": "compose", **CONTRAST_SELECTION,
                                          "preference_text": "both"},
                                         description="pmg-compose chosen by d_p to the keywords and the history "
                                                     "item names, against the background")
        out["pmg-guidance-contrast"] = Method("pmg-guidance-contrast",
                                              {"use_soft": True, "mode": "guidance", **CONTRAST_SELECTION},
                                              description="keywords + soft embeddings, guidance weighting (the "
                                                          "direction from the target to target + preference), "
                                                          "chosen with contrast")
    if history_available:
        out["keywords+images"] = Method("keywords+images", {"use_soft": False, "use_history_images": True,
                                                            **PAPER_SELECTION},
                                        description="keywords + history-image tokens")
    if history_available and soft_available:
        out["pmg+images"] = Method("pmg+images", {"use_soft": True, "use_history_images": True, "mode": "concat",
                                                  **PAPER_SELECTION},
                                   description="keywords + soft embeddings + history-image tokens (four groups)")
        out["pmg+images-compose"] = Method("pmg+images-compose",
                                           {"use_soft": True, "use_history_images": True, "mode": "compose",
                                            **PAPER_SELECTION},
                                           description="the four groups, the preference composed with the target "
                                                       "(AND guidance)")
    if soft_available and background_available:
        out["none-kept"] = Method("none-kept", {"weights": (0.0,), **KEPT},
                                  description="no personalization, the target inverted: w = 0 is the target "
                                              "itself through the VAE")
        out["pmg-kept"] = Method("pmg-kept", {**out["pmg-compose-history"].overrides, **KEPT},
                                 description="pmg-compose-history started from the target's inversion (its layout "
                                             "kept), plus retrieved catalog exemplars redrawn under the target + "
                                             "preference condition")
    from pmgen.presets import soft_prompt_branch

    for name, folder in (ablations or {}).items():
        if soft_prompt_branch(folder) == "preference":  # made for compose's preference branch: used there
            out[name] = Method(name, {"use_soft": True, "mode": "compose",
                                      **(CONTRAST_SELECTION if background_available else PAPER_SELECTION)},
                               soft_prompt=str(folder),
                               description=f"keywords + {name} soft embeddings (trained in compose's preference "
                                           "branch) composed with the target, chosen as "
                                           + ("pmg-compose-contrast" if background_available else "pmg-compose"))
            continue
        out[name] = Method(name, {"use_soft": True, "use_keywords": False, "history_weight": 1.0, **PAPER_SELECTION},
                           soft_prompt=str(folder), description=f"soft embeddings only, {name} weights")
    for m in out.values():  # every other method starts as it always did: SDEdit noise, no exemplars
        for key, value in SDEDIT.items():
            m.overrides.setdefault(key, value)
    return out


def history_item_ids(user: Any, limit: int = 12) -> list[str]:
    """The user's most recent distinct history items (the personalization reference images)."""
    from pmgen.data.schema import recent_item_ids

    return recent_item_ids(user.events, limit)


def run_methods(pmg: PMG, grader: Grader, ds: Dataset, samples: Sequence[Sample], methods: Sequence[Method],
                progress: Callable[[int, int], None] | None = None, keep_images: int = 0,
                soft_loader: Callable[[str], Any] | None = None, reference: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate every sample with every method and grade **every candidate**.

    Returns one row per (sample, method, candidate) — weight, the selector's d_t / d_p / z, whether
    it was chosen, and the metrics — and, for the first ``keep_images`` samples, the images
    (``{sample_id: {"target": ..., "ground_truth": ..., method: chosen image}}``) for the grid.
    ``soft_loader(folder)`` loads an ablation's soft-prompt weights (methods with ``soft_prompt``).
    ``reference=True`` also grades the target item's own image (method :data:`REFERENCE`, not
    generated): the ceiling of the accuracy metrics.
    """
    rows: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}
    softs: dict[str, Any] = {}
    for n, s in enumerate(samples):
        req = from_dataset(ds, sample_id=s.sample_id)
        user = ds.users[s.user_id]
        hist = history_item_ids(user)
        taste = user.attributes.get("taste_description")
        if n < keep_images:
            kept[s.sample_id] = {"target": grader.image(s.target_id)[0], "title": req.target.title,
                                 "taste": user.attributes.get("taste", ""),
                                 "ground_truth": (grader.image(s.ground_truth_personalized)[0]
                                                  if s.ground_truth_personalized else None)}
        if reference:
            mt = grader.grade(grader.image(s.target_id), s, taste, hist)[0]
            rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "method": REFERENCE, "weight": 0.0,
                         "d_t": float("nan"), "d_p": float("nan"), "chosen": True, **mt})
        for m in methods:
            if m.soft_prompt and m.soft_prompt not in softs:
                if soft_loader is None:
                    raise ValueError(f"method {m.name} needs a soft_loader for {m.soft_prompt}")
                softs[m.soft_prompt] = soft_loader(m.soft_prompt)
            res = pmg.generate(req.user, req.target, req.items, context=req.context,
                               target_image=req.target_image, history_images=[ds.image_path(i) for i in hist],
                               soft_prompt=softs.get(m.soft_prompt) if m.soft_prompt else None,
                               item_images=ds.image_path, **m.overrides)
            metrics = grader.grade(res.images, s, taste, hist)
            told = oracle_scores(pmg.selector, res.images, req.target.title, taste)
            for i, (cand, mt) in enumerate(zip(res.record.candidates, metrics)):
                rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "method": m.name,
                             "weight": cand.weight, "d_t": cand.d_t, "d_p": cand.d_p,
                             **({"d_h": cand.d_h} if cand.d_h is not None else {}),
                             **({"start": cand.start} if cand.start is not None else {}),
                             **{k: v[i] for k, v in told.items()}, "chosen": i == res.chosen, **mt})
            if n < keep_images:
                kept[s.sample_id][m.name] = res.chosen_image
                kept[s.sample_id][m.name + ":keywords"] = ", ".join(res.record.preference_keywords[:4])
        if progress is not None:
            progress(n + 1, len(samples))
    return rows, kept


def oracle_scores(selector: Any, images: Any, title: str, taste: str | None) -> dict[str, list[float]]:
    """The selector's cosine similarity of each candidate to the target's **name** and the user's **hidden
    taste** — texts no method is given (they see keywords). Kept in the rows only for the told-selector
    ceiling (:func:`pmgen.eval.summary.candidate_ceiling` ``by=``); empty without a hidden taste."""
    if not taste:
        return {}
    sims = selector.text_similarity(images, [title, taste])
    return {"oracle_title": [float(v) for v in sims[:, 0]], "oracle_taste": [float(v) for v in sims[:, 1]]}


def evaluation_samples(ds: Dataset, n: int, split: str = "test", seed: int = 0, skip: int = 0) -> list[Sample]:
    """``n`` samples of a split after the first ``skip``: one per user first (users in a fixed shuffled
    order, each user's ground-truth samples favoured), then each user's second sample in the same user
    order, and so on. ``skip = 100`` on the 100-user splits gives every user's second request: new targets
    for the same users, never seen by an evaluation of the first 100."""
    if n < 0 or skip < 0:
        raise ValueError(f"n and skip must be >= 0, got n={n}, skip={skip}")
    samples = ds.split(split)
    rng = random.Random(seed)
    by_user: dict[str, list[Sample]] = {}
    for s in samples:
        by_user.setdefault(s.user_id, []).append(s)
    users = sorted(by_user)
    rng.shuffle(users)
    ordered = {u: sorted(by_user[u], key=lambda s: (s.ground_truth_personalized is None, s.sample_id)) for u in users}
    picked = [ordered[u][r] for r in range(max(map(len, ordered.values()), default=0)) for u in users
              if r < len(ordered[u])]
    return picked[skip:skip + n]
