"""Evaluation of the embedded toy model: accuracy by the judge, guidance-scale table (CFG vs APG), inversion.

Everything is seeded: prompt ``i`` is sampled with ``torch.Generator().manual_seed(PROMPT_SEED + i)``, the
prompts are a fixed shuffle of every caption of the grammar, and the inversion images are held-out images
of the procedural world (seeds never used for training).  The table opens with a "world" reference row: the
world's own images for the same prompts (``world.scene_from_caption(prompt_i, seed=PROMPT_SEED + i)``),
measured the same way, so each guidance row can be read against what the model was trained to draw.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..metrics import clipped_fraction, mean_saturation
from . import world
from .judge import fidelity_summary, judge_batch, score

__all__ = ["eval_prompts", "load_pipeline", "generate", "guidance_table", "world_reference", "inversion_psnr",
           "run_evaluation", "markdown_table"]

PROMPT_SEED = 1000
INVERSION_SEED = 500_000  # held-out world seeds (training uses seeds >= 10**7)
SCALES = (1.0, 3.0, 5.0, 7.5, 10.0, 15.0)


def eval_prompts(n: int = 192) -> list[str]:
    """``n`` captions: a fixed shuffle of all 270 captions of the grammar (cycled if n > 270)."""
    caps = world.all_captions()
    order = np.random.default_rng(20261126).permutation(len(caps))
    return [caps[order[i % len(caps)]] for i in range(n)]


def _guided_pipeline_class():
    try:
        from guidekit.pipelines import GuidedStableDiffusionPipeline
    except ImportError:  # a source checkout without `pip install -e .`: pipelines/ is a top-level folder
        from pipelines import GuidedStableDiffusionPipeline
    return GuidedStableDiffusionPipeline


def load_pipeline(path=None, device="cpu"):
    from . import default_model_path

    cls = _guided_pipeline_class()
    pipe = cls.from_pretrained(str(path or default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _hooks(method: str):
    import guidekit

    if method == "cfg":
        return [guidekit.CFG()]
    if method == "apg":  # the embedded model's recommended settings (chosen by `guidekit eval-apg`)
        from . import RECOMMENDED_APG

        return [guidekit.APG(**RECOMMENDED_APG)]
    raise ValueError(f"method: got {method!r}; accepted: cfg, apg")


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], scale: float, method: str = "cfg", steps: int = 25, batch: int = 64,
             seed_offset: int = 0):
    """``(images float (N, 64, 64, 3) in [0, 1] unclipped-then-clamped, final latents (N, 4, 16, 16))``."""
    images, latents = [], []
    device = pipe.device
    for lo in range(0, len(prompts), batch):
        chunk = list(prompts[lo:lo + batch])
        gens = [torch.Generator().manual_seed(PROMPT_SEED + seed_offset + lo + i) for i in range(len(chunk))]
        noise = torch.stack([torch.randn(4, 16, 16, generator=g) for g in gens]).to(device)
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=scale, hooks=_hooks(method), latents=noise,
                   output_type="latent", height=64, width=64)
        lat = out.images
        dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        images.append((dec.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
        latents.append(lat.float().cpu())
    return np.concatenate(images), torch.cat(latents)


def _measure(images, latents, prompts) -> dict:
    """Accuracies (strict judge; all three also by the lenient one, to show what the strict reading moved),
    saturation, clipped fraction, shape fidelity (mean and per outline kind), mean |x0|."""
    judgements = judge_batch(images)
    acc = score(images, prompts, judgements)
    lenient = score(images, prompts, judge_batch(images, strict=False))
    return {
        **{f"acc_{k}": v for k, v in acc.items()},
        "acc_all3_lenient": lenient["all3"],
        "saturation": mean_saturation(images),
        "clipped": clipped_fraction(images),
        **fidelity_summary(judgements),
        "mean_abs_x0": float(latents.abs().mean()),
    }


@torch.no_grad()
def world_reference(pipe, prompts) -> dict:
    """The "world" row: the world's own images for the prompts, measured like a guidance row.

    Image ``i`` is ``world.scene_from_caption(prompts[i], seed=PROMPT_SEED + i)`` drawn in the world version the
    model was trained on (`guidekit.toy.MODEL_WORLD_VERSION`); its mean |x0| is that of
    the VAE's latents of these images (posterior mode, scaled as the UNet sees them).
    """
    t0 = time.perf_counter()
    from . import MODEL_WORLD_VERSION

    images = np.stack([world.render(world.as_version(world.scene_from_caption(p, seed=PROMPT_SEED + i),
                                                     MODEL_WORLD_VERSION))[0] for i, p in enumerate(prompts)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(pipe.device, pipe.vae.dtype)
    latents = torch.cat([pipe.vae.encode(x[lo:lo + 64]).latent_dist.mode() for lo in range(0, len(x), 64)])
    latents = latents.float().cpu() * pipe.vae.config.scaling_factor
    row = {"method": "world", "scale": None, **_measure(images.astype(np.float64) / 255.0, latents, prompts)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def guidance_table(pipe, prompts, scales=SCALES, methods=("cfg", "apg"), steps=25, batch=64, log=print):
    rows, grid = [], {}
    for method in methods:
        for w in scales:
            t0 = time.perf_counter()
            images, latents = generate(pipe, prompts, w, method, steps, batch)
            row = {"method": method, "scale": w, **_measure(images, latents, prompts),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            grid[(method, w)] = images[:8]
            log(json.dumps(row))
    return rows, grid


@torch.no_grad()
def inversion_psnr(pipe, n: int = 32, scales=(1.0, 7.5), steps: int = 25) -> dict:
    """DDIM-invert ``n`` held-out world images with their captions, reconstruct at the same scale; PSNR (dB)."""
    from guidekit.inversion import ddim_invert, ddim_levels, ddim_step

    device = pipe.device
    from . import MODEL_WORLD_VERSION

    images, captions, _ = world.generate_batch(range(INVERSION_SEED, INVERSION_SEED + n), MODEL_WORLD_VERSION)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    vae = pipe.vae
    z0 = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    def psnr(rec):
        rec = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).cpu().numpy()
        mse = ((rec - images.astype(np.float64)) ** 2).reshape(n, -1).mean(1)
        return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))

    out = {"n": n, "steps": steps, "vae_only": psnr(vae.decode(z0 / vae.config.scaling_factor).sample)}
    cond, uncond = pipe.encode_prompt(captions, device, 1, True, [""] * n)
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    levels = ddim_levels(sched)
    ptype = sched.config.prediction_type
    for w in scales:
        def model(z, t, w=w):
            tt = torch.full((z.shape[0],), int(t), device=device, dtype=torch.long)
            if w == 1.0:
                return pipe.unet(z, tt, cond).sample
            both = pipe.unet(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([uncond, cond])).sample
            u, c = both.chunk(2)
            return u + w * (c - u)

        inv = ddim_invert(model, z0, levels, prediction_type=ptype)
        z = inv.latents
        for i, t in enumerate(levels.timesteps):
            z = ddim_step(z, model(z, t), levels.alpha_bar[i], levels.alpha_bar_prev[i], ptype)
        out[f"w={w:g}"] = psnr(vae.decode(z / vae.config.scaling_factor).sample)
    return out


def _save_grid(grid: dict, prompts, path: Path):
    from PIL import Image

    keys = list(grid)
    cols = min(len(v) for v in grid.values())
    canvas = np.zeros((len(keys) * 64, cols * 64, 3), dtype=np.uint8)
    for r, k in enumerate(keys):
        for c in range(cols):
            canvas[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] = np.round(grid[k][c] * 255).astype(np.uint8)
    Image.fromarray(canvas).save(path, optimize=True)
    (path.with_suffix(".txt")).write_text(
        "rows: " + ", ".join(f"{m} w={w:g}" for m, w in keys) + "\ncolumns: " + " | ".join(prompts[:cols]) + "\n"
    )


def run_evaluation(out: str | Path, model=None, device="cpu", num_prompts=192, steps=25, scales=SCALES,
                   methods=("cfg", "apg"), default_scale: Optional[float] = None, inversion_n=32, batch=64,
                   log=print) -> dict:
    from . import DEFAULT_GUIDANCE_SCALE, RECOMMENDED_APG

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    default_scale = DEFAULT_GUIDANCE_SCALE if default_scale is None else float(default_scale)
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device)
    prompts = eval_prompts(num_prompts)
    scales = tuple(scales)
    if default_scale not in scales:
        scales = tuple(sorted(scales + (default_scale,)))
    reference = world_reference(pipe, prompts)
    log(json.dumps(reference))
    rows, grid = guidance_table(pipe, prompts, scales, methods, steps, batch, log)
    default_row = next(r for r in rows if r["method"] == "cfg" and r["scale"] == default_scale) if "cfg" in methods \
        else None
    result = {
        "model": str(model or "embedded"),
        "device": str(device),
        "num_prompts": len(prompts),
        "steps": steps,
        "prompt_seed": PROMPT_SEED,
        "default_scale": default_scale,
        "apg_settings": dict(RECOMMENDED_APG),
        "default": default_row,
        "world": reference,
        "table": rows,
    }
    try:
        result["inversion"] = inversion_psnr(pipe, inversion_n, (1.0, 7.5), steps) if inversion_n else None
    except ImportError as exc:  # guidekit.inversion missing
        result["inversion"] = {"skipped": f"guidekit.inversion is not importable: {exc}"}
    log(json.dumps({"inversion": result["inversion"]}))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    _save_grid(grid, prompts, out / "grid.png")
    (out / "table.md").write_text(markdown_table(result))
    return result


def _cell(value, fmt: str) -> str:
    """A table cell; a dash for a value the result lacks (older eval.json files) or that is nan."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return format(value, fmt)


def markdown_table(result: dict) -> str:
    """The table of a :func:`run_evaluation` result, the world's reference row first when the result has one."""
    lines = [
        "| guidance | w | shape colour | background | shape | all three | all three, lenient judge | texture (asked) | "
        "texture (all) | saturation | clipped | shape fidelity | mean abs x0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = ([result["world"]] if result.get("world") else []) + list(result["table"])
    for r in rows:
        name, scale = ("world", "—") if r["method"] == "world" else (r["method"].upper(), f"{r['scale']:g}")
        cells = [_cell(r.get(f"acc_{k}"), ".1%") for k in ("colour", "background", "shape", "all3", "all3_lenient",
                                                            "texture_asked", "texture")]
        cells += [_cell(r.get("saturation"), ".3f"), _cell(r.get("clipped"), ".4f"), _cell(r.get("fidelity"), ".3f"),
                  _cell(r.get("mean_abs_x0"), ".3f")]
        lines.append(f"| {name} | {scale} | " + " | ".join(cells) + " |")
    inv = result.get("inversion") or {}
    if "n" in inv:
        lines += ["", f"Inversion ({inv['n']} held-out world images, DDIM {inv['steps']} steps, caption as prompt): "
                  + ", ".join(f"{k}: {v:.2f} dB" for k, v in inv.items() if k.startswith("w="))
                  + f"; VAE alone: {inv['vae_only']:.2f} dB"]
    return "\n".join(lines) + "\n"
