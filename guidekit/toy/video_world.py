"""The toy video world: the image world's scenes with the shape moving at a constant velocity, bouncing off the walls.

A clip is a :class:`~.world.Scene` (caption, colours, size, texture: everything the image world draws) plus a
velocity.  The shape's centre moves ``(vx, vy)`` pixels per frame and reflects off the walls of the box in which the
shape stays whole inside the frame, so a clip of any length keeps the shape in view and has an exact, known
trajectory.  The background and its texture stay still.  Like the image world, everything is a pure function of a
seed: clip ``i`` of a data set is ``generate_clip(seed + i, frames)`` on any machine, and a longer clip of the same
seed starts with the shorter one (real long videos exist as ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from .world import SIZE, Scene, as_version, parse_caption, render, sample_scene, scene_from_caption

__all__ = [
    "SPEED_RANGE",
    "WALL_MARGIN",
    "Clip",
    "VideoSample",
    "sample_clip",
    "clip_from_caption",
    "centre_at",
    "trajectory",
    "render_clip",
    "generate_clip",
    "generate_clips",
]

#: Speed of the shape's centre in pixels per frame, drawn uniformly per clip (direction uniform on the circle).
#: At 1-2 px a frame a 16-frame clip moves the shape by about its own radius or more, so motion is plain to
#: see, while a frame-to-frame step stays small next to the shape (radius 9-18 px).
SPEED_RANGE = (1.0, 2.0)
#: The shape's box stays at least this many pixels inside the frame (the image world keeps 3).
WALL_MARGIN = 1.0


@dataclass(frozen=True)
class Clip:
    """A moving scene: the shape starts at ``scene.cx, scene.cy`` and moves ``(vx, vy)`` pixels per frame."""

    scene: Scene
    vx: float
    vy: float

    @property
    def caption(self) -> str:
        return self.scene.caption


@dataclass(frozen=True)
class VideoSample:
    frames: np.ndarray  # (F, 64, 64, 3) uint8
    masks: np.ndarray  # (F, 64, 64) bool
    centres: np.ndarray  # (F, 2) float64, the shape's centre (x, y) in pixels per frame
    caption: str
    clip: Clip


def _check_frames(frames) -> int:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames: got {frames!r}; accepted: a positive integer")
    return int(frames)


def _velocity(rng: np.random.Generator) -> tuple[float, float]:
    speed = float(rng.uniform(*SPEED_RANGE))
    angle = float(rng.uniform(0.0, 2 * np.pi))
    return speed * np.cos(angle), speed * np.sin(angle)


def sample_clip(seed: int) -> Clip:
    """A random clip: the image world's scene ``seed`` (same caption, colours and start layout) and a velocity."""
    rng = np.random.default_rng([int(seed), 0x71D])
    return Clip(sample_scene(seed), *_velocity(rng))


def clip_from_caption(text: str, seed: int = 0) -> Clip:
    """A clip matching a caption; layout, colours (within their bands) and velocity drawn from ``seed``."""
    parse_caption(text)  # a clear error for text outside the grammar
    rng = np.random.default_rng([int(seed), 0x71E])
    return Clip(scene_from_caption(text, seed), *_velocity(rng))


def _reflect(start: float, velocity: float, low: float, high: float, t: np.ndarray) -> np.ndarray:
    """Position at times ``t`` of a point moving at ``velocity`` from ``start`` and bouncing between low and high.

    Unfolding the bounces gives a straight line; folding it back is a triangle wave of period 2 (high - low).
    """
    span = high - low
    if span <= 0:
        return np.full(t.shape, low)
    u = np.mod(start - low + velocity * t, 2 * span)
    return low + np.where(u <= span, u, 2 * span - u)


def _bounds(clip: Clip) -> tuple[float, float]:
    r = clip.scene.radius
    return r + WALL_MARGIN, SIZE - r - WALL_MARGIN


def trajectory(clip: Clip, frames: int) -> np.ndarray:
    """The shape's centre (x, y) in pixels at frames 0..frames-1, (frames, 2) float64."""
    t = np.arange(_check_frames(frames), dtype=np.float64)
    low, high = _bounds(clip)
    x = _reflect(clip.scene.cx, clip.vx, low, high, t)
    y = _reflect(clip.scene.cy, clip.vy, low, high, t)
    return np.stack([x, y], axis=1)


def centre_at(clip: Clip, frame: int) -> tuple[float, float]:
    """The shape's centre (x, y) at one frame."""
    x, y = trajectory(clip, int(frame) + 1)[-1]
    return float(x), float(y)


def render_clip(clip: Clip, frames: int, version: int = 2) -> VideoSample:
    """Draw ``frames`` frames of a clip in world ``version``: the scene with its centre moved, frame by frame."""
    scene = as_version(clip.scene, version)
    centres = trajectory(clip, frames)
    images, masks = [], []
    for x, y in centres:
        image, mask = render(replace(scene, cx=float(x), cy=float(y)))
        images.append(image)
        masks.append(mask)
    return VideoSample(np.stack(images), np.stack(masks), centres, clip.caption, clip)


def generate_clip(seed: int, frames: int = 16, version: int = 2) -> VideoSample:
    """Clip ``seed`` of the video world: ``frames`` frames, masks, centres, caption."""
    return render_clip(sample_clip(seed), frames, version)


def generate_clips(seeds, frames: int = 16, version: int = 2,
                   captions: Optional[list] = None) -> tuple[np.ndarray, list[str]]:
    """``(clips uint8 (N, F, 64, 64, 3), captions)`` for a sequence of seeds (``captions``: draw these instead)."""
    if captions is None:
        samples = [generate_clip(int(s), frames, version) for s in seeds]
    else:
        samples = [render_clip(clip_from_caption(c, int(s)), frames, version) for s, c in zip(seeds, captions)]
    return np.stack([s.frames for s in samples]), [s.caption for s in samples]
