"""`guidekit generate`: one image from a prompt, with CFG or APG, on any diffusers SD 1.x/2.x/SDXL model.

Examples:
    guidekit generate "a red circle on a blue background"
    guidekit generate "a red circle on a blue background" --guidance apg --scale 15 --out apg.png
    guidekit generate "a photo of a cat" --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import click

# Models whose folders hold these files are loaded with the matching hooked pipeline.
_SDXL_MARKERS = ("text_encoder_2", "tokenizer_2")


class ModelLoadError(click.ClickException):
    """A model that cannot be loaded, with what was tried and what to do."""


def default_model() -> tuple[str, Optional[float]]:
    """The embedded toy model's folder and default guidance scale, or ("tiny-random", None) without it."""
    try:
        from guidekit import toy

        path = Path(toy.default_model_path())
        if (path / "model_index.json").exists():
            return str(path), float(getattr(toy, "DEFAULT_GUIDANCE_SCALE", 7.5))
    except (ImportError, AttributeError, FileNotFoundError):
        pass
    return "tiny-random", None


def _is_sdxl(model: str) -> bool:
    index = Path(model) / "model_index.json"
    if index.exists():
        config = json.loads(index.read_text())
        return any(key in config for key in _SDXL_MARKERS)
    return "xl" in model.lower()


def load_pipeline(model: Optional[str] = None, device: str = "cpu", dtype=None):
    """Load `model` (a diffusers folder or hub id; None: the embedded model) as a hooked pipeline.

    Returns the pipeline and the model's name. Raises `ModelLoadError` with a readable message when the
    model cannot be loaded (no such folder, no network for a hub id, not an SD/SDXL checkpoint).

    The embedded model is so small that torch's thread pool costs more than it gives (0.9 s for 25 steps
    on one thread, 10-30x that with two threads on a busy two-core machine), so on CPU this sets torch to
    one thread when it loads the embedded model, unless OMP_NUM_THREADS says otherwise.
    """
    import torch

    from guidekit.pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline
    from guidekit.testing import tiny_sd_pipeline

    if model is None:
        model, _ = default_model()
    if model in ("tiny-random", default_model()[0]) and str(device) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    if model == "tiny-random":
        pipe = tiny_sd_pipeline(cls=GuidedStableDiffusionPipeline)
        pipe.set_progress_bar_config(disable=False)
        return pipe.to(device), model
    cls = GuidedStableDiffusionXLPipeline if _is_sdxl(model) else GuidedStableDiffusionPipeline
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        raise ModelLoadError(f"--model: {model} is a folder without model_index.json; pass a diffusers pipeline folder")
    try:
        pipe = cls.from_pretrained(str(local) if local.exists() else model, torch_dtype=dtype or torch.float32)
    except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError... say which model failed
        hint = "" if local.exists() else " (a hub id needs network access, or the model in the local Hugging Face cache)"
        raise ModelLoadError(f"--model: cannot load {model!r}{hint}: {exc}") from exc
    return pipe.to(device), model


def _parse_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", value.strip().lower())
    if not match:
        raise click.BadParameter(f"{value!r}; accepted: N or WxH, e.g. 64 or 768x512", param_hint="--size")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    return width, height


def build_hook(guidance: str, eta: float, norm_threshold: Optional[float], momentum: float):
    import guidekit

    if guidance == "cfg":
        return guidekit.CFG()
    return guidekit.APG(eta=eta, norm_threshold=norm_threshold, momentum=momentum)


def _default_out(prompt: str, seed: int, guidance: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"
    return Path(f"{slug}-{guidance}-{seed}.png")


@click.command(context_settings={"show_default": True})
@click.argument("prompt")
@click.option("--model", default=None, metavar="ID_OR_PATH",
              help="diffusers model folder or hub id. Default: the embedded toy model (offline, CPU).")
@click.option("--guidance", type=click.Choice(["cfg", "apg"]), default="apg", help="Guidance method.")
@click.option("--scale", type=click.FloatRange(min=0.0), default=None,
              help="Guidance scale w. Default: the model's default (7.5 for other models).")
@click.option("--eta", type=click.FloatRange(0.0, 1.0), default=0.0, help="APG: weight of the parallel component (paper: 0).")
@click.option("--norm-threshold", type=click.FloatRange(min=0.0, min_open=True), default=15.0,
              help="APG: radius r of the update rescaling (paper SDXL value: 15).")
@click.option("--no-rescale", is_flag=True, help="APG: turn the norm rescaling off.")
@click.option("--momentum", type=click.FloatRange(-1.0, 1.0, min_open=True, max_open=True), default=-0.5,
              help="APG: reverse momentum beta (paper: -0.5; 0 turns it off).")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, help="Denoising steps.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the start noise.")
@click.option("--size", default=None, metavar="N|WxH", help="Image size in pixels. Default: the model's.")
@click.option("--negative-prompt", default=None, help="Negative prompt.")
@click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output PNG. Default: <prompt>-<guidance>-<seed>.png in the current folder.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (refused otherwise).")
def generate(prompt, model, guidance, scale, eta, norm_threshold, no_rescale, momentum, steps, seed, size,
             negative_prompt, device, out, overwrite):
    """Generate one image from PROMPT with CFG or APG guidance."""
    import torch

    out = out or _default_out(prompt, seed, guidance)
    if out.suffix.lower() != ".png":
        raise click.BadParameter(f"{out}; accepted: a path ending in .png", param_hint="--out")
    if out.exists() and not overwrite:
        raise click.ClickException(f"--out: {out} exists; pass --overwrite to replace it, or choose another path")
    start = time.perf_counter()
    if model is None:
        model, model_scale = default_model()
        if model == "tiny-random":
            click.echo("note: the embedded model is not installed; using a tiny random model (noise images)", err=True)
    else:
        model_scale = None
    pipe, name = load_pipeline(model, device=device)
    scale = scale if scale is not None else (model_scale or 7.5)
    dims = _parse_size(size)
    if dims is not None:
        factor = pipe.vae_scale_factor
        if dims[0] % factor or dims[1] % factor:
            raise click.BadParameter(f"{size}; width and height must be multiples of {factor} for this model",
                                     param_hint="--size")
    hook = build_hook(guidance, eta, None if no_rescale else norm_threshold, momentum)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=scale,
        width=dims[0] if dims else None,
        height=dims[1] if dims else None,
        generator=generator,
        hooks=[hook],
    ).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    click.echo(f"wrote {out} ({image.width}x{image.height}, {guidance} w={scale}, seed {seed}, {name}) "
               f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    generate()
