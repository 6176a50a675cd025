"""One rule for the dtype of guidekit's numerically sensitive math.

Projections, DDIM inversion coefficients and attention-map averages lose precision in half types and
accumulate rounding in float32, so they run in float64 where the device has it. Apple's MPS backend has
no float64, so there they run in float32.
"""

from __future__ import annotations

import torch

__all__ = ["math_dtype"]


def math_dtype(device) -> torch.dtype:
    """The dtype for sensitive math on `device`: float64, except float32 on MPS (which lacks float64).

    Args:
        device (`torch.device` or `str`): where the tensors live; a string such as ``"mps"`` is accepted.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
