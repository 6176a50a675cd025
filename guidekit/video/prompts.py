"""FreeNoise's multi-prompt schedules and motion-injection step rule: the math core (torch only).

FreeNoise (Qiu et al., ICLR 2024, arXiv 2310.15169) conditions each frame on its own text embedding, linearly
interpolated between prompts, and during the first and last denoising steps lets the down- and mid-block
cross-attention read one fixed prompt instead ("motion injection"). METHODS.md §3.3, FREENOISE.md §3.4 and §5.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, NamedTuple

import torch

from ..checks import check_number
from ..precision import math_dtype
from ._args import check_int

__all__ = [
    "PromptBlend",
    "blend_embeddings",
    "interpolate_prompt_schedule",
    "official_two_prompt_schedule",
    "uses_fixed_prompt",
]


class PromptBlend(NamedTuple):
    """One frame's embedding: (1 − t)·embeds[key_a] + t·embeds[key_b]."""

    key_a: Hashable
    key_b: Hashable
    t: float


def interpolate_prompt_schedule(prompts: Mapping[int, Hashable], num_frames: int) -> list[PromptBlend]:
    """Per-frame linear interpolation between key frames (diffusers' FreeNoise prompt travel).

    For consecutive key frames s < e with keys A and B, frame f in [s, e] gets t = (f − s)/(e − s), so the key
    frames themselves get exactly their own key (diffusers' `_lerp`, inclusive of both ends). Frames after the
    last key keep the last key (diffusers extends the last prompt to frame F − 1); frames before the first key
    keep the first key. diffusers requires a key at frame 0 and raises otherwise; with a key at 0 the
    schedules agree, except for F = 1, where diffusers' loop over key pairs is empty and leaves the
    embedding at zero.

    Args:
        prompts (`dict[int, key]`): {frame: key}, frames in [0, F); a key is anything hashable that indexes
            the embeddings later (a prompt string, an index).
        num_frames (`int`): F, >= 1.

    Returns:
        A list of F `PromptBlend`s, one per frame. Frames held on one key get (key, key, 0.0).
    """
    num_frames = check_int("num_frames", num_frames, 1)
    if not isinstance(prompts, Mapping) or not prompts:
        raise ValueError(
            f"prompts: {prompts!r} is not accepted; accepted: a non-empty dict {{frame: key}} with frames in "
            f"[0, {num_frames - 1}]"
        )
    for frame in prompts:
        check_int("prompts key (a frame index)", frame, 0, num_frames - 1, extra=" (num_frames − 1)")
    frames = sorted(prompts)
    schedule = [PromptBlend(prompts[frames[0]], prompts[frames[0]], 0.0)] * frames[0]
    for start, stop in zip(frames, frames[1:]):
        a, b = prompts[start], prompts[stop]
        schedule += [PromptBlend(a, b, (f - start) / (stop - start)) for f in range(start, stop)]
    last = prompts[frames[-1]]
    schedule += [PromptBlend(last, last, 0.0)] * (num_frames - frames[-1])
    return schedule


def official_two_prompt_schedule(num_frames: int, first: Hashable = 0, second: Hashable = 1) -> list[PromptBlend]:
    """The official FreeNoise two-prompt schedule (funcs.py `batch_ddim_sampling_freenoise_mp`, AILab-CVC/FreeNoise).

    With L1 = ⌊3F/8⌋ and L2 = F − 2·L1: frames [0, L1) use `first`, the middle L2 frames step linearly from
    `first` to `second` (frame L1 + i gets t = i/(L2 − 1), both ends included), and the last L1 frames use
    `second`. The official code divides by L2 − 1, which is 0 for F = 1 and F = 3; there the one middle frame
    gets t = 1/2. (One earlier revision of the official file used ⌊2F/8⌋; the current one uses ⌊3F/8⌋.)

    Args:
        num_frames (`int`): F, >= 1.
        first (key, defaults to `0`): the key of prompt A (the first prompt).
        second (key, defaults to `1`): the key of prompt B (the last prompt, also the fixed one of motion injection).

    Returns:
        A list of F `PromptBlend`s (`first`, `second`, t).
    """
    num_frames = check_int("num_frames", num_frames, 1)
    held = 3 * num_frames // 8
    middle = num_frames - 2 * held
    steps = [0.5] if middle == 1 else [i / (middle - 1) for i in range(middle)]
    ts = [0.0] * held + steps + [1.0] * held
    return [PromptBlend(first, second, t) for t in ts]


def blend_embeddings(embeds_by_key: Any, schedule: list[PromptBlend]) -> torch.Tensor:
    """The per-frame embeddings of a schedule: frame f is (1 − t)·E[key_a] + t·E[key_b].

    Computed in float64 (`guidekit.precision.math_dtype`) and cast back, so every frame is within one
    rounding of the exact blend, and a frame with t = 0, t = 1 or key_a == key_b is exactly its key's embedding.

    Args:
        embeds_by_key (`dict`, `list` or `torch.Tensor`): E, indexed by the schedule's keys; all embeddings
            have one shape (e.g. (tokens, dim)), dtype and device.
        schedule (`list[PromptBlend]`): from `interpolate_prompt_schedule` or `official_two_prompt_schedule`;
            plain (key_a, key_b, t) triples are accepted too.

    Returns:
        A tensor (F, *embedding shape) in the embeddings' dtype and on their device.
    """
    if not schedule:
        raise ValueError("schedule: an empty schedule is not accepted; accepted: one (key_a, key_b, t) per frame")
    keys: dict = {}
    for entry in schedule:
        try:
            key_a, key_b, t = entry
        except (TypeError, ValueError):
            raise ValueError(f"schedule: entry {entry!r} is not accepted; accepted: (key_a, key_b, t)") from None
        check_number("schedule t", t, 0.0, 1.0)
        for key in (key_a, key_b):
            if key not in keys:
                try:
                    keys[key] = embeds_by_key[key]
                except (KeyError, IndexError, TypeError):
                    raise ValueError(
                        f"embeds_by_key: has no embedding for key {key!r}; accepted: one per key"
                    ) from None
    stacked = list(keys.values())
    reference = stacked[0]
    for key, value in keys.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(
                f"embeds_by_key[{key!r}]: a {type(value).__name__} is not accepted; accepted: a float tensor"
            )
        if value.shape != reference.shape or value.dtype != reference.dtype or value.device != reference.device:
            raise ValueError(
                f"embeds_by_key[{key!r}]: shape {tuple(value.shape)} {value.dtype} on {value.device} is not accepted; "
                f"accepted: shape {tuple(reference.shape)} {reference.dtype} on {reference.device}, like the others"
            )
    dtype = math_dtype(reference.device)
    index = {key: i for i, key in enumerate(keys)}
    mix = torch.zeros(len(schedule), len(keys), dtype=dtype)
    for frame, (key_a, key_b, t) in enumerate(schedule):
        t = float(t)
        if key_a == key_b or t == 0.0:
            mix[frame, index[key_a]] = 1.0
        elif t == 1.0:
            mix[frame, index[key_b]] = 1.0
        else:
            mix[frame, index[key_a]] = 1.0 - t
            mix[frame, index[key_b]] = t
    table = torch.stack([v.to(dtype) for v in stacked]).flatten(1)
    blended = mix.to(reference.device) @ table
    return blended.view(len(schedule), *reference.shape).to(reference.dtype)


def uses_fixed_prompt(step_index: int, num_steps: int, t_a: float = 0.1, t_b: float = 0.3) -> bool:
    """Motion injection's step rule: whether the injected layers read the fixed prompt at this step.

    The official code (ddim_mp.py `p_sample_ddim`, AILab-CVC/FreeNoise) passes `use_injection=True` to the
    conditional UNet call when `step < 5 or step > 15` of 50 DDIM steps (step 0 the noisiest). With the bounds
    as fractions of the steps, T_a = t_a·N and T_b = t_b·N, the rule is i < T_a or i > T_b; the defaults give
    the official steps 0–4 and 16–49 of 50. Between T_a and T_b every layer reads the per-frame prompts.

    Args:
        step_index (`int`): i, the denoising step, 0 <= i < num_steps, 0 the noisiest.
        num_steps (`int`): N, the number of denoising steps, >= 1.
        t_a (`float`, defaults to `0.1`): T_a / N, in [0, 1].
        t_b (`float`, defaults to `0.3`): T_b / N, in [t_a, 1].

    Returns:
        True where the fixed prompt is used (i < T_a or i > T_b), False otherwise.
    """
    num_steps = check_int("num_steps", num_steps, 1)
    step_index = check_int("step_index", step_index, 0, num_steps - 1, extra=" (num_steps − 1)")
    t_a = check_number("t_a", t_a, 0.0, 1.0)
    t_b = check_number("t_b", t_b, 0.0, 1.0)
    if t_a > t_b:
        raise ValueError(f"t_a: {t_a} must not exceed t_b: {t_b}; accepted: 0 <= t_a <= t_b <= 1")
    return step_index < _bound(t_a, num_steps) or step_index > _bound(t_b, num_steps)


def _bound(fraction: float, num_steps: int) -> float:
    # 0.29·100 is 28.999999999999996 in floating point; a bound that is an integer up to rounding is that integer
    value = fraction * num_steps
    nearest = round(value)
    return float(nearest) if math.isclose(value, nearest, rel_tol=1e-9, abs_tol=1e-9) else value
