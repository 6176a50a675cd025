"""The toy world: seeded procedural 64x64 images of one coloured shape on a coloured background.

Everything here is a pure function of its arguments (a seed, or explicit attributes), so data sets are
never stored: image ``i`` of a data set is ``generate(seed + i)`` on any machine.

Captions follow exactly this grammar (other code and tests rely on it)::

    a {colour} {shape} on a {colour} background
    a {colour} {shape} on a {colour} {texture} background

with colour in :data:`COLOURS`, shape in :data:`SHAPES`, texture in :data:`TEXTURES`, and the shape's colour
different from the background's.  Textures are drawn in a darker shade of the background colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

__all__ = [
    "SIZE",
    "COLOURS",
    "SHAPES",
    "TEXTURES",
    "PALETTE",
    "DARK_FACTOR",
    "Scene",
    "Sample",
    "caption",
    "parse_caption",
    "sample_scene",
    "scene_from_caption",
    "render",
    "generate",
    "generate_batch",
    "all_captions",
]

SIZE = 64
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("striped", "dotted")

#: Saturated, clearly distinct hues; channels stay inside (0, 255) so that clipping measures overshoot.
PALETTE = {
    "red": (220, 40, 40),
    "yellow": (225, 210, 40),
    "green": (40, 185, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 70, 225),
    "magenta": (210, 50, 205),
}
#: Texture marks are the background colour times this factor.
DARK_FACTOR = 0.55

_STRIPE_PERIOD = 8  # pixels; dark half, light half, horizontal stripes
_DOT_PERIOD = 8
_DOT_RADIUS = 2.0
_SUPERSAMPLE = 4  # anti-aliasing of the shape's edge: 4x4 sub-pixel coverage
_TEXTURE_PROBS = (0.5, 0.25, 0.25)  # none, striped, dotted


def _check_choice(name: str, value, accepted) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name}: got {value!r}; accepted values are {', '.join(accepted)}")
    return value


def caption(colour: str, shape: str, background: str, texture: Optional[str] = None) -> str:
    """The caption of a scene; raises ValueError naming the bad argument and what is accepted."""
    _check_choice("colour", colour, COLOURS)
    _check_choice("shape", shape, SHAPES)
    _check_choice("background", background, COLOURS)
    if texture is not None:
        _check_choice("texture", texture, TEXTURES)
    if colour == background:
        raise ValueError(
            f"background: got {background!r}, the same as colour {colour!r}; the shape's colour and the "
            f"background colour must differ (accepted: any of {', '.join(c for c in COLOURS if c != colour)})"
        )
    bg = background if texture is None else f"{background} {texture}"
    return f"a {colour} {shape} on a {bg} background"


_GRAMMAR = "'a {colour} {shape} on a {colour} background' or 'a {colour} {shape} on a {colour} {texture} background'"


def parse_caption(text: str) -> dict:
    """Inverse of :func:`caption`: ``{"colour", "shape", "background", "texture"}`` (texture may be None).

    Raises ValueError for text that does not follow the grammar, naming what is accepted.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption: expected a string, got {type(text).__name__}")
    words = text.strip().split()
    if len(words) not in (7, 8) or words[0] != "a" or words[3:5] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"caption: {text!r} does not follow the grammar {_GRAMMAR}")
    colour, shape, background = words[1], words[2], words[5]
    texture = words[6] if len(words) == 8 else None
    if shape not in SHAPES and colour in SHAPES:
        raise ValueError(f"caption: {text!r} does not follow the grammar {_GRAMMAR}")
    caption(colour, shape, background, texture)  # validates each part with a precise message
    return {"colour": colour, "shape": shape, "background": background, "texture": texture}


@dataclass(frozen=True)
class Scene:
    """Every attribute that determines an image."""

    colour: str
    shape: str
    background: str
    texture: Optional[str]
    cx: float  # centre, pixels
    cy: float
    radius: float  # half-size, pixels
    phase: int  # offset of the texture pattern, pixels

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background, self.texture)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (64, 64, 3) uint8
    mask: np.ndarray  # (64, 64) bool, True where the shape covers at least half the pixel
    caption: str
    scene: Scene


def _layout(rng: np.random.Generator) -> tuple[float, float, float, int]:
    radius = float(rng.uniform(9.0, 18.0))
    margin = radius + 3.0
    cx = float(rng.uniform(margin, SIZE - margin))
    cy = float(rng.uniform(margin, SIZE - margin))
    phase = int(rng.integers(0, _STRIPE_PERIOD))
    return cx, cy, radius, phase


def sample_scene(seed: int) -> Scene:
    """A random scene, a pure function of the seed."""
    rng = np.random.default_rng([int(seed), 0x70E])
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    others = [c for c in COLOURS if c != colour]
    background = others[int(rng.integers(len(others)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    texture = (None,) + TEXTURES
    texture = texture[int(rng.choice(3, p=_TEXTURE_PROBS))]
    cx, cy, radius, phase = _layout(rng)
    return Scene(colour, shape, background, texture, cx, cy, radius, phase)


def scene_from_caption(text: str, seed: int = 0) -> Scene:
    """A scene matching a caption, with the layout drawn from ``seed``."""
    attrs = parse_caption(text)
    rng = np.random.default_rng([int(seed), 0x1A7])
    cx, cy, radius, phase = _layout(rng)
    return Scene(attrs["colour"], attrs["shape"], attrs["background"], attrs["texture"], cx, cy, radius, phase)


def _coverage(scene: Scene) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (64, 64) float in [0, 1] (4x4 sub-pixel samples)."""
    s = _SUPERSAMPLE
    r = scene.radius
    y0, y1 = max(int(np.floor(scene.cy - r)) - 1, 0), min(int(np.ceil(scene.cy + r)) + 1, SIZE)
    x0, x1 = max(int(np.floor(scene.cx - r)) - 1, 0), min(int(np.ceil(scene.cx + r)) + 1, SIZE)
    ys = (np.arange(y0 * s, y1 * s) + 0.5) / s - scene.cy
    xs = (np.arange(x0 * s, x1 * s) + 0.5) / s - scene.cx
    dy, dx = ys[:, None], xs[None, :]
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    else:  # upward triangle inscribed in the same box: apex at the top centre, base at the bottom
        t = (dy + r) / (2 * r)  # 0 at the apex row, 1 at the base row
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    out = np.zeros((SIZE, SIZE))
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return out


@lru_cache(maxsize=None)
def _dots(phase: int) -> np.ndarray:
    s = _SUPERSAMPLE
    coords = (np.arange(SIZE * s) + 0.5) / s
    p = _DOT_PERIOD
    o = (coords + phase) % p - p / 2
    dots = o[:, None] ** 2 + o[None, :] ** 2 <= _DOT_RADIUS**2
    out = dots.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))
    out.setflags(write=False)
    return out


def _texture_mask(scene: Scene) -> np.ndarray:
    """Where the background is drawn in the darker shade, (64, 64) float in [0, 1]."""
    if scene.texture is None:
        return np.zeros((SIZE, SIZE))
    if scene.texture == "striped":
        rows = ((np.arange(SIZE) + scene.phase) % _STRIPE_PERIOD) < _STRIPE_PERIOD // 2
        return np.repeat(rows[:, None], SIZE, axis=1).astype(np.float64)
    return _dots(scene.phase)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (64, 64, 3), shape mask bool (64, 64))`` of a scene."""
    bg = np.array(PALETTE[scene.background], dtype=np.float64)
    fg = np.array(PALETTE[scene.colour], dtype=np.float64)
    tex = _texture_mask(scene)[..., None]
    background = bg * (1 - tex) + bg * DARK_FACTOR * tex
    cov = _coverage(scene)
    image = background * (1 - cov[..., None]) + fg * cov[..., None]
    return np.round(image).astype(np.uint8), cov >= 0.5


def generate(seed: int) -> Sample:
    """Sample ``seed`` of the toy world: image, shape mask, caption and scene."""
    scene = sample_scene(seed)
    image, mask = render(scene)
    return Sample(image, mask, scene.caption, scene)


def generate_batch(seeds) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(images uint8 (N, 64, 64, 3), captions, masks bool (N, 64, 64))`` for a sequence of seeds."""
    samples = [generate(int(s)) for s in seeds]
    return (
        np.stack([s.image for s in samples]),
        [s.caption for s in samples],
        np.stack([s.mask for s in samples]),
    )


def all_captions() -> list[str]:
    """Every caption of the grammar, in a fixed order (6 * 5 * 3 * 3 = 270)."""
    out = []
    for texture in (None,) + TEXTURES:
        for shape in SHAPES:
            for colour in COLOURS:
                for background in COLOURS:
                    if background != colour:
                        out.append(caption(colour, shape, background, texture))
    return out
