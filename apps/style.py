"""`guidekit style`: StyleID style transfer of one content image, optionally with StyleSSP's start point.

Examples:
    guidekit style --out strip.png --side-by-side      # the example pair (guidekit.toy.style_example)
    guidekit style content.png style.png --out styled.png
    guidekit style content.png style.png --out strip.png --side-by-side --style-prompt "a yellow circle"
    guidekit style photo.png painting.png --out out.png --model runwayml/stable-diffusion-v1-5 --device cuda

Without CONTENT and STYLE the command runs the example pair of the embedded model's style task
(`guidekit.toy.style_example.STYLE_EXAMPLE`, two PNGs in assets/examples: the content gives the layout, the style
the background's colour and texture), with its style prompt (`STYLE_EXAMPLE_PROMPT`) unless one is given.

The functions below (`load_image`, `style_pipeline`, `run_transfer`, `style_numbers`) are shared with the demo's
Style tab, so the command and the tab compute the same images and numbers. The side-by-side strip is
`guidekit.apps.uam_image.labelled_strip`, as `guidekit reconstruct` and `guidekit edit` write theirs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import click

from .cli import FiniteFloatRange

#: StyleID's defaults (the official code; `guidekit.pipelines.styleid_sd.DEFAULT_GAMMA`/`DEFAULT_TEMPERATURE`)
#: and StyleSSP's (the official code; `guidekit.StyleSSP`). Kept here as plain numbers so `--help` imports
#: no torch; tests check them against the library's.
DEFAULT_GAMMA = 0.75
DEFAULT_TEMPERATURE = 1.5
DEFAULT_ALPHA = 0.7
DEFAULT_NEGATIVE_SCALE = 0.5


#: The panels of the --side-by-side strip, left to right.
STRIP_LABELS = ("content", "style", "StyleID", "StyleID + StyleSSP")


class StyleError(click.ClickException):
    """A style-transfer input that cannot be used, with what is accepted."""


#----------------------------------------------------------------------------
# Shared with the demo.

def load_image(path, name: str):
    """An image file as an RGB PIL image; `StyleError` (naming `name`) when it is missing or unreadable."""
    import PIL.Image

    path = Path(path)
    if not path.exists():
        raise StyleError(f"{name}: {path} not found; accepted: an image file (PNG, JPEG, ...)")
    if not path.is_file():
        raise StyleError(f"{name}: {path} is not a file; accepted: an image file (PNG, JPEG, ...)")
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise StyleError(f"{name}: {path} cannot be read as an image ({exc}); accepted: PNG, JPEG or another "
                         "format Pillow reads") from None


def check_style_images(pipe, content, style, names=("CONTENT", "STYLE")) -> None:
    """The checks `transfer` makes on its images (`guidekit.pipelines.images.prepare_image`: RGB, sizes multiples
    of the VAE factor) plus the size rule of every entry point (`guidekit.apps.jobs.size_multiple`, as for style
    jobs in `guidekit batch` and the demo), before any model call. Raises `ValueError` naming the image."""
    from guidekit.checks import check_image_size
    from guidekit.pipelines.images import prepare_image

    from .jobs import size_multiple, vae_factor

    for name, image in zip(names, (content, style)):
        prepare_image(image, vae_factor(pipe), name=name)
        check_image_size(image.width, image.height, multiple_of=size_multiple(pipe),
                         names=(f"{name} width", f"{name} height"))


def style_pipeline(pipe):
    """`pipe` (a loaded SD 1.x/2.x pipeline) as a `StyleIDStableDiffusionPipeline` sharing its modules.

    Raises `ValueError` for SDXL and other pipelines: StyleID is implemented for SD 1.x/2.x only.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from guidekit.pipelines import StyleIDStableDiffusionPipeline

    if isinstance(pipe, StyleIDStableDiffusionPipeline):
        return pipe
    if isinstance(pipe, StableDiffusionXLPipeline) or not isinstance(pipe, StableDiffusionPipeline):
        raise ValueError(f"model: a {type(pipe).__name__}; accepted: a Stable Diffusion 1.x/2.x model (StyleID is "
                         "not implemented for SDXL or other pipelines)")
    out = StyleIDStableDiffusionPipeline.from_pipe(pipe)
    out.set_progress_bar_config(disable=True)
    return out


def negative_scale_for(negative_scale: Optional[float], style_prompt: Optional[str]) -> float:
    """StyleSSP's negative-guided inversion scale: the one given, else `DEFAULT_NEGATIVE_SCALE` when a style
    prompt says what the style image shows, else 0 (no style prompt: frequency start point only)."""
    if negative_scale is not None:
        if negative_scale > 0 and not style_prompt:
            raise ValueError(f"negative scale: {negative_scale:g} needs a style prompt (what the style image shows, "
                             "the negative of the inversion guidance); accepted: a style prompt, or scale 0")
        return float(negative_scale)
    return DEFAULT_NEGATIVE_SCALE if style_prompt else 0.0


def run_transfer(spipe, content, style, *, stylessp: bool, steps: int = 50, gamma: float = DEFAULT_GAMMA,
                 temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 negative_scale: Optional[float] = None, style_prompt: Optional[str] = None, seed: int = 0):
    """One `transfer` of `content` in the style of `style` (PIL images): StyleID, or StyleID + `guidekit.StyleSSP`
    (α = `alpha`, negative-guided inversion scale from `negative_scale_for`). Returns a PIL image."""
    import torch

    import guidekit

    hooks = []
    if stylessp:
        s = negative_scale_for(negative_scale, style_prompt)  # s = w_inv − 1; 0 turns the negative inversion off
        hooks = [guidekit.StyleSSP(alpha=alpha, inversion_guidance_scale=1.0 + s, negative_inversion=s > 0)]
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    out = spipe.transfer(content, style, num_inference_steps=steps, gamma=gamma, temperature=temperature,
                         hooks=hooks, style_prompt=style_prompt or None, generator=generator)
    return out.images[0]


def _colour_stats(image):
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    return np.concatenate([arr.mean(axis=0), arr.std(axis=0)])


def style_numbers(output, content, style) -> dict:
    """Layout preservation and colour match of one result (PIL images; `output` has the content's size).

    * ``ssim``, ``psnr``: SSIM and PSNR (dB) of the output against the content (`guidekit.metrics.fidelity`,
      torchmetrics, RGB in [0, 1]): higher keeps more of the content's layout.
    * ``colour_dist``: Euclidean distance between the per-channel RGB mean and standard deviation (in [0, 1])
      of the output and of the style image: lower matches the style's colours better.
    """
    import numpy as np

    from guidekit.metrics import fidelity

    row = fidelity([output.convert("RGB")], [content.convert("RGB")], with_lpips=False)[0]
    dist = float(np.linalg.norm(_colour_stats(output) - _colour_stats(style)))
    return {"ssim": row["ssim"], "psnr": row["psnr"], "colour_dist": dist}


def format_numbers(name: str, numbers: dict) -> str:
    return (f"{name}: SSIM vs content {numbers['ssim']:.4f}, PSNR vs content {numbers['psnr']:.2f} dB, "
            f"colour distance to style {numbers['colour_dist']:.4f}")


#----------------------------------------------------------------------------
# Command line.

@click.command(context_settings={"show_default": True})
@click.argument("content", type=click.Path(path_type=Path), required=False)
@click.argument("style_path", metavar="[STYLE]", type=click.Path(path_type=Path), required=False)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Output PNG.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (refused otherwise).")
@click.option("--model", default=None, metavar="ID_OR_PATH",
              help="diffusers SD 1.x/2.x model folder or hub id. Default: the embedded toy model (offline, CPU).")
@click.option("--steps", type=click.IntRange(1, 1000), default=50,
              help="DDIM steps of each inversion and of the sampling (official StyleID LDM code: 50).")
@click.option("--gamma", type=FiniteFloatRange(0.0, 1.0), default=DEFAULT_GAMMA,
              help="StyleID query preservation gamma; larger keeps more content. Default: the paper's 0.75 "
                   "(its high-style-fidelity setting: 0.3).")
@click.option("--temperature", type=FiniteFloatRange(min=0.0, min_open=True, max=100.0), default=DEFAULT_TEMPERATURE,
              help="StyleID attention temperature T (> 1 sharpens the injected attention). Default: the paper's 1.5.")
@click.option("--stylessp/--no-stylessp", default=True,
              help="Add StyleSSP's start point (frequency manipulation, plus the negative-guided inversion with "
                   "--style-prompt).")
@click.option("--alpha", type=FiniteFloatRange(0.0, 1.0), default=DEFAULT_ALPHA,
              help="StyleSSP alpha, the factor on the lowest and highest frequencies of the start point; 1 turns "
                   "the frequency step off. Default: StyleSSP's official 0.7.")
@click.option("--negative-scale", type=FiniteFloatRange(0.0, 10.0), default=None,
              help="StyleSSP negative-guided inversion scale s (official w_inv 1.5 = s 0.5); 0 turns it off. "
                   "Default: 0.5 with --style-prompt, else 0.")
@click.option("--style-prompt", default=None, metavar="TEXT",
              help="What the style image shows, e.g. 'a yellow circle on a red background': the negative of "
                   "StyleSSP's inversion guidance.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of StyleSSP's start-point noise.")
@click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps.")
@click.option("--side-by-side", "strip", is_flag=True,
              help="Write content | style | StyleID | StyleID + StyleSSP as one strip, each panel labelled (both "
                   "transfers run, whatever --stylessp says), and print the layout and colour numbers of each.")
def style(content, style_path, out, overwrite, model, steps, gamma, temperature, stylessp, alpha, negative_scale,
          style_prompt, seed, device, strip):
    """Transfer the style of STYLE onto CONTENT (image files) with StyleID, optionally plus StyleSSP.

    The output has CONTENT's size; both sizes must be multiples of the model's VAE factor (8 for SD). Without
    CONTENT and STYLE: the example pair shipped in assets/examples (a toy-world content and style).
    """
    from .generate import check_family_method, load_pipeline, model_family
    from .uam_image import labelled_strip

    if (content is None) != (style_path is None):
        raise click.UsageError("CONTENT and STYLE: give both image files, or neither for the example pair")
    if content is None:
        from guidekit.toy.style_example import STYLE_EXAMPLE_PROMPT, style_example_paths

        content, style_path = style_example_paths()
        if style_prompt is None:
            style_prompt = STYLE_EXAMPLE_PROMPT
    if out.suffix.lower() != ".png":
        raise click.BadParameter(f"{out}; accepted: a path ending in .png", param_hint="--out")
    if out.exists() and not overwrite:
        raise click.ClickException(f"--out: {out} exists; pass --overwrite to replace it, or choose another path")
    content_img = load_image(content, "CONTENT")
    style_img = load_image(style_path, "STYLE")
    if stylessp or strip:
        try:
            negative_scale_for(negative_scale, style_prompt)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--negative-scale'") from None
    start = time.perf_counter()
    if model is not None:  # from model_index.json: a family without StyleID costs no model load
        check_family_method(model_family(model), "styleid", "--model")
    pipe, name = load_pipeline(model, device=device)
    try:
        spipe = style_pipeline(pipe)
        check_style_images(spipe, content_img, style_img)
    except ValueError as e:
        raise StyleError(str(e)) from None
    settings = dict(steps=steps, gamma=gamma, temperature=temperature, alpha=alpha, negative_scale=negative_scale,
                    style_prompt=style_prompt, seed=seed)
    try:
        if strip:
            plain = run_transfer(spipe, content_img, style_img, stylessp=False, **settings)
            ssp = run_transfer(spipe, content_img, style_img, stylessp=True, **settings)
            image = labelled_strip([content_img, style_img, plain, ssp], STRIP_LABELS)
        else:
            image = run_transfer(spipe, content_img, style_img, stylessp=stylessp, **settings)
    except ValueError as e:
        raise StyleError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    if strip:
        click.echo(format_numbers("StyleID", style_numbers(plain, content_img, style_img)))
        click.echo(format_numbers("StyleID+StyleSSP", style_numbers(ssp, content_img, style_img)))
    method = "StyleID+StyleSSP" if stylessp else "StyleID"
    if strip:
        method = "StyleID | StyleID+StyleSSP"
    click.echo(f"wrote {out} ({image.width}x{image.height}, {method}, gamma {gamma:g}, T {temperature:g}, "
               f"{steps} steps, {name}) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    style()
