"""The style-transfer task of the embedded model: the content gives the layout, the style gives the background.

In the toy world a scene is a layout (one shape: its kind, position and size) drawn in a look (the shape's
colour, the background's colour, the background's texture). The task (see docs/style-task.md for why this one):

* the **content** is a world scene; it gives the layout and the shape's colour;
* the **style** gives the background's look, its colour and its texture (striped, dotted or none). Its image
  is a world scene whose shape is drawn in the content's colour word (with the style scene's own tone), so
  that the shape carries nothing of the style: StyleID needs a shape in the style image for the content's
  shape to correspond to (a shape-free style image erases it), and a shape in another colour competes with
  the content's layout. The style's shape is of another kind than the content's and lies apart from it (it
  overlaps the content's shape by at most `MAX_OVERLAP` of its own area), so that its leakage can be seen;
* the **ideal** result is the content's scene with the style's background colour, tone, texture and texture
  phase.

Pair ``i``: the content is world scene ``CONTENT_SEED + i``; the style is the first world scene from seed
``STYLE_SEED + 1000 * i`` on whose background colour is neither the content's background nor its shape colour,
whose shape colour, texture and shape kind differ from the content's, and whose shape overlaps the content's
by at most `MAX_OVERLAP`; its shape colour word is then set to the content's. Both are drawn in
`MODEL_WORLD_VERSION`, the world the shipped model was trained on.

Measures of one output (:func:`score`), all read by `guidekit.toy.judge` (strict by default):

* ``layout_iou``: IoU of the judge's shape mask with the content's world mask (0 when it finds no shape);
* ``shape_kept``: the judge reads the content's shape kind (strict: a blob reads as no shape);
* ``colour_kept``: the judge reads the content's shape colour;
* ``background`` / ``texture``: the judge reads the style's background colour / texture;
  ``adopted``: both (the style adopted);
* ``leak_fraction``: the fraction of the style's shape region, outside the content's shape grown by 2 px, whose
  pixels the judge's hue labelling (nearest canonical hue, saturation at least 0.2) reads as the style's shape
  colour (the content's, in the task);
  ``flood_fraction``: the same fraction over the rest of the background (outside both shapes);
  ``leaked``: the style's shape appears, ``leak_fraction >= 0.5`` while ``flood_fraction < 0.5`` (a result whose
  whole background took the shape's colour has not drawn the style's shape); nan when the style has no shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from . import MODEL_WORLD_VERSION
from .judge import _MIN_SATURATION, _grow, _hsv, _nearest_hue, _to_uint8, judge
from .world import COLOURS, DARK_FACTOR, SIZE, Scene, _rgb, _texture_mask, as_version, render, sample_scene

__all__ = [
    "CONTENT_SEED",
    "STYLE_SEED",
    "MAX_OVERLAP",
    "STYLE_PROMPT",
    "MEASURES",
    "STYLE_SHAPES",
    "Pair",
    "ideal_scene",
    "style_scene_for",
    "background_image",
    "make_pairs",
    "layout_iou",
    "colour_fraction",
    "score",
    "score_all",
]

CONTENT_SEED = 700_000
STYLE_SEED = 800_000
#: The most of the style's shape area that may lie on the content's shape.
MAX_OVERLAP = 0.1
#: What the style image shows of its own, its shape's kind: c⁻ of StyleSSP's negative-guided inversion. Its colour
#: word is the content's, so it is left out (pushing away from it would push away from the content's colour).
STYLE_PROMPT = "a {shape}"
#: The per-pair measures of `score`, in table order.
MEASURES = ("layout_iou", "shape_kept", "colour_kept", "background", "texture", "adopted", "leaked",
            "leak_fraction", "flood_fraction")
#: What the style image's shape is, `make_pairs`' ``style_shape``: the task's ("content colour"), and the two
#: alternatives docs/style-task.md measures it against: the style scene's shape in its own colour ("own colour",
#: a full scene of the world as the style) and no shape at all ("none", a background colour and texture field).
STYLE_SHAPES = ("content colour", "own colour", "none")
#: Pixels of the content's shape grown by this much are left out of the leak region (anti-aliased edges, and
#: outlines a little larger than the content's).
_EDGE = 2


@dataclass(frozen=True)
class Pair:
    """One content/style pair with its images (uint8 (64, 64, 3)) and world masks (bool (64, 64))."""

    content: Scene
    style: Scene
    content_image: np.ndarray
    style_image: np.ndarray
    ideal_image: np.ndarray
    content_mask: np.ndarray
    style_mask: np.ndarray

    @property
    def style_prompt(self) -> str:
        """c⁻ of StyleSSP's negative-guided inversion: `STYLE_PROMPT` of the style's shape."""
        return STYLE_PROMPT.format(shape=self.style.shape)

    @property
    def leak_region(self) -> np.ndarray:
        """The style's shape outside the content's shape grown by 2 px."""
        return self.style_mask & ~_grow(self.content_mask, _EDGE)

    @property
    def rest_region(self) -> np.ndarray:
        """The background outside both shapes (each grown by 2 px)."""
        return ~_grow(self.content_mask, _EDGE) & ~_grow(self.style_mask, _EDGE)


def ideal_scene(content: Scene, style: Scene) -> Scene:
    """The content's scene with the style's background colour, tone, texture and texture phase.

    Args:
        content (`Scene`): gives the shape (kind, position, size), its colour, tone and shading.
        style (`Scene`): gives the background; its colour must differ from the content's shape colour.
    """
    if style.background == content.colour:
        raise ValueError(
            f"style: its background colour {style.background!r} is the content's shape colour; accepted: a style "
            "whose background colour differs from the content's shape colour"
        )
    return replace(content, background=style.background, bg_tone=style.bg_tone, texture=style.texture,
                   phase=style.phase)


def _overlap(style_mask: np.ndarray, content_mask: np.ndarray) -> float:
    return float((style_mask & content_mask).sum() / max(int(style_mask.sum()), 1))


def style_scene_for(content: Scene, seed: int, version: int = MODEL_WORLD_VERSION,
                    style_shape: str = "content colour") -> Scene:
    """The style scene of `content`: the first world scene from `seed` on that fits the rule of the module
    docstring, with its shape colour word set to the content's.

    Args:
        content (`Scene`): the content scene.
        seed (`int`): the first world seed tried.
        version (`int`): the world version the style is drawn in.
        style_shape (`str`): one of `STYLE_SHAPES`; "own colour" keeps the scene's own shape colour, the others
            set it to the content's. The scene found is the same for all three.
    """
    _check_style_shape(style_shape)
    content_mask = render(content)[1]
    while True:
        s = as_version(sample_scene(seed), version)
        seed += 1
        # the same scene for every style_shape (only its shape's colour, or its shape, differs), so the
        # alternatives are compared on the same backgrounds
        if (s.background in (content.background, content.colour) or s.colour == content.colour
                or s.texture == content.texture or s.shape == content.shape):
            continue
        if style_shape != "own colour":
            s = replace(s, colour=content.colour)
        if _overlap(render(s)[1], content_mask) <= MAX_OVERLAP:
            return s


def _check_style_shape(style_shape) -> str:
    if style_shape not in STYLE_SHAPES:
        raise ValueError(f"style_shape: got {style_shape!r}; accepted: {', '.join(map(repr, STYLE_SHAPES))}")
    return style_shape


def background_image(scene: Scene) -> np.ndarray:
    """The scene's background alone, its colour and texture with no shape: uint8 (64, 64, 3)."""
    bg = _rgb(scene.background, scene.bg_tone)
    tex = _texture_mask(scene)[..., None]
    image = bg * (1 - tex) + bg * DARK_FACTOR * tex
    return np.round(np.broadcast_to(image, (SIZE, SIZE, 3))).astype(np.uint8)


def make_pairs(n: int, version: int = MODEL_WORLD_VERSION, style_shape: str = "content colour") -> list[Pair]:
    """The first `n` pairs of the task (see the module docstring).

    Args:
        n (`int`): how many pairs, at least 1.
        version (`int`): the world version both images are drawn in.
        style_shape (`str`): one of `STYLE_SHAPES`: the task's style image ("content colour"), or an
            alternative ("own colour": the style scene as the world draws it; "none": its background alone,
            whose style mask is then empty and leakage undefined).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: got {n!r}; accepted: an integer >= 1")
    _check_style_shape(style_shape)
    pairs = []
    for i in range(n):
        content = as_version(sample_scene(CONTENT_SEED + i), version)
        style = style_scene_for(content, STYLE_SEED + 1000 * i, version, style_shape)
        c_img, c_mask = render(content)
        s_img, s_mask = render(style)
        if style_shape == "none":
            s_img, s_mask = background_image(style), np.zeros_like(s_mask)
        pairs.append(Pair(content, style, c_img, s_img, render(ideal_scene(content, style))[0], c_mask, s_mask))
    return pairs


def layout_iou(mask, want) -> float:
    """IoU of a judged shape mask (bool (H, W), or None when no shape was found: 0) with the mask `want`."""
    if mask is None:
        return 0.0
    got, want = np.asarray(mask, dtype=bool), np.asarray(want, dtype=bool)
    union = (got | want).sum()
    return float((got & want).sum() / union) if union else 0.0


def colour_fraction(image, colour: str, region: np.ndarray) -> float:
    """The fraction of the pixels of `region` (bool (H, W)) that the judge's hue labelling reads as `colour`
    (nearest canonical hue, saturation at least the judge's minimum); nan for an empty region."""
    if colour not in COLOURS:
        raise ValueError(f"colour: got {colour!r}; accepted: {', '.join(COLOURS)}")
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return float("nan")
    hue, sat, _ = _hsv(_to_uint8(image).astype(np.float64))
    labelled = (_nearest_hue(hue) == COLOURS.index(colour)) & (sat >= _MIN_SATURATION)
    return float(labelled[region].mean())


def score(image, pair: Pair) -> dict:
    """The measures (`MEASURES`, see the module docstring) of one output `image` of `pair`: an RGB image, uint8
    (H, W, 3) or floats in [0, 1]. Booleans are 0.0 or 1.0."""
    j = judge(image)
    leak = colour_fraction(image, pair.style.colour, pair.leak_region)
    flood = colour_fraction(image, pair.style.colour, pair.rest_region)
    background, texture = j.background == pair.style.background, j.texture == pair.style.texture
    return {
        "layout_iou": layout_iou(j.mask, pair.content_mask),
        "shape_kept": float(j.shape == pair.content.shape),
        "colour_kept": float(j.colour == pair.content.colour),
        "background": float(background),
        "texture": float(texture),
        "adopted": float(background and texture),
        "leaked": float(leak >= 0.5 and flood < 0.5) if np.isfinite(leak) else float("nan"),
        "leak_fraction": leak,
        "flood_fraction": flood,
    }


def score_all(images: Sequence, pairs: Sequence[Pair]) -> dict:
    """`score` of each output, as one list per measure (pair order kept).

    Args:
        images: one output per pair.
        pairs: the pairs.
    """
    images = list(images)
    if len(images) != len(pairs):
        raise ValueError(f"images: got {len(images)} for {len(pairs)} pairs; accepted: one image per pair")
    rows = [score(im, p) for im, p in zip(images, pairs)]
    return {m: [r[m] for r in rows] for m in MEASURES}
