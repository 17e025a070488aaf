"""What a generation produces and what it passes between its steps.

:class:`Plan` is one request up to the generator (:meth:`pmgen.pipeline.PMG.plan`); its candidates
rendered and chosen give a :class:`GenerationResult` (images plus the one record), which
:meth:`GenerationResult.save` writes as a result folder (``chosen.png``, ``candidates/``, ``record.json``,
``report.html``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmgen.data.schema import Item
from pmgen.settings import Settings
from pmgen.types import Candidate, GenerationRecord, SoftPrompt

def candidate_file(c: Candidate, index: int) -> str:
    """A candidate's PNG in a result folder: ``candidates/w_<weight>.png``, or for one redrawn from an
    exemplar ``candidates/x<index>_w_<weight>.png``."""
    return f"candidates/{f'x{index}_' if c.start is not None else ''}w_{c.weight:.2f}.png"


@dataclass
class GenerationResult:
    """Images of every candidate, the record (DESIGN.md section 4) and the chosen index."""

    record: GenerationRecord
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], one per weight
    history_images: list[Path] = field(default_factory=list)
    target_image: Path | None = None

    @property
    def chosen(self) -> int:
        return self.record.chosen

    @property
    def chosen_image(self) -> torch.Tensor:
        return self.images[self.chosen]

    def save(self, out_dir: str | Path) -> Path:
        """Write ``chosen.png``, ``candidates/w_*.png``, ``record.json`` and ``report.html``.

        Written to a temporary folder renamed into place at the end (:func:`pmgen.paths.write_result_dir`),
        so an interrupted save never leaves a half-written result behind. ``out_dir`` must be new,
        empty, or an earlier pmgen result; a folder holding anything else raises
        :class:`pmgen.paths.UnsafePathError` and nothing is written.
        """
        from pmgen.models.generator import StickerGenerator
        from pmgen.paths import write_result_dir
        from pmgen.report import write_request_report

        pils = StickerGenerator.to_pil(self.images)
        record = dataclasses.replace(self.record, image="chosen.png", candidates=[
            dataclasses.replace(c, image=candidate_file(c, i)) for i, c in enumerate(self.record.candidates)])

        def write(tmp: Path) -> None:
            (tmp / "candidates").mkdir()
            for cand, im in zip(record.candidates, pils):
                im.save(tmp / cand.image)
            pils[self.chosen].save(tmp / "chosen.png")
            (tmp / "record.json").write_text(json.dumps(record.to_json(), indent=2, ensure_ascii=False) + "\n")
            write_request_report(tmp, record, self.history_images, self.target_image)

        out = write_result_dir(out_dir, write)
        self.record = record
        return out




@dataclass
class Plan:
    """One request up to the generator (:meth:`PMG.plan`): its conditions and what the record needs."""

    user_id: str
    target: Item
    settings: Settings
    target_keywords: list[str]
    preference_keywords: list[str]
    preference: dict[str, Any]
    personalized: bool
    reason: str
    soft: torch.Tensor | None
    soft_prompt: SoftPrompt | None
    conditions: list[Any]
    init: torch.Tensor | None
    history: list[torch.Tensor]
    warnings: list[str]
    timings: dict[str, float]
    t_start: float
    alpha_source: str
    history_images: list[Path] = field(default_factory=list)
    target_image: Path | None = None
    history_tokens: torch.Tensor | None = None
    history_titles: list[str] = field(default_factory=list)
    exemplars: list[Any] = field(default_factory=list)
    """Retrieved :class:`pmgen.stages.retrieve.Exemplar` items, each an extra candidate after the conditions'."""
    exemplar_init: torch.Tensor | None = None
    exemplar_condition: Any = None
