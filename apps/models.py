"""The model of an entry point (generate, video, batch jobs, the demo): loading it, its family, and the size rule
of its images.

One module for every entry point, so that none of them imports another to load a model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import click


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


def vae_factor(pipe) -> int:
    """The VAE's spatial factor (Wan's pipelines call it `vae_scale_factor_spatial`)."""
    return int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8))


def size_multiple(pipe) -> int:
    """The number every width and height must be a multiple of for `pipe`; the one rule of every entry point
    (generate, video, style, batch jobs, the demo).

    The latents are the image shrunk by the VAE factor and, for a transformer denoiser, cut into patches of
    `patch_size` latent pixels, so sizes are multiples of their product. diffusers' Stable Diffusion, SDXL and
    AnimateDiff pipelines also refuse any size that is not a multiple of 8 (their `check_inputs`), whatever the
    VAE: the embedded model's VAE factor is 4, yet 100 px fails there.
    """
    factor = vae_factor(pipe)
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    if isinstance(patch, (tuple, list)) and patch:
        patch = patch[-1]  # Wan's (frames, height, width) patch: its spatial side
    if hasattr(pipe, "_pack_latents"):
        # Flux and Qwen-Image pack 2x2 latent pixels into one token, whatever the transformer's patch_size says
        # (Flux's is 1); their pipelines ask for multiples of twice the VAE factor
        factor *= 2
    elif isinstance(patch, int) and patch > 1:
        factor *= patch
    return math.lcm(8, factor)


def default_size(pipe) -> int:
    """The model's native image side in pixels: the UNet's sample size, or a transformer pipeline's
    `default_sample_size` (SD3, Flux, Qwen-Image), times the VAE factor."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return int(unet.config.sample_size) * vae_factor(pipe)
    return int(pipe.default_sample_size) * vae_factor(pipe)


def is_embedded_pipe(pipe) -> bool:
    """Whether `pipe` was loaded from a folder holding an embedded model's weights (`guidekit.toy.settings_for`
    recognises it)."""
    from guidekit.toy.settings import embedded_name

    from .defaults import model_path_of

    return embedded_name(model_path_of(pipe)) is not None
