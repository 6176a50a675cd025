r"""`guidekit reconstruct` and `guidekit edit`: UAM (uniform attention maps) on one's own image.

Examples:
    guidekit reconstruct photo.png --out runs/rec
    guidekit reconstruct photo.png --out runs/rec --prompt "a red circle on a blue background" --steps 50
    guidekit edit photo.png --source "a red circle on a blue background" \
        --target "a green circle on a blue background" --out runs/edit

The functions below (`uam_pipeline`, `check_uam_image`, `run_reconstruct`, `run_edit`, `labelled_strip`,
`write_new_files`) are shared with the batch jobs of kinds "reconstruct" and "edit" (`guidekit.apps.uam_jobs`).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Optional

import click

from .cli import FiniteFloatRange, ImageSize

#: The edit's mask modes: "uam" is UAM's adaptive mask-guided edit (Alg. 1); "masactrl" is the paper's baseline
#: row, plain DDIM inversion + MasaCtrl without the mask.
EDIT_MODES = ("uam", "masactrl")
#: Defaults of `UAMStableDiffusionPipeline.edit` (the official run script), kept as plain numbers so `--help`
#: imports no torch; tests check them against the pipeline's.
DEFAULT_GUIDANCE = 7.5
DEFAULT_QUANTILE = 0.5
DEFAULT_RECON_T = 200
DEFAULT_DILATE_RADIUS = 1
DEFAULT_STEPS = 50


class UAMError(click.ClickException):
    """A reconstruction or edit that cannot run as asked, with what is accepted."""


#----------------------------------------------------------------------------
# Shared with the batch jobs.

def uam_pipeline(pipe):
    """`pipe` (a loaded SD 1.x/2.x or SDXL pipeline) as the UAM pipeline of its kind, sharing its modules.

    Raises `ValueError` for other pipelines."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from guidekit.pipelines import UAMStableDiffusionPipeline, UAMStableDiffusionXLPipeline

    if isinstance(pipe, (UAMStableDiffusionPipeline, UAMStableDiffusionXLPipeline)):
        return pipe
    if isinstance(pipe, StableDiffusionXLPipeline):
        cls = UAMStableDiffusionXLPipeline
    elif isinstance(pipe, StableDiffusionPipeline):
        cls = UAMStableDiffusionPipeline
    else:
        raise ValueError(f"model: a {type(pipe).__name__}; accepted: a Stable Diffusion 1.x/2.x or SDXL model")
    out = cls.from_pipe(pipe)  # guidekit's from_pipe keeps the modules' dtype
    out.set_progress_bar_config(disable=True)
    return out


def check_uam_image(pipe, image, name: str = "IMAGE") -> None:
    """Raise `ValueError` naming `name` when `image` (PIL) breaks the size rule of every entry point
    (`guidekit.apps.jobs.size_multiple`) or is too large to decode in the free memory."""
    from guidekit.checks import check_image_memory, check_image_size

    from .jobs import size_multiple

    multiple = size_multiple(pipe)
    w, h = image.size
    try:
        check_image_size(w, h, multiple_of=multiple, names=(f"{name} width", f"{name} height"))
    except ValueError as e:
        raise ValueError(f"{e} (the image is {w}x{h}; this model's sizes are multiples of {multiple})") from None
    check_image_memory(pipe, w, h, images=2, name=name)  # the edit decodes the source and the target


def run_reconstruct(upipe, image, steps: int, prompt: Optional[str] = None, guidance: float = DEFAULT_GUIDANCE,
                    baseline: bool = True) -> dict:
    """UAM's reconstruction of `image` (PIL RGB), and plain DDIM inversion's as the baseline.

    UAM runs as the paper sets it: uniform maps, the null prompt, w = 1. The baseline is the inversion editing
    starts from: the caption `prompt` at CFG scale `guidance` with normal attention (without a prompt: the null
    prompt at w = 1). Returns {"uam": (PIL image, metrics), "baseline": (PIL image, metrics) or None,
    "baseline_setting": words}."""
    rec = upipe.reconstruct(image, num_inference_steps=steps)
    out = {"uam": (rec.images[0], rec.metrics[0]), "baseline": None, "baseline_setting": None}
    if baseline:
        w = float(guidance) if prompt else 1.0
        base = upipe.reconstruct(image, prompt=prompt or "", guidance_scale=w, uniform=False,
                                 num_inference_steps=steps)
        out["baseline"] = (base.images[0], base.metrics[0])
        out["baseline_setting"] = f"DDIM inversion, {'caption' if prompt else 'null prompt'}, w={w:g}"
    return out


def last_mask_step(upipe, steps: int, recon_t: int, recon_t_end: int = 0) -> Optional[tuple[int, int]]:
    """(step index, timestep) of the last step the edit mask acts at (`guidekit.uam.mask_active`), or None when
    no step of the schedule falls in recon_t_end < t < recon_t."""
    from guidekit.inversion import ddim_levels
    from guidekit.uam import mask_active

    levels = ddim_levels(upipe._uam_scheduler(steps))
    active = [(i, int(t)) for i, t in enumerate(levels.timesteps) if mask_active(t, recon_t, recon_t_end)]
    return active[-1] if active else None


def run_edit(upipe, image, source: str, target: str, steps: int, guidance: float = DEFAULT_GUIDANCE,
             mode: str = "uam", quantile: float = DEFAULT_QUANTILE, recon_t: int = DEFAULT_RECON_T,
             dilate_radius: int = DEFAULT_DILATE_RADIUS) -> dict:
    """UAM's mask-guided edit of `image` (PIL RGB) from the caption `source` to `target`.

    Returns {"image": PIL, "mask": (H, W) float array in [0, 1] or None, "coverage": float or None,
    "mask_source": words saying where the mask came from}."""
    import numpy as np

    from guidekit.uam import quantile_schedule

    if mode not in EDIT_MODES:
        raise ValueError(f"mode: {mode!r} is not accepted; accepted: {', '.join(map(repr, EDIT_MODES))}")
    adaptive = mode == "uam"
    out = upipe.edit(image, source, target, num_inference_steps=steps, guidance_scale=guidance,
                     adaptive_mask=adaptive, start_step=min(4, steps), quantile=quantile, recon_t=recon_t,
                     dilate_radius=dilate_radius)
    mask = None if out.masks is None else np.asarray(out.masks[0], dtype=np.float32)
    coverage = None if mask is None else float(mask.mean())
    if not adaptive:
        where = "no mask: mode 'masactrl' is plain DDIM inversion + MasaCtrl (the paper's baseline)"
    elif mask is None:
        where = (f"no mask: no step of the {steps}-step schedule has a timestep below recon_t {recon_t}; "
                 "accepted: more steps or a larger recon_t")
    else:
        i, t = last_mask_step(upipe, steps, recon_t)
        where = (f"UAM's adaptive mask, |x0_src - x0_tgt| above the threshold at quantile "
                 f"{float(quantile_schedule(quantile, steps)[i]):.3g} of step {i + 1}/{steps} (t={t}), dilated by "
                 f"{dilate_radius} latent px; the fraction of latent channels edited per pixel")
    return {"image": out.images[0], "mask": mask, "coverage": coverage, "mask_source": where}


def mask_to_image(mask, size):
    """A mask (H, W) in [0, 1] as a grey PIL image of `size` (black where no mask was used)."""
    import numpy as np
    from PIL import Image

    if mask is None:
        return Image.new("L", size, 0)
    return Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype("uint8"), mode="L")


def labelled_strip(images, labels, cell: int = 128):
    """PIL images side by side, each scaled to the first one's aspect at least `cell` px wide, with its label
    in a band above it (small images get room for the words)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = images[0].size
    scale = max(1, -(-cell // w))
    cw, ch = w * scale, h * scale
    band = 16
    strip = Image.new("RGB", (cw * len(images), ch + band), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for i, (im, label) in enumerate(zip(images, labels)):
        im = im.convert("RGB").resize((cw, ch), Image.NEAREST)
        strip.paste(im, (i * cw, band))
        draw.text((i * cw + 3, 2), label, fill="black", font=font)
    return strip


def write_new_files(folder: Path, files: dict) -> tuple[dict, Optional[str]]:
    """Write {name: PIL image} into `folder` (created if missing) as PNGs, never over an existing file: when any
    name is taken, every name gets the first free suffix -2, -3, ... Returns ({name: path}, a note saying
    which names were taken, or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(files)
    n = 1
    while True:
        paths = {k: folder / (k if n == 1 else f"{Path(k).stem}-{n}{Path(k).suffix}") for k in names}
        if not any(p.exists() for p in paths.values()):
            break
        n += 1
    note = None
    if n > 1:
        taken = ", ".join(k for k in names if (folder / k).exists())
        note = f"{taken} exist{'s' if ',' not in taken else ''} in {folder}; wrote new names with suffix -{n}"
    for key, path in paths.items():
        buffer = io.BytesIO()
        files[key].save(buffer, format="PNG")
        with open(path, "xb") as fh:  # "x": fails if the name appeared meanwhile, never replaces a file
            fh.write(buffer.getvalue())
    return paths, note


def format_metrics(name: str, metrics: dict) -> str:
    return f"{name}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}"


#----------------------------------------------------------------------------
# Command line.

def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} is a file; accepted: a folder (created if missing)", param_hint="'--out'")


def _load(image_path: Path, size, model, device):
    """(UAM pipeline, model name, PIL image resized to `size` if given), the image checked for this model."""
    import PIL.Image

    from .generate import load_pipeline

    try:
        with PIL.Image.open(image_path) as im:
            im.load()
            image = im.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, ValueError) as e:
        raise click.BadParameter(f"{image_path} cannot be read as an image ({e}); accepted: PNG, JPEG or another "
                                 "format Pillow reads", param_hint="'IMAGE'") from None
    pipe, name = load_pipeline(model, device=device)
    try:
        upipe = uam_pipeline(pipe)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--model'") from None
    if size is not None:
        from .cli import check_size_option

        image = image.resize(check_size_option(upipe, size, default=0, images=2), PIL.Image.BICUBIC)
    try:
        check_uam_image(upipe, image)
    except ValueError as e:
        raise click.BadParameter(f"{e}; or pass --size to resize it", param_hint="'IMAGE'") from None
    return upipe, name, image


_common = [
    click.argument("image", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)),
    click.option("--out", type=click.Path(path_type=Path), required=True, metavar="DIR",
                 help="Output folder (created if missing). Existing files are never replaced: new names get a "
                      "suffix, and the command says which."),
    click.option("--model", default=None, metavar="ID_OR_PATH",
                 help="diffusers SD 1.x/2.x or SDXL model folder or hub id. Default: the embedded toy model."),
    click.option("--steps", type=click.IntRange(1, 1000), default=DEFAULT_STEPS,
                 help="DDIM steps of the inversion and of the denoising (the paper: 50)."),
    click.option("--size", type=ImageSize(), default=None,
                 help="Resize the image to N or WxH first (a multiple of the model's size rule). Default: its size."),
    click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps."),
]


def _with_common(f):
    for decorator in reversed(_common):
        f = decorator(f)
    return f


@click.command(context_settings={"show_default": True})
@_with_common
@click.option("--prompt", default=None, metavar="TEXT",
              help="What the image shows (the source caption). UAM does not need it; the baseline inverts with "
                   "it at --guidance (without it: the null prompt at w = 1).")
@click.option("--guidance", type=FiniteFloatRange(0.0, 100.0), default=DEFAULT_GUIDANCE,
              help="CFG scale of the baseline with --prompt (the editing setting, 7.5 in the paper).")
@click.option("--baseline/--no-baseline", default=True,
              help="Also reconstruct with plain DDIM inversion (normal attention) for comparison.")
def reconstruct(image, out, model, steps, size, device, prompt, guidance, baseline):
    """Invert IMAGE with UAM and reconstruct it; write the reconstruction and a labelled strip into DIR.

    Prints PSNR and SSIM of the reconstruction against the input, for UAM and for the baseline. DDIM is
    deterministic, so there is no seed.
    """
    _check_out(out)
    start = time.perf_counter()
    upipe, name, img = _load(image, size, model, device)
    try:
        result = run_reconstruct(upipe, img, steps, prompt=prompt, guidance=guidance, baseline=baseline)
    except ValueError as e:
        raise UAMError(str(e)) from None
    rec, metrics = result["uam"]
    cells, labels = [img, rec], ["input", "UAM reconstruction"]
    if result["baseline"] is not None:
        cells.append(result["baseline"][0])
        labels.append("DDIM baseline")
    stem = image.stem
    paths, note = write_new_files(out, {f"{stem}-reconstruction.png": rec,
                                        f"{stem}-reconstruction-strip.png": labelled_strip(cells, labels)})
    if note:
        click.echo(f"note: {note}")
    click.echo(format_metrics("UAM (uniform maps, null prompt, w=1)", metrics))
    if result["baseline"] is not None:
        click.echo(format_metrics(f"baseline ({result['baseline_setting']})", result["baseline"][1]))
    for path in paths.values():
        click.echo(f"wrote {path}")
    click.echo(f"{img.width}x{img.height}, {steps} steps, {name}, {time.perf_counter() - start:.1f}s")


@click.command(context_settings={"show_default": True})
@_with_common
@click.option("--source", required=True, metavar="TEXT", help="What the image shows (the source caption).")
@click.option("--target", required=True, metavar="TEXT", help="What it should become (the target caption).")
@click.option("--mode", type=click.Choice(EDIT_MODES), default="uam",
              help="uam: UAM's adaptive mask-guided edit; masactrl: plain DDIM inversion + MasaCtrl, no mask "
                   "(the paper's baseline).")
@click.option("--guidance", type=FiniteFloatRange(0.0, 100.0), default=DEFAULT_GUIDANCE,
              help="CFG scale of the source and target branches (the paper: 7.5).")
@click.option("--quantile", type=FiniteFloatRange(0.0, 1.0, min_open=True, max_open=True), default=DEFAULT_QUANTILE,
              help="Largest quantile of the mask threshold schedule (the official run script: 0.5).")
@click.option("--recon-t", type=click.IntRange(1, 1000), default=DEFAULT_RECON_T,
              help="The mask acts at timesteps below this (200: about the last 10 of 50 steps).")
@click.option("--dilate-radius", type=click.IntRange(0, 16), default=DEFAULT_DILATE_RADIUS,
              help="Dilation radius of the edit mask, in latent pixels.")
def edit(image, out, model, steps, size, device, source, target, mode, guidance, quantile, recon_t, dilate_radius):
    """Edit IMAGE from the --source caption to the --target caption with UAM's mask-guided edit.

    Writes the edited image, the mask and a labelled strip (input | mask | edit) into DIR, and prints the
    mask's coverage and where it came from.
    """
    _check_out(out)
    for option, text in (("--source", source), ("--target", target)):
        if not text.strip():
            raise click.BadParameter("an empty caption; accepted: a non-empty text", param_hint=f"'{option}'")
    start = time.perf_counter()
    upipe, name, img = _load(image, size, model, device)
    try:
        result = run_edit(upipe, img, source, target, steps, guidance=guidance, mode=mode, quantile=quantile,
                          recon_t=recon_t, dilate_radius=dilate_radius)
    except ValueError as e:
        raise UAMError(str(e)) from None
    mask_img = mask_to_image(result["mask"], img.size)
    stem = image.stem
    files = {f"{stem}-edit.png": result["image"]}
    if result["mask"] is not None:
        files[f"{stem}-mask.png"] = mask_img
    files[f"{stem}-edit-strip.png"] = labelled_strip([img, mask_img, result["image"]],
                                                     ["input", "mask" if result["mask"] is not None else "no mask",
                                                      "edit"])
    paths, note = write_new_files(out, files)
    if note:
        click.echo(f"note: {note}")
    coverage = "none" if result["coverage"] is None else f"{100 * result['coverage']:.1f}% of the image"
    click.echo(f"mask coverage: {coverage}")
    click.echo(f"mask source: {result['mask_source']}")
    for path in paths.values():
        click.echo(f"wrote {path}")
    click.echo(f"{img.width}x{img.height}, {steps} steps, mode {mode}, w {guidance:g}, {name}, "
               f"{time.perf_counter() - start:.1f}s")
