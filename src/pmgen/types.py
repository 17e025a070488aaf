"""The contracts between stages: model roles as Protocols, and the one generation record.

Any object with these methods can play a role (``sticker-tiny``'s own models, the ``sd15``
adapters, tiny test models); presets decide which one, the pipeline never probes.

The record (:class:`GenerationRecord`) is what every front end writes and returns — ``record.json``
of ``pmgen generate``, the batch engines, the service's JSON — serialized only by
:meth:`GenerationRecord.to_json` / :meth:`GenerationRecord.from_json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

RECORD_SCHEMA_VERSION = 1
"""Version of the record's JSON layout (``schema_version`` in every ``record.json``)."""


# ------------------------------------------------------------------------------------ model roles


@runtime_checkable
class Named(Protocol):
    """Every model reports a name and a content hash of its weights (recorded in outputs)."""

    name: str

    @property
    def content_hash(self) -> str: ...


@runtime_checkable
class ChatLLM(Named, Protocol):
    """The frozen LLM of the keyword stage (:class:`pmgen.models.llm.LLM`, or an OpenAI-compatible endpoint)."""

    def chat(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 48, **kwargs: Any) -> str: ...

    def count_tokens(self, text: str) -> int: ...


@runtime_checkable
class TextEncoder(Named, Protocol):
    """The generator's text encoder: token states ``[B, L, D]`` and the attention mask ``[B, L]``."""

    hidden_size: int

    def token_states(self, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class Generator(Named, Protocol):
    """A conditional image generator on ``prompt_embeds`` (``[B, L, D]``); images ``[B, 3, H, W]`` in [0, 1]."""

    image_size: int

    def image_to_image(self, init_images: torch.Tensor, prompt_embeds: torch.Tensor,
                       negative_prompt_embeds: torch.Tensor | None = None, *, strength: float = 0.6,
                       **kwargs: Any) -> torch.Tensor: ...

    def text_to_image(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None,
                      **kwargs: Any) -> torch.Tensor: ...


@runtime_checkable
class Scorer(Named, Protocol):
    """A CLIP-style scorer: cosine similarities in [-1, 1] of images ``[B, 3, H, W]`` in [0, 1]."""

    def text_similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor: ...

    def image_similarity(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor: ...

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` unit vectors (the selection's ``contrast`` uses them with a text background)."""
        ...

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``[T, D]`` unit vectors."""
        ...


@runtime_checkable
class SoftPrompt(Protocol):
    """The trained bias-correction part: history texts → ``[B, n_img, D]`` soft preference embeddings.

    ``budget_tokens`` is the history budget it was trained with: the pipeline verbalizes the history
    for it with this budget (it may differ from the keyword stage's).
    """

    budget_tokens: int

    @property
    def content_hash(self) -> str: ...

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------ the record


@dataclass
class Candidate:
    """One generated candidate: its preference weight and scores (``d`` in (0, 1]; ``z`` = the objective).

    ``image`` is the PNG's path relative to the result folder once saved (``None`` before).
    ``d_h`` is the history-image similarity when ``history_weight > 0``. ``eligible`` is false when
    the candidate lost too much of the target to be chosen (``min_accuracy``). ``start`` / ``start_title``
    name the catalog exemplar the candidate was redrawn from (``None``: the target's own image).
    """

    weight: float
    d_t: float
    d_p: float
    z: float
    image: str | None = None
    preference_tokens: int = 0
    d_h: float | None = None
    eligible: bool = True
    start: str | None = None
    start_title: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"weight": self.weight, "d_t": self.d_t, "d_p": self.d_p, "z": self.z, "image": self.image,
               "preference_tokens": self.preference_tokens, "eligible": self.eligible}
        if self.d_h is not None:
            out["d_h"] = self.d_h
        if self.start is not None:
            out["start"], out["start_title"] = self.start, self.start_title
        return out


@dataclass
class GenerationRecord:
    """Everything one generation decided (DESIGN.md section 4); ``chosen`` indexes ``candidates``.

    ``preference`` is the keyword stage's own record (:meth:`pmgen.stages.keywords.Keywords.to_json`);
    ``models`` maps role → ``{"name", "hash"}``; ``warnings`` gathers every truncation and fallback.
    ``target_text`` / ``contrast`` say how d_t and d_p were measured (:class:`pmgen.pipeline.Settings`);
    ``preference_text`` says what d_p compared the candidates with (``history_names``: how many of the
    user's history item names it used). ``surround_strength`` is the strength outside the target's outline of the personalized candidates
    (``None``: ``strength`` everywhere).
    ``reason`` says why a result is not personalized (``personalized`` false). ``alpha_source`` says
    where ``alpha`` came from: ``"preset"``, ``"request"``, or the user's feedback (``"learned from …"``).
    """

    user_id: str
    target_id: str
    target_title: str
    personalized: bool
    preference_keywords: list[str]
    keywords_used: bool
    target_keywords: list[str]
    preference: dict[str, Any]
    soft_embeddings: str
    alpha: float
    mode: str
    candidates: list[Candidate]
    chosen: int
    seed: int
    strength: float | None
    init: str
    num_inference_steps: int
    guidance_scale: float
    history_weight: float
    preset: str
    models: dict[str, dict[str, str]]
    timings_s: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    min_accuracy: float = 0.0
    alpha_source: str = "preset"
    reason: str = ""
    image: str | None = None
    ground_truth_personalized: str | None = None
    history_image_tokens: str = ""
    target_text: str = "keywords"
    contrast: float = 0.0
    surround_strength: float | None = None
    preference_text: str = "keywords"
    history_names: int = 0
    text: dict[str, Any] | None = None
    """With ``--modality both``: the chosen text, its candidates and its fit to the chosen image."""
    schema_version: int = RECORD_SCHEMA_VERSION

    @property
    def chosen_candidate(self) -> Candidate:
        return self.candidates[self.chosen]

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the layout of ``record.json``); optional fields are left out when unset."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("reason", "image", "ground_truth_personalized", "history_image_tokens", "text") and not v:
                continue
            out[f.name] = [c.to_json() for c in v] if f.name == "candidates" else v
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GenerationRecord:
        """Read a record written by :meth:`to_json` (unknown keys are an error: they mean another schema)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"record has unknown fields {unknown} (schema_version {obj.get('schema_version')!r}, "
                             f"this pmgen reads {RECORD_SCHEMA_VERSION})")
        data = dict(obj)
        data["candidates"] = [Candidate(**c) for c in obj.get("candidates", [])]
        return cls(**data)
