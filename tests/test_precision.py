"""guidekit.precision: the one dtype rule for sensitive math (float64, float32 on MPS)."""

import torch

from guidekit.guidance import apg_math
from guidekit.precision import math_dtype


def test_math_dtype_is_float64_where_available():
    assert math_dtype(torch.device("cpu")) == torch.float64
    assert math_dtype(torch.device("cuda")) == torch.float64
    assert math_dtype("cpu") == torch.float64


def test_math_dtype_is_float32_on_mps():
    # Building a device object needs no MPS hardware.
    assert math_dtype(torch.device("mps")) == torch.float32
    assert math_dtype("mps") == torch.float32


def test_apg_math_reexports_the_shared_rule():
    assert apg_math.math_dtype is math_dtype
