"""Measures of a toy-world video read back by the judge: per-frame attributes, the shape's track, seams, smoothness.

Every measure is a pure function of uint8 frames (F, 64, 64, 3) and captions, so the world's own clips
(:mod:`.video_world`) can be measured exactly like a model's videos, as a reference row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .judge import Judgement, judge_batch
from .world import parse_caption

__all__ = [
    "TELEPORT_FACTOR",
    "TELEPORT_FLOOR",
    "VideoReading",
    "frames_to_uint8",
    "read_video",
    "frames_correct",
    "centroids",
    "teleports",
    "seam_score",
    "smoothness",
    "mean_speed",
    "max_jump",
]

#: A frame-to-frame centroid step is a teleport when it exceeds this many times the video's median step ...
TELEPORT_FACTOR = 3.0
#: ... and this many pixels (so that sub-pixel jitter of a nearly still shape is not called a teleport).
TELEPORT_FLOOR = 2.0


@dataclass
class VideoReading:
    judgements: list[Judgement]
    centroids: np.ndarray  # (F, 2) x, y in pixels; nan where the judge found no shape


def frames_to_uint8(frames) -> np.ndarray:
    """A pipeline's float frames in [0, 1] (F, H, W, 3) as the uint8 frames every measure here reads."""
    return np.round(np.clip(np.asarray(frames), 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: got an array of shape {frames.shape} and dtype {frames.dtype}; "
                         "accepted: uint8 (F, H, W, 3)")
    return frames


def centroids(judgements: Sequence[Judgement]) -> np.ndarray:
    """The centre of mass (x, y) of each frame's judged shape mask, (F, 2); nan where no shape was found."""
    out = np.full((len(judgements), 2), np.nan)
    for i, j in enumerate(judgements):
        if j.mask is not None and j.mask.any():
            ys, xs = np.nonzero(j.mask)
            out[i] = xs.mean() + 0.5, ys.mean() + 0.5
    return out


def read_video(frames) -> VideoReading:
    """Judge every frame and track the shape's centroid."""
    judgements = judge_batch(_check_frames(frames))
    return VideoReading(judgements, centroids(judgements))


def frames_correct(judgements: Sequence[Judgement], captions) -> np.ndarray:
    """Per frame, whether the judge reads every attribute its caption asks for (colour, shape, background,
    texture); ``captions`` is one caption for all frames or one per frame."""
    if isinstance(captions, str):
        captions = [captions] * len(judgements)
    if len(captions) != len(judgements):
        raise ValueError(f"captions: got {len(captions)} for {len(judgements)} frames")
    out = []
    for j, text in zip(judgements, captions):
        want = parse_caption(text)
        out.append(j.colour == want["colour"] and j.shape == want["shape"] and j.background == want["background"]
                   and j.texture == want["texture"])
    return np.array(out, dtype=bool)


def _steps(track: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(track, axis=0), axis=1)  # nan where either frame has no shape


def teleports(track: np.ndarray, factor: float = TELEPORT_FACTOR, floor: float = TELEPORT_FLOOR) -> int:
    """Frame-to-frame jumps of the centroid larger than ``factor`` x the median step and ``floor`` pixels.

    A step from or to a frame where the shape was not found counts as a teleport too (the shape vanished).
    """
    steps = _steps(track)
    finite = steps[np.isfinite(steps)]
    if finite.size == 0:
        return int(steps.size)
    limit = max(factor * float(np.median(finite)), floor)
    return int(np.sum(~np.isfinite(steps)) + np.sum(finite > limit))


def mean_speed(track: np.ndarray) -> float:
    """Median centroid step in pixels per frame (nan if the shape is never found twice in a row)."""
    steps = _steps(track)
    steps = steps[np.isfinite(steps)]
    return float(np.median(steps)) if steps.size else float("nan")


def smoothness(track: np.ndarray) -> dict:
    """How far the track is from constant velocity: mean |second difference| (acceleration) and mean |third
    difference| (jerk) of the centroid, px/frame^2 and px/frame^3, over the frames where all are defined.

    The world's own clips are exactly constant-velocity between bounces; a wall bounce shows as one spike.
    """
    acc = np.linalg.norm(np.diff(track, n=2, axis=0), axis=1)
    jerk = np.linalg.norm(np.diff(track, n=3, axis=0), axis=1)
    acc, jerk = acc[np.isfinite(acc)], jerk[np.isfinite(jerk)]
    return {"accel": float(acc.mean()) if acc.size else float("nan"),
            "jerk": float(jerk.mean()) if jerk.size else float("nan")}


def seam_score(frames, boundaries: Sequence[int]) -> float:
    """Mean change across the given boundaries over the typical change: mean over b of |x_b − x_{b−1}| (mean
    absolute pixel difference) divided by the median of that difference over all consecutive frames.

    About 1 means a boundary looks like any other frame step; well above 1, a visible seam.
    """
    x = _check_frames(frames).astype(np.float64)
    diffs = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))
    bounds = [int(b) for b in boundaries]
    if not bounds or any(b < 1 or b >= len(x) for b in bounds):
        raise ValueError(f"boundaries: got {boundaries!r}; accepted: frame indices from 1 to {len(x) - 1}")
    typical = float(np.median(diffs))
    return float(np.mean([diffs[b - 1] for b in bounds]) / max(typical, 1e-9))


def max_jump(track: np.ndarray, start: int, stop: int) -> Optional[float]:
    """The largest centroid step between frames in [start, stop) over the video's median step (nan if undefined)."""
    steps = _steps(track)
    finite = steps[np.isfinite(steps)]
    window = steps[start:stop - 1]
    if finite.size == 0 or window.size == 0:
        return float("nan")
    if not np.all(np.isfinite(window)):
        return float("inf")
    return float(window.max() / max(float(np.median(finite)), 1e-9))
