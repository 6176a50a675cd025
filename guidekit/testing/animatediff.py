"""Tiny random AnimateDiff checkpoints (SD 1.x or SDXL image model + motion adapter), for tests and examples."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, AnimateDiffSDXLPipeline, MotionAdapter, UNet2DConditionModel

from .tiny import make_tiny_sd, make_tiny_sdxl


def tiny_motion_adapter(max_length: int = 16, seed: int = 0, use_motion_mid_block: bool = True) -> MotionAdapter:
    """A random `MotionAdapter` matching `make_tiny_sd`'s and `make_tiny_sdxl`'s UNets (blocks (16, 32), one
    layer per block).

    Its `proj_out` layers keep diffusers' random initialisation (not AnimateDiff's zero one), so the motion
    modules change the output and any mistake in running them shows.

    Args:
        max_length (`int`, defaults to `16`): `motion_max_seq_length`, the longest sequence the positional
            embedding covers.
        seed (`int`, defaults to `0`): the seed of the random weights.
        use_motion_mid_block (`bool`, defaults to `True`): whether the mid block gets a motion module (the SDXL
            AnimateDiff adapters, e.g. "sdxl-beta", have none).
    """
    torch.manual_seed(seed)
    return MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=max_length,
        use_motion_mid_block=use_motion_mid_block,
    )


def make_tiny_animatediff(folder: str | os.PathLike, max_length: int = 16, seed: int = 0) -> Path:
    """Write a tiny random AnimateDiff checkpoint to `folder` (image model and adapter each saved and reloaded).

    Args:
        folder (`str` or `os.PathLike`): where the pipeline folder is written (`model_index.json` at its root).
        max_length (`int`, defaults to `16`): the adapter's `motion_max_seq_length`.
        seed (`int`, defaults to `0`): the seed of the random weights.
    """
    folder = Path(folder)
    image_dir, adapter_dir = folder / "_image", folder / "_adapter"
    make_tiny_sd(image_dir, seed=seed)
    tiny_motion_adapter(max_length, seed).save_pretrained(str(adapter_dir))
    pipe = AnimateDiffPipeline.from_pretrained(
        str(image_dir), motion_adapter=MotionAdapter.from_pretrained(str(adapter_dir))
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_tiny_animatediff_sdxl(
    folder: str | os.PathLike, max_length: int = 16, seed: int = 0, use_motion_mid_block: bool = False
) -> Path:
    """Write a tiny random AnimateDiff SDXL checkpoint (`AnimateDiffSDXLPipeline` folder) to `folder`.

    The image model (`make_tiny_sdxl`: two text encoders, added time ids) and the adapter are each saved and
    reloaded, then joined as users join them, `AnimateDiffSDXLPipeline.from_pretrained(sdxl, motion_adapter=...)`.
    diffusers' `UNetMotionModel.from_unet2d` leaves the SDXL added-embedding MLP (`add_embedding`, which reads
    the pooled text embedding and the size/crop ids) at its random initialisation; it is copied from the image
    UNet here, so the checkpoint is the image model plus motion modules.

    Args:
        folder (`str` or `os.PathLike`): where the pipeline folder is written (`model_index.json` at its root).
        max_length (`int`, defaults to `16`): the adapter's `motion_max_seq_length`.
        seed (`int`, defaults to `0`): the seed of the random weights.
        use_motion_mid_block (`bool`, defaults to `False`): whether the mid block gets a motion module too.
    """
    folder = Path(folder)
    image_dir, adapter_dir = folder / "_image", folder / "_adapter"
    make_tiny_sdxl(image_dir, seed=seed)
    tiny_motion_adapter(max_length, seed, use_motion_mid_block).save_pretrained(str(adapter_dir))
    pipe = AnimateDiffSDXLPipeline.from_pretrained(
        str(image_dir), motion_adapter=MotionAdapter.from_pretrained(str(adapter_dir))
    )
    image_unet = UNet2DConditionModel.from_pretrained(str(image_dir), subfolder="unet")
    pipe.unet.add_embedding.load_state_dict(image_unet.add_embedding.state_dict())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
