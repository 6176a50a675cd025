"""EluCD's math core against the official code's equations, re-derived here literally on fixed tensors."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import guidekit.guidance as guidance
from guidekit.guidance.elucd_math import (
    calibrated_log_prob,
    classifier_gradient,
    ddpm_guidance_weight,
    ddpm_posterior_variance,
    ddpm_sine_boost,
    edm_classifier_input,
    edm_guidance_weight,
    edm_rescale_gradient,
    smooth_classifier,
)
from tolerance import assert_close_to_scale


def fixed_logits(batch=4, classes=7, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=gen) * spread


LABELS = torch.tensor([0, 3, 6, 2])


def official_log_prob(logits, labels, tau1, tau2):
    """The official form, log(exp(τ1·f_y) / Σ_k exp(τ2·f_k)), in float64 numpy, sample by sample."""
    f = logits.double().numpy()
    out = []
    for b in range(f.shape[0]):
        numerator = np.exp(f[b, int(labels[b])] * tau1)
        denominator = np.exp(f[b] * tau2).sum()
        out.append(np.log(numerator / denominator))
    return torch.tensor(out)


# ----------------------------------------------------------------------------------------------------------
# calibrated_log_prob


def test_exported_from_guidance():
    for name in ("calibrated_log_prob", "classifier_gradient", "ddpm_guidance_weight", "edm_guidance_weight",
                 "edm_rescale_gradient", "smooth_classifier"):
        assert name in guidance.__all__
        assert getattr(guidance, name) is globals()[name]


@pytest.mark.parametrize("tau1,tau2", [(1.0, 0.5), (1.0, 1.0), (1.0, 0.0), (2.0, 0.3), (0.7, 1.5)])
def test_calibrated_log_prob_matches_official_form(tau1, tau2):
    logits = fixed_logits()
    expected = official_log_prob(logits, LABELS, tau1, tau2)
    actual = calibrated_log_prob(logits, LABELS, joint_temperature=tau1, marginal_temperature=tau2)
    assert actual.shape == (4,) and actual.dtype == torch.float32
    assert_close_to_scale(actual, expected, 1e-6)
    actual64 = calibrated_log_prob(logits.double(), LABELS, tau1, tau2)
    assert actual64.dtype == torch.float64
    assert_close_to_scale(actual64, expected, 1e-12)


def test_calibrated_log_prob_defaults_are_the_ddpm_script():
    logits = fixed_logits()
    assert_close_to_scale(calibrated_log_prob(logits, LABELS), official_log_prob(logits, LABELS, 1.0, 0.5), 1e-6)


def test_equal_temperatures_give_log_softmax():
    logits = fixed_logits(seed=1)
    expected = torch.log_softmax(logits.double(), dim=1)[torch.arange(4), LABELS]
    assert_close_to_scale(calibrated_log_prob(logits, LABELS, 1.0, 1.0), expected, 1e-6)


def test_zero_marginal_temperature_is_logit_minus_log_k():
    logits = fixed_logits(seed=2)
    expected = logits.double()[torch.arange(4), LABELS] - math.log(7)
    assert_close_to_scale(calibrated_log_prob(logits, LABELS, 1.0, 0.0), expected, 1e-6)


def test_large_logits_stay_finite_where_the_official_form_overflows():
    logits = fixed_logits(seed=3, spread=1.0) * 150.0 + 100.0  # exp overflows float32 beyond ~88
    official_fp32 = torch.log(
        torch.exp(logits * 1.0)[torch.arange(4), LABELS] / torch.exp(logits * 0.5).sum(1)
    )
    assert not torch.isfinite(official_fp32).all()
    f = logits.double().numpy()
    shifted = []  # log Σ exp(τ2 f) = m + log Σ exp(τ2 f − m), m = max τ2 f
    for b in range(4):
        z = 0.5 * f[b]
        m = z.max()
        shifted.append(f[b, int(LABELS[b])] - (m + np.log(np.exp(z - m).sum())))
    actual = calibrated_log_prob(logits, LABELS)
    assert torch.isfinite(actual).all()
    assert_close_to_scale(actual, torch.tensor(shifted), 1e-6)


def test_half_logits_are_computed_in_float32():
    logits = fixed_logits().half()
    out = calibrated_log_prob(logits, LABELS)
    assert out.dtype == torch.float32
    assert_close_to_scale(out, official_log_prob(logits.float(), LABELS, 1.0, 0.5), 1e-6)


def test_calibrated_log_prob_gradient_wrt_logits():
    """d/df [τ1 f_y − logsumexp(τ2 f)] = τ1·onehot(y) − τ2·softmax(τ2 f), written out in numpy."""
    logits = fixed_logits(seed=4).double().requires_grad_(True)
    tau1, tau2 = 1.3, 0.4
    calibrated_log_prob(logits, LABELS, tau1, tau2).sum().backward()
    f = logits.detach().numpy()
    expected = np.zeros_like(f)
    for b in range(4):
        e = np.exp(tau2 * f[b] - (tau2 * f[b]).max())
        expected[b] = -tau2 * e / e.sum()
        expected[b, int(LABELS[b])] += tau1
    assert_close_to_scale(logits.grad, torch.from_numpy(expected), 1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"labels": torch.tensor([0.0, 1.0, 2.0, 3.0])}, "labels"),
        ({"labels": torch.tensor([0, 1, 2])}, "labels"),
        ({"labels": torch.tensor([[0, 1, 2, 3]])}, "labels"),
        ({"labels": torch.tensor([0, 1, 2, 7])}, "labels"),
        ({"labels": torch.tensor([0, -1, 2, 3])}, "labels"),
        ({"labels": [0, 1, 2, 3]}, "labels"),
        ({"logits": torch.zeros(4)}, "logits"),
        ({"logits": torch.zeros(4, 7, dtype=torch.long)}, "logits"),
        ({"joint_temperature": float("nan")}, "joint_temperature"),
        ({"joint_temperature": -1.0}, "joint_temperature"),
        ({"marginal_temperature": float("inf")}, "marginal_temperature"),
        ({"marginal_temperature": -0.5}, "marginal_temperature"),
        ({"marginal_temperature": "0.5"}, "marginal_temperature"),
    ],
)
def test_calibrated_log_prob_errors(kwargs, match):
    args = {"logits": fixed_logits(), "labels": LABELS, **kwargs}
    with pytest.raises(ValueError, match=match):
        calibrated_log_prob(**args)


# ----------------------------------------------------------------------------------------------------------
# DDPM schedule


def official_ddpm_weights(variances, gamma, T):
    """The official p_sample loop: max_variance reset to 0, t counting down T−1 … 0, weight Σ + add_value."""
    max_variance = 0.0
    out = []
    for t in list(range(T))[::-1]:
        variance = variances[t]
        max_variance = max(max_variance, variance)
        add_value = max(np.sin((t / T) * np.pi) * max_variance * gamma, 0.0)
        out.append(variance + add_value)
    return out


def test_ddpm_weight_reproduces_the_official_loop():
    T = 250
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1 - betas)[::4]  # a respaced grid of 250 steps
    prev = np.append(1.0, alphas_cumprod[:-1])
    variances = list((1 - prev) / (1 - alphas_cumprod) * (1 - alphas_cumprod / prev))
    expected = official_ddpm_weights(variances, 0.3, T)
    max_variance = 0.0
    actual = []
    for i in range(T):
        t = T - 1 - i
        max_variance = max(max_variance, variances[t])
        actual.append(ddpm_guidance_weight(variances[t], t, T, max_variance))
    assert_close_to_scale(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), 1e-12)


def test_ddpm_sine_boost_formula_and_shape():
    T, mv, gamma = 250, 0.02, 0.3
    ts = [0, 1, 62, 125, 200, 249, 250]
    expected = [gamma * mv * math.sin(math.pi * t / T) for t in ts]
    actual = [ddpm_sine_boost(t, T, mv, gamma) for t in ts]
    assert_close_to_scale(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), 1e-12)
    assert actual[3] == pytest.approx(gamma * mv)  # peak in the middle
    assert actual[0] == 0.0
    assert ddpm_sine_boost(100, T, mv, gamma=0.0) == 0.0
    assert ddpm_guidance_weight(0.01, 100, T, mv, gamma=0.0) == 0.01  # γ = 0: plain Σ_t weighting


def test_ddpm_weight_with_tensors():
    variance = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    t = torch.tensor(80.0, dtype=torch.float64)
    out = ddpm_guidance_weight(variance, t, 250, torch.tensor(0.02, dtype=torch.float64))
    expected = variance + 0.3 * 0.02 * math.sin(math.pi * 80 / 250)
    assert out.shape == variance.shape
    assert_close_to_scale(out, expected, 1e-12)
    boost = ddpm_sine_boost(torch.tensor([0.0, 125.0, 249.0]), 250, 0.02)
    assert_close_to_scale(boost, torch.tensor([0.0, 0.006, 0.006 * math.sin(math.pi * 249 / 250)]), 1e-6)


def test_ddpm_posterior_variance_matches_the_adm_constructor():
    betas = np.linspace(1e-4, 0.02, 50)
    alphas_cumprod = np.cumprod(1 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    expected = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # gaussian_diffusion.py's definition
    actual = [ddpm_posterior_variance(float(a), float(p)) for a, p in zip(alphas_cumprod, alphas_cumprod_prev)]
    assert_close_to_scale(torch.tensor(actual, dtype=torch.float64), torch.from_numpy(expected), 1e-12)
    assert actual[0] == 0.0  # ᾱ_prev = 1 at the last step
    tensor = ddpm_posterior_variance(torch.from_numpy(alphas_cumprod), torch.from_numpy(alphas_cumprod_prev))
    assert_close_to_scale(tensor, torch.from_numpy(expected), 1e-12)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ddpm_sine_boost(10, 0, 0.1), "num_timesteps"),
        (lambda: ddpm_sine_boost(10, 2.5, 0.1), "num_timesteps"),
        (lambda: ddpm_sine_boost(300, 250, 0.1), "t must"),
        (lambda: ddpm_sine_boost(-1, 250, 0.1), "t must"),
        (lambda: ddpm_sine_boost(float("nan"), 250, 0.1), "t must"),
        (lambda: ddpm_sine_boost(10, 250, -0.1), "max_variance"),
        (lambda: ddpm_sine_boost(10, 250, 0.1, gamma=-0.3), "gamma"),
        (lambda: ddpm_sine_boost(10, 250, 0.1, gamma=float("inf")), "gamma"),
        (lambda: ddpm_guidance_weight(float("nan"), 10, 250, 0.1), "variance"),
        (lambda: ddpm_posterior_variance(1.0, 1.0), "alpha_prod_t"),
        (lambda: ddpm_posterior_variance(0.5, 0.0), "alpha_prod_prev"),
        (lambda: ddpm_posterior_variance(0.5, 0.4), "alpha_prod_prev"),
    ],
)
def test_ddpm_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------
# EDM schedule


def official_edm_lambda(i, num_steps, max_guidance, add_factor):
    """edm_sampler's current_guidance, with len(t_steps) = num_steps + 1."""
    n_t = num_steps + 1
    current = (max_guidance / n_t) * (n_t - i)
    current = max(current, 0.00001)
    interval = n_t - 1
    return current + np.sin(i / interval * (1 * np.pi)) * max_guidance * add_factor


@pytest.mark.parametrize("num_steps,g,gamma", [(10, 0.004, 0.3), (18, 0.001, 0.0), (36, 0.01, 0.5), (1, 0.004, 0.3)])
def test_edm_weight_matches_official(num_steps, g, gamma):
    actual = [edm_guidance_weight(i, num_steps, g, gamma) for i in range(num_steps)]
    expected = [official_edm_lambda(i, num_steps, g, gamma) for i in range(num_steps)]
    assert_close_to_scale(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), 1e-12)


def test_edm_weight_defaults_and_floor():
    assert edm_guidance_weight(3, 10) == pytest.approx(official_edm_lambda(3, 10, 0.004, 0.3), rel=1e-14)
    assert edm_guidance_weight(0, 10) == pytest.approx(0.004)  # start of the linear decay, no bump
    assert edm_guidance_weight(4, 10, max_guidance=0.0) == 1e-5


def rms(a):
    return np.sqrt((a**2).mean())


def test_edm_rescale_gradient_matches_official_loop():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 8, 8, generator=gen) * torch.tensor([0.5, 4.0, 80.0]).view(3, 1, 1, 1)
    grad = torch.randn(3, 3, 8, 8, generator=gen) * torch.tensor([1e-3, 10.0, 1.0]).view(3, 1, 1, 1)
    lam = official_edm_lambda(2, 10, 0.004, 0.3)
    xs, gs = x.double().numpy(), grad.double().numpy()
    expected = np.stack([gs[b] / rms(gs[b]) * rms(xs[b]) * lam for b in range(3)])
    out = edm_rescale_gradient(grad, x, lam)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close_to_scale(out, torch.from_numpy(expected), 1e-6)
    for b in range(3):  # the step is λ of the sample's own RMS
        assert rms(out[b].double().numpy()) == pytest.approx(lam * rms(xs[b]), rel=1e-5)
    per_sample = edm_rescale_gradient(grad, x, torch.tensor([lam, 2 * lam, 0.0]))
    assert_close_to_scale(per_sample, torch.from_numpy(expected * np.array([1, 2, 0]).reshape(3, 1, 1, 1)), 1e-6)


def test_edm_rescale_zero_or_nonfinite_gradient_gives_zero():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    grad = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    grad[0] = 0.0
    grad[1, 0, 0, 0] = float("nan")
    out = edm_rescale_gradient(grad, x, 0.004)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1] == 0).all()
    expected = grad[2].double() / rms(grad[2].double().numpy()) * rms(x[2].double().numpy()) * 0.004
    assert_close_to_scale(out[2], expected, 1e-6)


def test_edm_classifier_input_divides_only_when_rms_exceeds_one():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 1.0, 40.0], dtype=torch.float64).view(3, 1, 1, 1)
    expected = x.clone()
    for b in range(3):
        norm = float(((x[b] ** 2).mean()) ** 0.5)
        if norm > 1:
            expected[b] = x[b] / norm
    out = edm_classifier_input(x)
    assert_close_to_scale(out, expected, 1e-12)
    assert torch.equal(out[0], x[0])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: edm_guidance_weight(10, 10), "step"),
        (lambda: edm_guidance_weight(-1, 10), "step"),
        (lambda: edm_guidance_weight(0, 0), "num_steps"),
        (lambda: edm_guidance_weight(0, 10, max_guidance=-1.0), "max_guidance"),
        (lambda: edm_guidance_weight(0, 10, add_factor=float("nan")), "add_factor"),
        (lambda: edm_rescale_gradient(torch.zeros(2, 3), torch.zeros(2, 4), 0.1), "same shape"),
        (lambda: edm_rescale_gradient(torch.zeros(2, 3), torch.zeros(2, 3), -0.1), "weight"),
        (lambda: edm_rescale_gradient(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3)), "weight"),
        (lambda: edm_classifier_input(torch.zeros(3)), "x must"),
    ],
)
def test_edm_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------------------
# smooth_classifier


class SharedReluNet(nn.Module):
    """One ReLU instance used at two sites and held by two parents; an in-place ReLU; a functional relu."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.ReLU()
        self.first = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), self.shared)  # the same ReLU, second parent
        self.inplace = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.shared(self.first(x))
        h = self.block(h)
        h = self.inplace(h * 1.0)
        return self.head(torch.relu(h) + h)


def snapshot(model):
    return (
        [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(id(p), p.requires_grad) for p in model.parameters()],
        model.training,
    )


def test_shared_relu_becomes_one_shared_softplus_and_original_is_untouched():
    model = SharedReluNet()
    before = snapshot(model)
    smoothed = smooth_classifier(model, 3.0)
    assert smoothed is not model
    assert smoothed.softplus_replaced == 2  # two distinct ReLU instances
    assert isinstance(smoothed.shared, nn.Softplus) and smoothed.shared.beta == 3.0
    assert smoothed.block[1] is smoothed.shared  # shared stays shared, by identity
    assert isinstance(smoothed.inplace, nn.Softplus) and smoothed.inplace is not smoothed.shared
    assert not any(isinstance(m, nn.ReLU) for m in smoothed.modules())

    after = snapshot(model)
    assert after[0] == before[0] and after[2:] == before[2:]
    for k, v in before[1].items():
        assert torch.equal(after[1][k], v)
    assert model.block[1] is model.shared and isinstance(model.shared, nn.ReLU)
    assert model.inplace.inplace is True
    assert not ({p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in smoothed.parameters()})
    with torch.no_grad():
        smoothed.first.weight.add_(1.0)
    assert torch.equal(model.first.weight, before[1]["first.weight"])


def test_softplus_tends_to_relu_as_beta_grows():
    model = SharedReluNet().eval()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        reference = model(x)
        diffs = []
        for beta in (1.0, 10.0, 100.0, 1e3, 1e4, 1e5):
            diffs.append(float((smooth_classifier(model, beta)(x) - reference).abs().max()))
    assert all(b < a for a, b in zip(diffs, diffs[1:]))
    assert_close_to_scale(smooth_classifier(model, 1e5)(x), reference, 1e-4)
    # element-wise: 0 <= softplus_β(z) − relu(z) <= log 2 / β
    z = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    for beta in (3.0, 50.0, 1e4):
        gap = smooth_classifier(nn.ReLU(), beta)(z) - torch.relu(z)
        assert float(gap.min()) >= 0.0 and float(gap.max()) <= math.log(2) / beta * (1 + 1e-12)


def test_top_level_relu_and_no_relu_models():
    assert isinstance(smooth_classifier(nn.ReLU(), 2.0), nn.Softplus)
    gelu = nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.ReLU6())
    smoothed = smooth_classifier(gelu, 2.0)
    assert smoothed.softplus_replaced == 0
    assert isinstance(smoothed[1], nn.GELU) and isinstance(smoothed[2], nn.ReLU6)


def test_beta_none_keeps_relu_in_an_independent_copy():
    model = SharedReluNet()
    kept = smooth_classifier(model, None)
    assert kept is not model and kept.softplus_replaced == 0
    assert isinstance(kept.shared, nn.ReLU) and kept.block[1] is kept.shared
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(kept(x), model(x))


def test_inplace_relu_model_gives_gradients_after_smoothing():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    x_before = x.clone()
    labels = torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="in-place"):  # the original ReLU writes into the differentiated input
        classifier_gradient(lambda v: calibrated_log_prob(model(v), labels), x)
    grad = classifier_gradient(lambda v: calibrated_log_prob(smooth_classifier(model, 3.0)(v), labels), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(x, x_before)


def test_hf_resnet_every_relu_replaced():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=4
    )
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    n_relu = len({id(m) for m in model.modules() if isinstance(m, nn.ReLU)})
    smoothed = smooth_classifier(model, 3.0)
    assert n_relu > 0 and smoothed.softplus_replaced == n_relu
    assert not any(isinstance(m, nn.ReLU) for m in smoothed.modules())
    assert len({id(m) for m in model.modules() if isinstance(m, nn.ReLU)}) == n_relu  # the original keeps its ReLUs
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.isfinite(smoothed(x).logits).all()


@pytest.mark.parametrize("beta", [0, 0.0, -1.0, float("inf"), float("nan"), "3", True])
def test_smooth_classifier_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        smooth_classifier(nn.ReLU(), beta)


def test_smooth_classifier_needs_a_module():
    with pytest.raises(ValueError, match="model"):
        smooth_classifier(torch.relu, 3.0)


# ----------------------------------------------------------------------------------------------------------
# classifier_gradient


def linear_problem(dtype=torch.float32):
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 3, 2, 2, generator=gen, dtype=torch.float64)
    labels = torch.tensor([4, 0, 2])
    return weight, x.to(dtype), labels


def analytic_gradient(weight, x, labels, tau1, tau2):
    """∇ₓ [τ1 f_y − log Σ exp(τ2 f)] for f = flatten(x) @ W: W (τ1 e_y − τ2 softmax(τ2 f))."""
    W = weight.numpy()
    out = []
    for b in range(x.shape[0]):
        f = x[b].double().numpy().ravel() @ W
        e = np.exp(tau2 * f - (tau2 * f).max())
        d = -tau2 * e / e.sum()
        d[int(labels[b])] += tau1
        out.append((W @ d).reshape(x.shape[1:]))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_under_no_grad_matches_analytic(dtype):
    weight, x, labels = linear_problem(dtype)
    W = weight.to(dtype)

    def log_prob(v):
        return calibrated_log_prob(v.flatten(1) @ W, labels, 1.0, 0.5)

    expected = analytic_gradient(weight, x, labels, 1.0, 0.5)
    with torch.no_grad():
        grad = classifier_gradient(log_prob, x)
    assert grad.dtype == dtype and grad.shape == x.shape and not grad.requires_grad
    assert_close_to_scale(grad, expected, 1e-6 if dtype == torch.float32 else 1e-12)
    assert_close_to_scale(classifier_gradient(log_prob, x), expected, 1e-6 if dtype == torch.float32 else 1e-12)
    assert x.grad is None and not x.requires_grad


def test_gradient_does_not_reach_upstream():
    weight, x, labels = linear_problem()
    upstream = x.clone().requires_grad_(True)
    produced = upstream * 2.0  # stands for the denoiser's output
    grad = classifier_gradient(lambda v: calibrated_log_prob(v.flatten(1) @ weight.float(), labels), produced)
    assert upstream.grad is None and not grad.requires_grad


def test_gradient_never_nan():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(10))
    x[0] = -1.0  # sqrt of a negative sum: NaN for sample 0 only
    x[1] = x[1].abs()
    x[2] = x[2].abs()
    x[2, 0] = float("nan")  # NaN input: NaN gradient for sample 2
    grad = classifier_gradient(lambda v: torch.sqrt(v.sum(dim=1)), x)
    assert torch.isfinite(grad).all()
    assert (grad[0] == 0).all() and (grad[2] == 0).all()
    expected = torch.full((4,), 0.5 / math.sqrt(float(x[1].double().sum())), dtype=torch.float64)
    assert_close_to_scale(grad[1], expected, 1e-6)


def test_gradient_zero_when_x_unused_or_constant():
    x = torch.randn(2, 3)
    assert torch.equal(classifier_gradient(lambda v: torch.zeros(2), x), torch.zeros(2, 3))
    assert torch.equal(classifier_gradient(lambda v: v.detach().sum(dim=1), x), torch.zeros(2, 3))
    other = torch.randn(2, requires_grad=True)
    assert torch.equal(classifier_gradient(lambda v: other * 2, x), torch.zeros(2, 3))


def test_gradient_in_input_dtype_for_bfloat16():
    weight, x, labels = linear_problem()
    xb = x.bfloat16()
    grad = classifier_gradient(lambda v: calibrated_log_prob(v.flatten(1).float() @ weight.float(), labels), xb)
    assert grad.dtype == torch.bfloat16
    assert_close_to_scale(grad.double(), analytic_gradient(weight, xb.double(), labels, 1.0, 0.5), 1e-2)


def test_gradient_errors():
    with pytest.raises(RuntimeError, match="inference_mode"):
        with torch.inference_mode():
            classifier_gradient(lambda v: v.sum(dim=1), torch.randn(2, 3))
    with pytest.raises(ValueError, match="x must"):
        classifier_gradient(lambda v: v.sum(), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="log_prob_fn"):
        classifier_gradient(None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="log_prob_fn"):
        classifier_gradient(lambda v: 1.0, torch.zeros(2, 3))


def test_gradient_of_tensor_made_in_inference_mode():
    weight, x, labels = linear_problem()
    with torch.inference_mode():
        xi = x.clone()
    grad = classifier_gradient(lambda v: calibrated_log_prob(v.flatten(1) @ weight.float(), labels), xi)
    assert_close_to_scale(grad, analytic_gradient(weight, x, labels, 1.0, 0.5), 1e-6)
