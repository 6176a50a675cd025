"""A tiny random AnimateDiff (SD 1.x + motion adapter) checkpoint, for tests and examples."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, MotionAdapter

from .tiny import make_tiny_sd


def tiny_motion_adapter(max_length: int = 16, seed: int = 0) -> MotionAdapter:
    """A random `MotionAdapter` matching `make_tiny_sd`'s UNet (blocks (16, 32), one layer per block).

    Its `proj_out` layers keep diffusers' random initialisation (not AnimateDiff's zero one), so the motion
    modules change the output and any mistake in running them shows.

    Args:
        max_length (`int`, defaults to `16`): `motion_max_seq_length`, the longest sequence the positional
            embedding covers.
        seed (`int`, defaults to `0`): the seed of the random weights.
    """
    torch.manual_seed(seed)
    return MotionAdapter(
        block_out_channels=(16, 32),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=max_length,
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
