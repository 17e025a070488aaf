"""Per-request generation settings: the one place their defaults and ranges are defined.

:class:`Settings` starts from a preset's defaults (:meth:`Settings.for_preset`) and takes a request's
overrides (the CLI's options, a batch line's, the service's ``options``); every field is checked once,
here, when it is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from pmgen.presets import Preset

DEFAULT_ALPHA = 2 / 3
MAX_WEIGHT = 16.0
"""Largest preference weight accepted (the condition grows by one preference unit per 1.0)."""
MAX_WEIGHTS = 16
"""Most candidate weights per request."""
PREFERENCE_SOURCES = ("keywords", "history", "both")
"""What d_p compares a candidate with (:func:`select`)."""


WEIGHTING_MODES = ("concat", "guidance", "compose")
"""How the preference is weighted into the condition (:mod:`pmgen.stages.condition`)."""
INVERSIONS = ("ddim", "noised")
"""How :meth:`pmgen.models.generator.StickerGenerator.invert` builds the trajectory: DDIM inversion under
the source condition, or the init noised with one seeded noise (SDEdit's forward process)."""
MAX_EXEMPLARS = 8
"""Most exemplars per request (each one costs an inversion and a candidate; :mod:`pmgen.stages.retrieve`)."""

DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0)
TARGET_TEXTS = ("keywords", "title")
HISTORY_NAMES = 12
"""How many of the user's most recent distinct history items name the user's side of d_p with
``preference_text`` ``"history"`` / ``"both"``."""


@dataclass
class Settings:
    """Per-request generation settings (defaults from the preset).

    Attributes:
        weights: preference weights of the candidates (0 = non-personalized baseline, always included).
        alpha: balance in ``z = α·log d_p + (1−α)·log d_t`` (1 = all personalization).
        mode: weighting mode, ``"concat"`` (paper), ``"guidance"`` (continuous) or ``"compose"`` (the
            preference composed with the target as a concept of its own); see :mod:`pmgen.stages.condition`.
        k: number of preference keywords.
        n_target_keywords: number of target keywords used.
        seed: noise seed shared by every candidate.
        strength, num_inference_steps, guidance_scale: generator settings.
        history_weight: share of history-image similarity in d_p (0 = text only).
        min_accuracy: a candidate is chosen only if its d_t is at least this share of the ``w = 0``
            baseline's (0 = no guard; see :func:`pmgen.stages.select.keeps_target`).
        budget_tokens: token budget of the verbalized history given to the LLM.
        use_soft: use soft preference embeddings (needs trained weights in the preset).
        use_keywords: use the preference keywords in the condition and in d_p (``False`` = the
            soft-embeddings-only ablation; then d_p comes from ``history_weight`` alone).
        use_history_images: add the history-image tokens (the user's history stickers through the
            trained history-image encoder, :mod:`pmgen.stages.history_images`) to the preference unit,
            after the keywords and soft embeddings; needs the request's history images.
        target_text: what d_t compares each candidate with: ``"keywords"`` (the target keywords, as
            in the paper) or ``"title"`` (the target item's title).
        contrast: ``c`` in ``d_p = s(sim(image, preference) − c·(image · background))``, the user's
            preference measured against other users' (0 = off; needs the preset's preference
            background, see :func:`pmgen.stages.select.select`).
        preference_text: what d_p compares each candidate with: ``"keywords"`` (the preference
            keywords, as in the paper), ``"history"`` (the names of the user's
            :data:`HISTORY_NAMES` most recent history items) or ``"both"`` (their mean, against the
            background); see :func:`pmgen.stages.select.select`.
        surround_strength: image-to-image strength *outside* the target's outline (its non-white
            pixels) for the personalized candidates (``w > 0``); inside, ``strength``. ``None`` (the
            default) = ``strength`` everywhere. The ``w = 0`` baseline never changes. Needs pmgen's
            sticker generator (per-pixel strengths, :func:`pmgen.models.generator.outline_strengths`).
        inversion: how candidates start from the target's image: ``"off"`` (SDEdit noise at ``strength``),
            ``"ddim"`` or ``"noised"`` (the target inverted into the generator's trajectory under its own
            condition, :meth:`pmgen.models.generator.StickerGenerator.invert`: ``w = 0`` reproduces the
            target, ``w > 0`` keeps its layout). Needs pmgen's sticker generator.
        inversion_strength: the share of the sampler's steps the inversion covers (1 = from pure noise).
        keep: the share of steps, from the first, that hold the inverted layout (1 = all).
        exemplars: how many catalog items holding both the target and the user's taste to retrieve
            (:mod:`pmgen.stages.retrieve`); each is inverted under its own name and redrawn under the
            target + preference condition at ``exemplar_weight``, an extra candidate. Needs ``inversion``
            and the items' images.
        exemplar_weight: the preference weight the exemplars are redrawn at.
        exemplar_floor: an item is retrieved only if the selector's ``d_t`` of it is at least this share
            of the target image's own.
    """

    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    alpha: float = DEFAULT_ALPHA
    mode: str = "concat"
    k: int = 8
    n_target_keywords: int = 5
    seed: int = 0
    strength: float = 0.6
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    history_weight: float = 0.0
    min_accuracy: float = 0.0
    budget_tokens: int = 192
    use_soft: bool = False
    use_keywords: bool = True
    use_history_images: bool = False
    target_text: str = "keywords"
    contrast: float = 0.0
    surround_strength: float | None = None
    preference_text: str = "keywords"
    inversion: str = "off"
    inversion_strength: float = 1.0
    keep: float = 1.0
    exemplars: int = 0
    exemplar_weight: float = 1.0
    exemplar_floor: float = 0.9

    @classmethod
    def for_preset(cls, preset: "Preset", **overrides: Any) -> "Settings":
        """The preset's settings (:attr:`pmgen.presets.Preset.settings`), then ``overrides`` (checked)."""
        return dataclasses.replace(preset.settings, **overrides) if overrides else preset.settings

    def __post_init__(self) -> None:
        self.weights = tuple(weight_grid(self.weights))
        if self.mode not in WEIGHTING_MODES:
            raise ValueError(f"mode must be one of {WEIGHTING_MODES}, got {self.mode!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.k < 1 or self.n_target_keywords < 1 or self.budget_tokens < 16:
            raise ValueError("k >= 1, n_target_keywords >= 1 and budget_tokens >= 16 are required")
        if not 0 <= self.strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if not 1 <= self.num_inference_steps <= 1000:
            raise ValueError(f"steps (num_inference_steps) must be in [1, 1000], got {self.num_inference_steps}")
        if not 0 <= self.guidance_scale <= 100:
            raise ValueError(f"guidance_scale must be in [0, 100], got {self.guidance_scale}")
        if not 0 <= self.min_accuracy <= 1:
            raise ValueError(f"min_accuracy must be in [0, 1], got {self.min_accuracy}")
        if not 0 <= self.history_weight <= 1:
            raise ValueError(f"history_weight must be in [0, 1], got {self.history_weight}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.target_text not in TARGET_TEXTS:
            raise ValueError(f"target_text must be one of {TARGET_TEXTS}, got {self.target_text!r}")
        if not 0 <= self.contrast <= 1:
            raise ValueError(f"contrast must be in [0, 1], got {self.contrast}")
        if self.preference_text not in PREFERENCE_SOURCES:
            raise ValueError(f"preference_text must be one of {PREFERENCE_SOURCES}, got {self.preference_text!r}")
        if self.surround_strength is not None and not (
                isinstance(self.surround_strength, (int, float)) and 0 <= self.surround_strength <= 1):
            raise ValueError(f"surround_strength must be in [0, 1] (or None: off), got {self.surround_strength!r}")
        if self.inversion not in ("off", *INVERSIONS):
            raise ValueError(f"inversion must be one of off, {', '.join(INVERSIONS)}; got {self.inversion!r}")
        for name in ("inversion_strength", "keep", "exemplar_floor"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.inversion_strength == 0:
            raise ValueError("inversion_strength must be > 0")
        if isinstance(self.exemplars, bool) or not isinstance(self.exemplars, int) or \
                not 0 <= self.exemplars <= MAX_EXEMPLARS:
            raise ValueError(f"exemplars must be an integer in [0, {MAX_EXEMPLARS}], got {self.exemplars!r}")
        if self.exemplars and self.inversion == "off":
            raise ValueError("exemplars are inverted and redrawn: they need inversion 'ddim' or 'noised'")
        if not 0 < self.exemplar_weight <= MAX_WEIGHT:
            raise ValueError(f"exemplar_weight must be in (0, {MAX_WEIGHT:g}], got {self.exemplar_weight}")
        if self.k > 64 or self.n_target_keywords > 64 or self.budget_tokens > 8192:
            raise ValueError("k and n_target_keywords must be <= 64 and budget_tokens <= 8192")


def weight_grid(spec: str | Sequence[float]) -> list[float]:
    """Parse ``"0,0.5,1"`` (or a sequence) into sorted unique weights in [0, MAX_WEIGHT]; 0 always included.

    At most :data:`MAX_WEIGHTS` distinct weights (each one is a generated candidate).
    """
    parts = [v for v in (spec.split(",") if isinstance(spec, str) else spec) if str(v).strip() != ""]
    try:
        vals = [float(v) for v in parts]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be comma-separated numbers such as '0,0.5,1', got {spec!r}") from None
    if any(not math.isfinite(v) or not 0 <= v <= MAX_WEIGHT for v in vals):
        raise ValueError(f"weights must be finite numbers in [0, {MAX_WEIGHT:g}], got {spec!r}")
    out = sorted(set(vals) | {0.0})
    if len(out) > MAX_WEIGHTS:
        raise ValueError(f"at most {MAX_WEIGHTS} weights (one candidate each), got {len(out)}")
    return out
