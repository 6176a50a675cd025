"""StyleSSP's frequency manipulation of the start point: the math core.

StyleSSP (Xu, Xi, Wang, Mao, Cheng; "StyleSSP: Sampling StartPoint Enhancement for Training-free Diffusion-based
Method for Style Transfer", CVPR 2025, arXiv 2501.11319) changes only the start point z_T of an
inversion-based style transfer. One of its two parts is a *frequency manipulation of the start point*: the
inverted content latent is filtered in the 3-D Fourier domain over (C, H, W) so that its lowest (and highest)
frequencies are attenuated, and range-matched Gaussian noise is added. This module implements that step as
a plain function on tensors (no diffusers import), equal to the value the official code samples from
(`freq_exp(...)[1]` of src/frequency_utils.py, called with d_s=0.3, d_t=0.9, alpha=0.7,
filter_type="gaussian_b"); see METHODS.md §5.2.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

from ..checks import check_choice, check_number
from ..precision import math_dtype

__all__ = ["frequency_start_point", "frequency_mask", "FILTER_TYPES", "RANGE_MODES"]

#: Filter types implemented. The official code also names "gaussian", "ideal", "box" and "butterworth"
#: (low-pass filters inherited from FreeInit); StyleSSP's released call uses only "gaussian_b".
FILTER_TYPES = ("gaussian_b",)
_OFFICIAL_ONLY = ("gaussian", "ideal", "box", "butterworth")

#: Over what the max − min ranges of the noise rescaling are taken: each sample on its own, or the whole
#: batch at once (as the official code does).
RANGE_MODES = ("sample", "batch")

_FFT_DIMS = (-3, -2, -1)


def _check_stop_frequency(name: str, value) -> float:
    return check_number(name, value, 0.0, 1.0, low_open=True)


def _check_filter_type(filter_type) -> str:
    if filter_type in _OFFICIAL_ONLY:
        raise ValueError(
            f"filter_type: {filter_type!r} is not accepted; accepted: "
            f"{', '.join(repr(f) for f in FILTER_TYPES)} (the official code's other filters "
            f"{', '.join(repr(f) for f in _OFFICIAL_ONLY)} are not implemented)"
        )
    return check_choice("filter_type", filter_type, FILTER_TYPES)


@lru_cache(maxsize=32)
def _cached_mask(
    shape: Tuple[int, int, int],
    d_s: float,
    d_t: float,
    d_l: float,
    filter_type: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Build the (C, H, W) mask once per (shape, parameters, filter type, dtype, device)."""
    channels, height, width = shape

    def coordinate(n: int) -> torch.Tensor:
        # 2i/n − 1 for i = 0..n−1: after fftshift, 0 is the zero frequency (for even n) and −1 the Nyquist one.
        return 2.0 * torch.arange(n, dtype=dtype, device=device) / n - 1.0

    u_c = coordinate(channels).view(-1, 1, 1)
    u_h = coordinate(height).view(1, -1, 1)
    u_w = coordinate(width).view(1, 1, -1)
    spatial = u_h**2 + u_w**2
    if filter_type == "gaussian_b":
        low_pass = torch.exp(-((d_s / d_l * u_c) ** 2 + spatial) / (2.0 * d_s**2))
        high_pass = 1.0 - torch.exp(-((d_t / d_l * u_c) ** 2 + spatial) / (2.0 * d_t**2))
        mask = low_pass + high_pass
    else:  # unreachable: filter_type is checked before
        raise ValueError(f"filter_type: {filter_type!r} is not accepted; accepted: {FILTER_TYPES}")
    return mask  # shared between calls through the cache: nobody may write to it


def _mask(shape, d_s, d_t, d_l, filter_type, dtype, device) -> torch.Tensor:
    """Check the mask's arguments and return the cached mask (shared: do not write to it)."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape: {shape!r} is not accepted; accepted: a tuple of positive integers") from None
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise ValueError(
            f"shape: {shape!r} is not accepted; accepted: at least 3 positive sizes, the last three (C, H, W)"
        )
    d_s = _check_stop_frequency("d_s", d_s)
    d_t = _check_stop_frequency("d_t", d_t)
    d_l = _check_stop_frequency("d_l", d_l)
    filter_type = _check_filter_type(filter_type)
    return _cached_mask(shape[-3:], d_s, d_t, d_l, filter_type, dtype, torch.device(device))


def frequency_mask(
    shape,
    *,
    d_s: float = 0.3,
    d_t: float = 0.9,
    d_l: float = 0.3,
    filter_type: str = "gaussian_b",
    dtype: torch.dtype = torch.float64,
    device="cpu",
) -> torch.Tensor:
    """The mask M(c, h, w) of StyleSSP's frequency manipulation, on the fftshifted (C, H, W) frequency grid.

    With normalised coordinates u_c = 2c/C − 1, u_h = 2h/H − 1, u_w = 2w/W − 1 (0 is the zero frequency):

        LP = exp(−[(d_s/d_l · u_c)² + u_h² + u_w²] / (2 d_s²))
        HP = 1 − exp(−[(d_t/d_l · u_c)² + u_h² + u_w²] / (2 d_t²))
        M  = LP + HP

    M is close to 1 at the lowest and the highest frequencies and dips in the mid band (the official code
    calls it a "band pass", but it is the sum of a low-pass and a high-pass filter).

    Args:
        shape (`tuple`): the latent's shape; its last three entries are (C, H, W).
        d_s (`float`, defaults to `0.3`): normalised stop frequency of the low-pass part, in (0, 1].
        d_t (`float`, defaults to `0.9`): normalised stop frequency of the high-pass part, in (0, 1].
        d_l (`float`, defaults to `0.3`): normalised stop frequency of the channel axis, in (0, 1]; it scales
            u_c by d_s/d_l and d_t/d_l.
        filter_type (`str`, defaults to `"gaussian_b"`): only `"gaussian_b"` is implemented.
        dtype (`torch.dtype`, defaults to `torch.float64`): the mask's dtype.
        device (`torch.device` or `str`, defaults to `"cpu"`): the mask's device.

    Returns:
        A tensor of shape (C, H, W), a copy of the mask that is built without Python loops and cached per
        (shape, parameters, filter type, dtype, device).
    """
    return _mask(shape, d_s, d_t, d_l, filter_type, dtype, device).clone()


def _check_latent(name: str, tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: a {type(tensor).__name__} is not accepted; accepted: a torch.Tensor")
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: dtype {tensor.dtype} is not accepted; accepted: a real floating-point tensor")
    if tensor.dim() != 4 or tensor.numel() == 0:
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} is not accepted; accepted: a non-empty 4-D latent (B, C, H, W)"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name}: contains NaN or inf; accepted: finite values only")
    return tensor


def _value_range(x: torch.Tensor, range_over: str) -> torch.Tensor:
    """max − min over each sample (shape (B, 1, 1, 1)) or over the whole batch (a 0-d tensor)."""
    if range_over == "batch":
        return x.max() - x.min()
    flat = x.flatten(1)
    return (flat.amax(dim=1) - flat.amin(dim=1)).view(-1, 1, 1, 1)


def frequency_start_point(
    latent: torch.Tensor,
    noise: torch.Tensor,
    *,
    d_s: float = 0.3,
    d_t: float = 0.9,
    d_l: float = 0.3,
    alpha: float = 0.7,
    filter_type: str = "gaussian_b",
    range_over: str = "sample",
) -> torch.Tensor:
    """StyleSSP's frequency manipulation of the start point (Xu et al., CVPR 2025; METHODS.md §5.2).

    For an inverted content latent z (B, C, H, W) and Gaussian noise g of the same shape:

    1. X = fftshift(FFT₃(z)), the 3-D FFT over (C, H, W) of each sample, shifted so that the zero frequency
       is at the centre.
    2. M = LP + HP, the mask of `frequency_mask` (normalised coordinates 2i/n − 1 per axis).
    3. z_ref = IFFT₃(X ⊙ M + α · X ⊙ (1 − M)), the variant whose range sets the noise level;
       ĝ = g · range(z_ref) / range(g), with range(x) = max(x) − min(x).
    4. z' = IFFT₃(α · X ⊙ M + X ⊙ (1 − M)) + (1 − α) · ĝ.

    So the components that M selects (the lowest and the highest frequencies) are scaled down by α, and
    (1 − α) of range-matched noise is added. IFFT means ifftshift, inverse FFT and the real part, as in the
    official code. Since IFFT₃(X) = z, steps 3 and 4 are computed with one inverse FFT, y = IFFT₃(X ⊙ M):
    z' = z − (1 − α)·y + (1 − α)·ĝ and z_ref = α·z + (1 − α)·y, which is the same up to float64 round-off.
    Special cases: α = 1 returns z exactly (no noise); α = 0 gives IFFT₃(X ⊙ (1 − M)) + ĝ with
    range(ĝ) = range(IFFT₃(X ⊙ M)).

    Everything runs in `guidekit.precision.math_dtype` (float64; float32 on MPS); the result is cast back
    to `latent`'s dtype, on `latent`'s device.

    Differences from the official `freq_exp(...)[1]` (bytedance/StyleSSP, src/frequency_utils.py):

    * the official ranges are taken over the whole batch (one max − min over all samples, for both the
      latent variant and the noise), so each sample's noise level depends on the other samples. Here the
      default `range_over="sample"` takes them per sample, so a sample's start point does not depend on
      what it is batched with; `range_over="batch"` reproduces the official behaviour. For a batch of one
      they agree;
    * the official code draws the noise itself (`torch.randn`, float32, from the global generator); here the
      caller passes it, so the generator is the caller's;
    * the official mask is stored in float32 and the filtered latents are cast back to the input's dtype
      before the ranges and the final sum; here the whole computation is float64 with a single cast at the
      end (differences at the input dtype's rounding level);
    * the official `gaussian_band_pass_filter` always uses d_l = 0.3 (its caller does not pass it); here
      d_l is an argument with that default. The official code returns a zero mask for d_s = 0 or d_t = 0;
      here those values are refused.

    For odd C, H or W the shifted grid puts the zero frequency at u = −1/n rather than 0 and the mask is not
    symmetric, so the inverse FFT has an imaginary part, which is dropped; this follows the official code.

    Args:
        latent (`torch.Tensor`): the inverted content latent z_T, shape (B, C, H, W), finite, floating point.
        noise (`torch.Tensor`): noise g of the same shape, finite (standard Gaussian in the official code);
            only its shape, not its scale, matters, since it is rescaled to the range of z_ref. It is moved
            to `latent`'s device.
        d_s (`float`, defaults to `0.3`): normalised stop frequency of the low-pass part of M, in (0, 1].
        d_t (`float`, defaults to `0.9`): normalised stop frequency of the high-pass part of M, in (0, 1].
        d_l (`float`, defaults to `0.3`): normalised stop frequency of the channel axis, in (0, 1].
        alpha (`float`, defaults to `0.7`): α, in [0, 1]; the factor applied to the M-selected components.
        filter_type (`str`, defaults to `"gaussian_b"`): the mask; only `"gaussian_b"` (StyleSSP's) is
            implemented.
        range_over (`str`, defaults to `"sample"`): `"sample"` (per sample) or `"batch"` (over the whole
            batch, as the official code).

    Returns:
        z', shape, dtype and device of `latent`.

    Raises:
        ValueError: a tensor that is not a finite, real, floating-point (B, C, H, W) latent; shapes that
            differ; noise with zero range (constant) where it is needed (α < 1); α outside [0, 1]; d_s, d_t
            or d_l outside (0, 1]; an unknown `filter_type` or `range_over`.
    """
    latent = _check_latent("latent", latent)
    noise = _check_latent("noise", noise)
    if noise.shape != latent.shape:
        raise ValueError(
            f"noise: shape {tuple(noise.shape)} is not accepted; accepted: the shape of latent, {tuple(latent.shape)}"
        )
    alpha = check_number("alpha", alpha, 0.0, 1.0)
    range_over = check_choice("range_over", range_over, RANGE_MODES)

    device = latent.device
    dtype = math_dtype(device)
    mask = _mask(latent.shape, d_s, d_t, d_l, filter_type, dtype, device)

    if alpha == 1.0:  # z' = z: no filtering and no noise
        return latent.clone()

    z = latent.to(dtype)
    spectrum = torch.fft.fftshift(torch.fft.fftn(z, dim=_FFT_DIMS), dim=_FFT_DIMS)
    selected = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=_FFT_DIMS), dim=_FFT_DIMS).real

    g = noise.to(device=device, dtype=dtype)
    g_range = _value_range(g, range_over)
    if bool((g_range == 0).any()):
        where = "over the batch" if range_over == "batch" else "in some sample"
        raise ValueError(
            f"noise: constant {where} (max − min = 0), so it cannot be rescaled; accepted: noise with a "
            "positive range, e.g. standard Gaussian noise"
        )
    reference = alpha * z + (1.0 - alpha) * selected  # IFFT(X⊙M + α·X⊙(1−M))
    g_hat = g * (_value_range(reference, range_over) / g_range)

    start = z - (1.0 - alpha) * selected + (1.0 - alpha) * g_hat  # IFFT(α·X⊙M + X⊙(1−M)) + (1−α)·ĝ
    return start.to(latent.dtype)
