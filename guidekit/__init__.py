"""guidekit: training-free guidance and editing plugins for Hugging Face diffusers."""

from .attach import attach
from .freenoise import FreeNoise
from .guidance import APG, CFG, ClassifierGuidance, EluCD
from .hooks import HookChain, HookConflictError, SamplerHook, SamplerState
from .latents import StyleSSP

__version__ = "0.1.0"

__all__ = [
    "APG",
    "APGGuider",
    "CFG",
    "ClassifierGuidance",
    "EluCD",
    "FreeNoise",
    "HookChain",
    "HookConflictError",
    "SamplerHook",
    "SamplerState",
    "StyleSSP",
    "attach",
    "__version__",
]


def __getattr__(name):
    if name == "APGGuider":  # a diffusers Modular guider; imported on first use
        from .guidance.diffusers_guider import APGGuider

        return APGGuider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
