"""The scorer role: CLIP-style dual encoders that compare images with text (and images with images).

A :class:`DualEncoder` pairs a small trained **image tower** with the frozen text encoder
(all-MiniLM-L6-v2 pooled vectors) followed by a trained projection. pmgen trains two of them,
independently (``pmgen train scorer``):

* the **selector** computes ``d_t`` / ``d_p`` during generation;
* the **evaluator** (other seed, architecture and held-out split) is used only to grade results,
  so selection is never graded by its own judge.

Images are float tensors ``[B, 3, H, W]`` in **[0, 1]** (resized to 64×64 internally); texts are
strings. Similarities are cosines in [-1, 1].
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmgen.data.images import check_images
from pmgen.paths import write_file_atomically, write_text_atomically

ARCHS = ("resnet", "convnext")


@dataclass
class ScorerConfig:
    """Architecture of a dual encoder.

    Attributes:
        arch: image tower family — ``"resnet"`` (stride-2 stem, GroupNorm basic blocks) or
            ``"convnext"`` (2×2 patchify stem, depthwise 7×7 blocks with GroupNorm(1)).
        widths: channels per stage; the stem halves the resolution, then each later stage halves it
            again (64 → 32 → 16 → 8 → 4 for four stages).
        depth: blocks per stage.
        embed_dim: joint embedding size.
        text_dim: width of the text encoder's pooled vectors (384 for MiniLM).
        image_size: input resolution the tower sees.
        text_encoder: name of the frozen text encoder the projection was trained against.
        info: free-form training record (seed, split, accuracy) written by the trainer.
    """

    arch: str = "resnet"
    widths: tuple[int, ...] = (32, 64, 128, 256)
    depth: int = 1
    embed_dim: int = 256
    text_dim: int = 384
    image_size: int = 64
    text_encoder: str = "all-MiniLM-L6-v2"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or any(w <= 0 or w % 8 for w in self.widths):
            raise ValueError(f"widths must be positive multiples of 8, got {self.widths}")
        if self.depth < 1 or self.embed_dim < 8 or self.text_dim < 8 or self.image_size < 16:
            raise ValueError("depth >= 1, embed_dim >= 8, text_dim >= 8 and image_size >= 16 are required")


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = nn.GroupNorm(8, cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout))
                     if (stride != 1 or cin != cout) else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.n1(self.c1(x)))
        return F.silu(self.n2(self.c2(h)) + self.skip(x))


class _ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.GroupNorm(1, c)
        self.pw1 = nn.Conv2d(c, 4 * c, 1)
        self.pw2 = nn.Conv2d(4 * c, c, 1)
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.pw2(F.gelu(self.pw1(self.norm(self.dw(x)))))


class ImageTower(nn.Module):
    """Image ``[B, 3, S, S]`` in [0, 1] → feature vector ``[B, widths[-1]]``."""

    def __init__(self, cfg: ScorerConfig):
        super().__init__()
        w = cfg.widths
        layers: list[nn.Module] = []
        if cfg.arch == "resnet":
            layers += [nn.Conv2d(3, w[0], 3, 2, 1, bias=False), nn.GroupNorm(8, w[0]), nn.SiLU()]
            cin = w[0]
            for i, c in enumerate(w):
                for d in range(cfg.depth):
                    layers.append(_ResBlock(cin, c, 2 if (d == 0 and i > 0) else 1))
                    cin = c
        else:
            layers += [nn.Conv2d(3, w[0], 2, 2), nn.GroupNorm(1, w[0])]
            for i, c in enumerate(w):
                if i > 0:
                    layers += [nn.GroupNorm(1, w[i - 1]), nn.Conv2d(w[i - 1], c, 2, 2)]
                layers += [_ConvNeXtBlock(c) for _ in range(cfg.depth)]
        self.body = nn.Sequential(*layers)
        self.out_dim = w[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class DualEncoder(nn.Module):
    """Trained image tower + projection heads; texts come in as frozen pooled vectors.

    ``encode_images(images)`` → ``[B, D]`` and ``encode_text_vectors(pooled)`` → ``[T, D]``, both L2-normalized.
    """

    def __init__(self, cfg: ScorerConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = ImageTower(cfg)
        self.image_proj = nn.Linear(self.tower.out_dim, cfg.embed_dim)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU(),
                                       nn.Linear(cfg.text_dim, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP

    # the image mean/std used for normalization is fixed: stickers sit on white
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images)
        if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
            x = F.interpolate(x, size=(self.cfg.image_size, self.cfg.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        x = (x - 0.5) / 0.5
        return F.normalize(self.image_proj(self.tower(x)), dim=-1)

    def encode_text_vectors(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(pooled), dim=-1)

    def save(self, folder: Path, fp16: bool = True) -> None:
        """Write ``config.json`` and ``model.safetensors`` (fp16 by default) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        write_file_atomically(folder / "model.safetensors", lambda tmp: save_file(sd, str(tmp)))
        cfg = asdict(self.cfg)
        cfg["widths"] = list(cfg["widths"])
        write_text_atomically(folder / "config.json", json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "DualEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"no scorer at {folder}: expected config.json and model.safetensors "
                                    "(train one with `pmgen train scorer`)")
        cfg = ScorerConfig(**json.loads((folder / "config.json").read_text()))
        model = cls(cfg)
        sd = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
        model.load_state_dict(sd)
        return model.eval().requires_grad_(False)


class Scorer:
    """A dual encoder bound to its text encoder: what the pipeline and the evaluation call.

    All methods take images ``[B, 3, H, W]`` in [0, 1] and return cosine similarities.
    """

    def __init__(self, model: DualEncoder, text_encoder: Any, name: str = "scorer", content_hash: str = ""):
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.name = name
        self._content_hash = content_hash
        self.path: Path | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def content_hash(self) -> str:
        """Hash of the weight files it was loaded from, or of the in-memory image tower (computed once)."""
        if not self._content_hash:
            from pmgen.models import state_hash

            self._content_hash = state_hash(self.model.state_dict().items())
        return self._content_hash

    @classmethod
    def load(cls, folder: Path, text_encoder: Any, name: str | None = None) -> "Scorer":
        from pmgen.models.llm import folder_hash

        folder = Path(folder)
        scorer = cls(DualEncoder.load(folder), text_encoder, name or folder.name, folder_hash(folder))
        scorer.path = folder
        return scorer

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``[T, D]`` unit vectors (cached per text)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            vecs = self.model.encode_text_vectors(self.text_encoder.pooled(todo))
            self._text_cache.update(zip(todo, vecs))
        return torch.stack([self._text_cache[t] for t in texts])

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` unit vectors."""
        return self.model.encode_images(images)

    @torch.no_grad()
    def text_similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity ``[B, T]`` between each image and each text."""
        return self.image_embeddings(images) @ self.text_embeddings(texts).T

    @torch.no_grad()
    def image_similarity(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``[B, N]`` between each image and each of ``others``."""
        return self.image_embeddings(images) @ self.image_embeddings(others).T


class EnsembleScorer:
    """Several scorers as one: every similarity is the mean of the members' cosine similarities.

    The embeddings are the members' unit embeddings side by side, each scaled by ``1/sqrt(k)``, so any
    dot product — and a mean of embeddings, such as the selection's preference background — is the mean
    of the members' dot products. Independently trained selectors (other seeds and held-out splits)
    averaged this way make a steadier proxy for the evaluator than any one of them (docs/results.md, "Where the
    choice loses the taste")."""

    def __init__(self, members: Sequence[Any]):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 scorers, got {len(members)}")
        self.members, self._scale = list(members), len(members) ** -0.5
        self.name = "+".join(str(m.name) for m in self.members)

    @property
    def primary(self) -> Any:
        """The first member: the image tower of models trained on one selector's embeddings (the
        history-image encoder, :func:`pmgen.stages.history_images.image_tower`)."""
        return self.members[0]

    @property
    def content_hash(self) -> str:
        """The members' hashes, joined (the order matters: it is the order of the embeddings)."""
        return "+".join(str(m.content_hash) for m in self.members)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.cat([m.text_embeddings(texts) for m in self.members], 1) * self._scale

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.image_embeddings(images) for m in self.members], 1) * self._scale

    def text_similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """The members' mean cosine similarity ``[B, T]``."""
        return self.image_embeddings(images) @ self.text_embeddings(texts).T

    def image_similarity(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """The members' mean cosine similarity ``[B, N]``."""
        return self.image_embeddings(images) @ self.image_embeddings(others).T


def candidate_matrix(idx: Sequence[int], groups: Sequence[str], text_ids: Sequence[int], n_candidates: int = 100,
                     seed: int = 0) -> torch.Tensor:
    """Candidate text ids ``[len(idx), n_candidates]`` for retrieval tests; column 0 is the true one.

    For item ``i`` the other columns are text ids of random items from other groups (so a skin-tone
    variant is never a distractor) with a different text. Fixed ``seed`` → same candidates.
    """
    rng = random.Random(seed)
    n = len(groups)
    rows = []
    for i in idx:
        row = [text_ids[i]]
        seen = {text_ids[i]}
        tries = 0
        while len(row) < n_candidates:
            tries += 1
            if tries > 20 * n_candidates:  # small catalogs: enumerate instead of sampling
                others = sorted({text_ids[j] for j in range(n) if groups[j] != groups[i]} - seen)
                rng.shuffle(others)
                row += others[: n_candidates - len(row)]
                break
            j = rng.randrange(n)
            if groups[j] != groups[i] and text_ids[j] not in seen:
                row.append(text_ids[j])
                seen.add(text_ids[j])
        if len(row) < n_candidates:
            raise ValueError(f"only {len(row)} distinct candidate texts for item {i}; lower n_candidates")
        rows.append(row)
    return torch.tensor(rows)


def topk_hits(sims: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose column 0 ranks within the top ``k`` (ties count against it)."""
    true = sims[:, :1]
    rank = (sims[:, 1:] >= true).sum(dim=1)  # how many distractors score at least as high
    return {k: float((rank < k).float().mean()) for k in ks}
