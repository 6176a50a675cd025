"""The embedded toy world and model: a tiny text-to-image Stable Diffusion shipped in ``guidekit.assets``.

>>> from diffusers import StableDiffusionPipeline
>>> import guidekit.toy
>>> pipe = StableDiffusionPipeline.from_pretrained(guidekit.toy.default_model_path())
>>> image = pipe("a red circle on a blue background", guidance_scale=guidekit.toy.DEFAULT_GUIDANCE_SCALE,
...              num_inference_steps=25).images[0]

The world (``guidekit.toy.world``) and the judge (``guidekit.toy.judge``) need only numpy; the model code
imports torch and diffusers lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .settings import settings_for
from .world import COLOURS, SHAPES, TEXTURES, caption, generate, generate_batch, parse_caption

__all__ = [
    "COLOURS",
    "SHAPES",
    "TEXTURES",
    "MODEL_NAME",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_STEPS",
    "RECOMMENDED_APG",
    "RECOMMENDED_ELUCD",
    "RECOMMENDED_ELUCD_SAMPLER",
    "MODEL_WORLD_VERSION",
    "apg_settings",
    "settings_for",
    "caption",
    "parse_caption",
    "generate",
    "generate_batch",
    "default_model_path",
    "CLASSIFIER_NAME",
    "default_classifier_path",
    "MOTION_NAME",
    "default_motion_adapter_path",
    "default_video_model_path",
]

#: Folder name of the embedded model inside ``guidekit.assets``.
MODEL_NAME = "toy-sd"
#: Folder name of the embedded image classifier (clean world images -> "{colour} {shape}") inside ``guidekit.assets``.
CLASSIFIER_NAME = "toy-classifier"
#: Folder name of the embedded motion model (a diffusers ``MotionAdapter`` for the toy image model) inside
#: ``guidekit.assets``.
MOTION_NAME = "toy-motion"
#: Guidance scale at which the model card's accuracies were measured (CFG); see assets/toy-sd/README.md.
DEFAULT_GUIDANCE_SCALE = 3.0
#: DDIM steps used by the evaluation.
DEFAULT_STEPS = 25
#: The version of `guidekit.toy.world` the shipped weights were trained on (2: each colour word names a band of
#: hue, saturation and value). Evaluations that pair the model with world images (eval-toy's world row and
#: inversion, eval-uam, eval-style, the APG grid's reference, the classifier's training) draw that version, so
#: the model is measured in its own distribution.
MODEL_WORLD_VERSION = 2
#: `guidekit.APG` keyword arguments recommended for the embedded model, chosen by `guidekit eval-apg` (the
#: grid of r, beta, eta at w = 10, 15, 20 in the model card): the most accurate setting whose saturation stays
#: within 0.02 of the world's at every scale. The paper's SDXL radius (r = 15) is too large for these 16x16x4
#: latents (it rarely rescales, and the oversaturation comes back); the paper's momentum (beta = -0.5) helps here.
RECOMMENDED_APG = {"eta": 0.0, "norm_threshold": 4.0, "momentum": -0.5}

#: `guidekit.EluCD` keyword arguments (other than classifier and labels) recommended for the embedded model with
#: the embedded classifier (`default_classifier_path`), sampled with `RECOMMENDED_ELUCD_SAMPLER`; chosen by
#: `guidekit eval-elucd --scales 1,2,3`: the scale with the best judged class accuracy among those whose shape
#: fidelity stays within 0.03 of unguided (`eval_elucd.pick_scale`). The calibration is the official DDPM
#: script's (Softplus(3), tau1 = 1, tau2 = 0.5, gamma = 0.3). The step window skips the first 10% of the steps:
#: the zero-terminal-SNR schedule gives their x0 correction a huge weight, and guiding from the first step broke
#: shapes in the probes (47% against 61% on 36 images). See the README's EluCD section.
RECOMMENDED_ELUCD = {"scale": 2.0, "softplus_beta": None, "joint_temperature": 1.0, "marginal_temperature": 0.5,
                     "schedule": "ddpm", "gamma": 0.3, "start": 0.1, "stop": 1.0}

#: The sampler to run `RECOMMENDED_ELUCD` with on the embedded model: ancestral DDPM steps (`DDPMScheduler` from the
#: model's scheduler config), EluCD's own setting, where each step's mean shift sticks. On 36-image probes at
#: scale 3 (window 0.1-0.6), deterministic DDIM with 25 steps reached 31% class accuracy and DDPM with 100 steps
#: 53%; 200 DDPM steps did not add to it.
RECOMMENDED_ELUCD_SAMPLER = {"scheduler": "ddpm", "steps": 100}


def apg_settings(embedded: bool, eta=None, norm_threshold=None, momentum=None) -> dict:
    """APG keyword arguments: each value the user gave, else the embedded model's recommendation (for the
    embedded model) or `guidekit.APG`'s own defaults (for any other model). User values always win."""
    if embedded:
        base = RECOMMENDED_APG
    else:
        import inspect

        from ..guidance.apg import APG

        defaults = inspect.signature(APG.__init__).parameters
        base = {k: defaults[k].default for k in RECOMMENDED_APG}
    given = {"eta": eta, "norm_threshold": norm_threshold, "momentum": momentum}
    return {k: (base[k] if given[k] is None else given[k]) for k in base}


def _asset_path(name: str, what: str) -> Path:
    try:
        from importlib.resources import files

        path = Path(str(files("guidekit.assets") / name))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    import guidekit

    path = Path(guidekit.__file__).resolve().parent.parent / "assets" / name
    if not path.is_dir():
        raise FileNotFoundError(f"the embedded {what} {name!r} is not installed (looked in guidekit.assets and {path})")
    return path


def default_model_path() -> Path:
    """Folder of the embedded model: ``guidekit/assets/toy-sd`` installed, ``<repo>/assets/toy-sd`` in a checkout."""
    return _asset_path(MODEL_NAME, "model")


def default_classifier_path() -> Path:
    """Folder of the embedded image classifier (a transformers ``ResNetForImageClassification`` with its
    ``preprocessor_config.json``): ``guidekit/assets/toy-classifier`` installed, ``<repo>/assets/toy-classifier``
    in a checkout. Load it with ``AutoModelForImageClassification.from_pretrained`` or
    ``guidekit.guidance.TransformersClassifier.from_pretrained``."""
    return _asset_path(CLASSIFIER_NAME, "classifier")


def default_motion_adapter_path() -> Path:
    """Folder of the embedded motion model, a diffusers ``MotionAdapter`` trained on the toy video world on top of
    the embedded image model (``MotionAdapter.from_pretrained`` loads it)."""
    return _asset_path(MOTION_NAME, "motion model")


def _cache_root() -> Path:
    root = os.environ.get("GUIDEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "guidekit")
    return Path(root)


def _video_model_index(image_path: Path) -> dict:
    index = json.loads((image_path / "model_index.json").read_text())
    out = {"_class_name": "AnimateDiffPipeline", "_diffusers_version": index.get("_diffusers_version")}
    for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae"):
        out[name] = index[name]
    out["motion_adapter"] = ["diffusers", "MotionAdapter"]
    out["feature_extractor"] = [None, None]
    out["image_encoder"] = [None, None]
    return out


def default_video_model_path() -> Path:
    """Folder of the embedded text-to-video model, laid out as a diffusers ``AnimateDiffPipeline``:

    >>> from diffusers import AnimateDiffPipeline
    >>> pipe = AnimateDiffPipeline.from_pretrained(guidekit.toy.default_video_model_path())

    It is the embedded image model (:func:`default_model_path`) with the embedded motion adapter
    (:func:`default_motion_adapter_path`). So that the image model's weights are not shipped twice, the folder is
    assembled on first use under ``$GUIDEKIT_CACHE`` (default ``~/.cache/guidekit``) from links to those two
    folders (copies where links are not allowed); a folder of the same name is reused, never overwritten.
    """
    image_path, adapter_path = default_model_path(), default_motion_adapter_path()
    stamp = hashlib.sha1()
    for path in (image_path / "unet" / "diffusion_pytorch_model.safetensors",
                 adapter_path / "diffusion_pytorch_model.safetensors"):
        info = path.stat()
        stamp.update(f"{path.resolve()}:{info.st_size}:{info.st_mtime_ns}".encode())
    folder = _cache_root() / f"toy-video-{stamp.hexdigest()[:12]}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        links = {name: image_path / name for name in ("scheduler", "text_encoder", "tokenizer", "unet", "vae")}
        links["motion_adapter"] = adapter_path
        for name, target in links.items():
            try:
                os.symlink(target.resolve(), tmp / name, target_is_directory=True)
            except OSError:  # no symlinks here (e.g. some Windows setups): copy instead
                shutil.copytree(target, tmp / name)
        (tmp / "model_index.json").write_text(json.dumps(_video_model_index(image_path), indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process assembled it first
            if not (folder / "model_index.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
