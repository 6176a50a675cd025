"""EluCD on the embedded model: unconditional generation steered to each "{colour} {shape}" class by the
embedded (clean-image, ReLU) classifier, judged by `guidekit.toy.judge`, never by the guiding classifier.

Every method draws sample ``i`` of class ``c`` from the same noise (seed ``NOISE_SEED + 1000 * c + i``; the ancestral
sampler's step noise from seed ``NOISE_SEED + 1000 * c + STEP_NOISE_OFFSET + i``), so the unguided row is the same
images for every class (its accuracy is chance, about 1/18) and the rows differ only by the guidance. Generation:
empty prompt, guidance scale 1 (no CFG pass), with the sampler of :data:`guidekit.toy.RECOMMENDED_ELUCD_SAMPLER`
(EluCD's own setting: ancestral DDPM steps, which let each step's mean shift stick) unless one is given.

Measured per method: class accuracy (the judged shape colour *and* shape both match the class, read by the
strict judge, which reads no shape into a blob), colour and shape accuracy separately (EluCD steers the colour
more easily than the outline), the class accuracy a lenient judge would give (the kind from the corners alone:
what the strict reading moved), mean shape fidelity (`fidelity_summary`), diversity (distinct judged background colours per class, and the spread of the
shape's centroid, from the judge's mask, per class) and seconds.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .classifier import LABELS
from .judge import Judgement, fidelity_summary, judge_batch

__all__ = [
    "NOISE_SEED",
    "STEP_NOISE_OFFSET",
    "SCHEDULERS",
    "scheduler_for",
    "using_scheduler",
    "step_generators",
    "DEFAULT_SCALES",
    "method_rows",
    "noise",
    "render",
    "class_hits",
    "centroid",
    "diversity",
    "measure",
    "run",
    "pick_scale",
    "markdown",
    "save",
]

NOISE_SEED = 9000
#: Seed offset of the per-sample generators of the ancestral sampler's step noise (samples per class <= 100).
STEP_NOISE_OFFSET = 500
#: The samplers `render` accepts: diffusers scheduler classes built from the pipeline's scheduler config.
SCHEDULERS = ("ddim", "ddpm")
DEFAULT_SCALES = (0.3, 1.0, 3.0)
#: β of the official DDPM script's Softplus smoothing (the ablation row when the recommendation keeps ReLU).
PAPER_SOFTPLUS_BETA = 3.0


def method_rows(scales: Sequence[float], ablation_scale: Optional[float] = None) -> list[dict]:
    """The rows measured: unguided, then ClassifierGuidance and EluCD at every scale, then, at `ablation_scale`
    (default: the largest scale), ClassifierGuidance with EluCD's sine boost (γ of
    `guidekit.toy.RECOMMENDED_ELUCD`: it differs from that scale's EluCD row by the calibration alone, where the
    plain ClassifierGuidance rows also drop the boost) and one ablation row per part of the recommendation,
    switched the other way: the smoothing (off, or the paper's Softplus(3) when the recommendation keeps ReLU),
    the temperatures (τ₂ = τ₁) and the sine boost (γ = 0)."""
    from . import RECOMMENDED_ELUCD

    rows = [{"method": "unguided", "scale": 0.0, "kwargs": {}}]
    for s in scales:
        rows.append({"method": "ClassifierGuidance", "scale": float(s), "kwargs": {}})
        rows.append({"method": "EluCD", "scale": float(s), "kwargs": {}})
    a = float(max(scales) if ablation_scale is None else ablation_scale)
    rows.append({"method": "ClassifierGuidance, sine boost", "scale": a,
                 "kwargs": {"gamma": RECOMMENDED_ELUCD.get("gamma", 0.3)}})
    if RECOMMENDED_ELUCD.get("softplus_beta", 3.0) is None:
        rows.append({"method": "EluCD, Softplus(3) smoothing", "scale": a,
                     "kwargs": {"softplus_beta": PAPER_SOFTPLUS_BETA}})
    else:
        rows.append({"method": "EluCD, no smoothing", "scale": a, "kwargs": {"softplus_beta": None}})
    rows.append({"method": "EluCD, τ₂ = τ₁", "scale": a,
                 "kwargs": {"marginal_temperature": RECOMMENDED_ELUCD.get("joint_temperature", 1.0)}})
    rows.append({"method": "EluCD, no boost", "scale": a, "kwargs": {"gamma": 0.0}})
    return rows


def noise(classes: Sequence[int], samples: int) -> torch.Tensor:
    """Initial latents (len(classes) * samples, 4, 16, 16): sample ``i`` of class ``c`` from seed
    ``NOISE_SEED + 1000 * c + i``."""
    return torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(NOISE_SEED + 1000 * c + i))
                        for c in classes for i in range(samples)])


def step_generators(classes: Sequence[int], samples: int) -> list[torch.Generator]:
    """One generator per sample for the sampler's step noise: sample ``i`` of class ``c`` from seed
    ``NOISE_SEED + 1000 * c + STEP_NOISE_OFFSET + i``, so an image never depends on the batch it is drawn in."""
    return [torch.Generator().manual_seed(NOISE_SEED + 1000 * c + STEP_NOISE_OFFSET + i)
            for c in classes for i in range(samples)]


def scheduler_for(pipe, name: str):
    """A fresh scheduler of kind `name` ("ddim" or "ddpm") from the pipeline's scheduler config (its schedule,
    prediction type and timestep spacing kept)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: {name!r} is not accepted; accepted: {', '.join(SCHEDULERS)}")
    cls = DDPMScheduler if name == "ddpm" else DDIMScheduler
    return cls.from_config(pipe.scheduler.config)


@contextmanager
def using_scheduler(pipe, name: Optional[str]):
    """`pipe` with a fresh scheduler of kind `name` (:func:`scheduler_for`) while the block runs; its own
    scheduler is put back afterwards, also on an error. `name` None keeps the pipeline's own. Yields the
    scheduler in use."""
    if name is None:
        yield pipe.scheduler
        return
    own = pipe.scheduler
    pipe.scheduler = scheduler_for(pipe, name)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = own


def _hooks(row: dict, classifier, labels):
    import guidekit

    if row["method"] == "unguided":
        return []
    from . import RECOMMENDED_ELUCD

    if row["method"].startswith("ClassifierGuidance"):  # the same schedule and step window as EluCD, uncalibrated
        shared = {k: RECOMMENDED_ELUCD[k] for k in ("schedule", "input", "start", "stop") if k in RECOMMENDED_ELUCD}
        return [guidekit.ClassifierGuidance(classifier, labels, scale=row["scale"], **shared, **row["kwargs"])]

    kwargs = {**RECOMMENDED_ELUCD, **row["kwargs"], "scale": row["scale"]}
    return [guidekit.EluCD(classifier, labels, **kwargs)]


def render(pipe, row: dict, classifier, classes: Sequence[int], samples: int, steps: Optional[int] = None,
           batch: int = 36, scheduler: Optional[str] = None) -> np.ndarray:
    """Images float (N, 64, 64, 3) in [0, 1] of one row, classes × samples, from :func:`noise` and
    :func:`step_generators`, sampled with `scheduler` ("ddim" or "ddpm") for `steps` steps (defaults:
    :data:`guidekit.toy.RECOMMENDED_ELUCD_SAMPLER`). The pipeline's own scheduler is put back afterwards."""
    from . import RECOMMENDED_ELUCD_SAMPLER

    steps = RECOMMENDED_ELUCD_SAMPLER["steps"] if steps is None else steps
    scheduler = RECOMMENDED_ELUCD_SAMPLER["scheduler"] if scheduler is None else scheduler
    labels = [int(c) for c in classes for _ in range(samples)]
    latents = noise(classes, samples).to(pipe.device)
    generators = step_generators(classes, samples)
    out = []
    with using_scheduler(pipe, scheduler):
        for lo in range(0, len(labels), batch):
            chunk = labels[lo:lo + batch]
            hooks = _hooks(row, classifier, chunk)
            images = pipe([""] * len(chunk), num_inference_steps=steps, guidance_scale=1.0, hooks=hooks,
                          latents=latents[lo:lo + len(chunk)], generator=generators[lo:lo + len(chunk)],
                          output_type="np", height=64, width=64).images
            out.append(np.clip(images, 0.0, 1.0))
    return np.concatenate(out)


def class_hits(judgements: Sequence[Judgement], labels: Sequence[int], part: str = "class") -> list[bool]:
    """Per image: the judged shape colour and shape are the class's (``LABELS[label]``); ``part="colour"`` or
    ``"shape"`` checks that one alone."""
    if part not in ("class", "colour", "shape"):
        raise ValueError(f"part: got {part!r}; accepted: class, colour, shape")
    hits = []
    for j, y in zip(judgements, labels):
        colour, shape = LABELS[int(y)].split(" ")
        hit = {"colour": j.colour == colour, "shape": j.shape == shape}
        hits.append(hit["colour"] and hit["shape"] if part == "class" else hit[part])
    return hits


def centroid(judgement: Judgement) -> Optional[tuple[float, float]]:
    """(x, y) pixel centroid of the judge's shape mask, or None when no shape was found."""
    if judgement.mask is None or not judgement.mask.any():
        return None
    ys, xs = np.nonzero(judgement.mask)
    return float(xs.mean()), float(ys.mean())


def diversity(judgements: Sequence[Judgement], labels: Sequence[int]) -> dict:
    """Per class, then averaged over classes: the number of distinct judged background colours, and the spread
    of the shape centroids (the root mean of the x and y variances, pixels; classes with fewer than two shapes
    found are left out). ``backgrounds_all``: distinct background colours over all images."""
    by_class: dict = {}
    for j, y in zip(judgements, labels):
        by_class.setdefault(int(y), []).append(j)
    backgrounds, spreads = [], []
    for js in by_class.values():
        backgrounds.append(len({j.background for j in js}))
        points = [p for p in (centroid(j) for j in js) if p is not None]
        if len(points) >= 2:
            pts = np.array(points)
            spreads.append(float(np.sqrt(pts.var(axis=0).mean())))
    return {
        "backgrounds": float(np.mean(backgrounds)) if backgrounds else float("nan"),
        "backgrounds_all": len({j.background for j in judgements}),
        "position_std": float(np.mean(spreads)) if spreads else float("nan"),
    }


def measure(images: np.ndarray, labels: Sequence[int]) -> dict:
    """Class, colour and shape accuracy by the strict judge (and class accuracy by the lenient one), mean shape
    fidelity and diversity of a set of images with their classes."""
    judgements = judge_batch(images)
    lenient = judge_batch(images, strict=False)
    return {
        "accuracy": float(np.mean(class_hits(judgements, labels))),
        "colour_accuracy": float(np.mean(class_hits(judgements, labels, "colour"))),
        "shape_accuracy": float(np.mean(class_hits(judgements, labels, "shape"))),
        "accuracy_lenient": float(np.mean(class_hits(lenient, labels))),
        "fidelity": fidelity_summary(judgements)["fidelity"],
        **diversity(judgements, labels),
    }


def run(pipe, classifier, scales: Sequence[float] = DEFAULT_SCALES, samples: int = 4,
        classes: Optional[Sequence[int]] = None, steps: Optional[int] = None, ablation_scale: Optional[float] = None,
        log: Callable[[str], None] = print, scheduler: Optional[str] = None) -> dict:
    """Every row of :func:`method_rows`, measured. Returns ``{"rows": [...], ...}``."""
    from . import RECOMMENDED_ELUCD, RECOMMENDED_ELUCD_SAMPLER

    steps = RECOMMENDED_ELUCD_SAMPLER["steps"] if steps is None else steps
    scheduler = RECOMMENDED_ELUCD_SAMPLER["scheduler"] if scheduler is None else scheduler

    classes = list(range(len(LABELS))) if classes is None else [int(c) for c in classes]
    labels = [c for c in classes for _ in range(samples)]
    rows = []
    for row in method_rows(scales, ablation_scale):
        t0 = time.perf_counter()
        images = render(pipe, row, classifier, classes, samples, steps, scheduler=scheduler)
        seconds = time.perf_counter() - t0
        result = {"method": row["method"], "scale": row["scale"], **{k: v for k, v in row["kwargs"].items()},
                  **measure(images, labels), "seconds": round(seconds, 1)}
        rows.append(result)
        log(f"{row['method']} s={row['scale']:g}: accuracy {result['accuracy']:.3f} (colour "
            f"{result['colour_accuracy']:.3f}, shape {result['shape_accuracy']:.3f}) fidelity {result['fidelity']:.3f} "
            f"backgrounds {result['backgrounds']:.2f} position std {result['position_std']:.2f} ({seconds:.0f} s)")
    return {"classes": len(classes), "samples": samples, "steps": steps, "scheduler": scheduler,
            "scales": list(map(float, scales)),
            "elucd_settings": {k: v for k, v in RECOMMENDED_ELUCD.items() if k != "scale"}, "rows": rows}


def pick_scale(result: dict, max_fidelity_drop: float = 0.03) -> Optional[float]:
    """The EluCD scale with the best accuracy among those whose fidelity stays within `max_fidelity_drop` of
    the unguided row's (ties: the smaller scale); None when no scale qualifies."""
    base = next(r for r in result["rows"] if r["method"] == "unguided")["fidelity"]
    ok = [r for r in result["rows"] if r["method"] == "EluCD" and r["fidelity"] >= base - max_fidelity_drop]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["accuracy"], -r["scale"]))["scale"]


def markdown(result: dict) -> str:
    lines = ["| method | scale | class accuracy (strict judge) | colour | shape | class accuracy (lenient judge) | "
             "shape fidelity | backgrounds per class | position std (px) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        scale = "" if r["method"] == "unguided" else f"{r['scale']:g}"
        lines.append(f"| {r['method']} | {scale} | {r['accuracy']:.1%} | {r['colour_accuracy']:.1%} | "
                     f"{r['shape_accuracy']:.1%} | {r['accuracy_lenient']:.1%} | {r['fidelity']:.3f} | "
                     f"{r['backgrounds']:.2f} | {r['position_std']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def save(result: dict, out) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_elucd.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "eval_elucd.md").write_text(markdown(result) + "\n")
    return out
