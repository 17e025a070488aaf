"""Composite training pairs (issue 19) and the generator trainer's composition path, on a tiny
catalog and tiny random models built in code (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pmgen.stages.condition import ConditionBuilder
from pmgen.data.schema import Item, Sample
from pmgen.stages.keywords import target_keywords
from pmgen import composites as comp
from pmgen.train import generator as train

L = 24  # token positions of the tiny text states (no keyword text here is longer)

# (id, title, subgroup, tags, skintone base)
ITEMS = [
    ("f1", "grinning face", "face-smiling", ["happy", "smile"], ""),
    ("f2", "grinning cat", "cat-face", ["cat", "happy"], ""),
    ("f3", "smiling face", "face-smiling", ["smile"], ""),
    ("f4", "crying face", "face-concerned", ["sad"], ""),
    ("c1", "cat face", "animal-mammal", ["cat", "pet"], ""),
    ("c2", "cat", "animal-mammal", ["cat", "pet"], ""),
    ("d1", "dog face", "animal-mammal", ["dog", "pet"], ""),
    ("h1", "red heart", "heart", ["heart", "red"], ""),
    ("h2", "green heart", "heart", ["heart", "green"], ""),
    ("p1", "pizza", "food-prepared", ["food"], ""),
    ("s1", "rocket", "transport-air", ["space"], ""),
    ("w1", "waving hand", "hand-fingers-open", ["hand"], ""),
    ("w2", "waving hand: dark skin tone", "hand-fingers-open", [], "w1"),
    ("o1", "fish", "animal-marine", ["fish"], ""),
]


def _image(k: int) -> np.ndarray:
    img = np.full((64, 64, 3), 255, dtype=np.uint8)
    g = np.random.default_rng(k)
    img[14:50, 14:50] = g.integers(0, 200, size=3, dtype=np.uint8)  # a coloured square sticker
    img[28:36, 28:36] = 255  # a white hole: stays opaque in the filled mask
    return img


@pytest.fixture(scope="module")
def catalog() -> comp.Catalog:
    items = {i: Item(i, t, attributes={"subgroup": sg, "tags": tags, "group": "x",
                                       "skintone": 5 if base else "", "skintone_base": base})
             for i, t, sg, tags, base in ITEMS}
    images = {i: _image(k) for k, (i, *_rest) in enumerate(ITEMS)}
    samples = [Sample("u1-0", "u1", "f4", split="test", ground_truth_personalized="o1"),
               Sample("u2-0", "u2", "f3", split="train", ground_truth_personalized="h2")]
    targets, truths = comp.heldout_from_sticker_users(samples)
    assert (targets, truths) == ({"f4"}, {"o1"})  # train samples hold nothing out
    held = targets | {"d1"}  # + one "generator held-out" item
    return comp.Catalog(items, images, frozenset(held), frozenset(held | truths))


def test_specs_and_images_are_deterministic(catalog) -> None:
    a = comp.make_specs(catalog, 60, seed=3)
    b = comp.make_specs(catalog, 60, seed=3)
    assert a == b and comp.fingerprint(a) == comp.fingerprint(b)
    assert comp.make_specs(catalog, 60, seed=4) != a
    hues = comp.taste_hues(catalog)
    for s in a[:20]:
        x, y = comp.render(s, catalog.images, hues), comp.render(s, catalog.images, hues)
        assert x.dtype == np.uint8 and x.shape == (64, 64, 3) and np.array_equal(x, y)
    assert {s.mode for s in a} == set(comp.MODES)
    assert {s.weight for s in a} <= set(comp.DEFAULT_WEIGHTS)


def test_heldout_items_are_never_composed(catalog) -> None:
    specs = comp.make_specs(catalog, 300, seed=0)
    assert not {s.target for s in specs} & catalog.heldout_targets
    assert not {s.element for s in specs} & catalog.heldout_images
    assert "o1" not in {s.element for s in specs}  # a val/test ground truth: never an element either
    cs = comp.build_composite_set(catalog, 50, n_val=6, val_targets=["f4"])
    assert {s.target for s in cs.val} == {"f4"} and all(s.mode != "natural" for s in cs.val)
    leaked = comp.CompositeSpec("f4", "cats", "badge", "c1", 0, 1.0, ("crying face",), ("cats",))
    with pytest.raises(ValueError, match="held-out items"):
        comp.CompositeSet(catalog, [leaked], [], cs.hues)


def test_natural_pairs_are_the_catalogs_own_families(catalog) -> None:
    from pmgen.data.datasets.sticker_users import TASTES

    pairs = set(comp.natural_pairs(catalog, TASTES))
    assert ("f1", "cats", "f2", None) in pairs  # grinning face -> grinning cat
    assert ("h1", "colour", "h2", ("green",)) in pairs  # red heart + "green" -> green heart
    assert ("w1", "skin tone", "w2", ("dark skin tone",)) in pairs
    spec = comp.CompositeSpec("h1", "colour", "natural", "h2", 0, 1.0, ("red heart",), ("green",))
    assert np.array_equal(comp.render(spec, catalog.images, {}), catalog.images["h2"])


def test_mask_is_the_silhouette_with_its_holes_filled() -> None:
    m = comp._mask(_image(0))
    assert m[0, 0] == 0 and m[20, 20] == 1 and m[30, 30] == 1  # background / ink / the white hole
    assert m.sum() == 36 * 36


def test_badge_puts_the_taste_element_in_a_corner_of_the_target(catalog) -> None:
    hues = comp.taste_hues(catalog)
    base = comp.CompositeSpec("p1", "cats", "badge", "c1", 3, 2.0, ("pizza",), ("cats",))
    out = comp.render(base, catalog.images, hues).astype(int)
    target = catalog.images["p1"].astype(int)
    changed = np.abs(out - target).max(-1) > 0
    assert changed[36:, 36:].any() and not changed[:30].any()  # bottom-right corner only
    assert not changed[63, 36:44].any()  # the badge's white background is not pasted (its square is at 46..63)
    small = comp.render(comp.CompositeSpec(*[*base.__dict__.values()][:5], 0.5, base.target_keywords,
                                           base.preference_keywords), catalog.images, hues)
    assert (np.abs(small.astype(int) - target).max(-1) > 0).sum() < changed.sum()  # grows with w


def test_target_keywords_are_what_the_pipeline_computes(catalog) -> None:
    for s in comp.make_specs(catalog, 40, seed=1):
        assert list(s.target_keywords) == list(target_keywords(item=catalog.items[s.target], k=5).keywords)
        assert 1 <= len(s.preference_keywords) <= 8


# ------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory):
    from test_text_encoder import make_tiny_encoder

    from pmgen.models.text_encoder import TextEncoder

    return TextEncoder(make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert")))


def _train_data(catalog: comp.Catalog) -> train.TrainData:
    ids = sorted(catalog.items)
    images = torch.from_numpy(np.stack([catalog.images[i] for i in ids])).permute(0, 3, 1, 2).contiguous()
    texts = [[catalog.items[i].title] for i in ids]
    heldout = np.array([i == "d1" for i in ids])
    return train.TrainData(ids, images, texts, np.zeros(len(ids), dtype=bool), heldout)


def _config(tmp: Path, **overrides) -> train.GeneratorTrainConfig:
    values = {"out": str(tmp / "out"), "train_dir": str(tmp / "train"), "vae_channels": (8, 16, 16),
              "vae_norm_groups": 8, "vae_steps": 1, "vae_batch_size": 4, "unet_channels": (32, 64),
              "unet_attention_levels": 1, "unet_head_dim": 16, "batch_size": 4, "text_max_length": L,
              "warmup_steps": 1, "holdout": 1, "sample_steps": 2, "sample_strengths": (0.5,),
              "milestone_steps": 100, "max_steps": 3, "threads": 1, "composite_share": 0.5, "composite_count": 12}
    return train.GeneratorTrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def composite_set(catalog) -> comp.CompositeSet:
    return comp.build_composite_set(catalog, 12, n_val=3, val_targets=["f4"])


def test_trainer_conditions_are_the_condition_builders(catalog, composite_set, tiny_encoder, tmp_path) -> None:
    trainer = train.GeneratorTrainer(_config(tmp_path, vae_steps=0), _train_data(catalog), tiny_encoder,
                                     log=lambda m: None, composites=composite_set)
    builder = ConditionBuilder(tiny_encoder, L, "concat")
    for s in composite_set.train:
        expected = builder.build(s.target_keywords, s.preference_keywords, s.weight)
        cond, neg = trainer.composite_condition(s)
        assert torch.equal(cond, expected.prompt_embeds[0]) and torch.equal(neg, expected.negative_prompt_embeds[0])
        assert cond.shape[0] > L  # w > 0: target states then w copies of the preference unit
    with pytest.raises(ValueError, match="needs composites"):
        train.GeneratorTrainer(_config(tmp_path / "x"), _train_data(catalog), tiny_encoder, log=lambda m: None)


def test_padding_and_mask_leave_a_row_unchanged(catalog, composite_set, tiny_encoder, tmp_path) -> None:
    trainer = train.GeneratorTrainer(_config(tmp_path, vae_steps=0), _train_data(catalog), tiny_encoder,
                                     log=lambda m: None, composites=composite_set)
    cond, _ = trainer.composite_condition(composite_set.train[0])
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    t = torch.tensor([500])
    alone, _ = trainer._loss(trainer.unet.eval(), lat, cond[None], noise, t)
    padded = torch.cat([cond, torch.randn(7, cond.shape[1], generator=g)])[None]
    mask = torch.cat([torch.ones(cond.shape[0]), torch.zeros(7)])[None]
    masked, _ = trainer._loss(trainer.unet, lat, padded, noise, t, mask)
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-6)


def test_composite_training_resumes_exactly_and_exports(catalog, composite_set, tiny_encoder, tmp_path) -> None:
    from test_generator import _assert_same_state

    data = _train_data(catalog)
    quiet = lambda msg: None
    straight = train.GeneratorTrainer(_config(tmp_path / "a"), data, tiny_encoder, log=quiet, composites=composite_set)
    straight.run()
    assert straight.step == 3 and straight.n_composite == 2
    assert (straight.comp_epoch, straight.comp_pos) == (0, 6)

    first = train.GeneratorTrainer(_config(tmp_path / "b", max_steps=1), data, tiny_encoder, log=quiet,
                                   composites=composite_set)
    first.run()
    resumed = train.GeneratorTrainer(_config(tmp_path / "b"), data, tiny_encoder, log=quiet, composites=composite_set)
    resumed.load_checkpoint()
    assert (resumed.comp_epoch, resumed.comp_pos) == (0, 2)
    resumed.run()
    a, b = straight.state_dict(), resumed.state_dict()
    for key in ("config", "train_seconds"):
        a.pop(key), b.pop(key)
    a["rng"].pop("python"), b["rng"].pop("python")
    _assert_same_state(a, b)

    out = Path(resumed.cfg.out)
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()
    assert (out / "README.md").read_text().startswith("# sticker-tiny generator-compose")
    rows = json.loads((out / "samples.json").read_text())["rows"]
    assert {r["item"] for r in rows} == {"f4"}  # the grid shows held-out targets
    lines = [json.loads(x) for x in (resumed.train_dir / "progress.log").read_text().splitlines()]
    assert "val_composite_loss" in [x for x in lines if x["stage"] == "milestone"][-1]

    other = comp.build_composite_set(catalog, 12, n_val=3, seed=5, val_targets=["f4"])
    moved = train.GeneratorTrainer(_config(tmp_path / "b"), data, tiny_encoder, log=quiet, composites=other)
    with pytest.raises(ValueError, match="different composites"):
        moved.load_checkpoint()
