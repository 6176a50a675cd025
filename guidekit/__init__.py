"""guidekit: training-free guidance and editing plugins for Hugging Face diffusers."""

from .hooks import HookChain, HookConflictError, SamplerHook, SamplerState

__version__ = "0.1.0"

__all__ = ["HookChain", "HookConflictError", "SamplerHook", "SamplerState", "__version__"]
