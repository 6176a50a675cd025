"""guidekit: training-free guidance and editing plugins for Hugging Face diffusers."""

from .attach import attach
from .guidance import APG, CFG
from .hooks import HookChain, HookConflictError, SamplerHook, SamplerState

__version__ = "0.1.0"

__all__ = ["APG", "CFG", "HookChain", "HookConflictError", "SamplerHook", "SamplerState", "attach", "__version__"]
