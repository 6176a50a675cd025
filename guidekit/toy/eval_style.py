"""StyleID and StyleID + StyleSSP on the embedded model: content/style pairs from the toy world, judged by
`guidekit.toy.judge`.

Pair ``i``: the content is world scene ``CONTENT_SEED + i``; the style is the first world scene (seeds from
``STYLE_SEED + 1000 * i`` on) whose shape colour, background colour and texture all differ from the content's,
and whose shape kind differs from the content's for even ``i`` and equals it for odd ``i`` (so leakage of the
style image's shape can be read on half the pairs). Both are drawn in `MODEL_WORLD_VERSION`, the world the
shipped model was trained on.

The content is the shape: its kind, position and size. The style is the colours and the background texture.
The ideal result (:func:`ideal_scene`) is the content's scene with the style's shape colour, background colour,
texture (and its phase), tones and shading; the style's two colours already differ, so the ideal is a valid
scene.

Methods (:data:`METHODS`): StyleID; StyleID + StyleSSP (defaults: α = 0.7, negative-guided inversion w_inv = 1.5);
StyleSSP's frequency step only (``negative_inversion=False``); its negative-guided inversion only
(``frequency=False``). The negative inversion's c⁻ (``style_prompt``) is what the style image shows,
``"a {colour} {shape}"`` of the style scene (:data:`STYLE_PROMPT`); c⁺ is the empty prompt. Every transfer
draws StyleSSP's noise from ``torch.Generator().manual_seed(NOISE_SEED + i)``.

Measured per method (:func:`measure`): layout IoU (the judge's shape mask of the output against the content's
world mask; 0 when no shape is found), style adoption (the judged shape colour, background colour and texture
equal the style's; each and all three), content kept (the judged shape kind is the content's), content leakage
(the judged shape kind is the style's, over the pairs whose kinds differ), PSNR/SSIM against the ideal image
(`guidekit.metrics.fidelity`), and seconds. Two reference rows put the inputs themselves through the same
measures: the content image (layout IoU 1, no adoption) and the style image (full adoption, full leakage).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import MODEL_WORLD_VERSION
from .judge import Judgement, judge
from .world import Scene, render, sample_scene, as_version

__all__ = [
    "CONTENT_SEED",
    "STYLE_SEED",
    "NOISE_SEED",
    "STYLE_PROMPT",
    "METHODS",
    "Pair",
    "ideal_scene",
    "make_pairs",
    "layout_iou",
    "measure",
    "transfer_kwargs",
    "run",
    "markdown",
    "save",
]

CONTENT_SEED = 700_000
STYLE_SEED = 800_000
NOISE_SEED = 7000
#: c⁻ of the negative-guided inversion: what the style image shows.
STYLE_PROMPT = "a {colour} {shape}"
#: The rows measured, in order.
METHODS = ("StyleID", "StyleID + StyleSSP", "StyleSSP, frequency only", "StyleSSP, negative inversion only")


@dataclass(frozen=True)
class Pair:
    content: Scene
    style: Scene
    content_image: np.ndarray  # (64, 64, 3) uint8
    style_image: np.ndarray
    content_mask: np.ndarray  # (64, 64) bool, the world's mask of the content's shape
    ideal_image: np.ndarray  # the content's shape in the style's colours and texture
    ideal_mask: np.ndarray

    @property
    def shapes_differ(self) -> bool:
        return self.content.shape != self.style.shape

    @property
    def style_prompt(self) -> str:
        return STYLE_PROMPT.format(colour=self.style.colour, shape=self.style.shape)


def ideal_scene(content: Scene, style: Scene) -> Scene:
    """The content's shape, position and size drawn with the style's colours, tones, shading and texture."""
    if style.colour == style.background:
        raise ValueError(f"style: its shape colour and background are both {style.colour!r}; accepted: a world scene")
    return replace(content, colour=style.colour, background=style.background, texture=style.texture,
                   phase=style.phase, fg_tone=style.fg_tone, bg_tone=style.bg_tone, shade=style.shade)


def _style_for(content: Scene, i: int, version: int) -> Scene:
    want_same_shape = i % 2 == 1
    seed = STYLE_SEED + 1000 * i
    while True:
        s = as_version(sample_scene(seed), version)
        if (s.colour != content.colour and s.background != content.background and s.texture != content.texture
                and (s.shape == content.shape) == want_same_shape):
            return s
        seed += 1


def make_pairs(n: int, version: int = MODEL_WORLD_VERSION) -> list[Pair]:
    """The first ``n`` content/style pairs (see the module docstring), with their images and the ideal."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: got {n!r}; accepted: an integer >= 1")
    pairs = []
    for i in range(n):
        content = as_version(sample_scene(CONTENT_SEED + i), version)
        style = _style_for(content, i, version)
        c_img, c_mask = render(content)
        s_img, _ = render(style)
        i_img, i_mask = render(ideal_scene(content, style))
        pairs.append(Pair(content, style, c_img, s_img, c_mask, i_img, i_mask))
    return pairs


def layout_iou(judgement: Judgement, mask: np.ndarray) -> float:
    """IoU of the judge's shape mask with ``mask`` (bool (H, W)); 0 when the judge found no shape."""
    if judgement.mask is None:
        return 0.0
    got, want = judgement.mask.astype(bool), np.asarray(mask, dtype=bool)
    union = (got | want).sum()
    return float((got & want).sum() / union) if union else 0.0


def measure(images, pairs: Sequence[Pair]) -> dict:
    """The metrics of outputs ``images`` ((N, 64, 64, 3), uint8 or [0, 1] floats) of ``pairs``, averaged."""
    from ..metrics import fidelity

    images = list(images)
    if len(images) != len(pairs):
        raise ValueError(f"images: got {len(images)} for {len(pairs)} pairs")
    as01 = np.stack([np.asarray(im, dtype=np.float64) / (255.0 if np.asarray(im).dtype == np.uint8 else 1.0)
                     for im in images])
    ideal01 = np.stack([p.ideal_image / 255.0 for p in pairs])
    fid = fidelity(np.clip(as01, 0.0, 1.0), ideal01, with_lpips=False)
    iou, colour, background, texture, all3, kept, leak = [], [], [], [], [], [], []
    for im, p in zip(as01, pairs):
        j = judge(im)
        iou.append(layout_iou(j, p.content_mask))
        c, b, t = j.colour == p.style.colour, j.background == p.style.background, j.texture == p.style.texture
        colour.append(c)
        background.append(b)
        texture.append(t)
        all3.append(c and b and t)
        kept.append(j.shape == p.content.shape)
        if p.shapes_differ:
            leak.append(j.shape == p.style.shape)
    mean = lambda v: float(np.mean(v)) if len(v) else float("nan")  # noqa: E731
    return {
        "layout_iou": mean(iou),
        "style_colour": mean(colour),
        "style_background": mean(background),
        "style_texture": mean(texture),
        "style_all": mean(all3),
        "content_shape_kept": mean(kept),
        "leakage": mean(leak),
        "leakage_pairs": len(leak),
        "psnr": mean([r["psnr"] for r in fid]),
        "ssim": mean([r["ssim"] for r in fid]),
    }


def transfer_kwargs(method: str, pair: Pair) -> dict:
    """`transfer` keyword arguments (hooks, style_prompt) of one method on one pair."""
    import guidekit

    if method == "StyleID":
        return {"hooks": []}
    if method == "StyleID + StyleSSP":
        return {"hooks": [guidekit.StyleSSP()], "style_prompt": pair.style_prompt}
    if method == "StyleSSP, frequency only":
        return {"hooks": [guidekit.StyleSSP(negative_inversion=False)]}
    if method == "StyleSSP, negative inversion only":
        return {"hooks": [guidekit.StyleSSP(frequency=False)], "style_prompt": pair.style_prompt}
    raise ValueError(f"method: got {method!r}; accepted: {', '.join(METHODS)}")


def run(pipe, pairs: int = 24, steps: int = 25, methods: Sequence[str] = METHODS,
        log: Callable[[str], None] = print) -> dict:
    """Every method on the first ``pairs`` pairs; ``pipe`` a `StyleIDStableDiffusionPipeline`."""
    import torch

    items = make_pairs(pairs)
    rows = [{"method": "reference: the content image", **measure([p.content_image for p in items], items), "seconds": 0.0},
            {"method": "reference: the style image", **measure([p.style_image for p in items], items), "seconds": 0.0}]
    for method in methods:
        t0 = time.perf_counter()
        images = []
        for i, p in enumerate(items):
            out = pipe.transfer(p.content_image, p.style_image, num_inference_steps=steps, output_type="np",
                                generator=torch.Generator().manual_seed(NOISE_SEED + i), **transfer_kwargs(method, p))
            images.append(np.clip(out.images[0], 0.0, 1.0))
        seconds = time.perf_counter() - t0
        row = {"method": method, **measure(images, items), "seconds": round(seconds, 1)}
        rows.append(row)
        log(f"{method}: IoU {row['layout_iou']:.3f} style {row['style_all']:.3f} leakage {row['leakage']:.3f} "
            f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.3f} ({seconds:.0f} s)")
    return {"pairs": pairs, "pairs_shapes_differ": sum(p.shapes_differ for p in items), "steps": steps,
            "world_version": MODEL_WORLD_VERSION, "content_seed": CONTENT_SEED, "style_seed": STYLE_SEED,
            "noise_seed": NOISE_SEED, "style_prompt": STYLE_PROMPT, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| method | layout IoU | style: colour / background / texture / all | content shape kept | "
             f"leakage ({result['pairs_shapes_differ']} pairs) | PSNR vs ideal | SSIM vs ideal | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['layout_iou']:.3f} | {r['style_colour']:.0%} / {r['style_background']:.0%} / "
                     f"{r['style_texture']:.0%} / {r['style_all']:.0%} | {r['content_shape_kept']:.0%} | "
                     f"{r['leakage']:.0%} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def save(result: dict, out) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_style.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "eval_style.md").write_text(markdown(result) + "\n")
    return out
