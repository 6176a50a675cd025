"""Hooks that fill the guidance slot (CFG, APG) and their math cores."""

from .apg import APG
from .apg_math import apg_step, project
from .cfg import CFG

__all__ = ["APG", "CFG", "apg_step", "project"]
