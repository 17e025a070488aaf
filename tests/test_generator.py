"""StickerGenerator and its trainer on tiny random components built in code (no download, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pmgen.models.generator import (
    StickerGenerator,
    build_scheduler,
    build_unet,
    build_vae,
)
from pmgen.train import generator as train

DIM = 32  # width of the tiny text states
L = 8  # token positions


def tiny_generator(seed: int = 0) -> StickerGenerator:
    torch.manual_seed(seed)
    vae = build_vae((8, 16, 16), norm_num_groups=8)  # 64x64x3 -> 16x16x4
    unet = build_unet((32, 64), attention_levels=1, cross_attention_dim=DIM, head_dim=16, latent_size=16)
    return StickerGenerator(vae, unet, build_scheduler(), scaling_factor=1.7, text_max_length=L)


@pytest.fixture(scope="module")
def gen() -> StickerGenerator:
    return tiny_generator()


@pytest.fixture(scope="module")
def embeds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, L, DIM, generator=g), torch.randn(1, L, DIM, generator=g)


@pytest.fixture(scope="module")
def init() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    img = torch.ones(1, 3, 64, 64)
    img[:, :, 16:48, 16:48] = torch.rand(1, 3, 32, 32, generator=g)  # a "sticker" on white
    return img


KW = {"num_inference_steps": 4, "guidance_scale": 3.0}


# ------------------------------------------------------------------------------------------- sampling
def test_text_to_image_shape_range_and_determinism(gen, embeds) -> None:
    cond, neg = embeds
    a = gen.text_to_image(cond, neg, seed=7, **KW)
    assert a.shape == (2, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    b = gen.text_to_image(cond, neg, generator=torch.Generator().manual_seed(7), **KW)
    assert torch.equal(a, gen.text_to_image(cond, neg, seed=7, **KW))  # bit-identical
    c = gen.text_to_image(cond, neg, seed=8, **KW)
    assert not torch.equal(a, c)
    # seed= gives every row the same noise; one generator for the batch gives each row its own.
    same = gen.text_to_image(cond[:1].expand(2, -1, -1), neg, seed=7, **KW)
    assert torch.equal(same[0], same[1])
    one_gen = gen.text_to_image(cond[:1].expand(2, -1, -1), neg, generator=torch.Generator().manual_seed(7), **KW)
    assert not torch.equal(one_gen[0], one_gen[1])
    assert b.shape == a.shape


def test_the_condition_changes_the_output(gen, embeds) -> None:
    cond, neg = embeds
    out = gen.text_to_image(cond, neg, seed=3, **KW)
    assert (out[0] - out[1]).abs().mean() > 1e-4


def test_image_to_image_is_deterministic_and_strength_controls_the_edit(gen, embeds, init) -> None:
    cond, neg = embeds
    recon = gen.image_to_image(init, cond, neg, strength=0.0, seed=5, **KW)
    torch.testing.assert_close(recon, gen.decode(gen.encode(init)).expand(2, -1, -1, -1))
    a = gen.image_to_image(init, cond, neg, strength=0.9, seed=5, **KW)
    assert a.shape == (2, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, gen.image_to_image(init, cond, neg, strength=0.9, seed=5, **KW))
    assert not torch.equal(a, recon)


def keeping_generator() -> tuple[StickerGenerator, list[int]]:
    """A random UNet's prediction is noise-sized at every timestep; scaled down, it stands for a
    denoiser that keeps what it is given, so the size of an edit comes from the noise level. Also
    the list the UNet's timesteps are recorded in, one per call."""
    gen = tiny_generator()
    with torch.no_grad():
        gen.unet.conv_out.weight.mul_(0.02)
        gen.unet.conv_out.bias.mul_(0.02)
    calls: list[int] = []
    gen.unet.register_forward_hook(lambda module, args, out: calls.append(int(args[1])))
    return gen, calls


def test_small_strength_edits_less_than_large_strength(embeds, init) -> None:
    gen, calls = keeping_generator()
    cond, neg = embeds
    kw = {"seed": 5, "num_inference_steps": 20, "guidance_scale": 3.0}
    recon = gen.decode(gen.encode(init))
    change, timesteps = {}, {}
    for s in (0.1, 0.5, 0.9):
        calls.clear()
        change[s] = float((gen.image_to_image(init, cond, neg, strength=s, **kw) - recon).abs().mean())
        timesteps[s] = list(calls)
    assert change[0.1] < change[0.5] < change[0.9], change
    assert change[0.1] < 0.75 * change[0.9], change
    # SDEdit: strength s runs the last int(20 * s) of the 20 DDIM steps (one batched CFG call each).
    assert [len(timesteps[s]) for s in (0.1, 0.5, 0.9)] == [2, 10, 18]
    assert timesteps[0.1] == timesteps[0.9][-2:] and timesteps[0.9] == sorted(timesteps[0.9], reverse=True)


def test_a_uniform_strength_map_is_plain_sdedit(gen, embeds, init) -> None:
    cond, neg = embeds
    for s in (0.5, 0.9):
        plain = gen.image_to_image(init, cond, neg, strength=s, seed=3, **KW)
        mapped = gen.image_to_image(init, cond, neg, strength_map=torch.full((1, 1, 64, 64), s), seed=3, **KW)
        torch.testing.assert_close(mapped, plain)


def test_a_strength_map_holds_its_low_strength_pixels_to_the_init(embeds, init) -> None:
    gen, calls = keeping_generator()
    cond, neg = embeds
    smap = torch.full((1, 1, 64, 64), 0.9)
    smap[..., :32] = 0.1  # left half held until the last 2 of 20 steps
    out = gen.image_to_image(init, cond, neg, strength_map=smap, seed=5, num_inference_steps=20, guidance_scale=3.0)
    assert len(calls) == 18  # the run starts at the map's highest strength
    both = gen.image_to_image(init, cond, neg, strength=0.9, seed=5, num_inference_steps=20, guidance_scale=3.0)
    recon = gen.decode(gen.encode(init))
    left = (out - recon)[..., 8:56, 4:24].abs().mean()  # away from the border, where the decoder mixes halves
    right = (out - recon)[..., 8:56, 40:60].abs().mean()
    left_free = (both - recon)[..., 8:56, 4:24].abs().mean()
    assert left < 0.75 * right and left < 0.75 * left_free, (left, right, left_free)


def test_latent_strengths_min_pool_keeps_a_held_region_held() -> None:
    from pmgen.models.generator import latent_strengths

    smap = torch.ones(1, 1, 64, 64)
    smap[..., 5, 9] = 0.2  # one held pixel
    lat = latent_strengths(smap, (16, 16), 3)
    assert lat.shape == (3, 1, 16, 16)
    assert float(lat[0, 0, 1, 2]) == pytest.approx(0.2) and float(lat.sum()) == pytest.approx(3 * (255 + 0.2))


def test_without_guidance_no_negative_is_needed(gen, embeds, init) -> None:
    cond, _ = embeds
    out = gen.image_to_image(init, cond, None, strength=0.5, seed=1, num_inference_steps=4, guidance_scale=1.0)
    assert out.shape == (2, 3, 64, 64)


def test_composed_guidance_starts_from_the_chosen_prediction(gen, embeds, init) -> None:
    cond, neg = embeds
    kw = {"strength": 0.8, "seed": 4, **KW}
    plain = gen.image_to_image(init, cond, neg, **kw)
    # extra = the prompt itself from the prompt's prediction, or the negative from the unconditional
    # one: the added direction is zero, the images are the plain ones
    same_c = gen.image_to_image(init, cond, neg, extra_prompt_embeds=cond, extra_guidance_scale=2.0, **kw)
    same_u = gen.image_to_image(init, cond, neg, extra_prompt_embeds=neg, extra_guidance_scale=2.0,
                                extra_base="uncond", **kw)
    torch.testing.assert_close(same_c, plain)
    torch.testing.assert_close(same_u, plain)
    # the same extra condition from the two bases differs (ε_cond ≠ ε_uncond)
    other = torch.randn_like(cond[:1])
    a = gen.image_to_image(init, cond, neg, extra_prompt_embeds=other, extra_guidance_scale=2.0, **kw)
    b = gen.image_to_image(init, cond, neg, extra_prompt_embeds=other, extra_guidance_scale=2.0,
                           extra_base="uncond", **kw)
    assert (a - b).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="needs negative_prompt_embeds and guidance_scale > 1"):
        gen.image_to_image(init, cond, None, extra_prompt_embeds=other, extra_guidance_scale=1.0, extra_base="uncond",
                           strength=0.5, seed=0, num_inference_steps=4, guidance_scale=1.0)
    with pytest.raises(ValueError, match="extra_base must be one of"):
        gen.image_to_image(init, cond, neg, extra_prompt_embeds=other, extra_guidance_scale=1.0, extra_base="both",
                           **kw)


@pytest.mark.parametrize("call, match", [
    (lambda g, c, n, i: g.text_to_image(c[..., :5], n, seed=0), r"prompt_embeds must be \[B, L, 32\]"),
    (lambda g, c, n, i: g.text_to_image(c, None, seed=0, guidance_scale=4.0), "needs negative_prompt_embeds"),
    (lambda g, c, n, i: g.text_to_image(c, n[:, :3], seed=0), "negative_prompt_embeds must be"),
    (lambda g, c, n, i: g.text_to_image(c, n), "exactly one of generator"),
    (lambda g, c, n, i: g.text_to_image(c, n, seed=0, generator=torch.Generator()), "exactly one of generator"),
    (lambda g, c, n, i: g.text_to_image(c, n, generator=[torch.Generator()] * 3), "3 generators for a batch of 2"),
    (lambda g, c, n, i: g.image_to_image(i, c, n, strength=1.5, seed=0), r"strength must be in \[0, 1\]"),
    (lambda g, c, n, i: g.image_to_image(i[:, :, :32], c, n, seed=0), r"images must be a float tensor \[B, 3, 64, 64\]"),
    (lambda g, c, n, i: g.image_to_image(i.expand(3, -1, -1, -1), c, n, seed=0), "3 images for 2 prompts"),
    (lambda g, c, n, i: g.image_to_image(i, c, n, seed=0, strength_map=torch.ones(1, 64, 64)),
     r"strength_map must be a float tensor \[2 or 1, 1, H, W\]"),
    (lambda g, c, n, i: g.image_to_image(i, c, n, seed=0, strength_map=torch.full((1, 1, 64, 64), 1.5)),
     r"strength_map values must be in \[0, 1\]"),
    (lambda g, c, n, i: g.image_to_image(i, c, n, seed=0, strength_map=torch.full((1, 1, 64, 64), float("nan"))),
     r"strength_map values must be in \[0, 1\]"),
    (lambda g, c, n, i: g.image_to_image(i, c, n, seed=0, strength_map=torch.ones(1, 1, 30, 30)),
     "not a multiple of the latent size"),
])
def test_bad_inputs_raise_precise_errors(gen, embeds, init, call, match) -> None:
    cond, neg = embeds
    with pytest.raises(ValueError, match=match):
        call(gen, cond, neg, init)


def test_pil_round_trip(gen) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g).float() / 255
    pils = StickerGenerator.to_pil(images)
    assert [p.size for p in pils] == [(64, 64)] * 2 and pils[0].mode == "RGB"
    assert torch.equal(StickerGenerator.pil_to_tensor(pils), images)


# ------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(gen, embeds, init, tmp_path: Path) -> None:
    cond, neg = embeds
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "README.md").write_text("kept")
    gen.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "kept"
    assert {p.name for p in folder.iterdir()} == {"README.md", "vae", "unet", "scheduler", "pmgen_generator.json"}
    meta = json.loads((folder / "pmgen_generator.json").read_text())
    assert meta["scaling_factor"] == pytest.approx(1.7) and meta["text_max_length"] == L
    loaded = StickerGenerator.from_pretrained(folder)
    expected = gen.image_to_image(init, cond, neg, strength=0.6, seed=4, **KW)
    assert torch.equal(loaded.image_to_image(init, cond, neg, strength=0.6, seed=4, **KW), expected)

    gen.save_pretrained(folder, dtype=torch.float16)  # overwrite in place, as milestones do
    half = StickerGenerator.from_pretrained(folder)
    assert half.dtype == torch.float32 and gen.dtype == torch.float32
    out = half.image_to_image(init, cond, neg, strength=0.6, seed=4, **KW)
    assert (out - expected).abs().max() < 0.05


def test_loading_a_wrong_folder_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pmgen_generator.json"):
        StickerGenerator.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------- trainer
def test_text_variants_are_specific_deduplicated_and_stable() -> None:
    attrs = {"group": "animals-nature", "subgroup": "animal-mammal", "tags": ["cat", "kitten", "pet", "happy"],
             "aliases": ["cat", "cat face"]}
    texts = train.text_variants("cat face", attrs, "1F431")
    assert texts[0] == "cat face" and texts[1] == "cat"
    assert "animal mammal: cat" in texts
    assert "cat face, cat" not in texts  # tags already in the name are not repeated
    assert len({t.lower() for t in texts}) == len(texts)
    assert texts == train.text_variants("cat face", attrs, "1F431")
    assert len(train.text_variants("cat face", attrs, "1F431", max_variants=2)) == 2


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        train.GeneratorTrainConfig(out="x", lr_schedule="cosine")  # cosine needs max_steps
    with pytest.raises(ValueError, match="cond_drop"):
        train.GeneratorTrainConfig(out="x", cond_drop=1.0)
    with pytest.raises(ValueError, match="vae_norm_groups"):
        train.GeneratorTrainConfig(out="x", vae_channels=(8, 16), vae_norm_groups=32)


def test_cli_options_are_the_config_fields_typed_and_unknown_ones_rejected(monkeypatch) -> None:
    from typer.testing import CliRunner

    from pmgen.cli import app
    from pmgen.train.generator import main as entry

    seen = {}
    monkeypatch.setattr(entry, "main", lambda given, resume, write_card: seen.update(given, resume=resume) or 0)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "generator", "--out", "x", "--lr", "1e-4", "--unet-channels", "32,64",
                                 "--max-steps", "none"])
    assert result.exit_code == 0, result.output
    # only what was given, plus the invocation's own fields at their defaults
    assert seen == {"out": "x", "minutes": 600.0, "train_dir": None, "data_dir": None, "lr": 1e-4,
                    "unet_channels": (32, 64), "max_steps": None, "resume": False}
    result = runner.invoke(app, ["train", "generator", "--out", "x", "--learning-rate", "1"])
    assert result.exit_code == 2 and "No such option: --learning-rate" in result.output
    result = runner.invoke(app, ["train", "generator", "--out", "x", "--vae-channels", "8,a"])
    assert result.exit_code == 2 and "--vae-channels" in result.output
    help_text = runner.invoke(app, ["train", "generator", "--help"], env={"COLUMNS": "200"}).output
    assert "--composite-share" in help_text and "share of each UNet batch drawn from composites" in help_text


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory):
    from test_text_encoder import make_tiny_encoder

    from pmgen.models.text_encoder import TextEncoder

    return TextEncoder(make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert")))


def synthetic_data(n: int = 8) -> train.TrainData:
    g = torch.Generator().manual_seed(0)
    images = torch.full((n, 3, 64, 64), 255, dtype=torch.uint8)
    images[:, :, 16:48, 16:48] = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    texts = [["grinning face", "happy face"], ["cat face"], ["dog face", "dog"], ["red heart"], ["green heart"],
             ["pizza"], ["cat, happy"], ["smile"]][:n]
    skintone = np.zeros(n, dtype=bool)
    skintone[5:7] = True
    heldout = np.zeros(n, dtype=bool)
    heldout[-1] = True
    return train.TrainData([f"item{k}" for k in range(n)], images, texts, skintone, heldout)


def tiny_config(tmp: Path, **overrides) -> train.GeneratorTrainConfig:
    values = {"out": str(tmp / "out"), "train_dir": str(tmp / "train"), "vae_channels": (8, 16, 16),
              "vae_norm_groups": 8, "vae_steps": 1, "vae_batch_size": 4, "unet_channels": (32, 64),
              "unet_attention_levels": 1, "unet_head_dim": 16, "batch_size": 3, "text_max_length": L,
              "warmup_steps": 1, "holdout": 1, "sample_steps": 2, "sample_strengths": (0.5,),
              "milestone_steps": 100, "max_steps": 2, "threads": 1}
    return train.GeneratorTrainConfig(**{**values, **overrides})


def _assert_same_state(a: dict, b: dict, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k, v in a.items():
            _assert_same_state(v, b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


def test_trainer_resume_matches_uninterrupted_training(tiny_encoder, tmp_path: Path) -> None:
    data = synthetic_data()
    quiet = lambda msg: None

    straight = train.GeneratorTrainer(tiny_config(tmp_path / "a", decoder_steps=1), data, tiny_encoder, log=quiet)
    straight.run()
    assert (straight.vae_step, straight.dec_step, straight.step, straight.stage) == (1, 1, 2, "unet")

    first = train.GeneratorTrainer(tiny_config(tmp_path / "b", decoder_steps=1, max_steps=1), data, tiny_encoder,
                                   log=quiet)
    first.run()
    assert first.step == 1 and first.checkpoint_path.is_file()
    resumed = train.GeneratorTrainer(tiny_config(tmp_path / "b", decoder_steps=1, max_steps=2), data, tiny_encoder,
                                     log=quiet)
    resumed.load_checkpoint()
    resumed.run()

    a, b = straight.state_dict(), resumed.state_dict()
    for key in ("config", "train_seconds"):
        a.pop(key), b.pop(key)
    a["rng"].pop("python"), b["rng"].pop("python")  # tuples of ints, compared below
    _assert_same_state(a, b)
    assert straight.state_dict()["rng"]["python"] == resumed.state_dict()["rng"]["python"]

    # The export is a loadable fp16 pipeline with a sample grid and a latent scaling factor.
    out = Path(resumed.cfg.out)
    assert (out / "samples.png").is_file()
    card = (out / "README.md").read_text()  # the model card is rewritten at every milestone
    assert "| UNet steps × batch | **2** × 3" in card and (out / "loss.png").is_file()
    assert (out / "samples" / "step_0000002.png").is_file()
    meta = json.loads((out / "pmgen_generator.json").read_text())
    assert meta["saved_dtype"] == "float16" and meta["info"]["trained_steps"] == 2
    loaded = StickerGenerator.from_pretrained(out)
    assert loaded.scaling_factor == pytest.approx(straight.scaling_factor)
    lines = [json.loads(x) for x in (resumed.train_dir / "progress.log").read_text().splitlines()]
    assert {line["stage"] for line in lines} >= {"vae_done", "decoder_done", "milestone"}


def test_trainer_refuses_a_checkpoint_from_another_config(tiny_encoder, tmp_path: Path) -> None:
    data = synthetic_data()
    trainer = train.GeneratorTrainer(tiny_config(tmp_path, max_steps=1), data, tiny_encoder, log=lambda m: None)
    trainer.save_checkpoint()
    other = train.GeneratorTrainer(tiny_config(tmp_path, lr=1e-3), data, tiny_encoder, log=lambda m: None)
    with pytest.raises(ValueError, match="different config \\(lr\\)"):
        other.load_checkpoint()


def test_trainer_data_order_skips_heldout_and_thins_skintones(tiny_encoder, tmp_path: Path) -> None:
    data = synthetic_data()
    trainer = train.GeneratorTrainer(tiny_config(tmp_path, vae_steps=0, skintone_keep=0.01), data, tiny_encoder,
                                     log=lambda m: None)
    seen = torch.cat([trainer._next_batch(5) for _ in range(20)]).tolist()
    assert 7 not in seen  # held out
    assert set(seen) <= {0, 1, 2, 3, 4, 5, 6}
    assert sum(k in (5, 6) for k in seen) < 0.1 * len(seen)


def test_cli_starts_refuses_to_overwrite_and_resumes(tiny_encoder, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from pmgen.cli import app
    from pmgen.train.generator import main as entry

    monkeypatch.setattr(entry, "load_train_data", lambda cfg: synthetic_data())
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test session's setting
    import signal

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave the test session's handlers alone
    common = ["train", "generator", "--out", str(tmp_path / "out"), "--train-dir", str(tmp_path / "train"),
              "--minutes", "5"]
    model = ["--text-encoder", str(tiny_encoder.path), "--vae-channels", "8,16,16", "--vae-norm-groups", "8",
             "--vae-steps", "1", "--vae-batch-size", "4", "--unet-channels", "32,64", "--unet-attention-levels", "1",
             "--unet-head-dim", "16", "--batch-size", "3", "--text-max-length", str(L), "--warmup-steps", "1",
             "--holdout", "1", "--sample-steps", "2", "--sample-strengths", "0.5"]
    runner = CliRunner()
    run = lambda *args: runner.invoke(app, [*common, *args])
    assert run(*model, "--max-steps", "1").exit_code == 0
    again = run(*model, "--max-steps", "1")
    assert again.exit_code == 2 and "pass --resume" in again.output
    changed = run("--resume", "--lr", "1e-2")
    assert changed.exit_code == 2 and "cannot change lr" in changed.output
    assert run("--resume", "--max-steps", "2").exit_code == 0
    meta = json.loads((tmp_path / "out" / "pmgen_generator.json").read_text())
    assert meta["info"]["trained_steps"] == 2
    assert "--vae-steps 1 --decoder-steps 0" in (tmp_path / "out" / "README.md").read_text()


def test_vae_init_from_checkpoint_or_pipeline_folder(tiny_encoder, tmp_path: Path) -> None:
    data = synthetic_data()
    quiet = lambda msg: None
    first = train.GeneratorTrainer(tiny_config(tmp_path / "a", max_steps=1), data, tiny_encoder, log=quiet)
    first.run()
    trained = first.vae.state_dict()
    for source in (first.checkpoint_path, Path(first.cfg.out)):
        second = train.GeneratorTrainer(tiny_config(tmp_path / "b", vae_init=str(source), vae_steps=0), data,
                                        tiny_encoder, log=quiet)
        tol = 0 if source.is_file() else 1e-2  # the export is fp16
        for k, v in second.vae.state_dict().items():
            torch.testing.assert_close(v, trained[k], rtol=tol, atol=tol)
    with pytest.raises(FileNotFoundError, match="vae_init"):
        train.GeneratorTrainer(tiny_config(tmp_path / "c", vae_init=str(tmp_path / "missing")), data, tiny_encoder,
                               log=quiet)


def test_warm_start_from_an_export_when_the_cache_is_gone(tiny_encoder, tmp_path: Path) -> None:
    data = synthetic_data()
    quiet = lambda msg: None
    first = train.GeneratorTrainer(tiny_config(tmp_path / "a", max_steps=2), data, tiny_encoder, log=quiet)
    first.run()
    out = Path(first.cfg.out)
    # the export carries its training log, so the card survives a lost cache directory
    assert (out / train.TRAINING_LOG).read_text() == first.progress_path.read_text()
    shutil.rmtree(first.train_dir)
    card = train.write_model_card(out, first.train_dir).read_text()
    assert "**2**" in card
    ema = first.ema_unet().state_dict()
    second = train.GeneratorTrainer(tiny_config(tmp_path / "b", init_from=str(out), max_steps=3), data,
                                    tiny_encoder, log=quiet)
    assert (second.stage, second.step, second.scaling_factor) == ("unet", 2, first.scaling_factor)
    for k, v in second.unet.state_dict().items():
        torch.testing.assert_close(v, ema[k].half().float(), rtol=0, atol=0)
    second.run()
    meta = json.loads((Path(second.cfg.out) / "pmgen_generator.json").read_text())
    assert meta["info"]["trained_steps"] == 3
    with pytest.raises(FileNotFoundError, match="init_from"):
        train.GeneratorTrainer(tiny_config(tmp_path / "c", init_from=str(tmp_path)), data, tiny_encoder, log=quiet)


def test_decoder_stage_keeps_the_encoder_and_so_the_latents(tiny_encoder, tmp_path: Path) -> None:
    data = synthetic_data()
    trainer = train.GeneratorTrainer(tiny_config(tmp_path, vae_steps=1, decoder_steps=2, max_steps=1), data,
                                     tiny_encoder, log=lambda m: None)
    trainer.vae_train_step()
    assert trainer.vae_step == 1
    trainer._finish_vae_stage()
    assert trainer.stage == "decoder"
    before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    for _ in range(2):
        trainer.decoder_train_step()
    after = trainer.vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    trainer._finish_vae_stage()
    assert trainer.stage == "unet" and trainer.scaling_factor is not None
    metrics = trainer.vae_metrics()
    assert set(metrics) == {"l1", "psnr", "saturated_l1"} and 0 <= metrics["l1"] <= 1
