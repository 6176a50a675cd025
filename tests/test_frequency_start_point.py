"""StyleSSP's frequency manipulation of the start point against a literal re-derivation (METHODS.md §5.2)."""

import math

import numpy as np
import pytest
import torch
from tolerance import assert_close_to_scale

from guidekit.latents import frequency_mask, frequency_start_point
from guidekit.latents import frequency as frequency_module

AXES = (1, 2, 3)


def literal_mask(C, H, W, d_s, d_t, d_l):
    """M = LP + HP on the grid 2i/n − 1, one element at a time."""
    mask = np.zeros((C, H, W))
    for c in range(C):
        for h in range(H):
            for w in range(W):
                u_c, u_h, u_w = 2 * c / C - 1, 2 * h / H - 1, 2 * w / W - 1
                lp = math.exp(-((d_s / d_l * u_c) ** 2 + u_h**2 + u_w**2) / (2 * d_s**2))
                hp = 1 - math.exp(-((d_t / d_l * u_c) ** 2 + u_h**2 + u_w**2) / (2 * d_t**2))
                mask[c, h, w] = lp + hp
    return mask


def inverse(spectrum):
    return np.fft.ifftn(np.fft.ifftshift(spectrum, axes=AXES), axes=AXES).real


def reference(latent, noise, d_s=0.3, d_t=0.9, d_l=0.3, alpha=0.7, range_over="sample"):
    """IFFT(α·X⊙M + X⊙(1−M)) + (1−α)·ĝ, range(ĝ) = range(IFFT(X⊙M + α·X⊙(1−M))), in numpy float64."""
    z = latent.double().numpy()
    g = noise.double().numpy()
    B, C, H, W = z.shape
    M = literal_mask(C, H, W, d_s, d_t, d_l)
    X = np.fft.fftshift(np.fft.fftn(z, axes=AXES), axes=AXES)
    z_ref = inverse(X * M + alpha * X * (1 - M))
    z_low = inverse(alpha * X * M + X * (1 - M))
    g_hat = np.empty_like(g)
    if range_over == "batch":
        g_hat[...] = g * (z_ref.max() - z_ref.min()) / (g.max() - g.min())
    else:
        for b in range(B):
            g_hat[b] = g[b] * (z_ref[b].max() - z_ref[b].min()) / (g[b].max() - g[b].min())
    return torch.from_numpy(z_low + (1 - alpha) * g_hat)


def tensors(shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.5 + 0.4
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    return latent.to(dtype), noise.to(dtype)


@pytest.mark.parametrize("range_over", ["sample", "batch"])
def test_matches_literal_reference_with_official_defaults(range_over):
    latent, noise = tensors((2, 4, 8, 12))
    latent[1] *= 6.0  # samples of different ranges
    out = frequency_start_point(latent, noise, range_over=range_over)
    assert out.dtype == torch.float64
    assert_close_to_scale(out, reference(latent, noise, range_over=range_over), 1e-12)


@pytest.mark.parametrize("range_over", ["sample", "batch"])
def test_matches_literal_reference_odd_sizes_and_other_parameters(range_over):
    # odd sizes: the shifted grid is not centred on the zero frequency and the inverse FFT has an imaginary part
    latent, noise = tensors((3, 3, 5, 7), seed=1)
    params = dict(d_s=0.5, d_t=0.7, d_l=0.6, alpha=0.25)
    out = frequency_start_point(latent, noise, range_over=range_over, **params)
    assert_close_to_scale(out, reference(latent, noise, range_over=range_over, **params), 1e-12)


def test_mask_matches_literal_loop_and_is_one_at_zero_frequency():
    mask = frequency_mask((1, 4, 6, 8), d_s=0.3, d_t=0.9, d_l=0.3)
    expected = torch.from_numpy(literal_mask(4, 6, 8, 0.3, 0.9, 0.3))
    assert mask.shape == (4, 6, 8) and mask.dtype == torch.float64
    assert_close_to_scale(mask, expected, 1e-14)
    assert mask[2, 3, 4] == 1.0  # LP = 1, HP = 0 at the zero frequency: the lowest band is scaled by α
    assert float(mask.min()) < 0.5  # a dip in the mid band


def test_alpha_one_returns_the_latent():
    latent, _ = tensors((2, 4, 6, 6), dtype=torch.float32)
    out = frequency_start_point(latent, torch.zeros_like(latent), alpha=1.0)  # the noise term is 0·ĝ
    assert torch.equal(out, latent)
    assert out.data_ptr() != latent.data_ptr()


@pytest.mark.parametrize("range_over", ["sample", "batch"])
def test_alpha_zero_is_the_unselected_band_plus_noise_of_the_selected_band_range(range_over):
    latent, noise = tensors((2, 4, 6, 8), seed=2)
    latent[0] *= 0.1
    out = frequency_start_point(latent, noise, alpha=0.0, range_over=range_over).numpy()
    z = latent.numpy()
    X = np.fft.fftshift(np.fft.fftn(z, axes=AXES), axes=AXES)
    M = literal_mask(4, 6, 8, 0.3, 0.9, 0.3)
    g_hat = out - inverse(X * (1 - M))  # z' = IFFT(X⊙(1−M)) + ĝ
    selected = inverse(X * M)  # at α = 0 the reference variant is IFFT(X⊙M)
    g = noise.numpy()
    if range_over == "batch":
        ratio = np.ptp(selected) / np.ptp(g)
        np.testing.assert_allclose(g_hat, g * ratio, rtol=1e-10, atol=1e-12 * np.abs(z).max())
    else:
        for b in range(2):
            assert np.ptp(g_hat[b]) == pytest.approx(np.ptp(selected[b]), rel=1e-10)
            ratio = np.ptp(selected[b]) / np.ptp(g[b])
            np.testing.assert_allclose(g_hat[b], g[b] * ratio, rtol=1e-10, atol=1e-12 * np.abs(z).max())


def test_per_sample_range_differs_from_batch_range_when_samples_differ():
    latent, noise = tensors((2, 4, 8, 8), seed=3)
    latent[1] *= 20.0
    per_sample = frequency_start_point(latent, noise, range_over="sample")
    batch = frequency_start_point(latent, noise, range_over="batch")
    # sample 0 gets the batch-wide noise level of sample 1 in the official convention
    assert (per_sample[0] - batch[0]).abs().max() > 0.1
    # per sample, a start point does not depend on what it is batched with
    alone = frequency_start_point(latent[:1], noise[:1], range_over="sample")
    assert_close_to_scale(per_sample[:1], alone, 1e-13)
    # and for a batch of one the two conventions agree
    assert_close_to_scale(frequency_start_point(latent[:1], noise[:1], range_over="batch"), alone, 1e-13)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_dtype_and_device_preserved(dtype, rel):
    latent, noise = tensors((1, 4, 8, 8), seed=4, dtype=dtype)
    out = frequency_start_point(latent, noise.to(torch.float16))
    assert out.dtype == dtype and out.device == latent.device and out.shape == latent.shape
    assert_close_to_scale(out.double(), reference(latent, noise.to(torch.float16)), rel)


def test_mask_is_cached_per_shape_parameters_and_device():
    frequency_module._cached_mask.cache_clear()
    latent, noise = tensors((1, 4, 8, 8), seed=5)
    first = frequency_start_point(latent, noise)
    info = frequency_module._cached_mask.cache_info()
    assert (info.misses, info.hits) == (1, 0)
    second = frequency_start_point(latent * 2, noise)
    info = frequency_module._cached_mask.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # the second call did not rebuild
    assert torch.equal(second, 2 * first)  # and z' is linear in z for a fixed noise
    frequency_start_point(latent, noise, d_s=0.4)
    frequency_start_point(tensors((1, 4, 8, 6))[0], tensors((1, 4, 8, 6))[1])
    assert frequency_module._cached_mask.cache_info().misses == 3
    # the public mask is a copy: writing to it leaves the cached one intact
    mask = frequency_mask(latent.shape)
    mask.zero_()
    assert torch.equal(frequency_start_point(latent, noise), first)


GOOD = tensors((1, 4, 4, 4))


@pytest.mark.parametrize(
    "latent, noise, kwargs, match",
    [
        (GOOD[0], GOOD[1][..., :3], {}, "noise: shape"),
        (GOOD[0][0], GOOD[1][0], {}, "latent: shape .* 4-D"),
        (GOOD[0][None], GOOD[1][None], {}, "latent: shape"),
        (GOOD[0][:0], GOOD[1][:0], {}, "latent: shape"),
        (GOOD[0].long(), GOOD[1], {}, "latent: dtype"),
        (GOOD[0].to(torch.complex128), GOOD[1], {}, "latent: dtype"),
        (GOOD[0].numpy(), GOOD[1], {}, "latent: a ndarray"),
        (GOOD[0].clone().fill_(float("nan")), GOOD[1], {}, "latent: contains NaN"),
        (GOOD[0], GOOD[1].clone().fill_(float("inf")), {}, "noise: contains NaN or inf"),
        (GOOD[0], torch.ones_like(GOOD[1]), {}, "noise: constant"),
        (GOOD[0], GOOD[1], {"alpha": -0.1}, r"alpha: .*\[0.0, 1.0\]"),
        (GOOD[0], GOOD[1], {"alpha": 1.5}, "alpha"),
        (GOOD[0], GOOD[1], {"alpha": float("nan")}, "alpha"),
        (GOOD[0], GOOD[1], {"alpha": True}, "alpha"),
        (GOOD[0], GOOD[1], {"d_s": 0.0}, r"d_s: .*\(0.0, 1.0\]"),
        (GOOD[0], GOOD[1], {"d_t": 1.5}, "d_t"),
        (GOOD[0], GOOD[1], {"d_l": -0.3}, "d_l"),
        (GOOD[0], GOOD[1], {"d_l": "0.3x"}, "d_l"),
        (GOOD[0], GOOD[1], {"filter_type": "gaussian"}, "filter_type: 'gaussian' .* 'gaussian_b' .* not implemented"),
        (GOOD[0], GOOD[1], {"filter_type": "lanczos"}, "filter_type: 'lanczos' .* 'gaussian_b'"),
        (GOOD[0], GOOD[1], {"range_over": "all"}, "range_over: 'all' .* 'sample', 'batch'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(latent, noise, kwargs, match):
    with pytest.raises(ValueError, match=match):
        frequency_start_point(latent, noise, **kwargs)


def test_constant_noise_is_accepted_where_unused_and_batch_range_needs_only_a_batch_wide_spread():
    latent, noise = GOOD
    frequency_start_point(latent, torch.zeros_like(noise), alpha=1.0)  # no noise term at α = 1
    two = torch.cat([latent, latent])
    mixed = torch.cat([torch.ones_like(noise), noise])  # sample 0 constant, the batch is not
    frequency_start_point(two, mixed, range_over="batch")
    with pytest.raises(ValueError, match="noise: constant in some sample"):
        frequency_start_point(two, mixed, range_over="sample")
