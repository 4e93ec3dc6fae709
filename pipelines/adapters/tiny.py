"""Tiny random text-to-image pipeline and CLIP directories, in the standard diffusers/transformers layouts.

For tests and demos (nothing is downloaded): the same loaders that read a real Stable Diffusion or CLIP checkpoint
read these.

    python -m pipelines.adapters.tiny OUT_DIR     # writes OUT_DIR/sd (unet/, text_encoder/, tokenizer/, vae/,
                                                  # scheduler/, model_index.json), OUT_DIR/sd3 and OUT_DIR/clip

- ``write_tiny_sd(path)``: ``UNet2DConditionModel`` (two blocks, one cross-attention block, cross-attention dim 32,
  latents 4 x 8 x 8), ``CLIPTextModel`` (hidden 32, two layers), a byte-level CLIP tokenizer with a vocabulary and
  merges written here (16 tokens per prompt), ``AutoencoderKL`` (two blocks: a factor-2 decoder, images
  3 x 16 x 16) and Stable Diffusion's DDIM schedule (scaled-linear betas 0.00085 to 0.012, 1000 steps, epsilon
  prediction, ``steps_offset`` 1, ``set_alpha_to_one`` False).
- ``write_tiny_sd3(path)``: the rectified-flow counterpart (``SD3Transformer2DModel``, two CLIP text encoders,
  no T5, ``FlowMatchEulerDiscreteScheduler``), for ``pipelines.adapters.stable_diffusion_3``.
- ``write_tiny_clip(path)``: ``CLIPModel`` (text and vision towers of width 32, projection 16, 16 x 16 images in
  patches of 4) with the same tokenizer.

Weights are random with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

__all__ = ["TINY_WORDS", "write_tiny_tokenizer", "write_tiny_sd", "write_tiny_sd3", "write_tiny_clip", "main"]

TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "house")
"""Words with their own token (merges written for them); any other text falls back to byte tokens."""
MAX_TOKENS = 16
CROSS_ATTENTION_DIM = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte, in CLIP's vocabulary order (the printable
    bytes as themselves, then the others mapped to characters from 256 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's layout: bytes, bytes ending a word (``</w>``), merged tokens, then the two special tokens."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in TINY_WORDS:
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: p h -> ph, ph o -> pho, ...
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tiny_tokenizer(path: str | Path) -> Path:
    """A CLIP tokenizer directory (vocab.json, merges.txt, tokenizer config) with :data:`MAX_TOKENS` per prompt."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"),
                              model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(str(path))
    return path


def _text_config(vocab_size: int, eos_id: int, bos_id: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=bos_id, eos_token_id=eos_id,
                pad_token_id=eos_id, projection_dim=16)


def write_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Stable-Diffusion-class pipeline directory at ``path`` (module docstring)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(path / "tokenizer")
    vocab, _ = _vocab_and_merges()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=4, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(len(vocab), vocab[EOS], vocab[BOS])))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16, scaling_factor=0.18215,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    unet.save_pretrained(str(path / "unet"))
    text_encoder.save_pretrained(str(path / "text_encoder"))
    vae.save_pretrained(str(path / "vae"))
    scheduler.save_pretrained(str(path / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def write_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Stable-Diffusion-3-class directory at ``path``: ``SD3Transformer2DModel`` (two layers, latents
    4 x 8 x 8, patches of 2, joint attention dim 32), two ``CLIPTextModelWithProjection`` (hidden 16, projection 16:
    their concatenated states fill the joint dim, their pooled outputs the pooled dim 32) with the tiny tokenizer, no
    T5 (diffusers then uses zeros), ``FlowMatchEulerDiscreteScheduler`` (shift 3) and a 4-channel ``AutoencoderKL``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, _ = _vocab_and_merges()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    transformer.save_pretrained(str(path / "transformer"))
    for suffix in ("", "_2"):
        write_tiny_tokenizer(path / f"tokenizer{suffix}")
        text = _text_config(len(vocab), vocab[EOS], vocab[BOS])
        text.update(hidden_size=16, intermediate_size=24, num_attention_heads=2)
        CLIPTextModelWithProjection(CLIPTextConfig(**text)).save_pretrained(str(path / f"text_encoder{suffix}"))
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16, scaling_factor=1.5305, shift_factor=0.0609,
    ).save_pretrained(str(path / "vae"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(str(path / "scheduler"))
    index = {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": [None, None], "tokenizer_3": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def write_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` directory with its tokenizer at ``path`` (module docstring)."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    write_tiny_tokenizer(path)
    vocab, _ = _vocab_and_merges()
    text = _text_config(len(vocab), vocab[EOS], vocab[BOS])
    text.pop("projection_dim")
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4, num_channels=3)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random SD-class pipeline and a tiny CLIP model.")
    parser.add_argument("out", help="directory; receives sd/, sd3/ and clip/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(write_tiny_sd(out / "sd", seed=args.seed))
    print(write_tiny_sd3(out / "sd3", seed=args.seed))
    print(write_tiny_clip(out / "clip", seed=args.seed))


if __name__ == "__main__":
    main()
