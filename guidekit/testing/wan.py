"""Tiny random Wan text-to-video checkpoints (Wan 2.1 layout, Wan 2.2's two experts and its TI2V-5B layout), built
offline with the configs of diffusers' own Wan fast tests; the T5 tokenizer is built in code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from transformers import UMT5Config, UMT5EncoderModel

from .flow import build_t5_tokenizer

__all__ = [
    "WAN_VARIANTS",
    "wan_scheduler",
    "tiny_umt5_encoder",
    "tiny_wan_transformer",
    "tiny_wan_vae",
    "tiny_wan_components",
    "make_tiny_wan",
    "tiny_wan_pipeline",
]

#: The layouts `make_tiny_wan` builds: "wan2.1" (one transformer), "wan2.2" (a second expert below
#: `boundary_ratio` 0.875, as Wan2.2-T2V-A14B), "wan2.2-low-only" (only `transformer_2`, `boundary_ratio` 1.0,
#: as diffusers' optional-component test) and "wan2.2-ti2v" (48-channel patchified VAE, per-token timesteps).
WAN_VARIANTS = ("wan2.1", "wan2.2", "wan2.2-low-only", "wan2.2-ti2v")


def wan_scheduler(kind: str = "euler"):
    """A fresh flow scheduler for the tiny Wan pipelines.

    Args:
        kind (`str`, defaults to `"euler"`): `"euler"` is diffusers' Wan fast-test scheduler,
            FlowMatchEulerDiscreteScheduler(shift=7); `"unipc"` is the one the Wan checkpoints ship,
            UniPC with `prediction_type="flow_prediction"`, `use_flow_sigmas=True`, `flow_shift=3` (int64 timesteps).
    """
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=7.0)
    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    raise ValueError(f"kind: {kind!r} is not accepted; accepted: 'euler', 'unipc'")


def tiny_umt5_encoder(seed: int = 0) -> UMT5EncoderModel:
    """A tiny random UMT5 encoder (Wan's text encoder family; d_model 32 = the transformer's `text_dim`) whose
    vocabulary covers `build_t5_tokenizer()`."""
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=200, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8
    )
    return UMT5EncoderModel(config).eval()


def tiny_wan_transformer(channels: int = 16, seed: int = 0) -> WanTransformer3DModel:
    """diffusers' fast-test WanTransformer3DModel (2 layers, 2 heads of 12, text dim 32) with random weights."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_wan_vae(ti2v: bool = False, seed: int = 0) -> AutoencoderKLWan:
    """diffusers' fast-test AutoencoderKLWan: 16 latent channels, spatial factor 8, temporal factor 4, Wan 2.1's
    per-channel latent mean/std; with `ti2v`, Wan 2.2 TI2V's 48 channels, patch 2 and spatial factor 16."""
    torch.manual_seed(seed)
    if ti2v:
        return AutoencoderKLWan(
            base_dim=3,
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            temperal_downsample=[False, True, True],
        )
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def tiny_wan_components(variant: str = "wan2.1", scheduler: str = "euler", seed: int = 0) -> dict:
    """The components of diffusers' Wan fast tests (random weights), with a UMT5 encoder of the fast test's T5
    size and the offline T5 tokenizer.

    Args:
        variant (`str`, defaults to `"wan2.1"`): one of `WAN_VARIANTS`.
        scheduler (`str`, defaults to `"euler"`): `"euler"` or `"unipc"`, see `wan_scheduler`.
        seed (`int`, defaults to 0): seed of the weights; the second expert gets `seed + 1`, so that the two
            experts differ (diffusers' test seeds both with 0, which would hide a wrong expert).
    """
    if variant not in WAN_VARIANTS:
        raise ValueError(f"variant: {variant!r} is not accepted; accepted: {', '.join(WAN_VARIANTS)}")
    ti2v = variant == "wan2.2-ti2v"
    channels = 48 if ti2v else 16
    components = dict(
        tokenizer=build_t5_tokenizer(),
        text_encoder=tiny_umt5_encoder(seed=seed),
        vae=tiny_wan_vae(ti2v=ti2v, seed=seed),
        scheduler=wan_scheduler(scheduler),
        transformer=tiny_wan_transformer(channels, seed=seed),
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=ti2v,
    )
    if variant in ("wan2.2", "wan2.2-low-only"):
        components["transformer_2"] = tiny_wan_transformer(channels, seed=seed + 1)
        components["boundary_ratio"] = 0.875
    if variant == "wan2.2-low-only":
        # boundary 1.0: every step is below it, so only the low-noise expert runs (diffusers' own test case)
        components["transformer"] = None
        components["boundary_ratio"] = 1.0
    return components


def make_tiny_wan(
    folder: str | os.PathLike, variant: str = "wan2.1", scheduler: str = "euler", seed: int = 0
) -> Path:
    """Save a tiny random `WanPipeline` to `folder` (loadable with `from_pretrained`); arguments as in
    `tiny_wan_components`."""
    folder = Path(folder)
    WanPipeline(**tiny_wan_components(variant, scheduler, seed)).save_pretrained(folder)
    return folder


def tiny_wan_pipeline(folder: str | os.PathLike, cls=WanPipeline, scheduler: Optional[str] = None, **components):
    """Load a tiny Wan checkpoint saved by `make_tiny_wan` as `cls`, with a fresh scheduler of kind `scheduler`
    (see `wan_scheduler`; None: the saved one) and any `components` given instead of the saved ones."""
    kwargs = dict(components)
    if scheduler is not None:
        kwargs["scheduler"] = wan_scheduler(scheduler)
    pipe = cls.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
