"""The `{frame: prompt}` schedules of the AnimateDiff pipelines: argument checks and per-frame blending.

Shared by `GuidedAnimateDiffPipeline` (SD 1.x) and `GuidedAnimateDiffSDXLPipeline`; each pipeline encodes
the distinct prompts with its own text encoder(s) and hands the embeddings here.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Optional

import torch

from guidekit.video import blend_embeddings, interpolate_prompt_schedule


def check_prompt_schedule(
    prompt: Mapping, num_frames: int, negatives: Optional[Mapping[str, object]] = None, name: str = "prompt"
) -> None:
    """Raise a `ValueError` unless `prompt` is a non-empty `{frame: str}` dict with frames in [0, num_frames).

    Args:
        prompt (`dict[int, str]`): the schedule.
        num_frames (`int`): F; key frames must lie in [0, F).
        negatives (`dict[str, object]`, *optional*): argument name → value of the negative prompts, each of
            which must be a single str or None (one negative prompt for every frame).
        name (`str`, defaults to `"prompt"`): the argument's name in the messages.
    """
    if not prompt:
        raise ValueError(f"{name}: an empty dict is not accepted; accepted: {{frame: prompt}} with at least one entry")
    for frame, text in prompt.items():
        if not isinstance(frame, int) or isinstance(frame, bool) or not 0 <= frame < num_frames:
            raise ValueError(
                f"{name}: frame key {frame!r} is not accepted; accepted: integer frames from 0 to {num_frames - 1}"
            )
        if not isinstance(text, str):
            raise ValueError(f"{name}[{frame}]: a {type(text).__name__} is not accepted; accepted: a str")
    for negative_name, negative in (negatives or {}).items():
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"{negative_name}: with a {{frame: prompt}} dict, accepted: a single str or None")


def blend_prompt_schedule(
    keys: Mapping[int, Hashable], num_frames: int, embeds_by_key: Mapping[Hashable, torch.Tensor]
) -> torch.Tensor:
    """Per-frame embeddings (F, ...) of a `{frame: key}` schedule, linearly blended between key frames.

    Frames before the first key take the first key's embedding, frames after the last key the last one's
    (`guidekit.video.interpolate_prompt_schedule`); a frame on one key gets that key's embedding exactly.

    Args:
        keys (`dict[int, key]`): {frame: key}, the keys indexing `embeds_by_key` (prompts, or pairs of prompts).
        num_frames (`int`): F.
        embeds_by_key (`dict[key, torch.Tensor]`): one embedding per key, all of one shape.
    """
    return blend_embeddings(embeds_by_key, interpolate_prompt_schedule(keys, num_frames))
