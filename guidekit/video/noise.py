"""FreeNoise's noise rescheduling: the math core (torch only).

FreeNoise (Qiu et al., ICLR 2024, arXiv 2310.15169) starts a long video from noise whose frames after the
first window are block-shuffled copies of earlier frames, so every window sees the noise the model was
trained on, rearranged locally (official code: scripts/evaluation/inference_freenoise.py L98–102 of
AILab-CVC/FreeNoise; METHODS.md §3.1, FREENOISE.md §3.3). The blocks follow the window plan of
`guidekit.video.windows.plan_windows`: the frames each window adds to the previous one form one block.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..checks import check_choice
from ._args import check_int, check_tensor
from .windows import plan_windows

__all__ = ["NOISE_MODES", "reschedule_noise", "shuffle_sources"]

#: "shuffle": the official sequential block shuffle; "repeat": the first window tiled; "random": fresh
#: i.i.d. noise after the first window.
NOISE_MODES = ("shuffle", "repeat", "random")

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def _permutation(size: int, generator: Optional[torch.Generator]) -> list[int]:
    # drawn on the generator's own device, as torch requires; the same call diffusers makes per block
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(size, generator=generator, device=device).tolist()


def shuffle_sources(
    num_frames: int,
    context_length: int = 16,
    context_stride: int = 4,
    generator: Optional[torch.Generator] = None,
    max_length: Optional[int] = None,
) -> list[int]:
    """For each frame, the frame of the original noise it copies under the official FreeNoise shuffle.

    The official loop (VideoCrafter `inference_freenoise.py`), with W = `context_length`, S = `context_stride`:
    for k = W, W+S, W+2S, … < F, the block [k, k+S) becomes a random permutation of the frames
    [k−W, k−W+S) of the sequence *as rescheduled so far* (blocks run left to right, so later blocks copy
    copies, and every frame ends up a copy of a frame < W). When F − W is not a multiple of S the last block
    [k, F) is shorter: a permutation of the full source block is drawn and its first F − k entries are used
    (the official code fails on the shape mismatch there; this is diffusers' resolution). Block k is the part
    of a window of `plan_windows(F, W, S)` that the previous window does not cover.

    One `torch.randperm(S, generator=generator)` is drawn per block, in order, as diffusers does.

    Args:
        num_frames (`int`): F, >= 1.
        context_length (`int`, defaults to `16`): W.
        context_stride (`int`, defaults to `4`): S, 1 <= S <= W.
        generator (`torch.Generator`, *optional*): source of the permutations; torch's default one if None.
        max_length (`int`, *optional*): the motion model's positional limit; W above it is refused.

    Returns:
        A list `source` of F frame indices: rescheduled frame f is original frame `source[f]`; source[f] = f for f < W.
    """
    plan = plan_windows(num_frames, context_length, context_stride, max_length)
    source = list(range(num_frames))
    for (_, block_start), (_, block_stop) in zip(plan, plan[1:]):
        permutation = _permutation(context_stride, generator)
        first = block_start - context_length  # the source block [k−W, k−W+S) lies before k, already rescheduled
        block = [source[first + p] for p in permutation[: block_stop - block_start]]
        source[block_start:block_stop] = block
    return source


def _check_generators(generator, batch_size: int) -> list[Optional[torch.Generator]]:
    """One entry per sample for a list, [generator] for one generator or None."""
    accepted = f"None, a torch.Generator, or a list of {batch_size} torch.Generator (one per sample)"
    if generator is None or isinstance(generator, torch.Generator):
        return [generator]
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"generator: a list of {len(generator)} items is not accepted; accepted: {accepted}")
        return list(generator)
    raise ValueError(f"generator: a {type(generator).__name__} is not accepted; accepted: {accepted}")


def _fresh_noise(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def reschedule_noise(
    noise: torch.Tensor,
    context_length: int = 16,
    context_stride: int = 4,
    generator: Generators = None,
    mode: str = "shuffle",
    num_frames: Optional[int] = None,
    max_length: Optional[int] = None,
) -> torch.Tensor:
    """FreeNoise's noise rescheduling of the initial noise x_T (official: inference_freenoise.py L98–102).

    With W = `context_length` and F frames, frames < W are kept and frames >= W are made by `mode`:

    * "shuffle" (official): the sequential block shuffle of `shuffle_sources`.
    * "repeat": frame f is frame f mod W (the first window tiled).
    * "random": fresh i.i.d. Gaussian noise from `generator` (a baseline without rescheduling).

    F <= W returns a copy of `noise` (one window: nothing to reschedule).

    Randomness: with one generator (or None) all samples share one permutation per block, like the
    official code and diffusers, and the permutations are the same `randperm` draws diffusers makes after
    drawing the noise. With a list, sample b uses only `generator[b]`, so a sample does not depend on the
    batch it is in.

    Differences from diffusers' `_prepare_latents_free_noise` (noise_type="shuffle_context" | "repeat_context" |
    "random"): its "repeat_context" tests the context length against a string, so it is never taken and
    returns plain noise; its "random" redraws every frame, here frames < W are kept so that all modes share
    the first window; a list of generators fails in its `randperm`, here it is one generator per sample; user
    latents of W frames fail in its shuffle, here `num_frames` extends W frames to F.

    Args:
        noise (`torch.Tensor`): the noise, in diffusers' video-latent layout (B, C, F, H, W); not modified.
        context_length (`int`, defaults to `16`): W, the motion model's training length.
        context_stride (`int`, defaults to `4`): S, the block size, 1 <= S <= W.
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): for the permutations ("shuffle")
            or the fresh noise ("random"); one per sample if a list.
        mode (`str`, defaults to `"shuffle"`): one of "shuffle", "repeat", "random".
        num_frames (`int`, *optional*): F of the result. None: the frames of `noise`. Otherwise `noise` must
            have F frames or (for F > W) just the first W, which are then extended to F.
        max_length (`int`, *optional*): the motion model's positional limit; W above it is refused.

    Returns:
        A new tensor (B, C, F, H, W) with `noise`'s dtype and device.
    """
    check_tensor("noise", noise, 5, "(B, C, F, H, W)")
    mode = check_choice("mode", mode, NOISE_MODES)
    given = noise.shape[2]
    if num_frames is None:
        num_frames = given
    num_frames = check_int("num_frames", num_frames, 1)
    plan_windows(num_frames, context_length, context_stride, max_length)  # checks W and S
    if given != num_frames and not (num_frames > context_length and given == context_length):
        raise ValueError(
            f"noise: {given} frames are not accepted for num_frames={num_frames}; accepted: {num_frames} frames"
            + (f" or the first context_length={context_length}" if num_frames > context_length else "")
        )
    generators = _check_generators(generator, noise.shape[0])
    if num_frames <= context_length:
        return noise.clone()
    first = noise[:, :, :context_length]
    if mode == "repeat":
        index = torch.tensor([f % context_length for f in range(num_frames)], device=noise.device)
        return first.index_select(2, index)
    if mode == "random":
        batch, channels, _, height, width = noise.shape
        rest = num_frames - context_length
        if len(generators) == 1:
            fresh = _fresh_noise((batch, channels, rest, height, width), generators[0], noise)
        else:
            fresh = torch.cat([_fresh_noise((1, channels, rest, height, width), g, noise) for g in generators])
        return torch.cat([first, fresh], dim=2)
    samples = []
    for g in generators:
        source = shuffle_sources(num_frames, context_length, context_stride, g, max_length)
        samples.append(torch.tensor(source, device=noise.device))
    if len(samples) == 1:
        return first.index_select(2, samples[0])  # every source frame is < W
    return torch.stack([first[b].index_select(1, index) for b, index in enumerate(samples)])
