"""Selection: score candidates for accuracy to the target (d_t) and fit to the user (d_p), keep argmax z.

    d_t = s(sim(image, target text))            d_p = s(sim(image, preference text) − c·(image · b))
    z   = α·log d_p + (1 − α)·log d_t            chosen = argmax z   (ties → the smaller weight)
    over the candidates that keep the target:  d_t ≥ min_accuracy · d_t(w = 0)   (0 = all)

``sim`` is the selector's cosine similarity in [-1, 1] and ``s(c) = (1 + c) / 2`` maps it into
(0, 1] so the logarithm is defined (clamped at 1e-6). With ``history_weight = β > 0`` the user
side also counts the image's mean similarity to the user's history images:
``d_p = (1 − β)·s(sim_text) + β·s(mean sim_history)``. Every score is kept in the result.

``preference_source`` says what the user's text side is compared with:

* ``"keywords"`` — the preference keywords (the paper's d_p);
* ``"history"`` — the names of the user's recent history items (what the user did, not what the LLM
  made of it): ``sim_text`` = the mean of ``sim(image, name_j)``; no background (the names are the
  user's own);
* ``"both"`` — the mean of the two, against the background: ``sim_text = (sim(image, keywords) +
  mean_j sim(image, name_j)) / 2 − c·(image · b)``.

With no history names given, ``"history"`` and ``"both"`` fall back to the keywords. With several
selectors (:class:`pmgen.models.scorer.EnsembleScorer`) every ``sim`` is the mean of theirs. Measured
on held-out users (docs/results.md, "Choosing by what the user did"): with the seed-3 selector the history names
find about half again as much of the user's taste at the same accuracy as the keywords do.

With ``contrast = c > 0`` the user's text side is measured **against a background** of other users'
preference texts (their mean selector embedding ``b``, :func:`background_embedding`):
``sim_text = sim(image, preference text) − c·(image · b)``. What every user's keywords share (a
sticker in general, a face, "smileys, emotion") then no longer counts as fitting this user; only what
sets this user's preference apart does. Measured on held-out users (docs/results.md, "Choosing with a
background"): at the same accuracy it finds about twice the taste of the plain ``d_p``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pmgen.settings import (  # noqa: F401  (re-exported)
    DEFAULT_ALPHA, MAX_WEIGHT, MAX_WEIGHTS, PREFERENCE_SOURCES, weight_grid,
)

def to_unit(cos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity in [-1, 1] → (0, 1]."""
    return ((1 + cos) / 2).clamp(min=1e-6, max=1.0)


def z_score(d_t: torch.Tensor, d_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·log d_p + (1 − α)·log d_t`` elementwise (d values in (0, 1])."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * torch.log(d_p) + (1 - alpha) * torch.log(d_t)


def argmax_z(z: torch.Tensor | Sequence[float], eligible: Sequence[bool] | None = None) -> int:
    """Index of the largest ``z`` among the ``eligible`` candidates (ordered by weight; default: all);
    ties (to 1e-9) go to the smaller weight."""
    values = [float(v) for v in z]
    if not values:
        raise ValueError("no candidates to select from")
    ok = [i for i in range(len(values)) if eligible is None or eligible[i]] or [0]
    return max(ok, key=lambda i: (round(values[i], 9), -i))


def keeps_target(d_t: Sequence[float], min_accuracy: float) -> list[bool]:
    """Which candidates keep the target: ``d_t ≥ min_accuracy · d_t[0]`` (index 0 is the ``w = 0``
    baseline, always eligible). ``min_accuracy = 0`` keeps every candidate."""
    if not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy must be in [0, 1], got {min_accuracy}")
    base = float(d_t[0])
    return [i == 0 or float(v) >= min_accuracy * base for i, v in enumerate(d_t)]


@dataclass
class Selection:
    """Per-candidate scores (lists aligned with the candidates) and the chosen index."""

    d_t: list[float]
    d_p: list[float]
    z: list[float]
    chosen: int
    alpha: float
    d_h: list[float] | None = None
    eligible: list[bool] | None = None


def background_embedding(selector: Any, texts: Sequence[str]) -> torch.Tensor:
    """``[D]``: the mean of the selector's unit text embeddings of ``texts`` (other users' preference
    texts), the background ``b`` of ``contrast``. Not renormalized: ``image · b`` is the image's mean
    cosine similarity to those texts."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("a preference background needs at least one non-empty text")
    return selector.text_embeddings(texts).mean(dim=0)


def preference_vector(selector: Any, preference_text: str, history_texts: Sequence[str] = (),
                      preference_source: str = "keywords", background: torch.Tensor | None = None,
                      contrast: float = 0.0) -> torch.Tensor | None:
    """The user's side of ``d_p`` as one vector ``p`` ``[E]``: ``sim_p(image) = image · p`` (``None`` when
    no preference is known). Every ``sim`` of the module docstring is linear in the image embedding, so
    the mean over history names and the background fold into one vector, shared by the selection and
    the exemplar retrieval (:mod:`pmgen.stages.retrieve`)::

        keywords: p = kw − c·b        history: p = mean_j name_j        both: p = (kw + mean_j name_j)/2 − c·b

    (``kw`` the keyword text's unit embedding; ``both`` without keywords uses the names twice; with no
    names, ``history`` and ``both`` fall back to ``keywords``.)
    """
    if preference_source not in PREFERENCE_SOURCES:
        raise ValueError(f"preference_source must be one of {PREFERENCE_SOURCES}, got {preference_source!r}")
    if contrast > 0 and background is None:
        raise ValueError("contrast > 0 needs a preference background (other users' preference texts)")
    names = [t for t in history_texts if t and t.strip()] if preference_source != "keywords" else []
    back = contrast * background if contrast > 0 and background is not None else None
    if names:
        hist = selector.text_embeddings(names).mean(dim=0)
        if preference_source == "history":
            return hist
        side = selector.text_embeddings([preference_text])[0] if preference_text else hist
        p = side / 2 + hist / 2
    elif preference_text:
        p = selector.text_embeddings([preference_text])[0]
    else:
        return None
    return p - back.to(p.device, p.dtype) if back is not None else p


def select(images: torch.Tensor, selector: Any, target_text: str, preference_text: str,
           alpha: float = DEFAULT_ALPHA, history_images: torch.Tensor | None = None,
           history_weight: float = 0.0, min_accuracy: float = 0.0,
           background: torch.Tensor | None = None, contrast: float = 0.0,
           history_texts: Sequence[str] = (), preference_source: str = "keywords") -> Selection:
    """Score candidate ``images`` ``[N, 3, H, W]`` in [0, 1] with ``selector`` and choose one.

    ``images[0]`` is the ``w = 0`` baseline. Candidates whose ``d_t`` falls below ``min_accuracy``
    times the baseline's are not chosen (:func:`keeps_target`). An empty ``preference_text`` (no
    preference known) makes ``d_p`` neutral (1.0) so the choice falls to accuracy alone.
    ``contrast > 0`` needs ``background`` (:func:`background_embedding`). ``history_texts`` are the
    names of the user's recent history items, used by ``preference_source`` ``"history"`` / ``"both"``.
    """
    if images.shape[0] == 0:
        raise ValueError("no candidates to select from")
    if not 0.0 <= history_weight <= 1.0:
        raise ValueError(f"history_weight must be in [0, 1], got {history_weight}")
    if not 0.0 <= contrast <= 1.0:
        raise ValueError(f"contrast must be in [0, 1], got {contrast}")
    emb = selector.image_embeddings(images)
    t_vec = selector.text_embeddings([target_text])[0].to(emb.device, emb.dtype)
    p_vec = preference_vector(selector, preference_text, history_texts, preference_source, background, contrast)
    d_t = to_unit(emb @ t_vec)
    d_p = to_unit(emb @ p_vec.to(emb.device, emb.dtype)) if p_vec is not None else torch.ones_like(d_t)
    d_h = None
    if history_images is not None and history_images.shape[0] > 0 and history_weight > 0:
        d_h = to_unit(selector.image_similarity(images, history_images).mean(dim=1))
        d_p = (1 - history_weight) * d_p + history_weight * d_h
    z = z_score(d_t, d_p, alpha)
    eligible = keeps_target(d_t.tolist(), min_accuracy)
    return Selection(d_t=[float(v) for v in d_t], d_p=[float(v) for v in d_p], z=[float(v) for v in z],
                     chosen=argmax_z(z, eligible), eligible=eligible, alpha=alpha,
                     d_h=[float(v) for v in d_h] if d_h is not None else None)


