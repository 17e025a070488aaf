"""What the trainers share (pmgen.train.run, pmgen.train.losses, pmgen.config) and where training must
match inference: the diffusion loss at both call sites, the soft prompt's condition, the resume rule."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_sticker_generator


@pytest.fixture(scope="module")
def unet_and_batch():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    gen = tiny_sticker_generator(text_max_length=8)
    g = torch.Generator().manual_seed(3)
    batch = {"latents": torch.randn(3, 4, 16, 16, generator=g), "noise": torch.randn(3, 4, 16, 16, generator=g),
             "t": torch.tensor([10, 500, 990]), "context": torch.randn(3, 8, 32, generator=g)}
    return gen.unet.eval(), DDPMScheduler.from_config(gen.scheduler.config), batch


def _reference(unet, sched, b, gamma=5.0):
    """The two trainers' losses as they were written before pmgen.train.losses (generator, soft prompt)."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    noisy = sched.add_noise(b["latents"], b["noise"], b["t"])
    target = sched.get_velocity(b["latents"], b["noise"], b["t"])
    pred = unet(noisy, b["t"], encoder_hidden_states=b["context"], encoder_attention_mask=None).sample
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    snr = compute_snr(sched, b["t"])
    weighted = snr.clamp(max=gamma) / (snr + 1) * mse
    pred2 = unet(noisy, b["t"], encoder_hidden_states=b["context"]).sample
    soft_mse = F.mse_loss(pred2.float(), target, reduction="none").flatten(1).mean(1)
    return weighted, mse, soft_mse


@torch.no_grad()
def test_one_diffusion_loss_at_both_call_sites_is_unchanged(unet_and_batch) -> None:
    from pmgen.train.generator.trainer import GeneratorTrainer
    from pmgen.train.soft_prompt.trainer import SoftPromptTrainer

    unet, sched, b = unet_and_batch
    assert sched.config.prediction_type == "v_prediction"
    ref_weighted, ref_mse, ref_soft = _reference(unet, sched, b)
    gen_site = SimpleNamespace(noise_scheduler=sched, cfg=SimpleNamespace(snr_gamma=5.0))
    weighted, mse = GeneratorTrainer._loss(gen_site, unet, b["latents"], b["context"], b["noise"], b["t"])
    soft_site = SimpleNamespace(noise_scheduler=sched, generator=SimpleNamespace(unet=unet))
    soft = SoftPromptTrainer._losses(soft_site, b["latents"], b["noise"], b["t"], b["context"])
    assert torch.equal(weighted, ref_weighted) and torch.equal(mse, ref_mse) and torch.equal(soft, ref_soft)
    assert torch.equal(soft, mse)  # one loss: the soft prompt's is the generator's plain MSE
    # pinned values (tiny UNet of tests/tiny_models.py, seed 0): a change of the loss shows here
    torch.testing.assert_close(mse, torch.tensor(PINNED_MSE), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weighted, torch.tensor(PINNED_WEIGHTED), rtol=1e-4, atol=1e-6)


PINNED_MSE = [1.0351450443267822, 1.0592392683029175, 1.1256537437438965]
PINNED_WEIGHTED = [0.05282491445541382, 0.25529637932777405, 1.86074867087882e-05]


def test_epsilon_prediction_weight_is_min_snr_over_snr(unet_and_batch) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from pmgen.train.losses import min_snr_weight

    _, sched, b = unet_and_batch
    eps = DDPMScheduler.from_config(sched.config, prediction_type="epsilon")
    snr = compute_snr(eps, b["t"])
    assert torch.equal(min_snr_weight(eps, b["t"], 5.0), snr.clamp(max=5.0) / snr.clamp(min=1e-8))


# ------------------------------------------------------------------ the soft prompt's condition
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import write_tiny_bert, write_tiny_llama

    from pmgen.models.llm import LLM
    from pmgen.models.text_encoder import TextEncoder

    root = tmp_path_factory.mktemp("tiny-shared")
    torch.manual_seed(0)
    te = TextEncoder(write_tiny_bert(root / "bert"))
    gen = tiny_sticker_generator(text_max_length=8)
    llm = LLM.from_pretrained(write_tiny_llama(root / "llama"))
    return llm, te, gen, torch.randn(6, 4, 16, 16)


def test_soft_prompt_trainer_conditions_are_the_inference_conditions(tiny, tmp_path) -> None:
    """The trainer's ``[T ; S]`` is what PMG builds at w = 1 (``ConditionBuilder.build(tkw, pref_kw, w, soft)``
    with no preference keywords), and what the trainer used to build by hand."""
    from test_soft_prompt import examples, make

    from pmgen.stages.condition import ConditionBuilder

    trainer = make(tiny, tmp_path)
    _, te, _, _ = tiny
    ex = examples(2)
    ex.target_texts = ["grinning face, happy", "cat"]
    keywords = [["grinning face", "happy"], ["cat"]]
    soft = torch.randn(2, 2, 32)
    cond = trainer.conditions(ex, [0, 1], soft)
    inference = ConditionBuilder(te, 8, "concat")
    expected = torch.cat([inference.build(k, [], 1.0, s).prompt_embeds for k, s in zip(keywords, soft)])
    assert torch.equal(cond, expected)
    by_hand = torch.cat([torch.stack([trainer.builder.encode(t)[0] for t in ex.target_texts]), soft], dim=1)
    assert torch.equal(cond, by_hand)
    target_only = trainer.conditions(ex, [0, 1], None)
    assert torch.equal(target_only, torch.cat([inference.build(k, [], 0.0).prompt_embeds for k in keywords]))


def test_preference_branch_conditions_are_compose_modes_preference_branch(tiny, tmp_path) -> None:
    """``branch="preference"`` trains in the condition compose mode adds to the target's guidance at w > 0:
    ``[P ; S]`` without the target (and ``[P]`` alone without soft embeddings)."""
    from test_soft_prompt import examples, make

    from pmgen.stages.condition import ConditionBuilder

    ex = examples(2)
    ex.preference_texts = ["cat, kitten", "pizza"]
    trainer = make(tiny, tmp_path, branch="preference", positives="taste", train_ex=ex, val_ex=ex)
    _, te, _, _ = tiny
    soft = torch.randn(2, 2, 32)
    cond = trainer.conditions(ex, [1, 0], soft)
    inference = ConditionBuilder(te, 8, "compose")
    expected = torch.cat([inference.build([ex.target_texts[i]], [ex.preference_texts[i]], 1.0, s).extra_prompt_embeds
                          for i, s in zip([1, 0], soft)])
    assert torch.equal(cond, expected)
    assert torch.equal(cond[0, :8], trainer.builder.encode("pizza")[0])  # the preference, not the target
    alone = trainer.conditions(ex, [1], None)
    assert torch.equal(alone, trainer.builder.encode("pizza")[0].unsqueeze(0))
    losses = trainer.train_step()
    assert all(v > 0 for v in losses.values())


def test_preference_branch_needs_preference_keywords(tiny, tmp_path) -> None:
    from test_soft_prompt import make

    with pytest.raises(ValueError, match="preference keywords"):
        make(tiny, tmp_path, branch="preference")


# ------------------------------------------------------------------ configs, options, resume
def test_every_config_field_is_documented_and_becomes_an_option() -> None:
    from pmgen.config import dataclass_parameters, field_docs
    from pmgen.train.generator.config import GeneratorTrainConfig
    from pmgen.train.scorer.config import ScorerTrainConfig
    from pmgen.train.soft_prompt.config import SoftPromptTrainConfig

    for cls in (GeneratorTrainConfig, SoftPromptTrainConfig, ScorerTrainConfig):
        docs = field_docs(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        assert [n for n in names if not docs.get(n)] == [], cls.__name__
        assert [p.name for p in dataclass_parameters(cls)] == names
        assert not any("default" in docs[n].lower() and "(default" in docs[n] for n in names)


def test_resume_rule_keeps_the_runs_settings(tmp_path) -> None:
    from pmgen.train.generator.config import GeneratorTrainConfig
    from pmgen.train.run import start_config

    run = GeneratorTrainConfig(out=str(tmp_path / "out"), train_dir=str(tmp_path / "train"), lr=1e-4,
                               composite_share=0.5, init_from="somewhere", threads=1, milestone_steps=1000)
    (tmp_path / "train").mkdir()
    torch.save({"config": run.to_json()}, tmp_path / "train" / "last.pt")
    given = {"out": run.out, "train_dir": run.train_dir, "data_dir": None, "minutes": 1200.0}
    resumed = start_config(GeneratorTrainConfig, given, resume=True)
    assert resumed == GeneratorTrainConfig(**{**run.to_json(), "minutes": 1200.0})
    with pytest.raises(ValueError, match="pass --resume"):
        start_config(GeneratorTrainConfig, given, resume=False)
    with pytest.raises(ValueError, match="cannot change lr"):
        start_config(GeneratorTrainConfig, {**given, "lr": 3e-4}, resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        start_config(GeneratorTrainConfig, {**given, "train_dir": str(tmp_path / "elsewhere")}, resume=True)


def test_checkpoints_are_atomic_and_carry_the_rng(tmp_path) -> None:
    from pmgen.train.run import load_checkpoint, save_checkpoint, set_rng_state

    torch.manual_seed(5)
    path = save_checkpoint(tmp_path / "c.pt", step=3)
    expected = torch.rand(2)
    state = load_checkpoint(path)
    assert state["step"] == 3 and not (tmp_path / "c.pt.tmp").exists()
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(2), expected)
    assert load_checkpoint(tmp_path / "none.pt") is None
