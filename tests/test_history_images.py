"""History images as a condition: the encoder, its training (tiny models) and its place in the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import assert_resume_is_exact, tiny_sticker_generator, write_tiny_bert

L = 8


def _encoder(feature_dim: int = 16, width: int = 32, n_tokens: int = 3, norm: float = 2.0, name: str = "tiny-selector"):
    from pmgen.stages.history_images import HistoryImageConfig, HistoryImageEncoder

    torch.manual_seed(0)
    enc = HistoryImageEncoder(HistoryImageConfig(image_encoder=name, feature_dim=feature_dim, text_width=width,
                                                 n_tokens=n_tokens, max_images=4, norm=norm))
    torch.nn.init.normal_(enc.proj.weight)  # trained-looking weights: every token differs per user
    return enc.eval()


def test_tokens_shape_norm_padding_and_save_load(tmp_path) -> None:
    from pmgen.stages.history_images import HistoryImageEncoder

    enc = _encoder()
    feats = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = enc(feats, mask)
    assert out.shape == (2, 3, 32)
    assert torch.allclose(out.norm(dim=-1), torch.full((2, 3), 2.0), atol=1e-5)  # a word's norm, every token
    alone = enc(feats[:1, :3])  # padding rows do not count
    assert torch.allclose(out[0], alone[0], atol=1e-6)
    assert not torch.allclose(out[0], out[1])  # another history, other tokens
    with pytest.raises(ValueError, match="features must be"):
        enc(torch.randn(2, 5, 7))
    enc.save(tmp_path / "h")
    back = HistoryImageEncoder.load(tmp_path / "h")
    assert torch.equal(back(feats, mask), out) and back.content_hash == enc.content_hash
    assert not list(tmp_path.glob("h/*.tmp"))
    with pytest.raises(FileNotFoundError, match="pmgen train history-images"):
        HistoryImageEncoder.load(tmp_path / "missing")


def test_config_rejects_bad_shapes() -> None:
    from pmgen.stages.history_images import HistoryImageConfig

    for bad in ({"n_tokens": 0}, {"max_images": 0}, {"norm": -1.0}, {"feature_dim": 0}, {"n_tokens": 65},
                {"image_encoder_hash": "../../etc"}, {"image_encoder_hash": "a" * 65}, {"image_encoder_hash": ["ab"]}):
        with pytest.raises(ValueError):
            HistoryImageConfig(image_encoder="x", feature_dim=bad.get("feature_dim", 8),
                               **{k: v for k, v in bad.items() if k != "feature_dim"})


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pmgen.models.text_encoder import TextEncoder

    root = tmp_path_factory.mktemp("tiny-hist")
    torch.manual_seed(0)
    te = TextEncoder(write_tiny_bert(root / "bert"))
    gen = tiny_sticker_generator(text_max_length=L)
    latents = torch.randn(6, 4, 16, 16)
    features = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    return te, gen, latents, features


def examples(n: int = 3, rows: bool = True):
    from pmgen.train.soft_prompt import SoftExamples

    return SoftExamples(sample_ids=[f"s{i}" for i in range(n)], user_ids=[f"u{i}" for i in range(n)],
                        history_texts=[""] * n, target_texts=["grinning face, happy"] * n,
                        positives=[i % 3 for i in range(n)], negatives=[[3, 4, 5]] * n,
                        positive_kind=["ground truth"] * n, tastes=[["cats", "food"][i % 2] for i in range(n)],
                        history_rows=[[(i + 1) % 6, (i + 2) % 6] for i in range(n)] if rows else [])


def make(tiny, tmp, **overrides):
    from pmgen.train.history_images import HistoryImageTrainConfig, HistoryImageTrainer

    te, gen, latents, features = tiny
    values = {"out": str(tmp / "out"), "train_dir": str(tmp / "train"), "batch_size": 2, "max_steps": 2,
              "val_users": 2, "val_every": 100, "n_img": 2, "lr": 1e-2, "proj_lr": 1e-2}
    cfg = HistoryImageTrainConfig(**{**values, **overrides})
    return HistoryImageTrainer(cfg, te, gen, latents, features, examples(3), examples(2), text_max_length=L,
                               log=lambda m: None, image_encoder_name="tiny-selector", image_encoder_hash="0123abcd")


def test_only_the_projection_trains_and_the_generator_stays_frozen(tiny, tmp_path) -> None:
    gen = tiny[1]
    trainer = make(tiny, tmp_path)
    frozen = {k: v.clone() for k, v in gen.unet.state_dict().items()}
    before = {k: v.clone() for k, v in trainer.encoder.trainable_state().items()}
    losses = trainer.train_step()
    assert set(losses) == {"loss", "pos", "neg", "other"} and all(v > 0 for v in losses.values())
    after = trainer.encoder.trainable_state()
    assert set(before) == {"proj.weight", "proj.bias", "ln.weight", "ln.bias"}
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(frozen[k], v) for k, v in gen.unet.state_dict().items())


def test_resume_is_exact_and_the_export_loads_back_with_a_card(tiny, tmp_path) -> None:
    from pmgen.stages.history_images import HistoryImageEncoder

    straight = assert_resume_is_exact(lambda folder, **kw: make(tiny, folder, **kw), tmp_path)
    out = tmp_path / "a" / "out"
    assert {"config.json", "history_images.safetensors", "README.md", "loss.png"} <= {p.name for p in out.iterdir()}
    loaded = HistoryImageEncoder.load(out)
    assert loaded.cfg.image_encoder == "tiny-selector" and loaded.cfg.n_tokens == 2
    assert loaded.cfg.image_encoder_hash == "0123abcd"  # the weights it read, checked on use
    assert json.loads((out / "config.json").read_text())["info"]["steps"] == 3
    feats = tiny[3][:2].unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(feats), straight.encoder.eval()(feats), atol=1e-6)
    assert "history-image encoder" in (out / "README.md").read_text()
    other = make(tiny, tmp_path / "b", max_steps=3, n_img=3)
    with pytest.raises(ValueError, match="n_img"):
        other.load_checkpoint()
    soft_ckpt = tmp_path / "b" / "train" / "last.pt"
    state = torch.load(soft_ckpt, weights_only=False)
    state["format"] = "pmgen-soft-prompt-train"
    torch.save(state, soft_ckpt)
    with pytest.raises(ValueError, match="not a history-images training checkpoint"):
        make(tiny, tmp_path / "b", max_steps=3).load_checkpoint()


def test_examples_without_history_rows_are_refused(tiny, tmp_path) -> None:
    from pmgen.train.history_images import HistoryImageTrainConfig, HistoryImageTrainer

    te, gen, latents, features = tiny
    cfg = HistoryImageTrainConfig(out=str(tmp_path / "o"), train_dir=str(tmp_path / "t"), val_users=2)
    with pytest.raises(ValueError, match="history_rows"):
        HistoryImageTrainer(cfg, te, gen, latents, features, examples(3, rows=False), examples(2), L)


def test_training_examples_never_show_the_positive_among_the_history_images(data_root) -> None:
    from pmgen.data import datasets
    from pmgen.train.soft_prompt import build_examples

    ds = datasets.load("sticker-users", data_root)
    rows = {iid: k for k, iid in enumerate(ds.items)}
    ex = build_examples(ds, "train", lambda t: len(t.split()), 96, 0, rows, history_images=5)
    assert len(ex) > 0 and len(ex.history_rows) == len(ex)
    assert all(len(r) <= 5 and ex.positives[i] not in r for i, r in enumerate(ex.history_rows))
    assert sum(bool(r) for r in ex.history_rows) == len(ex)
    sub = ex.subset([0])
    assert sub.history_rows == [ex.history_rows[0]]


# ---------------------------------------------------------------------------------------------- pipeline
def test_history_tokens_enter_the_condition_and_keep_the_w0_baseline(tiny_pmg, toy_data) -> None:
    root, items, user = toy_data
    hist = [root / "img" / "b.png", root / "img" / "c.png"]
    plain = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", history_images=hist)
    assert plain.record.history_image_tokens == "" and "history_image_tokens" not in plain.record.to_json()
    with pytest.raises(ValueError, match="pmgen train history-images"):
        tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", history_images=hist,
                          use_history_images=True)
    width = tiny_pmg.builder("concat").width
    tiny_pmg.history_encoder = _encoder(feature_dim=16, width=width, n_tokens=3)
    try:
        res = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", history_images=hist,
                                use_history_images=True)
        assert torch.equal(res.images[0], plain.images[0])  # w = 0 is the target alone
        n_kw = plain.record.candidates[1].preference_tokens
        assert res.record.candidates[1].preference_tokens == n_kw + 3  # [P ; H] at w = 1
        assert not torch.equal(res.images[1], plain.images[1])
        assert res.record.history_image_tokens == "on (3 tokens from 2 images)"
        assert len(res.record.models["history_images"]["hash"]) == 16
        assert "history_image_tokens" in res.record.timings_s
        other = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png",
                                  history_images=[root / "img" / "d.png"], use_history_images=True)
        assert not torch.equal(other.images[1], res.images[1])  # another history, another sticker
        none = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png",
                                 use_history_images=True)
        assert any("no history images" in w for w in none.record.warnings)
        assert none.record.history_image_tokens == ""
        assert torch.equal(none.images[1], plain.images[1])  # nothing added: the keywords alone
    finally:
        tiny_pmg.history_encoder = None


def test_an_encoder_trained_on_another_image_encoder_is_refused(tiny_pmg) -> None:
    from pmgen.pipeline import PMG

    p = tiny_pmg
    with pytest.raises(ValueError, match="trained on the embeddings of 'other-selector'"):
        PMG(p.preset, p.llm, p.text_encoder, p.generator, p.selector, history_encoder=_encoder(name="other-selector"))


def test_an_encoder_trained_on_other_weights_of_the_same_selector_is_refused(tiny_pmg) -> None:
    """A retrained selector keeps its name but embeds differently: the recorded weight hash tells them apart."""
    from pmgen.pipeline import PMG

    p = tiny_pmg
    same = _encoder(name=p.selector.name)
    same.cfg.image_encoder_hash = p.selector.content_hash
    PMG(p.preset, p.llm, p.text_encoder, p.generator, p.selector, history_encoder=same)  # the one it read: fine
    other = _encoder(name=p.selector.name)
    other.cfg.image_encoder_hash = "ffffffffffffffff"
    with pytest.raises(ValueError, match="retrained selector embeds differently"):
        PMG(p.preset, p.llm, p.text_encoder, p.generator, p.selector, history_encoder=other)
    unrecorded = _encoder(name=p.selector.name)  # an encoder from before the hash was recorded: name check only
    PMG(p.preset, p.llm, p.text_encoder, p.generator, p.selector, history_encoder=unrecorded)


def test_the_shipped_history_image_encoder_records_the_shipped_selector() -> None:
    from pmgen.models.llm import folder_hash
    from pmgen.presets import ZOO
    from pmgen.stages.history_images import HistoryImageEncoder

    enc = HistoryImageEncoder.load(ZOO / "sticker-tiny" / "history-images")
    assert enc.cfg.image_encoder_hash == folder_hash(ZOO / "sticker-tiny" / "selector")
