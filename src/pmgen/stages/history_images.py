"""History images as a condition: the user's history stickers → a few tokens in the generator's text space.

IP-Adapter-style (Ye et al. 2023; PMG-Bench finds image conditioning beats text-only PMG on
similarity to the history): a **frozen image encoder** — the selector's image tower, the same
embedding d_p is scored with — embeds each history sticker; the unit vectors are averaged over the
history and a trained ``Linear(feature_dim → n_tokens·text_width)`` + ``LayerNorm`` maps the mean to
``n_tokens`` vectors, each rescaled to a word's norm (like the soft embeddings: a vector weighs in the
generator's cross-attention like one word, so it cannot swamp the target).

    enc = HistoryImageEncoder.load(folder)
    tokens = enc.embed(selector, history_images)            # [n_tokens, text_width]

In PMG the tokens are the fourth condition group: appended to the preference unit after the keywords
and the soft embeddings, ``[T ; (P ; S ; H) × w]`` (:mod:`pmgen.stages.condition`), so ``w = 0`` is
still the target alone. Trained like the soft prompt (:mod:`pmgen.train.history_images`): the
generator's loss on the recorded personalized sticker with ``[T ; H]``, a negative-image hinge and
an other-user hinge; the generator and the image encoder stay frozen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

WEIGHTS_FILE = "history_images.safetensors"


@dataclass
class HistoryImageConfig:
    """Shape of a history-image encoder.

    Attributes:
        image_encoder: name of the image encoder whose embeddings it reads (the selector; checked on use).
        image_encoder_hash: content hash of that encoder's weights (checked on use: a retrained selector of
            the same name embeds differently; empty = not recorded).
        feature_dim: width of those embeddings.
        text_width: the generator's text-embedding width (384 for MiniLM).
        n_tokens: condition tokens per user.
        max_images: history images read (the most recent distinct ones).
        norm: every token is rescaled to this L2 norm (0 leaves them unconstrained).
        info: free-form training record.
    """

    image_encoder: str
    feature_dim: int
    text_width: int = 384
    n_tokens: int = 4
    max_images: int = 12
    norm: float = 0.0
    image_encoder_hash: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.feature_dim < 1 or self.text_width < 1 or not 1 <= self.n_tokens <= 64 \
                or not 1 <= self.max_images <= 256 or self.norm < 0:
            raise ValueError("feature_dim >= 1, text_width >= 1, n_tokens in 1..64, max_images in 1..256 and "
                             "norm >= 0 are required")
        h = self.image_encoder_hash
        if not isinstance(h, str) or len(h) > 64 or any(c not in "0123456789abcdef" for c in h):
            raise ValueError(f"image_encoder_hash must be a hex digest of at most 64 characters (or empty), "
                             f"got {str(h)[:80]!r}")


def image_tower(selector: Any) -> Any:
    """The scorer whose image embeddings the history-image encoder reads: the selector itself, or the first
    member of a selector ensemble (:class:`pmgen.models.scorer.EnsembleScorer`), whose weights it was trained on."""
    return getattr(selector, "primary", selector)


class HistoryImageEncoder(nn.Module):
    """Mean of the history's image embeddings → ``n_tokens`` condition vectors (the trained part)."""

    def __init__(self, cfg: HistoryImageConfig):
        super().__init__()
        self.cfg = cfg
        self._name: str | None = None
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(cfg.feature_dim, cfg.n_tokens * cfg.text_width)
        nn.init.normal_(self.proj.weight, std=0.02, generator=g)
        nn.init.zeros_(self.proj.bias)
        self.ln = nn.LayerNorm(cfg.text_width)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``[B, n_tokens, text_width]`` from image embeddings ``[B, N, feature_dim]`` (``mask``
        ``[B, N]`` marks real images; a row without any gives zero tokens' worth of mean: all zeros in)."""
        if features.dim() != 3 or features.shape[-1] != self.cfg.feature_dim:
            raise ValueError(f"features must be [B, N, {self.cfg.feature_dim}], got {tuple(features.shape)}")
        m = torch.ones(features.shape[:2], dtype=features.dtype) if mask is None else mask.to(features.dtype)
        pooled = (features * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        tokens = self.ln(self.proj(pooled).view(-1, self.cfg.n_tokens, self.cfg.text_width))
        if self.cfg.norm > 0:
            tokens = self.cfg.norm * torch.nn.functional.normalize(tokens, dim=-1)
        return tokens

    @torch.no_grad()
    def embed(self, image_encoder: Any, images: torch.Tensor) -> torch.Tensor:
        """``[n_tokens, text_width]`` for one user's history images ``[N, 3, H, W]`` in [0, 1] (the most
        recent first; at most ``max_images`` are read), embedded by ``image_encoder.image_embeddings``."""
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"history images must be [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")
        feats = image_tower(image_encoder).image_embeddings(images[: self.cfg.max_images]).float()
        return self(feats.unsqueeze(0))[0]

    def check_image_encoder(self, image_encoder: Any) -> None:
        """Refuse an image encoder of another name, or other weights, than the one trained with."""
        image_encoder = image_tower(image_encoder)
        name = str(getattr(image_encoder, "name", ""))
        if name and self.cfg.image_encoder and name != self.cfg.image_encoder:
            raise ValueError(f"history-image encoder was trained on the embeddings of {self.cfg.image_encoder!r}, "
                             f"not {name!r}")
        digest = str(getattr(image_encoder, "content_hash", "") or "")
        if digest and self.cfg.image_encoder_hash and digest != self.cfg.image_encoder_hash:
            raise ValueError(f"history-image encoder was trained on the embeddings of the {self.cfg.image_encoder!r} "
                             f"with weights {self.cfg.image_encoder_hash}, but this one's are {digest} (a retrained "
                             "selector embeds differently: retrain the history-image encoder with "
                             "`pmgen train history-images`, or use the selector it was trained with)")

    @property
    def name(self) -> str:
        return self._name or "history-images"

    @property
    def content_hash(self) -> str:
        from pmgen.models import state_hash

        cfg = torch.tensor(list(json.dumps(asdict(self.cfg), sort_keys=True).encode()), dtype=torch.uint8)
        return state_hash([*self.trainable_state().items(), ("config", cfg)])

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict().items())

    def save(self, folder: Path) -> None:
        """Write ``config.json`` + the weights (float32: they are small), atomically each."""
        from safetensors.torch import save_file

        from pmgen.paths import write_file_atomically, write_text_atomically

        folder = Path(folder)
        state = {k: v.contiguous() for k, v in self.trainable_state().items()}
        write_file_atomically(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
        write_text_atomically(folder / "config.json", json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "HistoryImageEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no trained history-image encoder at {folder} "
                                    "(train one with `pmgen train history-images`)")
        enc = cls(HistoryImageConfig(**json.loads((folder / "config.json").read_text())))
        enc.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        enc._name = folder.name
        return enc.eval().requires_grad_(False)
