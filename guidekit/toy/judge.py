"""A deterministic judge that reads a toy-world image back into its attributes.

Each pixel is assigned to the nearest of the 12 palette entries (6 colours and their darker texture
shades).  The background colour is the most common colour on the image border (shapes never touch it),
the shape is the largest group of pixels of another colour, its kind is read from how much of its bounding
box's corners it fills (square: all four, triangle: the bottom two, circle: none), and the texture from the
fraction of background pixels drawn in the dark shade (stripes: half, dots: about a fifth, none: zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .world import COLOURS, DARK_FACTOR, PALETTE, parse_caption

__all__ = ["Judgement", "judge", "judge_batch", "score"]

_REF = np.array(
    [PALETTE[c] for c in COLOURS] + [tuple(DARK_FACTOR * v for v in PALETTE[c]) for c in COLOURS], dtype=np.float64
)


@dataclass(frozen=True)
class Judgement:
    colour: Optional[str]  # None when no shape was found
    background: str
    shape: Optional[str]
    texture: Optional[str]
    fill: float  # shape area / bounding-box area
    dark_fraction: float  # background pixels in the darker shade


def _to_uint8(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image: expected (H, W, 3) RGB, got shape {arr.shape}")
    return arr


def _shape_of(box: np.ndarray, fill: float) -> str:
    """Square: all four corners of the bounding box filled; triangle (apex up): the two bottom ones only;
    circle: none. Corner regions are a fifth of the box's side. Other patterns fall back to the fill ratio."""
    h, w = box.shape
    ch, cw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    tl, tr = box[:ch, :cw].mean(), box[:ch, -cw:].mean()
    bl, br = box[-ch:, :cw].mean(), box[-ch:, -cw:].mean()
    top, bottom = (tl + tr) / 2, (bl + br) / 2
    if top > 0.5 and bottom > 0.5:
        return "square"
    if bottom > 0.5 and top < 0.25:
        return "triangle"
    if max(tl, tr, bl, br) < 0.25:
        return "circle"
    return "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"


def judge(image) -> Judgement:
    """Read (shape colour, background colour, shape, texture) off one RGB image (uint8, or float in [0, 1])."""
    arr = _to_uint8(image).astype(np.float64)
    h, w, _ = arr.shape
    d = ((arr[:, :, None, :] - _REF[None, None]) ** 2).sum(-1)
    label = d.argmin(-1)  # 0..11
    hue = label % 6
    dark = label >= 6
    border = np.concatenate([hue[:2].ravel(), hue[-2:].ravel(), hue[:, :2].ravel(), hue[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=6).argmax())
    counts = np.bincount(hue[hue != bg], minlength=6)
    other = hue != bg
    colour = shape = None
    fill = 0.0
    if counts.sum() >= 12:
        fg = int(counts.argmax())
        colour = COLOURS[fg]
        mask = hue == fg
        rows = np.nonzero(mask.sum(1) >= 2)[0]
        cols = np.nonzero(mask.sum(0) >= 2)[0]
        if len(rows) and len(cols):
            box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            fill = float(box.sum() / box.size)
            shape = _shape_of(box, fill)
    # texture: only background-coloured pixels away from the shape count
    shape_zone = other.copy()
    for axis in (0, 1):  # grow the non-background region by 2 pixels to drop anti-aliased edges
        for shift in (-2, -1, 1, 2):
            shape_zone |= np.roll(other, shift, axis=axis)
    bgpix = (hue == bg) & ~shape_zone
    dark_bg = dark & bgpix
    n = bgpix.sum()
    dark_fraction = float(dark_bg.sum() / n) if n else 0.0
    texture = None
    if dark_fraction > 0.06:
        # stripes cover half of the background, dots about a fifth
        texture = "striped" if dark_fraction > 0.35 else "dotted"
    return Judgement(colour, COLOURS[bg], shape, texture, fill, dark_fraction)


def judge_batch(images) -> list[Judgement]:
    return [judge(im) for im in images]


def score(images, captions) -> dict:
    """Accuracies of a batch against its captions: colour, background, shape, all three, texture.

    ``texture`` counts every caption (no texture asked must give no texture); ``texture_asked`` only those
    that ask for one.
    """
    if len(images) != len(captions):
        raise ValueError(f"captions: got {len(captions)} for {len(images)} images")
    hits = {"colour": [], "background": [], "shape": [], "all3": [], "texture": [], "texture_asked": []}
    for image, text in zip(images, captions):
        want = parse_caption(text)
        got = judge(image)
        c, b, s = got.colour == want["colour"], got.background == want["background"], got.shape == want["shape"]
        t = got.texture == want["texture"]
        hits["colour"].append(c)
        hits["background"].append(b)
        hits["shape"].append(s)
        hits["all3"].append(c and b and s)
        hits["texture"].append(t)
        if want["texture"] is not None:
            hits["texture_asked"].append(t)
    return {k: (float(np.mean(v)) if v else float("nan")) for k, v in hits.items()}

