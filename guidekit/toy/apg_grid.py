"""A grid of APG settings (r, β, η) at high guidance scales on the embedded model, against CFG.

APG's radius r is a raw L2 norm over the whole latent, so the value that suits SDXL's 128×128×4 latents
(r = 15) is far too large for the toy model's 16×16×4 ones: it never rescales anything. This grid is how
`guidekit.toy.RECOMMENDED_APG` is chosen: on held-out prompts (a different shuffle from the accuracy
table's), every setting at every scale, judged by `guidekit.toy.judge`; the most accurate setting that keeps
the world's saturation at every scale is recommended (`pick_recommended`).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..metrics import clipped_fraction, mean_saturation
from . import world
from .judge import fidelity_summary, judge_batch, score

__all__ = ["GRID_SCALES", "default_grid", "heldout_prompts", "render", "measure", "run_grid", "pick_recommended"]

GRID_SCALES = (10.0, 15.0, 20.0)
GRID_SEED = 7000  # noise seeds of the grid's prompts; the accuracy table uses 1000 + i


def default_grid() -> list[dict]:
    """The (norm_threshold, momentum, eta) settings measured: r from 1 to 15, with and without momentum."""
    grid = [dict(norm_threshold=r, momentum=b, eta=0.0) for r, b in itertools.product((1.0, 2.0, 4.0, 8.0, 15.0), (0.0, -0.5))]
    grid += [dict(norm_threshold=2.0, momentum=0.0, eta=0.5), dict(norm_threshold=4.0, momentum=0.0, eta=0.5)]
    return grid


def heldout_prompts(n: int = 48) -> list[str]:
    """``n`` captions from a shuffle of the grammar independent of the accuracy table's."""
    caps = world.all_captions()
    order = np.random.default_rng(20261128).permutation(len(caps))
    return [caps[order[i % len(caps)]] for i in range(n)]


@torch.no_grad()
def render(pipe, prompts: Sequence[str], scale: float, hooks, steps: int = 25, batch: int = 48) -> np.ndarray:
    """Images float (N, 64, 64, 3) in [0, 1]; prompt ``i`` starts from the noise of seed GRID_SEED + i."""
    out = []
    for lo in range(0, len(prompts), batch):
        chunk = list(prompts[lo:lo + batch])
        noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(GRID_SEED + lo + i))
                             for i in range(len(chunk))]).to(pipe.device)
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=scale, hooks=hooks, latents=noise,
                      output_type="np", height=64, width=64).images
        out.append(images)
    return np.concatenate(out)


def measure(images: np.ndarray, prompts: Sequence[str]) -> dict:
    """Accuracy, mean shape fidelity, saturation and clipped fraction of a set of images."""
    judgements = judge_batch(images)
    acc = score(images, prompts, judgements)
    return {
        "all3": acc["all3"],
        "texture": acc["texture_asked"],
        "fidelity": fidelity_summary(judgements)["fidelity"],
        "saturation": mean_saturation(images),
        "clipped": clipped_fraction(images),
    }


def world_reference(prompts: Sequence[str]) -> dict:
    """The same measures on the world's own images of the same captions (layouts from the grid seeds), in the
    world version the model was trained on."""
    from . import MODEL_WORLD_VERSION

    images = np.stack([world.render(world.as_version(world.scene_from_caption(c, seed=GRID_SEED + i), MODEL_WORLD_VERSION))[0]
                       for i, c in enumerate(prompts)])
    return measure(images.astype(np.float64) / 255.0, prompts)


def run_grid(pipe, prompts: Sequence[str], scales: Sequence[float] = GRID_SCALES, grid: Optional[list[dict]] = None,
             steps: int = 25, log: Callable[[str], None] = print) -> dict:
    """CFG and every APG setting of `grid` at every scale: a list of rows plus the world's reference."""
    import guidekit

    grid = default_grid() if grid is None else grid
    rows = []
    settings = [("cfg", {})] + [("apg", g) for g in grid]
    for (method, setting), scale in itertools.product(settings, scales):
        t0 = time.perf_counter()
        hooks = [guidekit.CFG()] if method == "cfg" else [guidekit.APG(**setting)]
        row = {"method": method, "scale": float(scale), **setting, **measure(render(pipe, prompts, scale, hooks, steps), prompts)}
        rows.append(row)
        log(f"{method} {setting} w={scale}: all3 {row['all3']:.3f} fidelity {row['fidelity']:.3f} "
            f"saturation {row['saturation']:.3f} clipped {row['clipped']:.4f} ({time.perf_counter() - t0:.0f} s)")
    return {"prompts": len(prompts), "steps": steps, "scales": list(scales), "rows": rows,
            "world": world_reference(prompts)}


def pick_recommended(result: dict, saturation_tolerance: float = 0.02) -> dict:
    """The APG setting to recommend, as `guidekit.APG` keyword arguments.

    APG's promise is high guidance scales without oversaturation, so the candidates are the settings whose mean
    saturation stays within ``saturation_tolerance`` of the world's at every scale of the grid; among them, the
    best mean all-three accuracy wins (ties: shape fidelity). If no setting keeps the saturation, every setting is
    a candidate and the saturation gap only breaks ties.
    """
    world_sat = result["world"]["saturation"]
    by_setting: dict = {}
    for row in result["rows"]:
        if row["method"] != "apg":
            continue
        key = (row["norm_threshold"], row["momentum"], row["eta"])
        by_setting.setdefault(key, []).append(row)

    def keeps_saturation(rows):
        return all(abs(r["saturation"] - world_sat) <= saturation_tolerance for r in rows)

    def rank(item):
        rows = item[1]
        return (np.mean([r["all3"] for r in rows]), np.nanmean([r["fidelity"] for r in rows]),
                -np.mean([abs(r["saturation"] - world_sat) for r in rows]))

    candidates = {k: v for k, v in by_setting.items() if keeps_saturation(v)} or by_setting
    (r, b, e), _ = max(candidates.items(), key=rank)
    return {"eta": e, "norm_threshold": r, "momentum": b}


def markdown(result: dict) -> str:
    lines = ["| guidance | r | β | η | w | all three | texture | shape fidelity | saturation | clipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    w = result["world"]
    lines.append(f"| world images | | | | | {w['all3']:.1%} | {w['texture']:.1%} | {w['fidelity']:.3f} | "
                 f"{w['saturation']:.3f} | {w['clipped']:.4f} |")
    for row in result["rows"]:
        r, b, e = (row.get("norm_threshold", ""), row.get("momentum", ""), row.get("eta", ""))
        lines.append(f"| {row['method'].upper()} | {r} | {b} | {e} | {row['scale']:g} | {row['all3']:.1%} | "
                     f"{row['texture']:.1%} | {row['fidelity']:.3f} | {row['saturation']:.3f} | {row['clipped']:.4f} |")
    return "\n".join(lines)


def save(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "apg_grid.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "apg_grid.md").write_text(markdown(result) + "\n")
    return out
