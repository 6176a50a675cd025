"""Hooks that fill the guidance slot (CFG, APG) and their math cores."""

from .apg import APG
from .apg_math import apg_step, project
from .cfg import CFG

__all__ = ["APG", "APGGuider", "CFG", "apg_step", "project"]


def __getattr__(name):
    # The diffusers Modular guider imports diffusers.guiders: load it only when asked for.
    if name == "APGGuider":
        from .diffusers_guider import APGGuider

        return APGGuider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
