"""Tolerances scaled to the size of the values compared.

A fixed `atol` means a different relative precision for values of size 1 and of size 100: DDIM inversion
of a "sample" model, for instance, grows latents to ~160, where float32 rounding alone is ~1e-5, and the
exact rounding differs between CPUs (vectorised kernels, FMA). So compare against a bound relative to the
largest magnitude in the reference, which is what "agrees to float32 precision" means.
"""

from __future__ import annotations

import torch


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Assert |actual − expected| <= rel · (|expected| + max|expected|) element-wise.

    Args:
        actual (`torch.Tensor`): the computed values.
        expected (`torch.Tensor`): the reference; its largest magnitude sets the absolute tolerance, so an
            element near zero (cancellation) is held to the precision of the whole tensor.
        rel (`float`): the relative precision, e.g. 1e-5 for "float32 arithmetic somewhere", 1e-12 for
            float64 throughout.
    """
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, check_dtype=False)
