"""Tiny random flow-matching checkpoints (SD3 layout first), built offline with the configs of diffusers' own
fast tests; tokenizers are built here instead of downloaded."""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from .tokenizer import build_clip_tokenizer

__all__ = ["build_t5_tokenizer", "tiny_t5_encoder", "tiny_flow_vae", "make_tiny_sd3", "tiny_sd3_components"]

_T5_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def build_t5_tokenizer() -> T5Tokenizer:
    """An offline T5 (Unigram) tokenizer: one token per character, "▁"-prefixed at word starts, plus T5's specials.

    Vocabulary: <pad> 0, </s> 1, <unk> 2, "▁", the characters, "▁" + each character, and <extra_id_99..0>.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in _T5_CHARS] + [("▁" + c, -4.0) for c in _T5_CHARS]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(d_model: int = 32, seed: int = 0) -> T5EncoderModel:
    """A tiny random T5 encoder whose vocabulary covers `build_t5_tokenizer()`."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=200, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    return T5EncoderModel(config).eval()


def fast_test_clip_config() -> CLIPTextConfig:
    """The CLIP text config of diffusers' SD3 and Flux fast tests."""
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )


def _clip_with_projection(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(fast_test_clip_config()).eval()


def tiny_flow_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """diffusers' fast-test VAE for SD3 and Flux (factor 1, with SD3.5's shift and scale)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_sd3_components(seed: int = 0, shift: float = 1.0) -> dict:
    """The components of diffusers' SD3 fast test (random weights), with offline tokenizers."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_flow_vae(seed=seed),
        text_encoder=_clip_with_projection(seed),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_clip_with_projection(seed + 1),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed=seed),
        tokenizer_3=build_t5_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )


def make_tiny_sd3(folder: str | os.PathLike, seed: int = 0, shift: float = 1.0) -> Path:
    """Save a tiny random `StableDiffusion3Pipeline` to `folder` (loadable with `from_pretrained`)."""
    folder = Path(folder)
    StableDiffusion3Pipeline(**tiny_sd3_components(seed, shift)).save_pretrained(folder)
    return folder
