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

import json
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


class ModelLoadError(click.ClickException):
    """A model that cannot be loaded, with what was tried and what to do."""


def _embedded_model_path() -> Optional[Path]:
    """Where the embedded toy model belongs (it may be missing there), or None without `guidekit.toy`."""
    try:
        from guidekit import toy

        return Path(toy.default_model_path())
    except (ImportError, AttributeError, FileNotFoundError):
        return None


def default_model() -> tuple[str, float]:
    """The embedded toy model's folder and default guidance scale.

    Raises `ModelLoadError` when the model is not installed: a stand-in model would only draw noise, and
    the user would not know why.
    """
    path = _embedded_model_path()
    if path is None or not (path / "model_index.json").is_file():
        missing = f"{path / 'model_index.json'} is missing" if path else "guidekit.toy is not installed"
        raise ModelLoadError(
            f"the embedded model is not installed ({missing}); reinstall guidekit, whose package ships it, "
            "or pass --model ID_OR_PATH with a diffusers SD 1.x/2.x/SDXL folder or hub id"
        )
    from guidekit import toy

    return str(path), float(getattr(toy, "DEFAULT_GUIDANCE_SCALE", 7.5))


def _is_embedded(model: str) -> bool:
    path = _embedded_model_path()
    try:
        return path is not None and Path(model).expanduser().resolve() == path.resolve()
    except OSError:
        return False


def pipeline_class(config: dict, model: str):
    """The hooked pipeline class for a model whose `model_index.json` is `config`, from its `_class_name`
    (`guidekit.apps.families`): Stable Diffusion 1.x/2.x, SDXL, SD3, Flux or Qwen-Image.

    Raises `ModelLoadError` for any other pipeline; a Wan text-to-video model is refused naming `guidekit video`.
    """
    from .families import family_of_config, hooked_class

    family = family_of_config(config)
    if family is not None and family.video:
        raise ModelLoadError(
            f"--model: {model} is a {config.get('_class_name')} (model_index.json), a {family.label} text-to-video "
            f"model; accepted here: an image model. Make a video with guidekit video --model {model} (CFG, or --apg)"
        )
    if family is not None:
        return hooked_class(family)
    name = config.get("_class_name")
    raise ModelLoadError(
        f"--model: {model} is a {name or 'pipeline without _class_name'} (model_index.json); accepted: a "
        "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3), "
        "FluxPipeline (Flux) or QwenImagePipeline (Qwen-Image) checkpoint"
    )


def model_family(model: Optional[str]):
    """The family (`guidekit.apps.families.Family`) of `model` (None: the embedded model) from its
    `model_index.json` alone, before any weights load; None when it is none of guidekit's families (loading it
    then says what is accepted)."""
    from .families import family_of_config

    if model is None:
        model, _ = default_model()
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        return None  # load_pipeline says what is wrong with the folder
    source = str(local) if local.exists() else model
    hint = "" if local.exists() else " (a hub id needs network access, or the model in the local Hugging Face cache)"
    return family_of_config(_read_model_index(source, model, hint))


def _read_model_index(source: str, model: str, hint: str) -> dict:
    """`model_index.json` of a local folder, or of a hub id through the Hugging Face cache (or the network,
    unless HF_HUB_OFFLINE is set): the file alone, before any weights are fetched."""
    try:
        if Path(source).is_dir():
            index = Path(source) / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(source, "model_index.json"))
        config = json.loads(index.read_text(encoding="utf-8"))
    except Exception as exc:  # OSError, huggingface_hub's errors, bad JSON... say which model failed
        raise ModelLoadError(f"--model: cannot load {model!r}{hint}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"--model: {model}: model_index.json is not a JSON object")
    return config


def load_pipeline(model: Optional[str] = None, device: str = "cpu", dtype=None):
    """Load `model` (a diffusers folder or hub id; None: the embedded model) as a hooked pipeline.

    The pipeline kind (SD 1.x/2.x or SDXL) comes from the model's `model_index.json`, never from its name.
    Returns the pipeline and the model's name. Raises `ModelLoadError` with a readable message when the
    model cannot be loaded (no such folder, no network for a hub id, not an SD/SDXL checkpoint, the
    embedded model not installed).

    The embedded model is so small that torch's thread pool costs more than it gives (0.9 s for 25 steps
    on one thread, 10-30x that with two threads on a busy two-core machine), so on CPU this sets torch to
    one thread when it loads the embedded model, unless OMP_NUM_THREADS says otherwise.
    """
    import torch

    if model is None:
        model, _ = default_model()
    if _is_embedded(model) and str(device) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").exists():
        raise ModelLoadError(f"--model: {model} is a folder without model_index.json; pass a diffusers pipeline folder")
    source = str(local) if local.exists() else model
    hint = "" if local.exists() else " (a hub id needs network access, or the model in the local Hugging Face cache)"
    cls = pipeline_class(_read_model_index(source, model, hint), model)
    try:
        pipe = cls.from_pretrained(source, dtype=dtype or torch.float32)
    except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError... say which model failed
        raise ModelLoadError(f"--model: cannot load {model!r}{hint}: {exc}") from exc
    return pipe.to(device), model


def check_size(pipe, dims: Optional[tuple[int, int]]) -> tuple[int, int]:
    """`--size` (or the model's native size) checked against the model's size rule and the free memory."""
    from .jobs import default_size

    return check_size_option(pipe, dims, default_size(pipe))


# The APG options' default, shared by their help texts ({} is the paper's SDXL value of the option).
APG_DEFAULT_HELP = ("Default: the embedded model's recommended setting (guidekit.toy.RECOMMENDED_APG), "
                    "else the paper's SDXL value {}.")


def build_hook(guidance: str, eta: float, norm_threshold: Optional[float], momentum: float):
    import guidekit

    if guidance == "cfg":
        return guidekit.CFG()
    return guidekit.APG(eta=eta, norm_threshold=norm_threshold, momentum=momentum)


def parse_label(label: str):
    """`--label` as given: a string of decimal digits is a class id, anything else a class name."""
    text = label.strip()
    return int(text) if text.isdecimal() else label


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
