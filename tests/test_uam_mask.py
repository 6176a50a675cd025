"""UAM adaptive mask math on fixed tensors, against METHODS.md §2.4 written out by hand."""

import pytest
import torch

from guidekit.uam import adaptive_masks, blend_x0, dilate, edit_mask, mask_active, quantile_schedule, soft_threshold

torch.set_num_threads(1)


def test_quantile_schedule_is_linspace_from_zero():
    assert torch.allclose(quantile_schedule(0.5, 5), torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5], dtype=torch.float64))
    assert quantile_schedule(0.7, 50)[0] == 0 and abs(float(quantile_schedule(0.7, 50)[-1]) - 0.7) < 1e-15


@pytest.mark.parametrize("bad", [0, 0.0, 1, 1.0, 1.5, -0.1, float("nan"), "half", True])
def test_quantile_outside_open_interval_is_an_error(bad):
    with pytest.raises(ValueError, match="quantile.*accepted.*\\(0, 1\\)"):
        quantile_schedule(bad, 10)


def test_soft_threshold_and_factor_two():
    delta = torch.tensor([-3.0, -1.5, -0.5, 0.0, 0.4, 1.0, 2.1, 5.0], dtype=torch.float64)
    tau = 1.0
    assert torch.equal(soft_threshold(delta, tau), torch.tensor([-2.0, -0.5, 0, 0, 0, 0, 1.1, 4.0], dtype=torch.float64))
    # code: 1[|soft(Δ)| > τ] == 1[|Δ| > 2τ]; paper: 1[|Δ| > τ]
    assert edit_mask(delta, tau, "code").tolist() == [1, 0, 0, 0, 0, 0, 1, 1]
    assert edit_mask(delta, tau, "paper").tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    d = torch.randn(1000, generator=g, dtype=torch.float64)
    assert torch.equal(edit_mask(d, 0.3, "code"), (d.abs() > 0.6).double())
    with pytest.raises(ValueError, match="threshold_rule"):
        edit_mask(d, 0.3, "both")


def _slow_dilate(mask, r):
    out = torch.zeros_like(mask)
    h, w = mask.shape[-2:]
    for i in range(h):
        for j in range(w):
            out[..., i, j] = mask[..., max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].amax(dim=(-1, -2))
    return out


def test_dilate_matches_square_neighbourhood_max():
    g = torch.Generator().manual_seed(1)
    m = (torch.rand(2, 4, 9, 7, generator=g) > 0.9).double()
    for r in (0, 1, 2):
        assert torch.equal(dilate(m, r), _slow_dilate(m, r))
    with pytest.raises(ValueError, match="radius"):
        dilate(m, -1)


def test_adaptive_masks_on_fixed_pair():
    # one pair, one channel, 3x3; |Δ| sorted = 0..8 * 0.1, so quantile 0.5 is the median 0.4 exactly
    src = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    tgt = -torch.tensor([[0.0, 0.1, 0.2], [0.3, 0.4, 0.5], [0.6, 0.7, 0.8]], dtype=torch.float64).view(1, 1, 3, 3)
    # τ = 0.4: paper rule flags |Δ| > 0.4, code rule |Δ| > 0.8 (nothing)
    m_edit, m_keep = adaptive_masks(src, tgt, 0.5, dilate_radius=0, threshold_rule="paper")
    assert m_edit.view(3, 3).tolist() == [[0, 0, 0], [0, 0, 1], [1, 1, 1]]
    assert torch.equal(m_keep, 1 - m_edit)
    m_edit, _ = adaptive_masks(src, tgt, 0.5, dilate_radius=0, threshold_rule="code")
    assert m_edit.sum() == 0
    # τ at q=0.25 is 0.2: code flags |Δ| > 0.4 -> {0.5..0.8}; dilating the edit mask (code) by 1 pixel
    # spreads 0.5 at (1, 2) to (0, 1), (0, 2), (1, 1) and the bottom row to the middle row
    m_edit, m_keep = adaptive_masks(src, tgt, 0.25, dilate_radius=1, threshold_rule="code", dilate_target="edit")
    assert m_edit.view(3, 3).tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    # dilating the keep mask (paper): keep = {0..0.4} grows by one pixel, edit shrinks to what stays
    m_edit, m_keep = adaptive_masks(src, tgt, 0.25, dilate_radius=1, threshold_rule="code", dilate_target="keep")
    assert m_keep.view(3, 3).tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert m_edit.sum() == 0


def test_adaptive_masks_quantile_is_per_pair():
    a = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64).view(2, 1, 2, 2)
    m_edit, _ = adaptive_masks(a, b, 0.5, dilate_radius=0, threshold_rule="paper")
    # medians 2.5 and 25: the same two elements flagged in both pairs
    assert m_edit.flatten(1).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_blend_equations():
    g = torch.Generator().manual_seed(2)
    src, tgt, u = (torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    m_edit = (torch.rand(1, 4, 5, 5, generator=g) > 0.5).double()
    m_keep = 1 - m_edit
    new_src, new_tgt = blend_x0(src, tgt, u, m_edit, m_keep)
    # target: keep region from the uniform branch; source: edited region from the uniform branch
    assert torch.equal(new_tgt, torch.where(m_keep.bool(), u, tgt))
    assert torch.equal(new_src, torch.where(m_edit.bool(), u, src))
    same_src, _ = blend_x0(src, tgt, u, m_edit, m_keep, blend_source=False)
    assert torch.equal(same_src, src)


def test_mask_window_in_ddpm_timesteps():
    active = [t for t in (981, 401, 399, 201, 199, 21, 1, 0) if mask_active(t, 200)]
    assert active == [199, 21, 1]
    assert [t for t in (401, 399, 1) if mask_active(t, 400)] == [399, 1]


def test_mask_math_follows_the_device_rule(monkeypatch):
    # MPS has no float64: guidekit.precision.math_dtype says float32 there. Pretend every device is MPS.
    import guidekit.uam as uam

    monkeypatch.setattr(uam, "math_dtype", lambda device: torch.float32)
    assert quantile_schedule(0.5, 3).dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    src, tgt, u = (torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float16) for _ in range(3))
    m_edit, m_keep = adaptive_masks(src, tgt, 0.5)
    assert m_edit.dtype == m_keep.dtype == torch.float32
    new_src, new_tgt = blend_x0(src, tgt, u, m_edit, m_keep)
    assert new_src.dtype == new_tgt.dtype == torch.float32
