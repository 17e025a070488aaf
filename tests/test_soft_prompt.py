"""Soft-prompt training on tiny random models: what trains, exact resume, export, examples, the hinge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import assert_resume_is_exact, tiny_sticker_generator, write_tiny_bert, write_tiny_llama

L = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pmgen.models.llm import LLM
    from pmgen.models.text_encoder import TextEncoder

    root = tmp_path_factory.mktemp("tiny-soft")
    torch.manual_seed(0)
    te = TextEncoder(write_tiny_bert(root / "bert"))
    gen = tiny_sticker_generator(text_max_length=L)
    llm = LLM.from_pretrained(write_tiny_llama(root / "llama"))
    latents = torch.randn(6, 4, 16, 16)
    return llm, te, gen, latents


def examples(n: int = 3):
    from pmgen.train.soft_prompt import SoftExamples

    return SoftExamples(sample_ids=[f"s{i}" for i in range(n)], user_ids=[f"u{i}" for i in range(n)],
                        history_texts=[f"- Sent \"cat {i}\"." for i in range(n)],
                        target_texts=["grinning face, happy"] * n, positives=[i % 3 for i in range(n)],
                        negatives=[[3, 4, 5]] * n, positive_kind=["ground truth"] * n,
                        tastes=[["cats", "food"][i % 2] for i in range(n)])


def make(tiny, tmp: Path, train_ex=None, val_ex=None, **overrides):
    from pmgen.train.soft_prompt import SoftPromptTrainConfig, SoftPromptTrainer

    llm, te, gen, latents = tiny
    values = {"out": str(tmp / "out"), "train_dir": str(tmp / "train"), "batch_size": 2, "max_steps": 2,
              "val_users": 2, "val_every": 100, "prefix_length": 2, "n_img": 2, "lr": 1e-2}
    cfg = SoftPromptTrainConfig(**{**values, **overrides})
    return SoftPromptTrainer(cfg, llm, te, gen, latents, train_ex or examples(3), val_ex or examples(2),
                             text_max_length=L, log=lambda m: None, llm_name="tiny-llama")


def test_only_the_soft_prompt_trains(tiny, tmp_path) -> None:
    llm, _, gen, _ = tiny
    trainer = make(tiny, tmp_path)
    frozen = {**{f"llm.{k}": v.clone() for k, v in llm.model.state_dict().items()},
              **{f"unet.{k}": v.clone() for k, v in gen.unet.state_dict().items()}}
    before = {k: v.clone() for k, v in trainer.encoder.trainable_state().items()}
    losses = trainer.train_step()
    assert set(losses) == {"loss", "pos", "neg", "other"} and all(v > 0 for v in losses.values())
    after = trainer.encoder.trainable_state()
    assert set(before) == {"prefix", "img", "proj.weight", "proj.bias"}
    assert all(not torch.equal(before[k], after[k]) for k in before)
    now = {**{f"llm.{k}": v for k, v in llm.model.state_dict().items()},
           **{f"unet.{k}": v for k, v in gen.unet.state_dict().items()}}
    assert all(torch.equal(frozen[k], now[k]) for k in frozen)


def test_resume_matches_uninterrupted_training(tiny, tmp_path) -> None:
    assert_resume_is_exact(lambda folder, **kw: make(tiny, folder, **kw), tmp_path)


def test_resume_refuses_a_checkpoint_of_other_settings(tiny, tmp_path) -> None:
    make(tiny, tmp_path, max_steps=1).run()
    other = make(tiny, tmp_path, max_steps=1, n_img=3)
    with pytest.raises(ValueError, match="n_img"):
        other.load_checkpoint()


def test_export_loads_back_and_writes_a_model_card(tiny, tmp_path) -> None:
    from pmgen.stages.soft import SoftPromptEncoder

    llm = tiny[0]
    trainer = make(tiny, tmp_path)
    trainer.run()
    out = tmp_path / "out"
    assert {"config.json", "soft_prompt.safetensors", "README.md", "loss.png"} <= {p.name for p in out.iterdir()}
    loaded = SoftPromptEncoder.load(out, llm)
    text = ["- Sent \"dog\"."]
    with torch.no_grad():
        assert torch.allclose(loaded(text), trainer.encoder.eval()(text), atol=1e-6)
    info = json.loads((out / "config.json").read_text())["info"]
    assert info["steps"] == 2 and info["last_validation"]["step"] == 2
    assert "val_gain" in info["last_validation"]
    last = info["last_validation"]
    assert last["val_user_gain"] == pytest.approx(last["val_other_user"] - last["val_pos"], abs=2e-5)
    lines = [json.loads(x) for x in (tmp_path / "train" / "progress.log").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "val_pos" in lines[0]  # validation before training: the starting point


def test_other_user_is_the_next_user_of_another_taste() -> None:
    from pmgen.train.soft_prompt import other_user_index

    assert other_user_index(["a", "a", "b", "a", "c"]) == [2, 2, 3, 4, 0]
    assert other_user_index(["a", "a"]) == [0, 1]  # nobody else: itself (the gain is then 0)


def test_warm_start_continues_from_an_export(tiny, tmp_path) -> None:
    first = make(tiny, tmp_path / "a", max_steps=2)
    first.run()
    warm = make(tiny, tmp_path / "b", max_steps=4, init_from=str(tmp_path / "a" / "out"))
    a, b = first.encoder.trainable_state(), warm.encoder.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (warm.step, warm.epoch, warm.pos) == (2, 1, 1)  # 3 examples, 2 steps × 2 seen: epoch 1, position 1
    assert warm.order == first.order  # the same data order the first run would have gone on with
    warm.run()
    assert warm.step == 4
    with pytest.raises(ValueError, match="n_img"):
        make(tiny, tmp_path / "c", n_img=3, init_from=str(tmp_path / "a" / "out"))


def test_norm_matching_and_the_other_user_hinge(tiny, tmp_path) -> None:
    from pmgen.train.soft_prompt import mean_token_norm

    trainer = make(tiny, tmp_path, match_norm=True, user_weight=1.0, user_margin=10.0, batch_size=3)
    norm = trainer.encoder.cfg.norm
    assert norm == pytest.approx(mean_token_norm(trainer.builder, ["grinning face, happy"])) and norm > 0
    with torch.no_grad():
        soft = trainer.encoder(["- Sent \"cat\".", "- Sent \"a much longer history line about dogs\"."])
    assert torch.allclose(soft.norm(dim=-1), torch.full((2, 2), norm), rtol=1e-4)
    losses = trainer.train_step()
    assert losses["other"] > 0
    # a margin of 10 keeps the hinge active for the 3 users (each has one of another taste): ≈ 10 more
    assert losses["loss"] > losses["pos"] + 9.0


def test_ablation_shapes_train(tiny, tmp_path) -> None:
    for i, kw in enumerate(({"prefix_length": 0}, {"use_img_tokens": False}, {"neg_weight": 0.0},
                            {"user_weight": 0.0, "match_norm": False})):
        trainer = make(tiny, tmp_path / str(i), max_steps=1, **kw)
        losses = trainer.train_step()
        assert losses["pos"] > 0
        assert (losses["other"] == losses["other"]) == (kw.get("user_weight", 1.0) > 0)  # NaN when off
        assert (trainer.encoder.cfg.norm > 0) == kw.get("match_norm", True)
        assert trainer.encoder.cfg.prefix_length == kw.get("prefix_length", 2)


def test_hinge_is_bounded_below_by_the_positive_loss() -> None:
    from pmgen.train.soft_prompt import objective

    pos = torch.tensor([0.10, 0.20])
    assert objective(pos, torch.tensor([5.0, 9.0]), 0.5, 0.02) == pytest.approx(0.15)  # far negatives: no push
    assert objective(pos, torch.tensor([0.10, 0.20]), 0.5, 0.02) == pytest.approx(0.15 + 0.5 * 0.02)
    assert objective(pos, torch.tensor([0.0, 0.0]), 1.0, 0.0) == pytest.approx(0.15 + 0.15)


def test_config_rejects_bad_values_and_the_cli_types_options(monkeypatch) -> None:
    from typer.testing import CliRunner

    from pmgen.cli import app
    from pmgen.train.soft_prompt import SoftPromptTrainConfig
    from pmgen.train.soft_prompt import main as entry

    with pytest.raises(ValueError, match="t_max"):
        SoftPromptTrainConfig(out="x", t_max=0)
    seen = {}
    monkeypatch.setattr(entry, "main", lambda given, resume, preset: seen.update(given) or 0)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "soft-prompt", "--out", "x", "--prefix-length", "0", "--no-use-img-tokens",
                                 "--lr", "1e-4"])
    assert result.exit_code == 0, result.output
    assert {k: seen[k] for k in ("prefix_length", "use_img_tokens", "lr")} == {
        "prefix_length": 0, "use_img_tokens": False, "lr": 1e-4}
    assert "n_img" not in seen  # left at its default: not "given"
    result = runner.invoke(app, ["train", "soft-prompt", "--out", "x", "--nope", "1"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_examples_from_sticker_users(data_root) -> None:
    from pmgen.data import datasets
    from pmgen.data.datasets.sticker_users import taste_by_name
    from pmgen.train.soft_prompt import build_examples, one_per_user, with_positives

    ds = datasets.load("sticker-users", data_root)
    rows = {iid: k for k, iid in enumerate(ds.items)}
    ex = build_examples(ds, "val", lambda t: len(t.split()), 96, 0, rows)
    assert len(ex) > 0 and len(set(ex.user_ids)) > 50
    ids = list(ds.items)
    by_sample = {s.sample_id: s for s in ds.split("val")}
    for i in range(len(ex)):
        s = by_sample[ex.sample_ids[i]]
        user = ds.users[s.user_id]
        pos = ds.items[ids[ex.positives[i]]]
        taste = taste_by_name(user.attributes["taste"])
        if ex.positive_kind[i] == "ground truth":
            assert pos.id == s.ground_truth_personalized
        else:
            assert taste.matches(pos) and f'"{pos.title}"' not in ex.history_texts[i]  # held out of the history
        assert not any(taste.matches(ds.items[ids[j]]) for j in ex.negatives[i][:50])
        assert ex.target_texts[i]
    gt = with_positives(ex, "ground-truth")
    assert 0 < len(gt) < len(ex) and set(gt.positive_kind) == {"ground truth"}
    assert with_positives(ex, "all") is ex
    assert len(with_positives(ex, "taste")) == len(ex) - len(gt)
    with pytest.raises(ValueError, match="'taste'"):
        with_positives(ex, "best")
    # taste positives: a held-out taste sticker for every example, even where a ground truth is recorded
    taste = build_examples(ds, "val", lambda t: len(t.split()), 96, 0, rows, taste_positives=True)
    assert set(taste.positive_kind) == {"held-out taste item"} and len(taste) >= len(ex) - 5
    for i in range(len(taste)):
        pos = ds.items[ids[taste.positives[i]]]
        user = ds.users[taste.user_ids[i]]
        shown = taste.history_texts[i].replace(f'for "{pos.title}"', "")  # a search may name it
        assert taste_by_name(user.attributes["taste"]).matches(pos) and f'"{pos.title}"' not in shown
    val = one_per_user(ex, 10, 0)
    assert len(val) == 10 and len(set(val.user_ids)) == 10
    from pmgen.train.soft_prompt import with_preference_texts

    named = with_preference_texts(val, {u: ("" if k == 0 else f"kw {u}") for k, u in enumerate(val.user_ids)})
    assert len(named) == 9 and named.preference_texts == [f"kw {u}" for u in named.user_ids]


def test_ablation_weights_are_found_beside_the_presets_soft_prompt(tmp_path) -> None:
    from pmgen.presets import get_preset, soft_prompt_ablations

    main = tmp_path / "soft-prompt"
    main.mkdir()
    for name, complete in (("no-prefix", True), ("no-img", True), ("half-written", False)):
        d = tmp_path / "soft-prompt-ablations" / name
        d.mkdir(parents=True)
        if complete:
            (d / "soft_prompt.safetensors").write_bytes(b"")
    assert soft_prompt_ablations(get_preset("sticker-tiny", soft_prompt=str(main))) == {
        "soft-no-img": tmp_path / "soft-prompt-ablations" / "no-img",
        "soft-no-prefix": tmp_path / "soft-prompt-ablations" / "no-prefix"}
    assert soft_prompt_ablations(get_preset("sticker-tiny", soft_prompt="")) == {}


def test_cli_resume_keeps_the_runs_settings_and_refuses_changes(tiny, tmp_path, monkeypatch) -> None:
    """`pmgen train soft-prompt --resume` needs only the run control again (the run's settings come from
    its checkpoint); changing a training setting on resume is refused with its name."""
    import signal

    from typer.testing import CliRunner

    from pmgen.cli import app
    from pmgen.train.soft_prompt import main as entry
    from pmgen.train.soft_prompt.trainer import SoftPromptTrainer

    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    seen = []

    def fake_prepare(cfg, preset, log):
        seen.append(cfg)
        llm, te, gen, latents = tiny
        return SoftPromptTrainer(cfg, llm, te, gen, latents, examples(3), examples(2), text_max_length=L,
                                 log=lambda m: None, llm_name="tiny-llama")

    monkeypatch.setattr(entry, "prepare", fake_prepare)
    runner = CliRunner()
    common = ["train", "soft-prompt", "--out", str(tmp_path / "out"), "--train-dir", str(tmp_path / "train")]
    first = ["--batch-size", "2", "--val-users", "2", "--prefix-length", "2", "--n-img", "2", "--val-every", "100",
             "--max-steps", "1"]
    assert runner.invoke(app, [*common, *first]).exit_code == 0
    again = runner.invoke(app, [*common, *first])
    assert again.exit_code == 2 and "pass --resume" in again.output
    assert runner.invoke(app, [*common, "--resume", "--max-steps", "2"]).exit_code == 0
    assert (seen[-1].prefix_length, seen[-1].n_img, seen[-1].val_every, seen[-1].max_steps) == (2, 2, 100, 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["info"]["steps"] == 2
    changed = runner.invoke(app, [*common, "--resume", "--n-img", "3", "--max-steps", "3"])
    assert changed.exit_code == 2 and "n_img" in changed.output


def test_branch_and_taste_positives_are_validated() -> None:
    from pmgen.train.history_images.config import HistoryImageTrainConfig
    from pmgen.train.soft_prompt import SoftPromptTrainConfig

    assert SoftPromptTrainConfig(out="x", branch="preference", positives="taste").branch == "preference"
    with pytest.raises(ValueError, match="branch='sideways'"):
        SoftPromptTrainConfig(out="x", branch="sideways")
    with pytest.raises(ValueError, match="positives='best'"):
        SoftPromptTrainConfig(out="x", positives="best")
    with pytest.raises(ValueError, match="history-image tokens are trained in"):
        HistoryImageTrainConfig(out="x", branch="preference")


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tiny, tmp_path) -> None:
    """A checkpoint whose config lacks a setting added later (``branch``) was written by a run that behaved as
    its default: it resumes; one that records another value is refused."""
    make(tiny, tmp_path, max_steps=1).run()
    path = tmp_path / "train" / "last.pt"
    state = torch.load(path, weights_only=False)
    del state["config"]["branch"]
    torch.save(state, path)
    assert make(tiny, tmp_path, max_steps=1).load_checkpoint()
    state["config"]["branch"] = "preference"
    torch.save(state, path)
    with pytest.raises(ValueError, match="branch"):
        make(tiny, tmp_path, max_steps=1).load_checkpoint()
