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

from pathlib import Path

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
    "MODEL_WORLD_VERSION",
    "apg_settings",
    "caption",
    "parse_caption",
    "generate",
    "generate_batch",
    "default_model_path",
    "CLASSIFIER_NAME",
    "default_classifier_path",
]

#: Folder name of the embedded model inside ``guidekit.assets``.
MODEL_NAME = "toy-sd"
#: Folder name of the embedded image classifier (clean world images -> "{colour} {shape}") inside ``guidekit.assets``.
CLASSIFIER_NAME = "toy-classifier"
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
#: the embedded classifier (`default_classifier_path`), chosen by `guidekit eval-elucd --scales 0.3,1,3`: the
#: scale with the best judged class accuracy among those whose shape fidelity stays within 0.03 of unguided
#: (`eval_elucd.pick_scale`). The calibration is the official DDPM script's (Softplus(3), tau1 = 1, tau2 = 0.5,
#: gamma = 0.3). The step window is this model family's: its zero-terminal-SNR schedule gives the first steps'
#: x0 correction a huge weight, and guiding from the first step, or past 60% of the steps, broke the shapes into
#: textures in the probes. See the README's EluCD section.
RECOMMENDED_ELUCD = {"scale": 3.0, "softplus_beta": 3.0, "joint_temperature": 1.0, "marginal_temperature": 0.5,
                     "schedule": "ddpm", "gamma": 0.3, "start": 0.1, "stop": 0.6}


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
