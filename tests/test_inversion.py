"""Exact DDIM inversion: checked against diffusers' own DDIMScheduler.step and the DDIM equations."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from guidekit.inversion import ddim_invert, ddim_levels, ddim_step, predicted_x0
from guidekit.testing import sd_ddim_scheduler
from tolerance import assert_close_to_scale

torch.set_num_threads(1)


def _scheduler(prediction_type, steps, set_alpha_to_one=False):
    s = sd_ddim_scheduler(prediction_type, set_alpha_to_one=set_alpha_to_one)
    s.set_timesteps(steps)
    return s


def _constant_predictor(shape, timesteps, seed=0):
    """A model whose output depends on t only (never on x_t), with float64 outputs."""
    g = torch.Generator().manual_seed(seed)
    table = {int(t): torch.randn(shape, generator=g, dtype=torch.float64) for t in timesteps}
    calls = []

    def model(x, t):
        calls.append(int(t))
        return table[int(t)]

    return model, table, calls


@pytest.mark.parametrize(
    "prediction_type,set_alpha_to_one",
    [("epsilon", False), ("epsilon", True), ("v_prediction", False), ("v_prediction", True), ("sample", False)],
)
def test_invert_then_denoise_is_exact_for_x_independent_model(prediction_type, set_alpha_to_one):
    steps = 10
    sched = _scheduler(prediction_type, steps, set_alpha_to_one)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model, table, calls = _constant_predictor(z0.shape, sched.timesteps)

    inv = ddim_invert(model, z0, ddim_levels(sched), prediction_type)
    assert len(inv.trajectory) == steps + 1
    assert torch.equal(inv.trajectory[0], z0)
    # pairing: the first inversion step uses the last denoising timestep, the last one the first
    assert calls == [int(t) for t in reversed(sched.timesteps)]

    # denoise with diffusers' scheduler (an independent implementation of the forward step; it computes
    # its coefficients from float32 alphas, hence float32-level agreement relative to the latents' size:
    # a "sample" model's inversion grows them to ~160, where float32 rounding is ~1e-5 in absolute terms)
    x = inv.latents
    for i, t in enumerate(sched.timesteps):
        assert_close_to_scale(x, inv.trajectory[-1 - i], rel=1e-5)
        x = sched.step(table[int(t)], t, x).prev_sample
    assert_close_to_scale(x, z0, rel=1e-5)

    # and in float64 with the DDIM equation x_p = sqrt(ab_p) x0_hat + sqrt(1 - ab_p) eps_hat
    ac = sched.alphas_cumprod.to(torch.float64)
    final = torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
    x = inv.latents
    for t in [int(t) for t in sched.timesteps]:
        ab_t = ac[t]
        ab_p = ac[t - 1000 // steps] if t - 1000 // steps >= 0 else final
        pred = table[t]
        if prediction_type == "epsilon":
            x0, eps = (x - (1 - ab_t).sqrt() * pred) / ab_t.sqrt(), pred
        elif prediction_type == "v_prediction":
            x0, eps = ab_t.sqrt() * x - (1 - ab_t).sqrt() * pred, ab_t.sqrt() * pred + (1 - ab_t).sqrt() * x
        else:
            x0, eps = pred, (x - ab_t.sqrt() * pred) / (1 - ab_t).sqrt()
        x = ab_p.sqrt() * x0 + (1 - ab_p).sqrt() * eps
    assert_close_to_scale(x, z0, rel=1e-10)  # float64 throughout; the trajectory passes through ~160


def test_non_invertible_schedule_is_an_error():
    sched = _scheduler("sample", 3, set_alpha_to_one=True)
    with pytest.raises(ValueError, match="prediction_type.*cannot\\s+be inverted|cannot be inverted"):
        ddim_invert(lambda x, t: x, torch.zeros(1, 4, 2, 2), ddim_levels(sched), "sample")


def test_inverse_step_matches_ddim_inversion_equation():
    # Classic eps-DDIM inversion (Song et al.; Mokady et al.):
    # x_t = sqrt(ab_t) * (x_p - sqrt(1 - ab_p) eps) / sqrt(ab_p) + sqrt(1 - ab_t) eps,
    # with eps = model(x_p, t) and p the level denoising step t lands on.
    sched = _scheduler("epsilon", 5)
    z0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inv = ddim_invert(lambda x, t: eps * (1 + x.abs().mean()), z0, ddim_levels(sched))

    ac = sched.alphas_cumprod.to(torch.float64)
    stride = 1000 // 5
    x = z0
    for t in reversed([int(t) for t in sched.timesteps]):
        ab_p = ac[t - stride] if t - stride >= 0 else torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
        ab_t = ac[t]
        e = eps * (1 + x.abs().mean())
        x = ab_t.sqrt() * (x - (1 - ab_p).sqrt() * e) / ab_p.sqrt() + (1 - ab_t).sqrt() * e
    assert_close_to_scale(inv.latents, x, rel=1e-12)  # float64 on both sides


def test_forward_step_and_x0_match_scheduler():
    sched = _scheduler("v_prediction", 4)
    lv = ddim_levels(sched)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    t = sched.timesteps[1]
    ref = sched.step(v, t, x)
    # the scheduler takes its coefficients from float32 alphas (1 − ᾱ and the square roots in float32),
    # so the two agree to float32 precision of the whole tensor, not element-wise where terms cancel
    assert_close_to_scale(ddim_step(x, v, lv.alpha_bar[1], lv.alpha_bar_prev[1], "v_prediction"), ref.prev_sample, rel=1e-6)
    assert_close_to_scale(predicted_x0(x, v, lv.alpha_bar[1], "v_prediction"), ref.pred_original_sample, rel=1e-6)


def test_bad_prediction_type():
    sched = _scheduler("epsilon", 2)
    with pytest.raises(ValueError, match="prediction_type.*'flow'.*epsilon"):
        ddim_invert(lambda x, t: x, torch.zeros(1, 4, 2, 2), ddim_levels(sched), "flow")


def test_epsilon_model_on_zero_terminal_snr_schedule_names_the_cause():
    # rescale_betas_zero_snr makes ᾱ = 0 at t = 999, which "trailing" spacing samples: an epsilon model's
    # x0 = (x − σ ε) / α is undefined there. The message must say so and point to what works instead.
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(
        _scheduler("epsilon", 4).config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    sched.set_timesteps(4)
    calls = []
    with pytest.raises(ValueError) as info:
        ddim_invert(lambda x, t: calls.append(t) or x, torch.zeros(1, 4, 2, 2), ddim_levels(sched), "epsilon")
    message = str(info.value)
    assert message.startswith("prediction_type: 'epsilon'")
    assert "timestep 999" in message and "ᾱ_t = 0" in message and "zero terminal SNR" in message
    assert "v_prediction" in message and "rescale_betas_zero_snr=False" in message and "timestep_spacing" in message
    assert "same output" not in message
    assert calls == []  # refused before any model call
    # a v-prediction model inverts the same schedule
    inv = ddim_invert(lambda x, t: torch.zeros_like(x), torch.ones(1, 4, 2, 2), ddim_levels(sched), "v_prediction")
    assert torch.isfinite(inv.latents).all()


def test_sample_model_landing_on_alpha_one_names_the_cause():
    sched = _scheduler("sample", 3, set_alpha_to_one=True)
    with pytest.raises(ValueError) as info:
        ddim_invert(lambda x, t: x, torch.zeros(1, 4, 2, 2), ddim_levels(sched), "sample")
    message = str(info.value)
    assert "prediction_type: 'sample'" in message and "σ_prev = 0" in message
    assert "set_alpha_to_one=False" in message and "epsilon" in message


def test_math_follows_the_device_rule(monkeypatch):
    # MPS has no float64: guidekit.precision.math_dtype says float32 there. Pretend every device is MPS.
    import guidekit.inversion as inversion

    monkeypatch.setattr(inversion, "math_dtype", lambda device: torch.float32)
    sched = _scheduler("epsilon", 3)
    levels = ddim_levels(sched)
    assert levels.alpha_bar.dtype == levels.alpha_bar_prev.dtype == torch.float32
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    assert predicted_x0(x, x, levels.alpha_bar[0]).dtype == torch.float32
    a, b = inversion.ddim_step_coefficients(levels.alpha_bar[0], levels.alpha_bar_prev[0])
    assert a.dtype == b.dtype == torch.float32
    inv = ddim_invert(lambda x, t: torch.zeros_like(x), x.half(), levels)
    assert inv.latents.dtype == torch.float16 and torch.isfinite(inv.latents).all()
