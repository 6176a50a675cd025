"""A deterministic judge that reads a toy-world image back into its attributes, and measures its shape's outline.

Colours are read by hue, which the world fixes to a band per colour word while saturation and value vary
(world v2); the v1 world's fixed colours, and the images of a model trained on them, lie inside the same
bands.  Each pixel of enough saturation is labelled with the nearest canonical hue (:data:`~.world.HUES`):
the background colour is the most common label on the image border (shapes never touch it), the shape's
colour the most common other label.

The rest is read as by a judge that knows the image's colours: each pixel goes to the nearest (in RGB) of
12 references, the six colours and their darker texture shades, where the background's and the shape's
entries are the image's own colours (estimated from the pixels labelled with them) and the other four keep
their v1 :data:`~.world.PALETTE` colours, which only catch pixels of neither colour (mixtures at edges,
artefacts).  On v1 images the estimates are close to the palette that earlier versions of this judge used
for all 12, so the shipped model's images read as before.  The shape's kind is read from how much of its bounding box's corners
its pixels fill (square: all four, triangle: the bottom two, circle: none), the texture from the fraction of
background pixels nearest the dark shade (stripes: half, dots: about a fifth, none: zero).

Shape fidelity is the IoU of the shape's mask with the ideal shape (as :func:`~.world.shape_coverage` draws
it) stretched to fill the mask's bounding box: 1 for a perfect outline, lower for wobbly, concave or lumpy
ones.  It measures the outline only; position, size and aspect ratio are fitted away.  The mask is every
pixel at least half the shape's colour when read as a mix of it and a background shade, as the world's own
mask holds the pixels the shape covers at least half, reduced to its largest connected part.

The judge reads strictly: a kind is only read where the outline looks like it.  A shape whose fidelity is
below :data:`MIN_FIDELITY`, or whose fill of its bounding box lies outside its kind's band
(:data:`FILL_BANDS`), is read as ``shape=None`` and counts wrong, however its corners fall; an irregular blob
is not a circle.  Both limits are set on the world itself: the world's own v2 images never come near them
(lowest fidelity 0.856, fills circle 0.72-0.84, square 0.92-1, triangle 0.50-0.64 on 3000 images), and world
images put through the embedded model's VAE, which caps any model's outlines, still read 99.5% right (600 images; lenient 99.8%).
``judge(image, strict=False)`` gives the lenient reading of earlier versions (the kind from the corners
alone), so that a table can say what the strict reading moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .world import COLOURS, DARK_FACTOR, HUES, PALETTE, SHAPES, parse_caption, shape_coverage

__all__ = ["MIN_FIDELITY", "FILL_BANDS", "Judgement", "judge", "judge_batch", "score", "shape_fidelity", "mask_fidelity", "fidelity_summary"]

_HUE_CENTRES = np.array([HUES[c] for c in COLOURS])
#: Pixels less saturated than this get no hue (greys, e.g. an edge pixel mixing two complementary colours).
_MIN_SATURATION = 0.2
#: The background's colour is estimated from its brightest pixels: those at or above this percentile of value.
_BRIGHT_PERCENTILE = 90
_MIN_SHAPE_PIXELS = 12
#: A pixel belongs to the shape's mask from this estimated coverage on: just under one half, because the
#: world's coverage comes in sixteenths (4x4 sub-pixels) so exactly-half pixels are common, and 8-bit rounding
#: and the shape's shading move their estimate by a few hundredths either way (the next level down is 0.4375).
_HALF_COVERED = 0.47
#: Below this shape fidelity the judge reads no shape.  World v2 images: lowest 0.856 (3000 images);
#: through the embedded VAE: 1st percentile 0.765 for triangles, the hardest kind, 0.91 for the others.
MIN_FIDELITY = 0.75
#: The fill of its bounding box that each kind may have, (low, high).  World v2 images (3000): circle
#: 0.72-0.84, square 0.92-1.00, triangle 0.50-0.64; the bands leave about 0.1 on each side for anti-aliasing
#: and the VAE.
FILL_BANDS = {"circle": (0.62, 0.94), "square": (0.82, 1.0), "triangle": (0.40, 0.74)}


@dataclass(frozen=True)
class Judgement:
    colour: Optional[str]  # None when no shape was found
    background: str
    shape: Optional[str]
    texture: Optional[str]
    fill: float  # shape area / bounding-box area
    dark_fraction: float  # background pixels in the darker shade
    fidelity: float = float("nan")  # IoU of the shape's mask with its ideal shape (nan when no shape)
    mask: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # the shape's mask, (H, W) bool
    outline: Optional[str] = None  # the kind its corners suggest, kept when the strict reading refuses it


def _to_uint8(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image: expected (H, W, 3) RGB, got shape {arr.shape}")
    return arr


def _hsv(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value in [0, 1] of an (H, W, 3) array in [0, 255]."""
    rgb = arr / 255.0
    hi, lo = rgb.max(-1), rgb.min(-1)
    d = hi - lo
    safe = np.where(d > 0, d, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    sat = np.where(hi > 0, d / np.where(hi > 0, hi, 1.0), 0.0)
    return np.where(d > 0, hue, 0.0), sat, hi


def _nearest_hue(hue: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest canonical hue (circular distance)."""
    diff = np.abs(hue[..., None] - _HUE_CENTRES)
    return np.minimum(diff, 360.0 - diff).argmin(-1)


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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a boolean mask (numpy only: min-label propagation with pointer jumps)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    none = h * w  # label of pixels outside the mask; larger than every pixel index
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        p = np.pad(lab, 1, constant_values=none)
        nb = np.min([p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        nb = np.where(mask, nb, none)
        nb = np.where(mask, np.append(nb.ravel(), none)[nb], none)  # jump: take the label's own label
        if np.array_equal(nb, lab):
            break
        lab = nb
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab == ids[counts.argmax()]


def _bbox(mask: np.ndarray, min_count: int = 1) -> Optional[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` inclusive, over rows/columns holding at least ``min_count`` mask pixels."""
    rows = np.nonzero(mask.sum(1) >= min_count)[0]
    cols = np.nonzero(mask.sum(0) >= min_count)[0]
    if not len(rows) or not len(cols):
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def mask_fidelity(mask, shape: str) -> float:
    """IoU of a boolean shape mask (H, W) with the ideal ``shape`` fitted to the mask's bounding box.

    The ideal is the world's own drawing (:func:`~.world.shape_coverage`, pixels covered at least half) of a
    shape filling the box's outer edges; nan for an empty mask.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape: got {shape!r}; accepted values are {', '.join(SHAPES)}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask: expected a square (H, H) boolean array, got shape {mask.shape}")
    box = _bbox(mask)
    if box is None:
        return float("nan")
    y0, y1, x0, x1 = box
    ideal = shape_coverage(shape, (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2, (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2,
                           size=mask.shape[0]) >= 0.5
    return float((mask & ideal).sum() / (mask | ideal).sum())


def _coverage_estimate(arr: np.ndarray, fg: np.ndarray, backgrounds) -> np.ndarray:
    """How much of each pixel the shape covers, read as ``pixel = c * fg + (1 - c) * bg``.

    ``bg`` is whichever background shade puts the pixel nearest its fg-bg segment; ``c`` is the pixel's
    position along that segment, clipped to [0, 1].  (Merely taking the nearest of the three colours would
    hand a dark shape's anti-aliased edge on a bright background to the dark shade.)
    """
    best_c, best_r = None, None
    for bg in backgrounds:
        v = fg - bg
        c = np.clip(((arr - bg) @ v) / max(float(v @ v), 1e-9), 0.0, 1.0)
        r = ((arr - bg - c[..., None] * v) ** 2).sum(-1)
        if best_c is None:
            best_c, best_r = c, r
        else:
            nearer = r < best_r
            best_c, best_r = np.where(nearer, c, best_c), np.where(nearer, r, best_r)
    return best_c


def _grow(region: np.ndarray, pixels: int = 2) -> np.ndarray:
    """The region grown by ``pixels`` along rows and columns (a cross, wrapping at the border like np.roll)."""
    out = region.copy()
    for axis in (0, 1):
        for shift in range(1, pixels + 1):
            out |= np.roll(region, shift, axis=axis) | np.roll(region, -shift, axis=axis)
    return out


def _references(arr, val, label, bg: int, fg: Optional[int]) -> np.ndarray:
    """The 12 references (6 colours, then their dark shades), (12, 3): the palette, with the background's and
    the shape's entries replaced by the image's own colours.

    The background's colour is the median of its brightest tenth of pixels away from the shape, so that
    neither texture marks nor the blurred edges of a model's stripes pull it down.
    """
    refs = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)
    bgpix = (label == bg) & ~_grow(label != bg)
    if bgpix.any():
        top = bgpix & (val >= np.percentile(val[bgpix], _BRIGHT_PERCENTILE))
        refs[bg] = np.median(arr[top], axis=0)
    if fg is not None:
        refs[fg] = np.median(arr[label == fg], axis=0)
    return np.concatenate([refs, refs * DARK_FACTOR])


def _reads_as(outline: str, fill: float, fidelity: float) -> bool:
    """Whether a shape whose corners suggest ``outline`` looks enough like one to be read as it."""
    low, high = FILL_BANDS[outline]
    return bool(np.isfinite(fidelity) and fidelity >= MIN_FIDELITY and low <= fill <= high)


def judge(image, strict: bool = True) -> Judgement:
    """Read (shape colour, background colour, shape, texture) off one RGB image (uint8, or float in [0, 1]),
    with the shape's fidelity and mask.

    ``strict`` (default) reads ``shape=None`` for an outline below :data:`MIN_FIDELITY` or outside its kind's
    fill band; ``strict=False`` reads the kind from the corners alone.  ``fidelity`` and ``outline`` are the
    same either way.
    """
    arr = _to_uint8(image).astype(np.float64)
    hue, sat, val = _hsv(arr)
    nearest = _nearest_hue(hue)
    label = np.where(sat >= _MIN_SATURATION, nearest, -1)  # 0..5, -1: no hue
    border = np.concatenate([label[:2].ravel(), label[-2:].ravel(), label[:, :2].ravel(), label[:, -2:].ravel()])
    if not (border >= 0).any():  # a grey border: fall back to the nearest hue regardless of saturation
        border = np.concatenate([nearest[:2].ravel(), nearest[-2:].ravel(), nearest[:, :2].ravel(),
                                 nearest[:, -2:].ravel()])
    bg = int(np.bincount(border[border >= 0], minlength=6).argmax())
    counts = np.bincount(label[(label != bg) & (label >= 0)], minlength=6)
    fg = int(counts.argmax()) if counts.sum() >= _MIN_SHAPE_PIXELS else None

    refs = _references(arr, val, label, bg, fg)
    nearest12 = ((arr[:, :, None, :] - refs[None, None]) ** 2).sum(-1).argmin(-1)
    colour_of, dark = nearest12 % 6, nearest12 >= 6

    # texture: only background pixels away from the shape count (its anti-aliased edge is darker too)
    other = colour_of != bg
    bgpix = (colour_of == bg) & ~_grow(other)
    n = bgpix.sum()
    dark_fraction = float((dark & bgpix).sum() / n) if n else 0.0
    texture = None
    if dark_fraction > 0.06:
        # stripes cover half of the background, dots about a fifth
        texture = "striped" if dark_fraction > 0.35 else "dotted"

    colour = shape = outline = None
    fill, fidelity, mask = 0.0, float("nan"), None
    if fg is not None and other.sum() >= _MIN_SHAPE_PIXELS:
        colour = COLOURS[fg]
        pixels = colour_of == fg
        box = _bbox(pixels, min_count=2)  # rows/columns of one pixel (an apex, a spur) do not decide the kind
        if box is not None:
            y0, y1, x0, x1 = box
            part = pixels[y0 : y1 + 1, x0 : x1 + 1]
            fill = float(part.sum() / part.size)
            outline = _shape_of(part, fill)
            shades = [refs[bg]] + ([refs[6 + bg]] if texture is not None else [])
            mask = _largest_component(_coverage_estimate(arr, refs[fg], shades) >= _HALF_COVERED)
            fidelity = mask_fidelity(mask, outline)
            shape = outline if not strict or _reads_as(outline, fill, fidelity) else None
    return Judgement(colour, COLOURS[bg], shape, texture, fill, dark_fraction, fidelity, mask, outline)


def judge_batch(images, strict: bool = True) -> list[Judgement]:
    return [judge(im, strict=strict) for im in images]


def shape_fidelity(image, shape: Optional[str] = None) -> float:
    """IoU of the judged shape's mask with the ideal shape fitted to its bounding box (nan when no shape).

    ``shape`` fits that kind instead of the judged one (e.g. the caption's shape).
    """
    j = judge(image)
    if j.mask is None or j.outline is None:
        return float("nan")
    return j.fidelity if shape is None or shape == j.outline else mask_fidelity(j.mask, shape)


def score(images, captions, judgements: Optional[Sequence[Judgement]] = None) -> dict:
    """Accuracies of a batch against its captions: colour, background, shape, all three, texture.

    ``texture`` counts every caption (no texture asked must give no texture); ``texture_asked`` only those
    that ask for one.  ``judgements`` (from :func:`judge_batch` of the same images) saves judging them again.
    """
    if len(images) != len(captions):
        raise ValueError(f"captions: got {len(captions)} for {len(images)} images")
    if judgements is not None and len(judgements) != len(images):
        raise ValueError(f"judgements: got {len(judgements)} for {len(images)} images")
    hits = {"colour": [], "background": [], "shape": [], "all3": [], "texture": [], "texture_asked": []}
    for i, (image, text) in enumerate(zip(images, captions)):
        want = parse_caption(text)
        got = judgements[i] if judgements is not None else judge(image)
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


def fidelity_summary(judgements: Sequence[Judgement]) -> dict:
    """Mean shape fidelity over the images where a shape was found, overall and per outline kind (nan if none).

    Every shape found counts, also those the strict reading refuses, so the mean says how good the outlines
    are, not only the ones good enough to be read."""
    def mean(vals):
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    out = {"fidelity": mean([j.fidelity for j in judgements])}
    for s in SHAPES:
        out[f"fidelity_{s}"] = mean([j.fidelity for j in judgements if j.outline == s])
    return out
