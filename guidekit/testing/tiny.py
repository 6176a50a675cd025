"""Builders of tiny Stable Diffusion 1.x and SDXL checkpoints with random weights."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import build_clip_tokenizer


def sd_ddim_scheduler(prediction_type: str = "epsilon", set_alpha_to_one: bool = False) -> DDIMScheduler:
    """A DDIM scheduler with Stable Diffusion's own schedule (scaled_linear 0.00085..0.012, no clipping)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def guidance_pairs(n_steps: int = 3, batch: int = 3, shape=(4, 6, 6), seed: int = 0):
    """Fixed (cond, uncond) prediction pairs for `n_steps` steps, for testing guidance math.

    Samples get very different norms (scales 0.1, 1 and 8), so that a norm threshold such as 5 rescales
    some samples and not others.
    """
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 8.0][:batch]).view(-1, 1, 1, 1)
    conds = [torch.randn(batch, *shape, generator=g) * scales for _ in range(n_steps)]
    unconds = [c + torch.randn(batch, *shape, generator=g) * scales for c in conds]
    return conds, unconds


def tiny_vae(sample_size: int = 32) -> AutoencoderKL:
    """A tiny random VAE (factor 2, 4 latent channels)."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=sample_size,
    )


def _text_encoder(hidden: int, projection: Optional[int] = None):
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
        projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def make_tiny_sd(folder: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny random SD 1.x checkpoint (UNet, VAE, CLIP text encoder, tokenizer, DDIM) to `folder`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=_text_encoder(32),
        tokenizer=build_clip_tokenizer(),
        scheduler=sd_ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def make_tiny_sdxl(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SDXL checkpoint (two text encoders, added time ids) to `folder`."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=_text_encoder(32),
        text_encoder_2=_text_encoder(32, projection=32),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        scheduler=sd_ddim_scheduler(),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def make_mid_unet(seed: int = 0) -> UNet2DConditionModel:
    """A UNet of about 100M parameters (random weights), for CPU timing benchmarks."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(192, 384, 768),
        layers_per_block=1,
        sample_size=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )


def _load(cls, maker, folder, **kwargs):
    if folder is None:
        folder = tempfile.mkdtemp(prefix="guidekit-tiny-")
    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        maker(folder, **kwargs)
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(folder: str | os.PathLike | None = None, cls=StableDiffusionPipeline, **kwargs):
    """Load (building it first if `folder` is empty or None) a tiny SD 1.x pipeline of class `cls`."""
    return _load(cls, make_tiny_sd, folder, **kwargs)


def tiny_sdxl_pipeline(folder: str | os.PathLike | None = None, cls=StableDiffusionXLPipeline, **kwargs):
    """Load (building it first if `folder` is empty or None) a tiny SDXL pipeline of class `cls`."""
    return _load(cls, make_tiny_sdxl, folder, **kwargs)
