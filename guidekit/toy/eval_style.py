"""StyleID and StyleID + StyleSSP on the embedded model's style task (`guidekit.toy.style_task`), with
bootstrap confidence intervals.

Every method runs `StyleIDStableDiffusionPipeline.transfer` on each pair (`METHODS`; `TABLE_METHODS` are the
table's rows, the others the investigations of docs/style-task.md), with StyleSSP's noise drawn from
``torch.Generator().manual_seed(NOISE_SEED + i)`` for pair ``i``. Three reference rows put the content, style
and ideal images themselves through the same measures.

Confidence intervals are percentile bootstrap intervals over the pairs (`BOOTSTRAP` resamples, seed 0, 95%):
of each mean, and of each method's paired difference from StyleID (the same resampled pairs for both).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Sequence

import numpy as np

from . import MODEL_WORLD_VERSION
from .style_task import (CONTENT_SEED, MAX_OVERLAP, MEASURES, STYLE_PROMPT, STYLE_SEED, Pair, make_pairs,
                         score_all)
from .style_task import _check_style_shape

__all__ = [
    "NOISE_SEED",
    "BOOTSTRAP",
    "METHODS",
    "TABLE_METHODS",
    "BASELINE",
    "transfer_kwargs",
    "bootstrap_ci",
    "summarise",
    "run",
    "markdown",
    "save",
    "pick_example",
]

NOISE_SEED = 7000
#: Bootstrap resamples of every confidence interval.
BOOTSTRAP = 10_000
#: The method the paired differences are taken against.
BASELINE = "StyleID"


def _stylessp(**options) -> Callable[[Pair], dict]:
    def kwargs(pair: Pair) -> dict:
        import guidekit

        hook = guidekit.StyleSSP(**options)
        out = {"hooks": [hook]}
        if hook.negative_inversion_scale > 0:
            out["style_prompt"] = pair.style_prompt
        return out

    return kwargs


#: `transfer` keyword arguments of each method for one pair. "reconstruction" is the plain empty-prompt DDIM
#: inversion of the content sampled back (no AdaIN, no injection): what the model keeps of a content by itself.
METHODS: Dict[str, Callable[[Pair], dict]] = {
    "reconstruction": lambda pair: {"init_adain": False, "attn_injection": False},
    "AdaIN only": lambda pair: {"attn_injection": False},
    "StyleID": lambda pair: {"hooks": []},
    "StyleID + StyleSSP": _stylessp(),
    "StyleSSP, frequency only": _stylessp(negative_inversion=False),
    "StyleSSP, negative inversion only": _stylessp(frequency=False),
    "StyleID + StyleSSP, AdaIN then frequency": _stylessp(order="adain_first"),
    "StyleID + StyleSSP, frequency then AdaIN": _stylessp(order="frequency_first"),
    "StyleSSP, frequency only, AdaIN then frequency": _stylessp(negative_inversion=False, order="adain_first"),
    "StyleSSP, frequency only, frequency then AdaIN": _stylessp(negative_inversion=False, order="frequency_first"),
    "StyleSSP, negative inversion only, w_inv 2": _stylessp(frequency=False, inversion_guidance_scale=2.0),
    "StyleSSP, negative inversion only, w_inv 3": _stylessp(frequency=False, inversion_guidance_scale=3.0),
    "StyleSSP, negative inversion only, w_inv 5": _stylessp(frequency=False, inversion_guidance_scale=5.0),
}
#: The rows `guidekit eval-style` runs by default.
TABLE_METHODS = ("reconstruction", "StyleID", "StyleID + StyleSSP", "StyleSSP, frequency only",
                 "StyleSSP, negative inversion only")


def transfer_kwargs(method: str, pair: Pair) -> dict:
    """`transfer` keyword arguments (hooks, style_prompt, switches) of `method` on `pair`."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; accepted: {', '.join(METHODS)}")
    return METHODS[method](pair)


def bootstrap_ci(values, resamples: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple:
    """(low, high): the percentile bootstrap interval of the mean of `values` (one per pair; NaNs left out of
    each resample's mean).

    Args:
        values: the per-pair values (1-D), or (2, n) for a paired difference: rows a and b, interval of mean(a − b).
        resamples (`int`): bootstrap resamples.
        seed (`int`): seed of the resampling (so a table is reproducible).
        level (`float`): coverage in (0, 1).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2:
        v = v[0] - v[1]
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values: shape {np.shape(values)}; accepted: (n,) or (2, n) with n >= 1")
    if not 0 < level < 1:
        raise ValueError(f"level: got {level!r}; accepted: a number in (0, 1)")
    if np.isnan(v).all():  # a measure undefined on every pair (leakage of a style without a shape)
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    with warnings.catch_warnings():  # resamples drawing only undefined pairs are left out of the percentiles
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(v[idx], axis=1)
    low, high = np.nanpercentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def _mean(v: np.ndarray) -> float:
    """The mean over the pairs where `v` is defined (nan when it is nowhere)."""
    return float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")


def summarise(values: Dict[str, list]) -> dict:
    """Mean and bootstrap interval of each measure: ``{measure: {"mean", "low", "high"}}``."""
    out = {}
    for m in MEASURES:
        v = np.asarray(values[m], dtype=np.float64)
        low, high = bootstrap_ci(v)
        out[m] = {"mean": _mean(v), "low": low, "high": high}
    return out


def _difference(a: Dict[str, list], b: Dict[str, list]) -> dict:
    out = {}
    for m in ("layout_iou", "shape_kept", "adopted", "leaked"):
        pair = np.asarray([a[m], b[m]], dtype=np.float64)
        low, high = bootstrap_ci(pair)
        out[m] = {"mean": _mean(pair[0] - pair[1]), "low": low, "high": high}
    return out


def run(pipe, pairs: int = 48, steps: int = 25, methods: Sequence[str] = TABLE_METHODS,
        log: Callable[[str], None] = print, style_shape: str = "content colour") -> dict:
    """Every method on the first `pairs` pairs of the task.

    Args:
        pipe: a `StyleIDStableDiffusionPipeline` (the embedded model's for the task's numbers).
        pairs (`int`): how many pairs.
        steps (`int`): DDIM steps of each inversion and of the sampling.
        methods: names in `METHODS`.
        log: called with one line per method.
        style_shape (`str`): the style images (`guidekit.toy.style_task.STYLE_SHAPES`): the task's, or an
            alternative it is compared with.
    """
    import torch

    _check_style_shape(style_shape)
    first = make_pairs(1)[0]
    for m in methods:
        transfer_kwargs(m, first)  # every name checked before any model call
    items = make_pairs(pairs, style_shape=style_shape)
    per_pair = {
        "reference: the content image": score_all([p.content_image for p in items], items),
        "reference: the style image": score_all([p.style_image for p in items], items),
        "reference: the ideal image": score_all([p.ideal_image for p in items], items),
    }
    seconds = {name: 0.0 for name in per_pair}
    outputs = {}
    for method in methods:
        t0 = time.perf_counter()
        images = []
        for i, p in enumerate(items):
            out = pipe.transfer(p.content_image, p.style_image, num_inference_steps=steps, output_type="np",
                                generator=torch.Generator().manual_seed(NOISE_SEED + i), **transfer_kwargs(method, p))
            images.append(np.clip(out.images[0], 0.0, 1.0))
        seconds[method] = round(time.perf_counter() - t0, 1)
        outputs[method] = images
        per_pair[method] = score_all(images, items)
        s = summarise(per_pair[method])
        log(f"{method}: IoU {s['layout_iou']['mean']:.3f} adopted {s['adopted']['mean']:.2f} "
            f"leaked {s['leaked']['mean']:.2f} ({seconds[method]:.0f} s)")
    rows = [{"method": name, "seconds": seconds[name], **summarise(values)} for name, values in per_pair.items()]
    differences = [{"method": name, **_difference(values, per_pair[BASELINE])}
                   for name, values in per_pair.items() if BASELINE in per_pair and name in methods and name != BASELINE]
    return {"pairs": pairs, "steps": steps, "style_shape": style_shape, "world_version": MODEL_WORLD_VERSION, "content_seed": CONTENT_SEED,
            "style_seed": STYLE_SEED, "max_overlap": MAX_OVERLAP, "noise_seed": NOISE_SEED,
            "style_prompt": STYLE_PROMPT, "bootstrap": BOOTSTRAP, "rows": rows, "differences": differences,
            "per_pair": per_pair, "_grid": _grid(items, outputs)}


def _grid(items: Sequence[Pair], outputs: Dict[str, list]) -> np.ndarray:
    """One row per pair: content, style, ideal, then each method's output (uint8)."""
    rows = []
    for i, p in enumerate(items):
        cells = [p.content_image, p.style_image, p.ideal_image]
        cells += [np.round(np.asarray(imgs[i]) * 255.0).astype(np.uint8) for imgs in outputs.values()]
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def _rate(s: dict) -> str:
    if np.isnan(s["mean"]):
        return "n/a"
    return f"{s['mean']:.0%} [{s['low']:.0%}, {s['high']:.0%}]"


def _value(s: dict) -> str:
    return f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def _signed(s: dict, percent: bool) -> str:
    if np.isnan(s["mean"]):
        return "n/a"
    if percent:
        return f"{100 * s['mean']:+.0f} [{100 * s['low']:+.0f}, {100 * s['high']:+.0f}] pts"
    return f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"


def markdown(result: dict) -> str:
    """The table (means with 95% bootstrap intervals) and, when StyleID ran, the paired differences from it."""
    lines = ["| method | layout IoU | shape kept | shape colour kept | background | texture | style adopted "
             "(both) | style's shape leaked | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {_value(r['layout_iou'])} | {_rate(r['shape_kept'])} | "
                     f"{r['colour_kept']['mean']:.0%} | {r['background']['mean']:.0%} | {r['texture']['mean']:.0%} | "
                     f"{_rate(r['adopted'])} | {_rate(r['leaked'])} | {r['seconds']:.0f} |")
    if result.get("differences"):
        lines += ["", f"Paired differences from {BASELINE} (method − {BASELINE}, 95% bootstrap interval):", "",
                  "| method | layout IoU | shape kept | style adopted | style's shape leaked |", "|---|---|---|---|---|"]
        for d in result["differences"]:
            lines.append(f"| {d['method']} | {_signed(d['layout_iou'], False)} | {_signed(d['shape_kept'], True)} | "
                         f"{_signed(d['adopted'], True)} | {_signed(d['leaked'], True)} |")
    return "\n".join(lines)


def save(result: dict, out) -> Path:
    """Write eval_style.json (everything, per-pair values included), eval_style.md (the tables) and grid.png (one
    row per pair: content, style, ideal, then the methods in table order) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    grid = result.pop("_grid", None)
    if grid is not None:
        from PIL import Image

        Image.fromarray(grid).save(out / "grid.png")
    (out / "eval_style.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "eval_style.md").write_text(markdown(result) + "\n")
    return out


def pick_example(result: dict, methods: Sequence[str] = (BASELINE, "StyleID + StyleSSP")) -> int:
    """The example pair: the first pair on which every row of `methods` keeps the content's shape (its kind and
    colour), adopts the style (background colour and texture) and does not leak the style's shape.

    Args:
        result (`dict`): a `run` result holding those rows (its ``per_pair`` values).
        methods: the rows that must all succeed.
    """
    per_pair = result["per_pair"]
    missing = [m for m in methods if m not in per_pair]
    if missing:
        raise ValueError(f"methods: {missing[0]!r} is not in the result; accepted: {', '.join(per_pair)}")
    for i in range(result["pairs"]):
        if all(per_pair[m]["shape_kept"][i] == 1 and per_pair[m]["colour_kept"][i] == 1
               and per_pair[m]["adopted"][i] == 1 and per_pair[m]["leaked"][i] == 0 for m in methods):
            return i
    raise ValueError("result: no pair on which every method succeeds; accepted: a result with one")
