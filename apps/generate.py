"""`guidekit generate`: one image from a prompt, with CFG or APG, on a diffusers SD 1.x/2.x, SDXL, SD3, Flux or
Qwen-Image model (the family is read from its model_index.json).

Examples:
    guidekit generate "a red circle on a blue background"
    guidekit generate "a red circle on a blue background" --guidance apg --scale 15 --out apg.png
    guidekit generate "a photo of a cat" --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda
    guidekit generate "a photo of an animal" --model MODEL --guidance cfg --classifier ./resnet --label "tabby cat"
    guidekit generate "a photo of a cat" --model ./flux-folder --guidance apg --scale 4

On SD3 `--scale` is the pipeline's guidance_scale; on Flux and Qwen-Image it is true_cfg_scale, and the negative
prompt is "" unless --negative-prompt gives one, so that the unconditional pass CFG and APG need runs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

import click

from guidekit import toy as _toy
from guidekit.checks import MAX_IMAGE_SIDE

from .cli import FiniteFloatRange, ImageSize, check_size_option
from .defaults import (DEFAULT_METHOD, DEFAULT_STEPS, PAPER_CLASSIFIER_SCALE, STOCK_SCALE, resolve_defaults,
                       using_sampler)
from .families import check_scale, scale_kwargs, slot_hooks
from .jobs_classifier import parse_label
from .models import default_model, default_size, load_pipeline, model_family


def check_size(pipe, dims: Optional[tuple[int, int]]) -> tuple[int, int]:
    """`--size` (or the model's native size) checked against the model's size rule and the free memory."""
    return check_size_option(pipe, dims, default_size(pipe))


# The APG options' default, shared by their help texts ({} is the paper's SDXL value of the option).
APG_DEFAULT_HELP = ("Default: the embedded model's recommended setting (guidekit.toy.RECOMMENDED_APG), "
                    "else the paper's SDXL value {}.")


def build_hook(guidance: str, eta: float, norm_threshold: Optional[float], momentum: float):
    import guidekit

    if guidance == "cfg":
        return guidekit.CFG()
    return guidekit.APG(eta=eta, norm_threshold=norm_threshold, momentum=momentum)


def build_classifier_hook(path: str, label: str, settings: dict, calibration: str = "elucd"):
    """The EluCD correction hook (`calibration="elucd"`) or plain classifier guidance (`"plain"`) for the
    transformers image classifier in the folder `path`, steering toward `label` (an id or a name), with the hook
    keyword arguments `settings` (`guidekit.apps.defaults.Defaults.classifier`, its scale included).

    Raises `click.ClickException` naming `--classifier` when the classifier cannot be loaded, and
    `click.BadParameter` naming `--label` for a label the classifier does not have.
    """
    import guidekit
    from guidekit.guidance import TransformersClassifier

    if not Path(path).expanduser().is_dir():
        raise click.BadParameter(f"{path} is not a folder; accepted: a local folder of a transformers image "
                                 "classifier (config.json, weights, preprocessor_config.json)",
                                 param_hint="'--classifier'")
    try:
        classifier = TransformersClassifier.from_pretrained(str(Path(path).expanduser()))
    except Exception as exc:  # transformers' OSError/ValueError, the adapter's missing normalisation...
        raise click.ClickException(f"--classifier: cannot load {path!r}: {exc}") from exc
    cls = guidekit.EluCD if calibration == "elucd" else guidekit.ClassifierGuidance
    try:
        return cls(classifier, parse_label(label), **settings)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--label'") from None


def check_family_method(family, method: str, option: str) -> None:
    """Refuse, as a usage error naming `option`, a method (a key of `guidekit.apps.families.METHOD_NAMES`) that
    the model's family cannot run."""
    from .families import MethodRefused, check_method

    try:
        check_method(family, method)
    except MethodRefused as e:
        raise click.BadParameter(str(e), param_hint=f"'{option}'") from None


def _default_out(prompt: str, seed: int, guidance: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "image"
    return Path(f"{slug}-{guidance}-{seed}.png")


@click.command(context_settings={"show_default": True})
@click.argument("prompt")
@click.option("--model", default=None, metavar="ID_OR_PATH",
              help="diffusers model folder or hub id. Default: the embedded toy model (offline, CPU).")
@click.option("--guidance", type=click.Choice(["cfg", "apg"]), default=None,
              help=f"Guidance method. Default: {DEFAULT_METHOD['image']}.")
@click.option("--scale", type=FiniteFloatRange(min=0.0), default=None,
              help="Guidance scale w (SD3: guidance_scale; Flux, Qwen-Image: true_cfg_scale). Default: the embedded "
                   "model's (guidekit.toy.settings_for); 1 for an empty PROMPT without --negative-prompt (nothing to "
                   f"steer toward); SD3 7.0, Flux and Qwen-Image 4.0; {STOCK_SCALE:g} for other models.")
@click.option("--eta", type=FiniteFloatRange(0.0, 1.0), default=None,
              help="APG: weight of the parallel component. " + APG_DEFAULT_HELP.format("0"))
@click.option("--norm-threshold", type=FiniteFloatRange(min=0.0, min_open=True), default=None,
              help="APG: radius r of the update rescaling. " + APG_DEFAULT_HELP.format("15"))
@click.option("--no-rescale", is_flag=True, help="APG: turn the norm rescaling off.")
@click.option("--momentum", type=FiniteFloatRange(-1.0, 1.0, min_open=True, max_open=True), default=None,
              help="APG: reverse momentum beta; 0 turns it off. " + APG_DEFAULT_HELP.format("-0.5"))
@click.option("--steps", type=click.IntRange(1, 1000), default=None,
              help=f"Denoising steps. Default: {DEFAULT_STEPS}; with --classifier the embedded classifier on the "
                   f"embedded model, {_toy.RECOMMENDED_ELUCD_SAMPLER['steps']} "
                   "(guidekit.toy.RECOMMENDED_ELUCD_SAMPLER).")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the start noise.")
@click.option("--size", type=ImageSize(), default=None,
              help=f"Image size in pixels, at most {MAX_IMAGE_SIDE} per side and a multiple of the model's VAE "
                   "factor. Default: the model's.")
@click.option("--negative-prompt", default=None,
              help="Negative prompt. Default: none; on Flux and Qwen-Image \"\" (their guidance needs a negative).")
@click.option("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output PNG. Default: <prompt>-<guidance>-<seed>.png in the current folder.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (refused otherwise).")
@click.option("--classifier", default=None, metavar="PATH",
              help="EluCD: local folder of a transformers image classifier (AutoModelForImageClassification, "
                   "with its preprocessor_config.json) that steers the image toward --label, as a correction "
                   "after the guidance. Default: none (no classifier guidance).")
@click.option("--label", default=None, metavar="NAME_OR_ID",
              help="EluCD: the class to steer toward: an id (digits) or a name from the classifier's id2label "
                   "(case-insensitive). Required with --classifier.")
@click.option("--classifier-scale", type=FiniteFloatRange(min=0.0), default=None,
              help="EluCD: classifier scale s; 0 turns the correction off. Default: "
                   f"{_toy.RECOMMENDED_ELUCD['scale']:g} (guidekit.toy.RECOMMENDED_ELUCD) for the embedded classifier "
                   f"on the embedded model, else {PAPER_CLASSIFIER_SCALE:g}, the official classifier_scale of the "
                   "EluCD DDPM script (guidekit.EluCD's default).")
@click.option("--calibration", type=click.Choice(["elucd", "plain"]), default="elucd",
              help="elucd: calibrated log-probability, the sine boost and (paper default) Softplus-smoothed ReLUs "
                   "(guidekit.EluCD); plain: uncalibrated classifier guidance (guidekit.ClassifierGuidance). The "
                   "embedded classifier on the embedded model gets guidekit.toy.RECOMMENDED_ELUCD (plain: its "
                   "schedule, input and step window) and its sampler (guidekit.toy.RECOMMENDED_ELUCD_SAMPLER: "
                   "ancestral DDPM); any other pair the paper's defaults and the model's own scheduler.")
def generate(prompt, model, guidance, scale, eta, norm_threshold, no_rescale, momentum, steps, seed, size,
             negative_prompt, device, out, overwrite, classifier, label, classifier_scale, calibration):
    """Generate one image from PROMPT with CFG or APG guidance (and optionally EluCD classifier guidance)."""
    import torch
    from guidekit.guidance.elucd import check_elucd_scheduler

    request = "image" if classifier is None else "classifier"
    out = out or _default_out(prompt, seed, guidance or DEFAULT_METHOD[request])
    if out.suffix.lower() != ".png":
        raise click.BadParameter(f"{out}; accepted: a path ending in .png", param_hint="--out")
    if out.exists() and not overwrite:
        raise click.ClickException(f"--out: {out} exists; pass --overwrite to replace it, or choose another path")
    if classifier is None and label is not None:
        raise click.BadParameter("is given without --classifier; accepted: --label together with --classifier PATH",
                                 param_hint="'--label'")
    if classifier is not None and label is None:
        raise click.BadParameter("is required with --classifier; accepted: a class id or name of the classifier",
                                 param_hint="'--label'")
    start = time.perf_counter()
    family = model_family(model) if model is not None else None  # model_index.json only: a method the family cannot run costs no model load
    if classifier is not None:
        check_family_method(family, "elucd", "--classifier")
    if model is None:
        model, _ = default_model()
    # Every default of the request (method, scale, steps, sampler, APG and classifier settings) for this model:
    # the embedded model's recommendation, its family's, or the papers'; the user's values win.
    settings = resolve_defaults(request, model=model, family=family, prompt=prompt, negative_prompt=negative_prompt,
                                classifier=classifier, calibration=calibration, method=guidance, guidance_scale=scale,
                                steps=steps, eta=eta, norm_threshold=norm_threshold, momentum=momentum,
                                classifier_scale=classifier_scale)
    guidance, scale, steps, apg = settings.method, settings.guidance_scale, settings.steps, settings.apg
    correction = None
    if classifier is not None:  # before the diffusion model: a wrong label costs no model load
        correction = build_classifier_hook(classifier, label, settings.classifier, calibration)
    try:
        check_scale(family, scale)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--scale'") from None
    pipe, name = load_pipeline(model, device=device)
    width, height = check_size(pipe, size)
    hook = build_hook(guidance, apg["eta"], None if no_rescale else apg["norm_threshold"], apg["momentum"])
    generator = torch.Generator(device="cpu").manual_seed(seed)  # the start noise, and DDPM's step noise
    with using_sampler(pipe, settings.sampler) as scheduler:
        sampler_name = type(scheduler).__name__
        if correction is not None:  # the hook's own refusal, before any step runs
            try:
                check_elucd_scheduler(scheduler, type(correction).__name__)
            except ValueError as exc:
                raise click.ClickException(f"--classifier: the model's {exc}") from None
        image = pipe(
            prompt,
            num_inference_steps=steps,
            **scale_kwargs(family, scale, negative_prompt),
            width=width,
            height=height,
            generator=generator,
            hooks=slot_hooks(family, scale, [hook]) + ([] if correction is None else [correction]),
        ).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    extra = ""
    if correction is not None:
        extra = f", {type(correction).__name__} s={correction.scale:g} label {correction.labels}"
        if settings.classifier_recommended:
            extra += f" (recommended settings, window {correction.start:g}-{correction.stop:g})"
    if family is not None and family.is_flow:
        extra += f", {family.label} {family.scale_argument}"
    click.echo(f"wrote {out} ({image.width}x{image.height}, {guidance} w={scale}{extra}, {sampler_name} {steps} "
               f"steps, seed {seed}, {name}) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    generate()
