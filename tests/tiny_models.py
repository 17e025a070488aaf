"""Tiny random models built in code (diffusers-style dummy components), written to temp folders.

Nothing here downloads: tokenizers are written from a character vocabulary, weights are random.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> Path:
    """A character-level CLIP BPE tokenizer (no merges) saved to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,!?'-:;()":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=max_length)
    tok.save_pretrained(folder)
    return folder


def tiny_clip_text_config(vocab_size: int = 128, hidden: int = 32, max_positions: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                          layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=5, vocab_size=vocab_size,
                          max_position_embeddings=max_positions)


def write_tiny_sd_pipeline(folder: Path) -> Path:
    """A Stable Diffusion pipeline (UNet 32/64, VAE 32/64, 5-layer 32-wide CLIP) at 64×64, saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=64)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tok_dir = write_clip_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(tiny_clip_text_config(vocab_size=len(tokenizer)))
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder,
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def write_tiny_clip(folder: Path) -> Path:
    """A CLIPModel (32-wide towers, 32×32 images) with its tokenizer, saved to ``folder``."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(0)
    write_clip_tokenizer(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=4)
    cfg = CLIPConfig(text_config=tiny_clip_text_config().to_dict(), vision_config=vision.to_dict(),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    return folder


def write_tiny_bert(folder: Path) -> Path:
    """A 2-layer 32-wide BERT with a WordPiece tokenizer, saved to ``folder`` (a MiniLM stand-in)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase) + [
        "cat", "dog", "face", "grinning", "heart", "red", "happy", "sticker", "a", "of"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(dict.fromkeys(words)), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=128)).save_pretrained(folder)
    return folder


def write_tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama causal LM with a character tokenizer and a chat template, saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.printable[:95])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(folder)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    return folder


def tiny_sticker_generator(text_max_length: int = 16, cross_attention_dim: int = 32):
    """A random pmgen sticker generator (tiny VAE + UNet) conditioned on ``cross_attention_dim`` states."""
    from pmgen.models.generator import StickerGenerator, build_scheduler, build_unet, build_vae

    return StickerGenerator(build_vae((32, 32, 32)), build_unet((32, 32), attention_levels=1,
                                                                cross_attention_dim=cross_attention_dim, head_dim=16),
                            build_scheduler(), text_max_length=text_max_length)


def assert_resume_is_exact(make, tmp: Path, steps: int = 3):
    """Train ``steps`` straight, and 1 step + a resumed run to ``steps`` elsewhere: the same weights and data
    position. ``make(folder, max_steps=...)`` builds a trainer whose run lives in ``folder``. Returns the
    straight trainer."""
    straight = make(tmp / "a", max_steps=steps)
    straight.run()
    make(tmp / "b", max_steps=1).run()
    resumed = make(tmp / "b", max_steps=steps)
    assert resumed.load_checkpoint() and resumed.step == 1
    resumed.run()
    a, b = straight.encoder.trainable_state(), resumed.encoder.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed.step, resumed.epoch, resumed.pos) == (straight.step, straight.epoch, straight.pos)
    return straight
