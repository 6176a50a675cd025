"""The toy world: seeded procedural 64x64 images of one coloured shape on a coloured background.

Everything here is a pure function of its arguments (a seed, or explicit attributes), so data sets are
never stored: image ``i`` of a data set is ``generate(seed + i)`` on any machine.

Captions follow exactly this grammar (other code and tests rely on it)::

    a {colour} {shape} on a {colour} background
    a {colour} {shape} on a {colour} {texture} background

with colour in :data:`COLOURS`, shape in :data:`SHAPES`, texture in :data:`TEXTURES`, and the shape's colour
different from the background's.  Textures are drawn in a darker shade of the background colour.

World v2 (this module): each colour word names a *band* of colours rather than one colour.  Per image, the
shape's and the background's colours are drawn separately: hue within ±:data:`HUE_BAND` degrees of the
word's canonical hue (:data:`HUES`, the six primary and secondary hues 60° apart, so neighbouring bands stay
40° apart), saturation uniform in :data:`SATURATION_RANGE`, value uniform in :data:`VALUE_RANGE`.  The shape
carries a gentle linear shading (its value varies by at most ±:data:`SHADE_MAX` across it).  The bands are
chosen so that no channel of any image reaches 0 or 255: "clipped" then measures overshoot only.

The v1 world (the fixed colours of :data:`PALETTE`, no shading; every PALETTE colour lies inside its band) is
still drawn by a :class:`Scene` whose tones are None.  Captions, sizes, positions and textures are drawn
exactly as in v1, so image ``i`` of either world has the same caption and layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import numpy as np

__all__ = [
    "SIZE",
    "COLOURS",
    "SHAPES",
    "TEXTURES",
    "PALETTE",
    "HUES",
    "HUE_BAND",
    "SATURATION_RANGE",
    "VALUE_RANGE",
    "SHADE_MAX",
    "DARK_FACTOR",
    "hsv_to_rgb",
    "Scene",
    "Sample",
    "caption",
    "parse_caption",
    "sample_scene",
    "scene_from_caption",
    "shape_coverage",
    "render",
    "generate",
    "generate_batch",
    "VERSIONS",
    "as_version",
    "all_captions",
]

SIZE = 64
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("striped", "dotted")

#: The v1 world's fixed colours (saturated, clearly distinct; channels inside (0, 255)).  Each lies inside its
#: v2 band (hue within HUE_BAND of HUES, saturation and value inside their ranges); a Scene without tones uses them.
PALETTE = {
    "red": (220, 40, 40),
    "yellow": (225, 210, 40),
    "green": (40, 185, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 70, 225),
    "magenta": (210, 50, 205),
}
#: Canonical hue of each colour word, degrees: the primary and secondary hues, evenly spaced.
HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}
#: A colour's hue lies within this many degrees of its canonical hue (bands of different words stay 40° apart).
HUE_BAND = 10.0
#: Saturation and value of a colour are drawn uniformly from these ranges, per image, for shape and background.
#: The ranges keep every channel inside (0, 255): the darkest one, a texture mark of a value-0.55,
#: saturation-0.95 background, is 255 * 0.55 * 0.55 * 0.05 = 3.9; the brightest, 255 * 0.95 * (1 + SHADE_MAX), 252.
SATURATION_RANGE = (0.5, 0.95)
VALUE_RANGE = (0.55, 0.95)
#: The shape's value is scaled by 1 + a * (position along a random direction, -1..1), a <= SHADE_MAX.
SHADE_MAX = 0.04
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


Tone = tuple[float, float, float]  # (hue offset from the word's canonical hue in degrees, saturation, value)


@dataclass(frozen=True)
class Scene:
    """Every attribute that determines an image.

    A tone stores the hue as an *offset* from the colour word's canonical hue, so that a scene with another
    colour word (``dataclasses.replace(scene, colour=...)``) is still a valid scene of the world.  Tones of
    None mean the v1 world's fixed :data:`PALETTE` colour; ``shade`` is ``(amplitude, angle in radians)``.
    """

    colour: str
    shape: str
    background: str
    texture: Optional[str]
    cx: float  # centre, pixels
    cy: float
    radius: float  # half-size, pixels
    phase: int  # offset of the texture pattern, pixels
    fg_tone: Optional[Tone] = None  # the shape's colour
    bg_tone: Optional[Tone] = None  # the background's colour (texture marks: its value times DARK_FACTOR)
    shade: tuple[float, float] = (0.0, 0.0)

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background, self.texture)

    @property
    def fg_hsv(self) -> tuple[float, float, float]:
        """The shape's colour as (hue in degrees [0, 360), saturation, value), before shading."""
        return _hsv(self.colour, self.fg_tone)

    @property
    def bg_hsv(self) -> tuple[float, float, float]:
        """The background's colour as (hue in degrees [0, 360), saturation, value); texture marks are darker."""
        return _hsv(self.background, self.bg_tone)


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (64, 64, 3) uint8
    mask: np.ndarray  # (64, 64) bool, True where the shape covers at least half the pixel
    caption: str
    scene: Scene


def hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """RGB in [0, 255] (float64, shape (3,)) of a colour given as hue in degrees, saturation and value in [0, 1]."""
    h = (float(hue) % 360.0) / 60.0
    c = value * saturation
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return (np.array(rgb, dtype=np.float64) + (value - c)) * 255.0


def _rgb_to_hsv(rgb) -> tuple[float, float, float]:
    r, g, b = (float(v) / 255.0 for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    d = hi - lo
    if d == 0:
        hue = 0.0
    elif hi == r:
        hue = 60.0 * (((g - b) / d) % 6)
    elif hi == g:
        hue = 60.0 * ((b - r) / d + 2)
    else:
        hue = 60.0 * ((r - g) / d + 4)
    return hue, (d / hi if hi > 0 else 0.0), hi


def _hsv(colour: str, tone: Optional[Tone]) -> tuple[float, float, float]:
    if tone is None:
        return _rgb_to_hsv(PALETTE[colour])
    dh, sat, val = tone
    return (HUES[colour] + dh) % 360.0, sat, val


def _draw_tone(rng: np.random.Generator) -> Tone:
    dh = float(rng.uniform(-HUE_BAND, HUE_BAND))
    sat = float(rng.uniform(*SATURATION_RANGE))
    val = float(rng.uniform(*VALUE_RANGE))
    return dh, sat, val


def _draw_colours(rng: np.random.Generator) -> tuple[Tone, Tone, tuple[float, float]]:
    """Shape tone, background tone, shading.  Drawn after the layout, so captions and layouts match v1's."""
    fg, bg = _draw_tone(rng), _draw_tone(rng)
    shade = (float(rng.uniform(0.0, SHADE_MAX)), float(rng.uniform(0.0, 2 * np.pi)))
    return fg, bg, shade


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
    return Scene(colour, shape, background, texture, cx, cy, radius, phase, *_draw_colours(rng))


def scene_from_caption(text: str, seed: int = 0) -> Scene:
    """A scene matching a caption, with the layout and the colours (within their bands) drawn from ``seed``."""
    attrs = parse_caption(text)
    rng = np.random.default_rng([int(seed), 0x1A7])
    cx, cy, radius, phase = _layout(rng)
    return Scene(attrs["colour"], attrs["shape"], attrs["background"], attrs["texture"], cx, cy, radius, phase,
                 *_draw_colours(rng))


def shape_coverage(shape: str, cx: float, cy: float, rx: float, ry: Optional[float] = None,
                   size: int = SIZE) -> np.ndarray:
    """Fraction of each pixel covered by a shape, (size, size) float in [0, 1] (4x4 sub-pixel samples).

    The shape fills the box ``[cx - rx, cx + rx] x [cy - ry, cy + ry]`` (pixels; ``ry`` defaults to ``rx``):
    a circle (an ellipse if rx != ry), a square (rectangle), or an upward triangle inscribed in the box (apex
    at the top centre, base along the bottom).
    """
    _check_choice("shape", shape, SHAPES)
    ry = rx if ry is None else ry
    if not (rx > 0 and ry > 0):
        raise ValueError(f"rx, ry: half-sizes must be positive, got {rx!r}, {ry!r}")
    s = _SUPERSAMPLE
    y0, y1 = max(int(np.floor(cy - ry)) - 1, 0), min(int(np.ceil(cy + ry)) + 1, size)
    x0, x1 = max(int(np.floor(cx - rx)) - 1, 0), min(int(np.ceil(cx + rx)) + 1, size)
    out = np.zeros((size, size))
    if y1 <= y0 or x1 <= x0:  # entirely outside the image
        return out
    dy = ((np.arange(y0 * s, y1 * s) + 0.5) / s - cy)[:, None] / ry  # box coordinates in [-1, 1]
    dx = ((np.arange(x0 * s, x1 * s) + 0.5) / s - cx)[None, :] / rx
    if shape == "circle":
        inside = dx * dx + dy * dy <= 1
    elif shape == "square":
        inside = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    else:
        t = (dy + 1) / 2  # 0 at the apex row, 1 at the base row
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t)
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return out


def _coverage(scene: Scene) -> np.ndarray:
    """Fraction of each pixel covered by the scene's shape, (64, 64) float in [0, 1]."""
    return shape_coverage(scene.shape, scene.cx, scene.cy, scene.radius)


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


def _rgb(colour: str, tone: Optional[Tone]) -> np.ndarray:
    if tone is None:  # the v1 world
        return np.array(PALETTE[colour], dtype=np.float64)
    return hsv_to_rgb(*_hsv(colour, tone))


def _shading(scene: Scene) -> np.ndarray:
    """Value factor of the shape, (64, 64): 1 + a * (position along the shading direction, -1 at one edge of
    the shape's box to 1 at the other), a linear ramp that scales all three channels (hue and saturation kept)."""
    amplitude, angle = scene.shade
    if amplitude == 0:
        return np.ones((SIZE, SIZE))
    coords = np.arange(SIZE) + 0.5
    along = (coords[None, :] - scene.cx) * np.cos(angle) + (coords[:, None] - scene.cy) * np.sin(angle)
    return 1 + amplitude * np.clip(along / scene.radius, -1.0, 1.0)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint8 (64, 64, 3), shape mask bool (64, 64))`` of a scene."""
    bg = _rgb(scene.background, scene.bg_tone)
    fg = _rgb(scene.colour, scene.fg_tone)[None, None, :] * _shading(scene)[..., None]
    tex = _texture_mask(scene)[..., None]
    background = bg * (1 - tex) + bg * DARK_FACTOR * tex
    cov = _coverage(scene)[..., None]
    image = background * (1 - cov) + fg * cov
    return np.round(image).astype(np.uint8), cov[..., 0] >= 0.5


#: The world versions: 2 (colour bands, shading; the current world) and 1 (one fixed PALETTE colour per word).
VERSIONS = (1, 2)


def as_version(scene: Scene, version: int) -> Scene:
    """`scene` as drawn in world `version`: version 1 drops the colour tones and the shading (same layout)."""
    if version not in VERSIONS:
        raise ValueError(f"version: got {version!r}; accepted: {', '.join(map(str, VERSIONS))}")
    return scene if version == 2 else replace(scene, fg_tone=None, bg_tone=None, shade=(0.0, 0.0))


def generate(seed: int, version: int = 2) -> Sample:
    """Sample ``seed`` of the toy world (``version`` 2, or 1: the fixed palette): image, mask, caption, scene.

    Both versions give seed ``i`` the same caption and layout.
    """
    scene = as_version(sample_scene(seed), version)
    image, mask = render(scene)
    return Sample(image, mask, scene.caption, scene)


def generate_batch(seeds, version: int = 2) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(images uint8 (N, 64, 64, 3), captions, masks bool (N, 64, 64))`` for a sequence of seeds."""
    samples = [generate(int(s), version) for s in seeds]
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
