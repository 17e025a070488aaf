"""Structure-kept edits (inversion) and retrieved exemplars (issue 41), on tiny random models and
hand-made embeddings: no download, seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pmgen.stages.retrieve import MAX_EXEMPLARS, ExemplarIndex
from pmgen.stages.select import preference_vector, select
from test_generator import DIM, L, tiny_generator


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


@pytest.fixture(scope="module")
def init() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    img = torch.ones(2, 3, 64, 64)
    img[:, :, 16:48, 16:48] = torch.rand(2, 3, 32, 32, generator=g)  # a "sticker" on white
    return img


def _embeds(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, L, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["ddim", "noised"])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_the_source_condition_reproduces_the_inverted_image(gen, init, method, strength) -> None:
    cond, neg = _embeds(1), _embeds(2, 1)
    inv = gen.invert(init, cond, neg, strength=strength, num_inference_steps=10, guidance_scale=4.0, method=method)
    assert inv.corrections.shape == (len(inv.timesteps), 2, 4, 16, 16)
    assert len(inv.timesteps) == int(10 * strength)
    out = gen.edit(inv, cond, neg)
    vae = gen.decode(inv.init_latents)
    # the corrections land each step on the trajectory: the VAE reconstruction, to float rounding
    assert (out - vae).abs().max() < 2e-3
    sdedit = gen.image_to_image(init, cond, neg, strength=strength, seed=0, num_inference_steps=10)
    assert (sdedit - vae).abs().mean() > 20 * (out - vae).abs().mean()


def test_another_condition_edits_and_keep_trades_layout_for_freedom(gen, init) -> None:
    cond, neg, other = _embeds(1), _embeds(2, 1), _embeds(5)
    inv = gen.invert(init, cond, neg, num_inference_steps=10)
    vae = gen.decode(inv.init_latents)
    full, half, free = (gen.edit(inv, other, neg, keep=k) for k in (1.0, 0.5, 0.0))
    d = [float((x - vae).abs().mean()) for x in (full, half, free)]
    assert d[0] > 1e-3  # the new condition changes the image
    assert d[0] < d[1] < d[2]  # the fewer steps hold the layout, the further it moves


def test_one_inverted_row_serves_many_prompts_and_rows_can_be_selected(gen, init) -> None:
    cond, neg = _embeds(1), _embeds(2, 1)
    inv = gen.invert(init, cond, neg, num_inference_steps=6)
    one = inv.select([1])
    assert len(one) == 1 and torch.equal(one.start, inv.start[1:2])
    many = gen.edit(one, torch.cat([cond[1:2], cond[1:2]]), neg)
    alone = gen.edit(one, cond[1:2], neg)
    assert many.shape[0] == 2 and (many[0] - alone[0]).abs().max() < 1e-4


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "magic"}, "inversion method"), ({"strength": 0.0}, "strength"), ({"strength": 1.5}, "strength"),
    ({"strength": 0.05}, "runs no step"),
])
def test_bad_inversion_arguments_are_refused(gen, init, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        gen.invert(init, _embeds(1), _embeds(2, 1), num_inference_steps=10, **kwargs)


def test_edit_refuses_a_row_count_that_does_not_fit_and_a_bad_keep(gen, init) -> None:
    inv = gen.invert(init, _embeds(1), _embeds(2, 1), num_inference_steps=4)
    with pytest.raises(ValueError, match="rows"):
        gen.edit(inv, _embeds(1, 3), _embeds(2, 1))
    with pytest.raises(ValueError, match="keep"):
        gen.edit(inv, _embeds(1), _embeds(2, 1), keep=1.5)


# ------------------------------------------------------------------ retrieval

class AxisSelector:
    """Texts and images on named axes: an image is a one-hot-ish row, a text the unit vector of its axis."""

    content_hash = "axes"

    def __init__(self, axes: list[str]):
        self.axes = axes

    def text_embeddings(self, texts):
        return torch.eye(len(self.axes))[[self.axes.index(t) for t in texts]]

    def image_embeddings(self, images):
        v = images.mean(dim=(2, 3))[:, :1].repeat(1, len(self.axes))  # unused by these tests
        return torch.nn.functional.normalize(v, dim=1)


def _index(rows: dict[str, list[float]]) -> ExemplarIndex:
    emb = torch.nn.functional.normalize(torch.tensor(list(rows.values()), dtype=torch.float32), dim=1)
    return ExemplarIndex(list(rows), [f"title {i}" for i in rows], emb)


def test_retrieval_takes_items_that_hold_both_the_target_and_the_taste() -> None:
    # axes: [target meaning, cat taste, other]
    index = _index({"target": [1, 0, 0], "cat-and-target": [0.8, 0.6, 0], "cat-only": [0, 1, 0],
                    "other": [0, 0, 1], "target-ish": [0.9, 0.1, 0.4]})
    t, p = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    found = index.search(t, p, k=2, alpha=2 / 3, target_item="target")
    assert [e.item_id for e in found][0] == "cat-and-target"
    assert "target" not in [e.item_id for e in found]  # never the target itself
    r_t = (1 + 0.8) / 2
    assert found[0].r_t == pytest.approx(r_t, abs=1e-6)
    assert found[0].score == pytest.approx(2 / 3 * math.log((1 + 0.6) / 2) + 1 / 3 * math.log(r_t), abs=1e-6)
    # the floor: only items that keep ≥ 85% of the target image's own r_t (cat-only and other drop out)
    floored = index.search(t, p, k=5, alpha=2 / 3, target_item="target", min_target=0.85)
    assert {e.item_id for e in floored} == {"cat-and-target", "target-ish"}
    assert index.search(t, p, k=5, alpha=2 / 3, exclude=["cat-and-target"])[0].item_id != "cat-and-target"


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k"), ({"k": MAX_EXEMPLARS + 1}, "k"),
                                           ({"k": 1, "min_target": 2.0}, "min_target")])
def test_retrieval_bounds(kwargs, match) -> None:
    index = _index({"a": [1, 0], "b": [0, 1]})
    with pytest.raises(ValueError, match=match):
        index.search(torch.tensor([1.0, 0]), torch.tensor([0, 1.0]), alpha=0.5, **kwargs)


def test_the_index_is_cached_per_selector_and_catalog(tmp_path: Path) -> None:
    from pmgen.data.schema import Item

    items = {f"i{k}": Item(f"i{k}", f"item {k}", image=f"{k}.png") for k in range(5)}
    items["noimg"] = Item("noimg", "no image")
    calls = []

    def image_of(iid):
        calls.append(iid)
        return None if iid == "i4" else torch.full((1, 3, 8, 8), float(iid[1:]) / 5)

    sel = AxisSelector(["a", "b"])
    first = ExemplarIndex.build(sel, items, image_of, cache_dir=tmp_path)
    assert first.ids == ["i0", "i1", "i2", "i3"]  # items without an image (or whose image is missing) left out
    n = len(calls)
    again = ExemplarIndex.build(sel, items, image_of, cache_dir=tmp_path)
    assert len(calls) == n and torch.equal(again.embeddings, first.embeddings)  # from the cache
    items["i0"] = Item("i0", "renamed", image="0.png")
    ExemplarIndex.build(sel, items, image_of, cache_dir=tmp_path)
    assert len(calls) > n  # another catalog: rebuilt
    (next(tmp_path.glob("exemplars-*.pt"))).write_bytes(b"damaged")
    assert ExemplarIndex.build(sel, items, image_of, cache_dir=tmp_path).ids  # a damaged cache is rebuilt


def test_selection_and_retrieval_share_one_preference_vector() -> None:
    sel = AxisSelector(["t", "kw", "n1", "n2"])
    back = torch.tensor([0.0, 0.5, 0.5, 0.0])
    hist = preference_vector(sel, "kw", ["n1", "n2"], "history")
    assert torch.allclose(hist, torch.tensor([0, 0, 0.5, 0.5]))
    both = preference_vector(sel, "kw", ["n1", "n2"], "both", back, 1.0)
    assert torch.allclose(both, torch.tensor([0, 0.5, 0.25, 0.25]) - back)
    assert torch.allclose(preference_vector(sel, "kw", [], "history"), torch.tensor([0, 1.0, 0, 0]))
    assert preference_vector(sel, "", [], "keywords") is None
    with pytest.raises(ValueError, match="background"):
        preference_vector(sel, "kw", [], "keywords", None, 0.5)

    class Imgs(AxisSelector):
        def image_embeddings(self, images):
            return images[:, 0, 0, :4]

    imgs = torch.zeros(2, 3, 4, 4)
    imgs[0, 0, 0] = torch.tensor([1.0, 0, 0, 0])
    imgs[1, 0, 0] = torch.tensor([0.6, 0, 0.8, 0])
    s = select(imgs, Imgs(["t", "kw", "n1", "n2"]), "t", "kw", history_texts=["n1", "n2"],
               preference_source="history")
    assert s.d_p == pytest.approx([0.5, (1 + 0.4) / 2])


# ------------------------------------------------------------------ the pipeline

def _gen(pmg, toy_data, **kw):
    root, items, user = toy_data
    return pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png",
                        item_images=lambda i: root / items[i].image if items[i].image else None, **kw)


def test_with_inversion_w0_is_the_target_through_the_vae_and_w_gt_0_edits(tiny_pmg, toy_data) -> None:
    from pmgen.data.images import load_image

    root = toy_data[0]
    res = _gen(tiny_pmg, toy_data, inversion="ddim", mode="compose")
    init = load_image(root / "img" / "a.png", 64)
    vae = tiny_pmg.generator.decode(tiny_pmg.generator.encode(init))
    assert torch.equal(res.images[0], vae[0])  # w = 0 reproduces the target, bit for bit
    assert [c.weight for c in res.record.candidates] == [0.0, 1.0, 2.0]
    if res.record.preference_keywords:
        assert not torch.equal(res.images[0], res.images[2])
    plain = _gen(tiny_pmg, toy_data, mode="compose")  # SDEdit: w = 0 drifts from the target
    assert (plain.images[0] - vae[0]).abs().mean() > (res.images[0] - vae[0]).abs().mean()


@pytest.mark.parametrize("mode", ["compose", "concat"])
def test_batched_edits_are_the_one_by_one_edits(tiny_pmg, toy_data, mode) -> None:
    res = _gen(tiny_pmg, toy_data, inversion="ddim", mode=mode, exemplars=2, exemplar_floor=0.0)
    plan = tiny_pmg.plan(toy_data[2], toy_data[1]["a"], toy_data[1], target_image=toy_data[0] / "img" / "a.png",
                         item_images=lambda i: toy_data[0] / toy_data[1][i].image, inversion="ddim", mode=mode,
                         exemplars=2, exemplar_floor=0.0)
    s, gen = plan.settings, tiny_pmg.generator
    images = torch.cat([plan.init, plan.exemplar_init])
    names = torch.stack([tiny_pmg.builder(mode).encode(e.title)[0] for e in plan.exemplars])
    c0 = plan.conditions[0]
    inv = gen.invert(images, torch.cat([c0.prompt_embeds, names]), c0.negative_prompt_embeds,
                     num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale)
    alone = [tiny_pmg.edit_one(inv.select([0]), c, 1.0) for c in plan.conditions[1:]]
    alone += [tiny_pmg.edit_one(inv.select([1 + j]), plan.exemplar_condition, 1.0) for j in range(2)]
    assert (res.images[1:] - torch.cat(alone)).abs().max() < 1e-3  # batching changes float rounding only


def test_exemplars_are_extra_candidates_named_in_the_record_and_saved(tiny_pmg, toy_data, tmp_path) -> None:
    from pmgen.types import GenerationRecord

    res = _gen(tiny_pmg, toy_data, inversion="ddim", mode="compose", exemplars=2, exemplar_floor=0.0)
    rec = res.record
    starts = [c.start for c in rec.candidates]
    assert starts[:3] == [None, None, None] and len(starts) == 5
    assert set(starts[3:]) <= {"b", "c", "d"} and len(set(starts[3:])) == 2  # never the target, no repeats
    assert all(c.weight == 1.0 and c.start_title for c in rec.candidates[3:])
    assert res.images.shape[0] == 5 and "retrieve" in rec.timings_s
    out = res.save(tmp_path / "r")
    data = json.loads((out / "record.json").read_text())
    assert data["candidates"][3]["image"] == "candidates/x3_w_1.00.png" and (out / "candidates/x4_w_1.00.png").is_file()
    assert GenerationRecord.from_json(data).candidates[3].start == starts[3]  # the record reads back


def test_exemplar_settings_are_checked_and_a_missing_catalog_is_told(tiny_pmg, toy_data) -> None:
    from pmgen.pipeline import Settings

    with pytest.raises(ValueError, match="need inversion"):
        Settings(exemplars=2)
    for bad in ({"exemplars": True}, {"exemplars": 99, "inversion": "ddim"}, {"inversion": "magic"},
                {"keep": 1.5}, {"inversion_strength": 0.0}, {"exemplar_weight": 0.0, "inversion": "ddim"}):
        with pytest.raises(ValueError):
            Settings(**bad)
    root, items, user = toy_data
    res = tiny_pmg.generate(user, items["a"], items, target_image=root / "img" / "a.png", inversion="ddim",
                            exemplars=2, mode="compose")
    assert len(res.record.candidates) == 3 and any("item_images" in w for w in res.record.warnings)


def test_an_item_image_path_that_leaves_the_catalog_folder_is_not_read(tmp_path) -> None:
    from pmgen.data.requests import Request
    from pmgen.data.schema import Item, User

    items = {"ok": Item("ok", "fine", image="img/ok.png"), "evil": Item("evil", "x", image="../../etc/passwd"),
             "none": Item("none", "no image")}
    req = Request("r", User("u", []), items["ok"], items, images_root=tmp_path)
    assert req.item_image("ok") == (tmp_path / "img" / "ok.png").resolve()
    assert req.item_image("evil") is None and req.item_image("none") is None and req.item_image("missing") is None


def test_the_report_names_the_exemplar_a_candidate_was_redrawn_from_escaped(tiny_pmg, toy_data, tmp_path) -> None:
    import dataclasses

    res = _gen(tiny_pmg, toy_data, inversion="ddim", mode="compose", exemplars=1, exemplar_floor=0.0)
    c = res.record.candidates[-1]
    res.record.candidates[-1] = dataclasses.replace(c, start_title="<b>cat</b>")  # catalog titles are user data
    page = (res.save(tmp_path / "r") / "report.html").read_text()
    assert "from &lt;b&gt;cat&lt;/b&gt;" in page and "<b>cat</b>" not in page
