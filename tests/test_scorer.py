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


def test_config_validation():
    import pytest

    with pytest.raises(ValueError, match="arch"):
        ScorerConfig(arch="vit")
    with pytest.raises(ValueError, match="multiples of 8"):
        ScorerConfig(widths=(30,))
