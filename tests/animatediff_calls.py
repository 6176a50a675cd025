"""Calls of the tiny AnimateDiff test pipelines shared by the FreeNoise tests: 2 steps, 16 px, latents out."""

import torch

KW = dict(prompt="a red circle", height=16, width=16, num_inference_steps=2, output_type="latent")


def load(cls, folder, **kwargs):
    """`cls.from_pretrained(folder)` without progress bars."""
    pipe = cls.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video(pipe, num_frames, seed=0, **kw):
    """The video latents (B, C, F, h, w) of one seeded call; `kw` overrides `KW` (a `generator` replaces the seed)."""
    generator = kw.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(num_frames=num_frames, generator=generator, **{**KW, **kw}).frames
