"""`guidekit eval-uam`: UAM's effect on the embedded toy model, on procedurally generated images.

Reconstruction (≥ 32 images of the toy world, each with its caption): PSNR / SSIM / MSE of the decoded
reconstruction against the input for

  (a) plain DDIM inversion with the caption at w = 1,
  (b) plain DDIM inversion with the caption at w = 7.5 (the setting editing needs, which drifts),
  (c) UAM: uniform cross-attention maps with the null prompt,
  (d) plain DDIM inversion with the null prompt at w = 1 (what (c) changes is only the attention maps).

Edits (the same images): change the shape's colour word, or its shape word, in the caption; run
`edit(image, caption, new_caption)` with and without the adaptive mask (without = DDIM inversion + MasaCtrl)
and report the judge's accuracy on the new attribute, whether the background colour survived, and the PSNR
of the unedited region: the pixels outside the source shape and the target shape (same layout), grown by
one pixel to leave out anti-aliased borders.

    guidekit eval-uam                                   # 32 images, 50 DDIM steps, w = 7.5
    guidekit eval-uam --num-images 64 --json uam.json --markdown uam.md
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import click
import numpy as np

from .cli import FiniteFloatRange

__all__ = ["eval_uam", "evaluate", "edit_targets"]


def edit_targets(scene, kind: str):
    """(new caption, new attribute, target scene) for a colour-word or shape-word change of a toy scene."""
    from guidekit.toy.world import COLOURS, SHAPES

    if kind == "colour":
        i = COLOURS.index(scene.colour)
        new = next(c for c in COLOURS[i + 1 :] + COLOURS[: i + 1] if c not in (scene.colour, scene.background))
        target = replace(scene, colour=new)
    elif kind == "shape":
        i = SHAPES.index(scene.shape)
        new = SHAPES[(i + 1) % len(SHAPES)]
        target = replace(scene, shape=new)
    else:
        raise ValueError(f"kind: {kind!r} is not accepted; accepted: 'colour', 'shape'")
    return target.caption, new, target


def _grow(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    out = mask.copy()
    for axis in (0, 1):
        for shift in range(1, pixels + 1):
            for s in (shift, -shift):
                rolled = np.roll(mask, s, axis=axis)
                if s > 0:
                    rolled[(slice(None),) * axis + (slice(0, s),)] = False
                else:
                    rolled[(slice(None),) * axis + (slice(s, None),)] = False
                out |= rolled
    return out


def _mean(rows, key):
    vals = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate(
    model: Optional[str] = None,
    num_images: int = 32,
    seed: int = 1000,
    steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    quantile: float = 0.5,
    recon_t: int = 200,
    parts: str = "all",
    dilate_radius: int = 1,
    baseline: bool = True,
    log=print,
) -> dict:
    """Run the evaluation and return {"reconstruction": [...], "edits": [...], "settings": {...}}.

    Args:
        model (`str`, *optional*): a Stable Diffusion folder; None: the embedded toy model.
        num_images (`int`, defaults to `32`): images of the toy world, seeds `seed`, `seed + 1`, ...
        seed (`int`, defaults to `1000`): first seed.
        steps (`int`, defaults to `50`): DDIM steps (the paper: 50).
        guidance_scale (`float`, defaults to `7.5`): w of setting (b) and of the editing branches.
        batch_size (`int`, defaults to `8`): images per pipeline call.
        quantile (`float`, defaults to `0.5`): `edit(quantile=)`, q_max of the mask schedule.
        recon_t (`int`, defaults to `200`): `edit(recon_t=)`, the mask acts while t < recon_t.
        parts (`str`, defaults to ``"all"``): ``"all"``, ``"reconstruction"`` or ``"edits"``.
        dilate_radius (`int`, defaults to `1`): `edit(dilate_radius=)`.
        baseline (`bool`, defaults to `True`): also run the edits without the adaptive mask.
    """
    if parts not in ("all", "reconstruction", "edits"):
        raise ValueError(f"parts: {parts!r} is not accepted; accepted: 'all', 'reconstruction', 'edits'")
    import torch

    from guidekit.metrics import masked_psnr
    from guidekit.pipelines import UAMStableDiffusionPipeline
    from guidekit.toy.judge import judge
    from guidekit.toy.world import generate, render

    from .generate import default_model

    path = str(model or default_model()[0])  # a clear error when the embedded model is not installed
    pipe = UAMStableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    from guidekit.toy import MODEL_WORLD_VERSION

    samples = [generate(seed + i, MODEL_WORLD_VERSION) for i in range(num_images)]  # the model's own world
    batches = [samples[i : i + batch_size] for i in range(0, num_images, batch_size)]

    settings = {
        "(a) DDIM inversion, caption, w=1": dict(uniform=False, guidance=1.0, caption=True),
        f"(b) DDIM inversion, caption, w={guidance_scale:g}": dict(uniform=False, guidance=guidance_scale, caption=True),
        "(c) UAM: uniform maps, null prompt": dict(uniform=True, guidance=1.0, caption=False),
        "(d) DDIM inversion, null prompt, w=1": dict(uniform=False, guidance=1.0, caption=False),
    }
    reconstruction = []
    for name, cfg in settings.items():
        if parts == "edits":
            break
        t0, rows = time.perf_counter(), []
        for batch in batches:
            images = np.stack([s.image for s in batch])
            prompts = [s.caption for s in batch] if cfg["caption"] else ""
            out = pipe.reconstruct(images, prompts, cfg["guidance"], cfg["uniform"], steps, output_type="np")
            rows += out.metrics
        row = {"setting": name, "psnr": _mean(rows, "psnr"), "psnr_median": float(np.median([r["psnr"] for r in rows])),
               "ssim": _mean(rows, "ssim"), "mse": _mean(rows, "mse"), "n": len(rows),
               "seconds": round(time.perf_counter() - t0, 1)}
        reconstruction.append(row)
        log(f"reconstruction {name}: PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.4f} ({row['seconds']} s)")

    edits = []
    for kind in (("colour", "shape") if parts != "reconstruction" else ()):
        for adaptive in ((True, False) if baseline else (True,)):
            t0 = time.perf_counter()
            hits, bg_kept, psnrs = [], [], []
            for batch in batches:
                images = np.stack([s.image for s in batch])
                targets = [edit_targets(s.scene, kind) for s in batch]
                out = pipe.edit(
                    images,
                    [s.caption for s in batch],
                    [t[0] for t in targets],
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    adaptive_mask=adaptive,
                    start_step=min(4, steps),  # MasaCtrl's default, kept valid for short test runs
                    quantile=quantile,
                    recon_t=recon_t,
                    dilate_radius=dilate_radius,
                    output_type="np",
                )
                region = []
                for s, (_, new, target_scene), edited in zip(batch, targets, out.images):
                    got = judge(edited)
                    hits.append((got.colour if kind == "colour" else got.shape) == new)
                    bg_kept.append(got.background == s.scene.background)
                    region.append(~_grow(s.mask | render(target_scene)[1], 1))
                psnrs += masked_psnr(out.images, images.astype(np.float64) / 255.0, np.stack(region))
            row = {
                "edit": f"{kind} word",
                "adaptive_mask": adaptive,
                "accuracy": float(np.mean(hits)),
                "background_kept": float(np.mean(bg_kept)),
                "psnr_unedited": float(np.mean([p for p in psnrs if np.isfinite(p)])),
                "n": len(hits),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            edits.append(row)
            log(f"edit {kind} mask={adaptive}: accuracy {row['accuracy']:.3f}, unedited PSNR {row['psnr_unedited']:.2f} dB")
    return {
        "reconstruction": reconstruction,
        "edits": edits,
        "settings": {"model": path, "num_images": num_images, "seed": seed, "steps": steps,
                     "guidance_scale": guidance_scale, "quantile": quantile, "recon_t": recon_t,
                     "dilate_radius": dilate_radius,
                     "threads": torch.get_num_threads()},
    }


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = []
    if result["reconstruction"]:
        lines += [
            f"Reconstruction, {s['num_images']} toy-world images (seeds {s['seed']}…), {s['steps']} DDIM steps:",
            "",
            "| setting | PSNR (dB) ↑ | median PSNR (dB) ↑ | SSIM ↑ | MSE ↓ |",
            "|---|---|---|---|---|",
        ]
        for r in result["reconstruction"]:
            lines.append(f"| {r['setting']} | {r['psnr']:.2f} | {r['psnr_median']:.2f} | {r['ssim']:.4f} | {r['mse']:.5f} |")
    if result["edits"]:
        lines += [
            "",
            f"Edits, {s['num_images']} images (w = {s['guidance_scale']:g}, quantile {s['quantile']:g}, recon_t "
            f"{s['recon_t']}, dilate_radius {s.get('dilate_radius', 1)}; judge accuracy of the new attribute; "
            "PSNR outside source ∪ target shape):",
            "",
            "| edit | adaptive mask | accuracy ↑ | background kept ↑ | PSNR unedited (dB) ↑ |",
            "|---|---|---|---|---|",
        ]
        for r in result["edits"]:
            lines.append(
                f"| {r['edit']} | {'yes' if r['adaptive_mask'] else 'no (MasaCtrl only)'} | {r['accuracy']:.3f} | "
                f"{r['background_kept']:.3f} | {r['psnr_unedited']:.2f} |"
            )
    return "\n".join(lines).strip()


@click.command(context_settings={"show_default": True})
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Stable Diffusion folder; default: the embedded toy model.")
@click.option("--num-images", type=click.IntRange(1, 10000), default=32, metavar="INT", help="Toy-world images.")
@click.option("--seed", type=click.IntRange(0), default=1000, metavar="INT", help="Seed of the first image.")
@click.option("--steps", type=click.IntRange(1, 1000), default=50, metavar="INT", help="DDIM steps.")
@click.option("--guidance", "guidance_scale", type=FiniteFloatRange(0, 100), default=7.5, metavar="FLOAT",
              help="w of the plain-inversion baseline (b) and of the editing branches.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, metavar="INT", help="Images per call.")
@click.option("--quantile", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=0.5, metavar="FLOAT",
              help="q_max of the edit mask's quantile schedule.")
@click.option("--recon-t", type=click.IntRange(0, 1000), default=200, metavar="INT",
              help="The edit mask acts while the timestep is below this.")
@click.option("--dilate-radius", type=click.IntRange(0, 16), default=1, metavar="INT", help="Edit mask dilation radius (latent pixels).")
@click.option("--baseline/--no-baseline", default=True, help="Also run the edits without the adaptive mask.")
@click.option("--parts", type=click.Choice(["all", "reconstruction", "edits"]), default="all", help="What to run.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the numbers as JSON.")
@click.option("--markdown", "md_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the tables as Markdown.")
def eval_uam(model, num_images, seed, steps, guidance_scale, batch_size, quantile, recon_t, dilate_radius, baseline, parts,
             json_out, md_out):
    """UAM reconstruction and editing numbers on procedurally generated toy-world images."""
    import torch

    torch.set_num_threads(1)  # a shared machine: one thread per process
    result = evaluate(model, num_images, seed, steps, guidance_scale, batch_size, quantile, recon_t, parts,
                      dilate_radius, baseline, log=click.echo)
    table = to_markdown(result)
    click.echo(table)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))
    if md_out:
        md_out.write_text(table + "\n")


if __name__ == "__main__":
    eval_uam()
