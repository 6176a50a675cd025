"""A tiny random Flux.1 checkpoint, built offline with the configs of diffusers' own Flux fast test (the CLIP and
T5 tokenizers are built here instead of downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from .flow import build_t5_tokenizer, fast_test_clip_config, tiny_flow_vae, tiny_t5_encoder
from .tokenizer import build_clip_tokenizer

__all__ = ["tiny_flux_components", "make_tiny_flux"]


def _clip_text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(fast_test_clip_config()).eval()


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = False) -> dict:
    """The components of diffusers' Flux fast test (random weights), with offline tokenizers.

    Args:
        seed (`int`, defaults to 0): seed of the random weights.
        guidance_embeds (`bool`, defaults to `False`): build a guidance-distilled transformer (Flux.1-dev's
            layout: the embedded `guidance_scale` is an input of the model) instead of a plain one.

    The VAE has factor 1 and one latent channel, so an 8x8 image is 16 packed tokens of 4 channels. The scheduler
    is Flux.1's (dynamic shift: mu from the number of image tokens, base 0.5 at 256 tokens, max 1.15 at 4096).
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=tiny_flow_vae(latent_channels=1, seed=seed),
        text_encoder=_clip_text_encoder(seed),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed=seed),
        tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def make_tiny_flux(folder: str | os.PathLike, seed: int = 0, guidance_embeds: bool = False) -> Path:
    """Save a tiny random `FluxPipeline` to `folder` (loadable with `from_pretrained`); see `tiny_flux_components`."""
    folder = Path(folder)
    FluxPipeline(**tiny_flux_components(seed, guidance_embeds)).save_pretrained(folder)
    return folder
