"""Adapters for real models (the ``sd15`` preset): Stable Diffusion, its CLIP text encoder, CLIP scorers.

They expose the same small interfaces as the ``sticker-tiny`` models, so the pipeline does not
care which it gets:

* :class:`StableDiffusionGenerator` — ``text_to_image`` / ``image_to_image`` with ``prompt_embeds``
  and ``negative_prompt_embeds`` (any token length, the two must match), images in [0, 1];
* :class:`CLIPTextEncoder` — ``token_states`` / ``pooled`` from the pipeline's own CLIP text encoder;
* :class:`CLIPScorer` — ``text_similarity`` / ``image_similarity`` with a transformers ``CLIPModel``.

Everything loads with ``local_files_only=True``: an id must already be in the local Hugging Face
cache, or be a local folder. A missing model raises :class:`pmgen.models.llm.ModelNotAvailable`
naming it. (These code paths are tested with tiny random models built in code.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pmgen.data.images import check_images
from pmgen.models.llm import ModelNotAvailable, folder_hash

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _not_available(kind: str, ref: Any, e: Exception) -> ModelNotAvailable:
    return ModelNotAvailable(f"cannot load the {kind} '{ref}' offline: {str(e).splitlines()[0]}. Give a local "
                             "folder or an id already in the Hugging Face cache (pmgen never downloads).")


def _hash(ref: Any) -> str:
    p = Path(str(ref))
    return folder_hash(p) if p.is_dir() else ""


def _generators(generator: Any, seed: int | None, batch: int) -> list[torch.Generator]:
    if (generator is None) == (seed is None):
        raise ValueError("pass exactly one of `generator` or `seed`")
    if seed is not None:
        return [torch.Generator().manual_seed(int(seed)) for _ in range(batch)]
    gens = generator if isinstance(generator, list) else [generator] * batch
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for {batch} prompts")
    return gens


def _no_composed_guidance(extra: torch.Tensor | None, scale: float) -> None:
    if extra is not None and scale != 0.0:
        raise ValueError("the 'guidance' and 'compose' weighting modes (composed guidance) are implemented for "
                         "the sticker generator only; use mode='concat' with Stable Diffusion")


class StableDiffusionGenerator:
    """A diffusers Stable Diffusion 1.x/2.x pipeline behind pmgen's generator interface."""

    def __init__(self, pipe: Any, name: str = "stable-diffusion", content_hash: str = ""):
        from diffusers import StableDiffusionImg2ImgPipeline

        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        self.img2img.set_progress_bar_config(disable=True)
        self.name = name
        self.content_hash = content_hash
        self.vae, self.unet, self.text_encoder = pipe.vae, pipe.unet, pipe.text_encoder

    @classmethod
    def from_pretrained(cls, id_or_path: str | Path, dtype: torch.dtype = torch.float32) -> "StableDiffusionGenerator":
        _offline()
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(id_or_path), dtype=dtype, local_files_only=True,
                                                           safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError, EnvironmentError) as e:
            raise _not_available("Stable Diffusion pipeline", id_or_path, e) from e
        return cls(pipe, name=str(id_or_path), content_hash=_hash(id_or_path))

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * (2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def _check(self, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cond.dim() != 3 or cond.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"prompt_embeds must be [B, L, {self.cross_attention_dim}], got {tuple(cond.shape)}")
        if uncond is None:
            if guidance_scale > 1:
                raise ValueError("negative_prompt_embeds are required when guidance_scale > 1")
            return cond, None
        if uncond.shape[0] == 1 and cond.shape[0] > 1:
            uncond = uncond.expand(cond.shape[0], -1, -1)
        if uncond.shape != cond.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(uncond.shape)} must match prompt_embeds "
                             f"{tuple(cond.shape)} (pad both to the same token length)")
        return cond, uncond

    @torch.no_grad()
    def text_to_image(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
                      generator: Any = None, seed: int | None = None, num_inference_steps: int = 30,
                      guidance_scale: float = 7.5, extra_prompt_embeds: torch.Tensor | None = None,
                      extra_guidance_scale: float = 0.0, extra_base: str = "cond") -> torch.Tensor:
        """Images float32 ``[B, 3, S, S]`` in [0, 1] from noise."""
        _no_composed_guidance(extra_prompt_embeds, extra_guidance_scale)
        cond, uncond = self._check(prompt_embeds, negative_prompt_embeds, guidance_scale)
        out = self.pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, generator=_generators(generator, seed, cond.shape[0]),
                        output_type="pt")
        return out.images.float().clamp(0, 1)

    @torch.no_grad()
    def image_to_image(self, init_images: torch.Tensor, prompt_embeds: torch.Tensor,
                       negative_prompt_embeds: torch.Tensor | None = None, *, strength: float = 0.6,
                       generator: Any = None, seed: int | None = None, num_inference_steps: int = 30,
                       guidance_scale: float = 7.5, extra_prompt_embeds: torch.Tensor | None = None,
                       extra_guidance_scale: float = 0.0, extra_base: str = "cond") -> torch.Tensor:
        """SDEdit from ``init_images`` (float ``[1 or B, 3, H, W]`` in [0, 1]); images in [0, 1]."""
        _no_composed_guidance(extra_prompt_embeds, extra_guidance_scale)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        cond, uncond = self._check(prompt_embeds, negative_prompt_embeds, guidance_scale)
        init = check_images(init_images, "init_images")
        if init.shape[0] == 1 and cond.shape[0] > 1:
            init = init.expand(cond.shape[0], -1, -1, -1)
        size = self.image_size
        if init.shape[-1] != size or init.shape[-2] != size:
            init = F.interpolate(init, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        out = self.img2img(image=init, prompt_embeds=cond, negative_prompt_embeds=uncond, strength=strength,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           generator=_generators(generator, seed, cond.shape[0]), output_type="pt")
        return out.images.float().clamp(0, 1)


class CLIPTextEncoder:
    """The text encoder of a Stable Diffusion pipeline (CLIP), with pmgen's text-encoder interface."""

    def __init__(self, tokenizer: Any, model: Any, name: str = "clip-text", content_hash: str = ""):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.content_hash = content_hash
        self.hidden_size: int = int(model.config.hidden_size)
        self.path: Path | None = None

    @classmethod
    def from_pipeline(cls, generator: StableDiffusionGenerator) -> "CLIPTextEncoder":
        return cls(generator.pipe.tokenizer, generator.pipe.text_encoder, name=f"{generator.name}:text_encoder",
                   content_hash=generator.content_hash)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10_000 else 77)

    @torch.no_grad()
    def token_states(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L, hidden]`` last hidden states padded to ``max_length`` (default the tokenizer's), and the mask."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string")
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True,
                               max_length=max_length or self.max_length, return_tensors="pt")
        out = self.model(input_ids=batch["input_ids"])
        return out.last_hidden_state.float(), batch["attention_mask"]

    @torch.no_grad()
    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized pooled (end-of-text) vectors ``[B, hidden]``."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return F.normalize(self.model(input_ids=batch["input_ids"]).pooler_output.float(), dim=-1)


class CLIPScorer:
    """A transformers ``CLIPModel`` with pmgen's scorer interface (images in [0, 1], cosine similarities)."""

    def __init__(self, model: Any, tokenizer: Any, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, name: str = "clip", content_hash: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.image_size = int(model.config.vision_config.image_size)
        self.name = name
        self.content_hash = content_hash
        self.path: Path | None = None

    @classmethod
    def from_pretrained(cls, id_or_path: str | Path, name: str | None = None) -> "CLIPScorer":
        _offline()
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(str(id_or_path), local_files_only=True, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(id_or_path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise _not_available("CLIP model", id_or_path, e) from e
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = Path(str(id_or_path)) / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        scorer = cls(model, tok, mean, std, name=name or str(id_or_path), content_hash=_hash(id_or_path))
        scorer.path = Path(str(id_or_path)) if Path(str(id_or_path)).is_dir() else None
        return scorer

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True)
        feats = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=int(self.model.config.text_config.max_position_embeddings),
                               return_tensors="pt")
        feats = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        return F.normalize(feats.float(), dim=-1)

    def text_similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.image_embeddings(images) @ self.text_embeddings(texts).T

    def image_similarity(self, images: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        return self.image_embeddings(images) @ self.image_embeddings(others).T
