import pytest
import torch

from pmgen.models.scorer import DualEncoder, Scorer, ScorerConfig, candidate_matrix, topk_hits


class FakeTextEncoder:
    """Deterministic 384-d 'pooled' vectors from a hash of the text."""

    name = "fake"

    def pooled(self, texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(abs(hash(t)) % (2**31))
            out.append(torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0))
        return torch.stack(out)


def test_topk_hits_math():
    sims = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.6, 0.1], [0.3, 0.3, 0.1], [0.1, 0.2, 0.3]])
    hits = topk_hits(sims, ks=(1, 2))
    assert hits[1] == 0.25  # only row 0 ranks first; a tie counts against the true text
    assert hits[2] == 0.75  # rows 0, 1 and 2 (tie: second place) are within the top 2


def test_candidate_matrix_properties():
    groups = ["a", "a", "b", "c", "d", "e"]
    text_ids = [0, 1, 2, 3, 4, 5]
    cands = candidate_matrix([0, 2], groups, text_ids, n_candidates=4, seed=0)
    assert cands.shape == (2, 4)
    assert cands[0, 0] == 0 and cands[1, 0] == 2
    assert 1 not in cands[0].tolist()  # a same-group text is never a distractor
    assert all(len(set(r.tolist())) == 4 for r in cands)
    assert torch.equal(cands, candidate_matrix([0, 2], groups, text_ids, n_candidates=4, seed=0))


def test_dual_encoder_shapes_and_roundtrip(tmp_path):
    for arch in ("resnet", "convnext"):
        torch.manual_seed(0)
        m = DualEncoder(ScorerConfig(arch=arch, widths=(8, 16), embed_dim=16)).eval()
        x = torch.rand(3, 3, 64, 64)
        e = m.encode_images(x)
        assert e.shape == (3, 16)
        assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
        m.save(tmp_path / arch)
        m2 = DualEncoder.load(tmp_path / arch)
        assert torch.allclose(m2.encode_images(x), e, atol=2e-2)  # fp16 on disk


def test_scorer_similarities(tmp_path):
    torch.manual_seed(0)
    m = DualEncoder(ScorerConfig(widths=(8, 16), embed_dim=16))
    m.save(tmp_path)
    s = Scorer.load(tmp_path, FakeTextEncoder())
    x = torch.rand(2, 3, 64, 64)
    sim = s.text_similarity(x, ["cat", "dog", "heart"])
    assert sim.shape == (2, 3) and sim.abs().max() <= 1 + 1e-5
    assert s.image_similarity(x, x).diagonal().allclose(torch.ones(2), atol=1e-5)
    assert s.content_hash and s.path == tmp_path


def test_a_plus_b_selector_reference_loads_the_mean_of_both(tmp_path):
    """``a+b`` as a selector: an EnsembleScorer of the two folders (the mean of their similarities); an empty
    or too long list is a clear error; a folder whose own name has a '+' is still one scorer."""
    import dataclasses

    from pmgen.models.scorer import EnsembleScorer
    from pmgen.presets import MAX_ENSEMBLE, get_preset, load_scorer

    torch.manual_seed(0)
    for name in ("a", "b", "c+d"):
        DualEncoder(ScorerConfig(widths=(8, 16), embed_dim=16)).save(tmp_path / name)
    te = FakeTextEncoder()
    p = dataclasses.replace(get_preset("sticker-tiny"), text_encoder="minilm",
                            selector=f"{tmp_path / 'a'}+{tmp_path / 'b'}")
    ens = load_scorer(p, "selector", te)
    assert isinstance(ens, EnsembleScorer) and len(ens.members) == 2
    a, b = (Scorer.load(tmp_path / n, te) for n in ("a", "b"))
    x = torch.rand(3, 3, 64, 64)
    texts = ["cat", "red heart"]
    assert ens.text_similarity(x, texts).allclose((a.text_similarity(x, texts) + b.text_similarity(x, texts)) / 2,
                                                  atol=1e-5)
    assert ens.content_hash == f"{a.content_hash}+{b.content_hash}"
    from pmgen.stages.history_images import image_tower

    assert image_tower(ens) is ens.members[0] and image_tower(a) is a  # what a history-image encoder reads
    one = load_scorer(dataclasses.replace(p, selector=str(tmp_path / "c+d")), "selector", te)
    assert isinstance(one, Scorer)
    for bad in (f"{tmp_path / 'a'}+", "+".join([str(tmp_path / "a")] * (MAX_ENSEMBLE + 1))):
        with pytest.raises(ValueError, match="ensemble"):
            load_scorer(dataclasses.replace(p, selector=bad), "selector", te)
    with pytest.raises(FileNotFoundError):
        load_scorer(dataclasses.replace(p, selector=f"{tmp_path / 'a'}+zoo:sticker-tiny/no-such"), "selector", te)


def test_config_validation():
    import pytest

    with pytest.raises(ValueError, match="arch"):
        ScorerConfig(arch="vit")
    with pytest.raises(ValueError, match="multiples of 8"):
        ScorerConfig(widths=(30,))


# ------------------------------------------------------------------ generator views (selector training)
def _tiny_catalog(n=5):
    from pmgen.data.catalog import ImageCatalog
    from pmgen.data.schema import Item

    g = torch.Generator().manual_seed(0)
    items = [Item(id=f"i{k}", title=t, attributes={"tags": ["tag"]})
             for k, t in enumerate(["cat face", "red heart", "rocket", "pizza", "sun", "moon", "tree", "car"][:n])]
    return ImageCatalog(items, torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8))


class _CountingGenerator:
    """A tiny sticker generator that counts its image_to_image rows."""

    def __init__(self):
        from tiny_models import tiny_sticker_generator

        torch.manual_seed(0)
        self.gen = tiny_sticker_generator(text_max_length=8)
        self.content_hash = "tiny"
        self.rows = 0

    def image_to_image(self, init, *a, **kw):
        self.rows += init.shape[0]
        return self.gen.image_to_image(init, *a, **kw)


def _parts(tmp_path):
    from tiny_models import write_tiny_bert

    from pmgen.models.text_encoder import TextEncoder
    from pmgen.stages.condition import ConditionBuilder

    gen = _CountingGenerator()
    return gen, ConditionBuilder(TextEncoder(write_tiny_bert(tmp_path / "bert")), 8), 4.0


def test_generated_views_are_the_generator_at_weight_zero_and_resume_from_their_cache(tmp_path, monkeypatch):
    from pmgen.stages.keywords import target_keywords
    from pmgen.train.scorer import generated

    monkeypatch.setattr(generated, "CHUNK", 2)
    cat = _tiny_catalog(5)
    parts = _parts(tmp_path)
    gen, builder, _ = parts
    calls = iter([False, False, True])  # stop after two chunks
    part = generated.generated_views(cat, (0.6, 1.0), seed=3, cache=tmp_path / "c", parts=parts,
                                     stop=lambda: next(calls, True), log=lambda m: None)
    assert part is None and gen.rows == 4  # stopped; the finished rows are cached
    views = generated.generated_views(cat, (0.6, 1.0), seed=3, cache=tmp_path / "c", parts=parts,
                                      log=lambda m: None)
    assert gen.rows == 10 and views.shape == (2, 5, 3, 64, 64) and views.dtype == torch.uint8
    # row k at strength s is the generator's img2img of item k under its own keywords (w = 0)
    conds = [builder.build(list(target_keywords(item=it, k=5).keywords), [], 0.0) for it in cat.items[2:4]]
    direct = gen.gen.image_to_image(cat.images[2:4].float() / 255, torch.cat([c.prompt_embeds for c in conds]),
                                    torch.cat([c.negative_prompt_embeds for c in conds]), strength=0.6,
                                    seed=3 + 2, num_inference_steps=20, guidance_scale=4.0)
    assert torch.equal(views[0, 2:4], (direct.clamp(0, 1) * 255).round().to(torch.uint8))
    assert not torch.equal(views[0], views[1])
    again = generated.generated_views(cat, (0.6, 1.0), seed=3, cache=tmp_path / "c", parts=parts)
    assert gen.rows == 10 and torch.equal(again, views)  # all cached: the generator is not called again


def test_generated_views_settings_are_checked_and_keep_a_catalog_only_runs_key(tmp_path):
    import pytest

    from pmgen.train.scorer.config import ScorerTrainConfig
    from pmgen.train.scorer.trainer import _config_key

    with pytest.raises(ValueError, match="generated_strengths"):
        ScorerTrainConfig(out=str(tmp_path), generated_strengths=(0.0,))
    with pytest.raises(ValueError, match="generated_fraction"):
        ScorerTrainConfig(out=str(tmp_path), generated_strengths=(0.6,), generated_fraction=1.5)
    plain = ScorerTrainConfig(out=str(tmp_path))
    assert plain.generated_strengths == ()
    # a catalog-only run's checkpoint key is the one it had before these settings existed
    assert _config_key(plain) == _config_key(ScorerTrainConfig(out=str(tmp_path), generated_fraction=0.9))
    assert _config_key(plain) != _config_key(ScorerTrainConfig(out=str(tmp_path), generated_strengths=(0.6,)))


def _centroids(x):
    """Column / row centroid (px) of the non-white ink of each image ``[B, 3, H, W]``."""
    ink = (1 - x.mean(1)).clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(x.shape[-2]).float(), torch.arange(x.shape[-1]).float(), indexing="ij")
    m = ink.sum((1, 2))
    return (ink * xs).sum((1, 2)) / m, (ink * ys).sum((1, 2)) / m


def test_augment_roam_lets_a_shrunk_sticker_reach_the_corners_and_zero_keeps_it_centred():
    from pmgen.train.scorer.trainer import augment

    x = torch.ones(64, 3, 64, 64)
    x[:, :, 16:48, 16:48] = 0.2  # a dark square sticker, centred
    offsets = {}
    for roam in (0.0, 1.0):
        out = augment(x.clone(), torch.Generator().manual_seed(3), zoom_min=0.5, zoom_max=0.5, roam=roam)
        cx, cy = _centroids(out)
        offsets[roam] = torch.maximum((cx - 31.5).abs(), (cy - 31.5).abs())
        # the whole sticker stays in the frame: about 16 × 16 dark pixels (half of 32 × 32), none cut off
        dark = (out.mean(1) < 0.6).sum((1, 2))
        assert int(dark.min()) >= 200 and int(dark.max()) <= 300, dark
    assert float(offsets[0.0].max()) < 2.0, offsets[0.0]
    assert float(offsets[1.0].max()) > 10.0, offsets[1.0]  # towards a corner (16 px is the edge)
    assert float(offsets[1.0].max()) <= 18.0  # the shrunk frame (32 px) reaches the edge, ±0.08 grid units more


def test_augment_settings_are_checked_and_the_original_augmentation_keeps_its_resume_key(tmp_path):
    import pytest

    from pmgen.train.scorer.config import ScorerTrainConfig
    from pmgen.train.scorer.trainer import _config_key, augment_options

    for bad, match in (({"zoom_min": 1.2}, "zoom_min"), ({"zoom_min": 0.1}, "zoom_min"), ({"roam": 2.0}, "roam")):
        with pytest.raises(ValueError, match=match):
            ScorerTrainConfig(out=str(tmp_path), **bad)
    plain = ScorerTrainConfig(out=str(tmp_path))
    robust = ScorerTrainConfig(out=str(tmp_path), zoom_min=0.5, roam=1.0)
    assert _config_key(plain) == _config_key(ScorerTrainConfig(out=str(tmp_path), zoom_min=0.85, roam=0.0))
    assert _config_key(plain) != _config_key(robust)
    assert augment_options(plain) == "" and augment_options(robust) == " --zoom-min 0.5 --roam 1"


def test_the_model_cards_command_names_steps_other_than_the_roles_default(tmp_path):
    from pmgen.train.scorer.config import ScorerTrainConfig
    from pmgen.train.scorer.trainer import steps_option

    assert steps_option(ScorerTrainConfig(out=str(tmp_path), role="evaluator")) == ""
    assert steps_option(ScorerTrainConfig(out=str(tmp_path), role="evaluator", steps=3000)) == " --steps 3000"
    from pmgen.train.scorer.trainer import seed_options

    assert seed_options(ScorerTrainConfig(out=str(tmp_path), role="selector")) == ""
    assert seed_options(ScorerTrainConfig(out=str(tmp_path), role="selector", seed=3, holdout_seed=103)) == \
        " --seed 3 --holdout-seed 103"


def test_shrunk_draws_the_sticker_small_in_the_top_left_corner():
    from pmgen.train.scorer.trainer import shrunk

    x = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    out = shrunk(x, 48)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert int(out[..., :48, :48].max()) == 0 and int(out[..., 48:, :].min()) == 255 and int(out[..., :, 48:].min()) == 255
