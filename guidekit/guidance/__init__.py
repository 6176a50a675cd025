"""Hooks that fill the guidance slot (CFG, APG), the EluCD correction hooks with their classifier adapters, and the
math cores of the guidance methods (APG, EluCD)."""

from .apg import APG
from .apg_math import apg_step, project
from .cfg import CFG
from .classifiers import TorchClassifier, TransformersClassifier
from .elucd import ClassifierGuidance, EluCD
from .elucd_math import (
    calibrated_log_prob,
    classifier_gradient,
    ddpm_guidance_weight,
    ddpm_posterior_variance,
    ddpm_sine_boost,
    edm_classifier_input,
    edm_guidance_weight,
    edm_rescale_gradient,
    flow_posterior_variance,
    smooth_classifier,
)

__all__ = [
    "APG",
    "APGGuider",
    "CFG",
    "ClassifierGuidance",
    "EluCD",
    "TorchClassifier",
    "TransformersClassifier",
    "apg_step",
    "calibrated_log_prob",
    "classifier_gradient",
    "ddpm_guidance_weight",
    "ddpm_posterior_variance",
    "ddpm_sine_boost",
    "edm_classifier_input",
    "edm_guidance_weight",
    "edm_rescale_gradient",
    "flow_posterior_variance",
    "project",
    "smooth_classifier",
]


def __getattr__(name):
    # The diffusers Modular guider imports diffusers.guiders: load it only when asked for.
    if name == "APGGuider":
        from .diffusers_guider import APGGuider

        return APGGuider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
