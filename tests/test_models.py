"""Model roles, the preset registry, and the real-model (sd15) paths with tiny random models."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from pmgen.models.llm import LLM, ModelNotAvailable, OpenAIChatLLM
from pmgen.presets import PRESETS, ROLES, check_preset, get_preset, resolve
from tiny_models import write_tiny_clip, write_tiny_llama, write_tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def tiny_sd(tiny_dir):
    return write_tiny_sd_pipeline(tiny_dir / "sd-pipeline")


@pytest.fixture(scope="module")
def tiny_clip(tiny_dir):
    return write_tiny_clip(tiny_dir / "clip")


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM.from_pretrained(write_tiny_llama(tiny_dir / "llama"))


# ------------------------------------------------------------------------- presets


def test_registry_has_both_presets_with_every_role():
    assert {"sticker-tiny", "sd15"} <= set(PRESETS)
    for p in PRESETS.values():
        for role in ROLES:
            assert getattr(p, role)
    assert get_preset().name == "sticker-tiny"


def test_preset_overrides_are_checked():
    p = get_preset("sticker-tiny", strength=0.4, num_inference_steps=10)
    assert p.settings.strength == 0.4 and p.settings.num_inference_steps == 10
    assert PRESETS["sticker-tiny"].settings.strength == 0.6  # the registry itself is untouched
    assert get_preset("sticker-tiny", strength=1).settings.strength == 1.0
    with pytest.raises(TypeError, match="unknown preset field"):
        get_preset("sticker-tiny", strenght=0.5)
    with pytest.raises(TypeError, match="expects int"):
        get_preset("sticker-tiny", num_inference_steps="ten")
    with pytest.raises(ValueError, match="strength"):
        get_preset("sticker-tiny", strength=1.5)
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("sdxl")


def test_resolve_refs(tmp_path):
    assert str(resolve("zoo:sticker-tiny/generator")).endswith("pmgen/zoo/sticker-tiny/generator")
    assert resolve(str(tmp_path)) == tmp_path
    assert resolve("org/model-that-is-not-a-path") == "org/model-that-is-not-a-path"


def test_models_check_names_what_is_missing():
    p = get_preset("sd15", generator="/nonexistent/sd", selector="/nonexistent/clip-b", evaluator="/nonexistent/clip-l",
                   llm="/nonexistent/llm", text_encoder="/nonexistent/te")
    statuses = {s.role: s for s in check_preset(p)}
    assert not any(s.ok for s in statuses.values())
    assert "/nonexistent/sd" in statuses["generator"].error
    assert "offline" in statuses["selector"].error or "not" in statuses["selector"].error


def test_sd15_preset_with_tiny_local_models(tiny_sd, tiny_clip, tiny_dir):
    llm_dir = tiny_dir / "llama"
    if not llm_dir.exists():
        write_tiny_llama(llm_dir)
    p = get_preset("sd15", generator=str(tiny_sd), selector=str(tiny_clip), evaluator=str(tiny_clip),
                   llm=str(llm_dir), image_size=64)
    statuses = check_preset(p)
    assert all(s.ok for s in statuses), [(s.role, s.error) for s in statuses]
    assert all(s.content_hash for s in statuses if s.role != "text_encoder")


# ------------------------------------------------------------------------- LLM


def test_llm_chat_and_hidden_states(tiny_llm):
    reply = tiny_llm.chat([{"role": "user", "content": "hello"}], max_new_tokens=6)
    assert isinstance(reply, str)
    assert reply == tiny_llm.chat([{"role": "user", "content": "hello"}], max_new_tokens=6)  # greedy = deterministic
    ids = tiny_llm.encode_chat([{"role": "user", "content": "hi"}])
    emb = tiny_llm.input_embeddings()(ids).requires_grad_(True)
    h = tiny_llm.hidden_states(emb)
    assert h.shape == (1, ids.shape[1], tiny_llm.hidden_size)
    h.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_llm.model.parameters())  # frozen
    assert tiny_llm.count_tokens("abc") == 3


def test_llm_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailable, match="never downloads"):
        LLM.from_pretrained(tmp_path / "no-such-model")


def test_openai_chat_backend_against_local_server():
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.update(body=body, path=self.path)
            out = json.dumps({"choices": [{"message": {"content": "1. cats\n2. kittens"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        llm = OpenAIChatLLM(f"http://127.0.0.1:{server.server_port}/v1", "tiny")
        assert llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=12) == "1. cats\n2. kittens"
        assert seen["path"] == "/v1/chat/completions"
        assert seen["body"]["model"] == "tiny" and seen["body"]["max_tokens"] == 12 and seen["body"]["temperature"] == 0
    finally:
        server.server_close()


def test_openai_backend_unreachable():
    llm = OpenAIChatLLM("http://127.0.0.1:9/v1", "x", timeout=2)
    with pytest.raises(ConnectionError, match="did not answer"):
        llm.chat([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------- sd15 adapters


def test_sd_generator_both_entry_points_custom_length(tiny_sd):
    from pmgen.models.sd import CLIPTextEncoder, StableDiffusionGenerator

    gen = StableDiffusionGenerator.from_pretrained(tiny_sd)
    te = CLIPTextEncoder.from_pipeline(gen)
    cond, _ = te.token_states(["a grinning cat", "a red heart"], max_length=24)  # custom length, not 77
    neg, _ = te.token_states([""], max_length=24)
    assert cond.shape == (2, 24, 32)
    t2i = gen.text_to_image(cond, neg, seed=0, num_inference_steps=2, guidance_scale=3.0)
    assert t2i.shape == (2, 3, 64, 64) and 0 <= t2i.min() and t2i.max() <= 1
    again = gen.text_to_image(cond, neg, seed=0, num_inference_steps=2, guidance_scale=3.0)
    assert torch.equal(t2i, again)
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    i2i = gen.image_to_image(init, cond, neg, strength=0.5, seed=0, num_inference_steps=4, guidance_scale=3.0)
    assert i2i.shape == (2, 3, 64, 64)
    assert not torch.equal(i2i[0], i2i[1])  # the condition matters
    with pytest.raises(ValueError, match="must match"):
        gen.text_to_image(cond, neg[:, :10], seed=0, num_inference_steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="negative_prompt_embeds are required"):
        gen.text_to_image(cond, None, seed=0, num_inference_steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="exactly one"):
        gen.text_to_image(cond, neg, num_inference_steps=2, guidance_scale=3.0)


def test_clip_scorer(tiny_clip):
    from pmgen.models.sd import CLIPScorer

    sc = CLIPScorer.from_pretrained(tiny_clip)
    x = torch.rand(2, 3, 64, 64)
    sim = sc.text_similarity(x, ["a cat", "a dog", "a heart"])
    assert sim.shape == (2, 3) and sim.abs().max() <= 1 + 1e-5
    assert sc.image_similarity(x, x).diagonal().allclose(torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="divide by 255"):
        sc.image_embeddings(x * 255)


def test_missing_sd_model_is_a_clear_error(tmp_path):
    from pmgen.models.sd import CLIPScorer, StableDiffusionGenerator

    with pytest.raises(ModelNotAvailable, match="offline"):
        StableDiffusionGenerator.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ModelNotAvailable, match="offline"):
        CLIPScorer.from_pretrained("some-org/some-clip-not-cached")


def _card_commands() -> list[tuple[str, str]]:
    """Every ``pmgen train ...`` command written in a shipped model card (continuation lines joined)."""
    import re

    zoo = Path(__file__).resolve().parents[1] / "src" / "pmgen" / "zoo"
    found = []
    for card in sorted(zoo.glob("*/*/README.md")):
        text = re.sub(r"\\\n\s*", " ", card.read_text())
        for cmd in re.findall(r"pmgen train [^`\n]+", text):
            if "<" not in cmd:  # placeholders such as <this folder>
                found.append((str(card.relative_to(zoo)), cmd.split("#")[0].strip()))
    return found


@pytest.mark.parametrize("card,command", _card_commands())
def test_model_card_commands_parse(card, command):
    """A model card's reproduce/continue command is one the CLI accepts (options are renamed with the CLI):
    with --help appended, click parses every option (an unknown one is exit 2) and then only prints help."""
    import shlex

    from typer.testing import CliRunner

    from pmgen.cli import app

    r = CliRunner().invoke(app, shlex.split(command)[1:] + ["--help"])
    assert r.exit_code == 0, f"{card}: {command}\n{r.output}"


def test_model_cards_have_commands():
    cards = {c for c, _ in _card_commands()}
    assert {"sticker-tiny/generator/README.md", "sticker-tiny/soft-prompt/README.md",
            "sticker-tiny/generator-compose/README.md"} <= cards
