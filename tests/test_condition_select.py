"""Weighting (conditions) and selection math."""

import math

import pytest
import torch

from pmgen.stages.condition import ConditionBuilder, keywords_text
from pmgen.stages.select import select, to_unit, weight_grid, z_score


class FakeTextEncoder:
    """token_states: deterministic per-token vectors; real tokens = words + [CLS] + [SEP]."""

    dim = 8

    def token_states(self, texts, max_length):
        out = torch.zeros(len(texts), max_length, self.dim)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = ["[CLS]"] + t.replace(",", " ,").split() + ["[SEP]"]
            toks = toks[: max_length - 1] + ["[SEP]"] if len(toks) > max_length else toks
            for j in range(max_length):
                tok = toks[j] if j < len(toks) else f"[PAD]{j}"
                g = torch.Generator().manual_seed(abs(hash(tok)) % (2**31))
                out[i, j] = torch.randn(self.dim, generator=g)
            mask[i, : len(toks)] = 1
        return out, mask


@pytest.fixture()
def builder():
    return ConditionBuilder(FakeTextEncoder(), max_length=16, mode="concat")


def test_w0_is_the_target_only_condition_in_both_modes():
    for mode in ("concat", "guidance", "compose"):
        b = ConditionBuilder(FakeTextEncoder(), max_length=16, mode=mode)
        base = b.build(["grinning face"], [], 0.0)
        c0 = b.build(["grinning face"], ["cat", "kitten"], 0.0, soft=torch.randn(4, 8))
        assert torch.equal(c0.prompt_embeds, base.prompt_embeds)
        assert torch.equal(c0.negative_prompt_embeds, base.negative_prompt_embeds)
        assert c0.extra_prompt_embeds is None and c0.n_preference_tokens == 0
        assert c0.prompt_embeds.shape == (1, 16, 8)


def test_concat_repeats_the_preference_unit(builder):
    pref = ["cat", "kitten"]  # real tokens: [CLS] cat , kitten [SEP] = 5
    soft = torch.randn(3, 8)
    c1 = builder.build(["grinning face"], pref, 1.0, soft)
    c2 = builder.build(["grinning face"], pref, 2.0, soft)
    c15 = builder.build(["grinning face"], pref, 1.5, soft)
    assert c1.n_preference_tokens == 5 + 3
    assert c2.n_preference_tokens == 2 * 8 and c2.prompt_embeds.shape == (1, 16 + 16, 8)
    assert c15.n_preference_tokens == 8 + 4
    # the unit is [P_real ; S], the soft rows sit right after the keyword tokens
    assert torch.equal(c1.prompt_embeds[0, 16 + 5:], soft)
    assert torch.equal(c2.prompt_embeds[0, 16:24], c2.prompt_embeds[0, 24:32])
    # the negative matches the condition's shape
    for c in (c1, c2, c15):
        assert c.negative_prompt_embeds.shape == c.prompt_embeds.shape
    # the first 16 positions are the target states unchanged
    assert torch.equal(c2.prompt_embeds[:, :16], builder.build(["grinning face"], [], 0).prompt_embeds)


def test_guidance_mode_condition(builder):
    b = ConditionBuilder(FakeTextEncoder(), max_length=16, mode="guidance")
    c = b.build(["grinning face"], ["cat"], 1.5)
    assert c.extra_scale == 1.5
    assert torch.equal(c.prompt_embeds, b.build(["grinning face"], [], 0).prompt_embeds)
    assert c.extra_prompt_embeds.shape == (1, 16 + 3, 8)


def test_compose_mode_condition_is_the_preference_alone_from_the_unconditional():
    from pmgen.stages.condition import COMPOSE_SCALE

    b = ConditionBuilder(FakeTextEncoder(), max_length=16, mode="compose")
    soft = torch.randn(3, 8)
    c = b.build(["grinning face"], ["cat"], 1.5, soft)
    assert c.extra_base == "uncond" and c.extra_scale == COMPOSE_SCALE * 1.5
    # the target's condition is untouched at every weight
    assert torch.equal(c.prompt_embeds, b.build(["grinning face"], [], 0).prompt_embeds)
    # the extra condition: the keywords as a whole prompt (padded, no target), then the soft rows
    assert c.extra_prompt_embeds.shape == (1, 16 + 3, 8)
    assert torch.equal(c.extra_prompt_embeds[0, :16], b.encode("cat")[0])
    assert torch.equal(c.extra_prompt_embeds[0, 16:], soft)
    # soft embeddings alone (no keywords): the empty prompt's states, then the soft rows
    c_soft = b.build(["grinning face"], [], 1.0, soft)
    assert torch.equal(c_soft.extra_prompt_embeds[0, :16], b.unconditional(16))


def test_overflowing_keywords_are_truncated_with_a_warning(builder):
    many = [f"word{i}" for i in range(40)]
    c = builder.build(["grinning face"], many, 1.0)
    assert c.n_preference_tokens == 16
    assert any("truncated" in w for w in c.warnings)


def test_no_preference_gives_target_alone(builder):
    c = builder.build(["grinning face"], [], 2.0)
    assert c.n_preference_tokens == 0 and any("no preference" in w for w in c.warnings)


def test_bad_inputs(builder):
    with pytest.raises(ValueError, match="weight"):
        builder.build(["x"], ["y"], -1)
    with pytest.raises(ValueError, match="soft embeddings"):
        builder.build(["x"], ["y"], 1, soft=torch.randn(4, 5))
    with pytest.raises(ValueError, match="mode"):
        ConditionBuilder(FakeTextEncoder(), mode="average")


def test_keywords_text():
    assert keywords_text([" cat", "kitten ", "", "  "]) == "cat, kitten"


# ----------------------------------------------------------------------------- selection


def test_z_score_math():
    d_t = torch.tensor([0.9, 0.5])
    d_p = torch.tensor([0.5, 0.9])
    z = z_score(d_t, d_p, alpha=2 / 3)
    assert z[0].item() == pytest.approx(2 / 3 * math.log(0.5) + 1 / 3 * math.log(0.9))
    assert z[1] > z[0]  # α = 2/3 favours personalization
    assert z_score(d_t, d_p, 0.0)[0] > z_score(d_t, d_p, 0.0)[1]  # α = 0: accuracy only
    with pytest.raises(ValueError):
        z_score(d_t, d_p, 1.5)
    assert to_unit(torch.tensor([-1.0, 0.0, 1.0])).tolist() == pytest.approx([1e-6, 0.5, 1.0])


class FakeSelector:
    """Image i's similarity to the j-th text ever asked about is ``sims[i][j]`` ("t" first, then "p"):
    texts are one-hot axes, images their rows of ``sims``."""

    def __init__(self, sims, img_sims=None):
        self.sims = torch.tensor(sims)
        self.img_sims = img_sims
        self.axes: dict[str, int] = {"t": 0, "p": 1}

    def image_embeddings(self, images):
        return self.sims

    def text_embeddings(self, texts):
        return torch.eye(self.sims.shape[1])[[self.axes.setdefault(t, len(self.axes)) for t in texts]]

    def text_similarity(self, images, texts):
        return self.image_embeddings(images) @ self.text_embeddings(texts).T

    def image_similarity(self, images, others):
        return torch.tensor(self.img_sims)


def test_select_argmax_and_ties():
    imgs = torch.zeros(3, 3, 8, 8)
    # columns: target text, preference text
    sel = select(imgs, FakeSelector([[0.8, 0.0], [0.6, 0.5], [0.2, 0.6]]), "t", "p", alpha=2 / 3)
    expected = [2 / 3 * math.log((1 + p) / 2) + 1 / 3 * math.log((1 + t) / 2) for t, p in [(0.8, 0), (0.6, 0.5), (0.2, 0.6)]]
    assert sel.z == pytest.approx(expected, rel=1e-5)
    assert sel.chosen == max(range(3), key=lambda i: expected[i])
    tie = select(torch.zeros(2, 3, 8, 8), FakeSelector([[0.5, 0.5], [0.5, 0.5]]), "t", "p")
    assert tie.chosen == 0  # ties go to the smaller weight (the first candidate)
    acc = select(imgs, FakeSelector([[0.8, 0.0], [0.6, 0.5], [0.2, 0.6]]), "t", "p", alpha=0.0)
    assert acc.chosen == 0


def test_select_without_preferences_and_with_history():
    imgs = torch.zeros(2, 3, 8, 8)
    sel = select(imgs, FakeSelector([[0.3, 0.9], [0.5, 0.0]]), "t", "", alpha=2 / 3)
    assert sel.d_p == [1.0, 1.0] and sel.chosen == 1
    hist = select(imgs, FakeSelector([[0.5, 0.5], [0.5, 0.5]], img_sims=[[0.9, 0.9], [0.1, 0.1]]), "t", "p",
                  history_images=torch.zeros(2, 3, 8, 8), history_weight=0.5)
    assert hist.d_h == pytest.approx([0.95, 0.55]) and hist.chosen == 0


def test_weight_grid():
    assert weight_grid("1, 0.5,2") == [0.0, 0.5, 1.0, 2.0]
    assert weight_grid([2, 1, 1]) == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        weight_grid("-1")


def test_min_accuracy_guard_refuses_candidates_that_lose_the_target():
    from pmgen.stages.select import argmax_z, keeps_target

    d_t = [0.80, 0.78, 0.50]  # w = 0, 1, 2: the last one lost the target
    z = [-0.5, -0.4, -0.1]  # ... but scores best on z
    assert argmax_z(z) == 2
    ok = keeps_target(d_t, 0.9)
    assert ok == [True, True, False] and argmax_z(z, ok) == 1
    assert keeps_target(d_t, 0.0) == [True, True, True]
    assert argmax_z(z, [True, False, False]) == 0  # the baseline is always eligible
    with pytest.raises(ValueError):
        keeps_target(d_t, 1.5)


class EmbeddingSelector:
    """A selector that, like the real scorers, scores by unit embeddings: text ``"t"`` is axis 0,
    ``"p"`` axis 1, every other text (other users' preferences) axis 2."""

    def __init__(self, emb):
        self.emb = torch.tensor(emb)
        self.image_passes = 0

    def image_embeddings(self, images):
        self.image_passes += 1
        return self.emb

    def text_embeddings(self, texts):
        axis = {"t": 0, "p": 1}
        return torch.stack([torch.eye(3)[axis.get(t, 2)] for t in texts])

    def text_similarity(self, images, texts):
        return self.image_embeddings(images) @ self.text_embeddings(texts).T


def test_contrast_measures_the_preference_against_the_background():
    from pmgen.stages.select import background_embedding

    imgs = torch.zeros(3, 3, 8, 8)
    # candidate 2 is closest to the preference text but only because it is close to *every* user's text
    # columns: similarity to the target text, to the preference text, to the other users' texts
    sel = EmbeddingSelector([[0.8, 0.30, 0.0], [0.8, 0.40, 0.05], [0.8, 0.45, 0.4]])
    bg = background_embedding(sel, ["cats, kitten", "space, rocket", ""])  # empty texts are skipped
    assert bg.tolist() == pytest.approx([0.0, 0.0, 1.0])
    plain = select(imgs, sel, "t", "p", alpha=2 / 3)
    sel.image_passes = 0
    contrasted = select(imgs, sel, "t", "p", alpha=2 / 3, background=bg, contrast=1.0)
    assert sel.image_passes == 1  # the candidates go through the image tower once
    assert plain.chosen == 2 and contrasted.chosen == 1
    assert contrasted.d_p == pytest.approx([(1 + 0.30) / 2, (1 + 0.35) / 2, (1 + 0.05) / 2])
    assert contrasted.d_t == plain.d_t  # accuracy is untouched
    half = select(imgs, sel, "t", "p", background=bg, contrast=0.5)
    assert half.d_p[2] == pytest.approx((1 + 0.45 - 0.2) / 2)
    assert select(imgs, sel, "t", "", background=bg, contrast=1.0).d_p == [1.0, 1.0, 1.0]  # no preference: neutral
    with pytest.raises(ValueError, match="background"):
        select(imgs, sel, "t", "p", contrast=1.0)
    with pytest.raises(ValueError, match="contrast"):
        select(imgs, sel, "t", "p", background=bg, contrast=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        background_embedding(sel, ["", "  "])


class AxisSelector(EmbeddingSelector):
    """Unit embeddings: "t" axis 0, "p" axis 1, history names "h1" / "h2" axes 2 / 3, anything else axis 4."""

    def text_embeddings(self, texts):
        axis = {"t": 0, "p": 1, "h1": 2, "h2": 3}
        return torch.stack([torch.eye(5)[axis.get(t, 4)] for t in texts])


def test_history_names_and_both_as_the_preference_side():
    imgs = torch.zeros(2, 3, 8, 8)
    # columns: target, keywords, history name 1, history name 2, other users' texts
    sel = AxisSelector([[0.8, 0.6, 0.0, 0.2, 0.1], [0.7, 0.1, 0.5, 0.5, 0.3]])
    bg = torch.eye(5)[4]
    kw = select(imgs, sel, "t", "p", history_texts=["h1", "h2"])  # the default source ignores the names
    assert kw.d_p == pytest.approx([0.8, 0.55]) and kw.chosen == 0
    hist = select(imgs, sel, "t", "p", history_texts=["h1", "h2", " "], preference_source="history",
                  background=bg, contrast=1.0)  # blank names are skipped; no background on the user's own names
    assert hist.d_p == pytest.approx([(1 + 0.1) / 2, (1 + 0.5) / 2]) and hist.chosen == 1
    assert hist.d_t == kw.d_t
    both = select(imgs, sel, "t", "p", history_texts=["h1", "h2"], preference_source="both", background=bg,
                  contrast=0.5)
    assert both.d_p == pytest.approx([(1 + 0.35 - 0.05) / 2, (1 + 0.3 - 0.15) / 2])
    no_kw = select(imgs, sel, "t", "", history_texts=["h1", "h2"], preference_source="both")
    assert no_kw.d_p == pytest.approx(hist.d_p)  # no keywords: the names alone
    for source in ("history", "both"):  # no names: the keywords, as before
        assert select(imgs, sel, "t", "p", preference_source=source).d_p == kw.d_p
    with pytest.raises(ValueError, match="preference_source"):
        select(imgs, sel, "t", "p", preference_source="taste")


def test_ensemble_scorer_is_the_mean_of_its_members():
    from pmgen.models.scorer import EnsembleScorer

    a = AxisSelector([[0.8, 0.6, 0.0, 0.0, 0.6], [0.0, 1.0, 0.0, 0.0, 0.0]])
    b = AxisSelector([[0.6, 0.8, 0.0, 0.0, 0.0], [0.6, 0.0, 0.8, 0.0, 0.0]])
    for m, n in ((a, "a"), (b, "b")):
        m.name, m.content_hash = n, n * 4
    ens = EnsembleScorer([a, b])
    imgs = torch.zeros(2, 3, 8, 8)
    texts = ["t", "p", "h1"]
    assert ens.text_similarity(imgs, texts) == pytest.approx(
        ((a.text_similarity(imgs, texts) + b.text_similarity(imgs, texts)) / 2), abs=1e-6)
    from pmgen.stages.select import background_embedding

    bgs = [background_embedding(m, ["x", "p"]) for m in (a, b, ens)]
    e = [m.image_embeddings(imgs) for m in (a, b, ens)]
    assert e[2] @ bgs[2] == pytest.approx((e[0] @ bgs[0] + e[1] @ bgs[1]) / 2, abs=1e-6)
    assert (ens.name, ens.content_hash) == ("a+b", "aaaa+bbbb")
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleScorer([a])
