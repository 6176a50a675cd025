"""EluCD and ClassifierGuidance on flow-matching models (SD3, Flux, Qwen-Image, Wan).

* On FlowMatchEuler, deterministic and with ``stochastic_sampling=True``, the realised shift of the next latents
  (two scheduler steps from the same state and noise, with and without the hook's prediction) equals the intended
  u = s·(Σ + a)·g, with Σ re-derived here from the Gaussian forward transition of the flow path and g from a
  linear classifier in closed form;
* the images the classifier reads are the pipeline's own decode of x̂0 (stock unpack, de-normalise, ``vae.decode``);
* EluCD runs on each pipeline with CFG or APG in the guidance slot;
* FlowMatchHeun and the multistep flow solvers are refused, naming the accepted scheduler and the recommended one.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FluxPipeline,
    QwenImagePipeline,
    UniPCMultistepScheduler,
)
from torch import nn

import guidekit
from guidekit.guidance.elucd import check_elucd_scheduler
from guidekit.hooks import SamplerHook, SamplerState
from guidekit.pipelines import (
    GuidedFluxPipeline,
    GuidedQwenImagePipeline,
    GuidedStableDiffusion3Pipeline,
    GuidedWanPipeline,
)
from guidekit.testing import TinyReLUClassifier, make_tiny_flux, make_tiny_qwenimage
from guidekit.testing.flow import make_tiny_sd3
from guidekit.testing.wan import make_tiny_wan, tiny_wan_pipeline
from tolerance import assert_close_to_scale

SHAPE = (2, 3, 6, 6)


class LinearClassifier(nn.Module):
    """logits = W·x (each image flattened), fixed random W: the gradient of its log-probability has a closed form."""

    id2label = {0: "first", 1: "second", 2: "third"}

    def __init__(self, shape: tuple, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3, math.prod(shape), generator=gen, dtype=torch.float64) / 4)

    def forward(self, x):
        return x.flatten(1).to(self.weight.dtype) @ self.weight.T


def linear_gradient(weight, x, labels, tau1, tau2):
    """∇ₓ [τ₁·f_y − logsumexp(τ₂·f)] for f = W·x: τ₁·W_y − τ₂·softmax(τ₂·f)ᵀ·W."""
    f = x.flatten(1).double() @ weight.T.double()
    p = torch.softmax(tau2 * f, dim=1)
    return (tau1 * weight[labels].double() - tau2 * p @ weight.double()).view_as(x)


def gaussian_posterior_variance(sigma: float, sigma_next: float) -> float:
    """Var(x_{σ'} | x_σ, x0) by conditioning the joint Gaussian of the flow path's Markov chain.

    Given x0, x_{σ'} = (1 − σ')·x0 + σ'·ε and the forward transition x_σ = a·x_{σ'} + b·ε' with a = (1 − σ)/(1 − σ')
    and b² chosen so that Var(x_σ) = σ². Then Cov(x_{σ'}, x_σ) = a·σ'², and the Schur complement of Var(x_σ) gives
    the conditional variance σ'² − (a·σ'²)²/σ².
    """
    a = (1 - sigma) / (1 - sigma_next)
    cov = torch.tensor([[sigma_next**2, a * sigma_next**2], [a * sigma_next**2, sigma**2]], dtype=torch.float64)
    return float(cov[0, 0] - cov[0, 1] * cov[1, 0] / cov[1, 1])


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9), (0.9, 0.5), (0.5, 0.49), (0.3, 0.0), (0.7, 0.02)])
def test_flow_posterior_variance_is_the_gaussian_conditional(sigma, sigma_next):
    from guidekit.guidance import flow_posterior_variance

    expected = gaussian_posterior_variance(sigma, sigma_next)
    assert flow_posterior_variance(sigma, sigma_next) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_flow_posterior_variance_refuses_a_step_that_does_not_denoise():
    from guidekit.guidance import flow_posterior_variance

    with pytest.raises(ValueError, match="sigma_next"):
        flow_posterior_variance(0.5, 0.6)


def measure(scheduler, hook, steps, scale, tau1, tau2, gamma, labels=(0, 2), seed=0):
    """Per step: the realised shift of x_next (guided − unguided, same noise) and the intended u, by hand."""
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=gen)
    state = SamplerState(num_steps=steps, scheduler=scheduler, prediction_type="flow_prediction")
    weight = hook.classifier.model.weight.detach()
    variances, out = [], []
    for i, t in enumerate(scheduler.timesteps):
        state.update(i, t, x, model_input=x)
        v = torch.randn(SHAPE, generator=gen)
        guided = hook.correct(state, v)
        s, s_next = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        nexts = [copy.deepcopy(scheduler).step(p, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
                 for p in (v, guided)]
        realised = (nexts[1] - nexts[0]).double()
        # u = s·(Σ + a)·g, g at x̂0 = x − σ·v clipped to [-1, 1] (a pixel model), a = γ·max Σ·sin(π(N−1−i)/N)
        variances.append(gaussian_posterior_variance(s, s_next))
        boost = max(gamma * max(variances) * math.sin(math.pi * (steps - 1 - i) / steps), 0.0)
        g = linear_gradient(weight, (x.double() - s * v.double()).clamp(-1, 1), list(labels), tau1, tau2)
        intended = scale * (variances[-1] + boost) * g
        norm = float(intended.norm())
        out.append(dict(realised=realised, intended=intended, scale_x=float(x.norm()),
                        ratio=float((realised * intended).sum()) / norm**2 if norm else float("nan")))
        x = scheduler.step(v, t, x, generator=torch.Generator().manual_seed(100 + i)).prev_sample
    return out


SCHEDULERS = {
    "euler": dict(shift=3.0),
    "euler-stochastic": dict(shift=3.0, stochastic_sampling=True),
    "euler-terminal": dict(shift=1.0, shift_terminal=0.02),
    "euler-stochastic-terminal": dict(shift=2.0, shift_terminal=0.05, stochastic_sampling=True),
}


@pytest.mark.parametrize("case", list(SCHEDULERS))
@pytest.mark.parametrize("hook_kind", ["elucd", "classifier-guidance"])
def test_realised_shift_of_the_next_latents_is_the_intended_one(case, hook_kind):
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[case])
    classifier = LinearClassifier(SHAPE[1:])
    if hook_kind == "elucd":
        scale, tau1, tau2, gamma = 4.0, 1.5, 0.7, 0.4
        hook = guidekit.EluCD(classifier, ["first", "third"], scale=scale, joint_temperature=tau1,
                              marginal_temperature=tau2, gamma=gamma, softplus_beta=None)
    else:
        scale, tau1, tau2, gamma = 4.0, 1.0, 1.0, 0.0
        hook = guidekit.ClassifierGuidance(classifier, ["first", "third"], scale=scale)
    steps = measure(scheduler, hook, 8, scale, tau1, tau2, gamma)
    for i, d in enumerate(steps):
        # float32 steps: the difference of two next latents carries float32 rounding of |x|
        tol = 1e-6 * d["scale_x"] + 1e-5 * float(d["intended"].norm())
        assert float((d["realised"] - d["intended"]).norm()) <= tol, (i, d["ratio"])
    assert sum(float(d["intended"].norm()) > 0 for d in steps) >= len(steps) - 1
    ratios = [d["ratio"] for d in steps if float(d["intended"].norm()) > 1e-3]
    assert ratios and all(abs(r - 1) < 1e-4 for r in ratios)


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("scheduler", [
    FlowMatchHeunDiscreteScheduler(shift=3.0),
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("cls", [guidekit.EluCD, guidekit.ClassifierGuidance], ids=lambda c: c.__name__)
def test_flow_solvers_other_than_euler_are_refused(scheduler, cls):
    for accepted in (FlowMatchEulerDiscreteScheduler(), FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)):
        check_elucd_scheduler(accepted, cls.__name__)
    hook = cls(LinearClassifier(SHAPE[1:]), 0, **({"softplus_beta": None} if cls is guidekit.EluCD else {}))
    state = SamplerState(num_steps=4, scheduler=scheduler, prediction_type="flow_prediction")
    why = "order-2" if isinstance(scheduler, FlowMatchHeunDiscreteScheduler) else "multistep"
    with pytest.raises(ValueError) as info:
        hook.validate(state)
    message = str(info.value)
    assert message.startswith(f"scheduler: {type(scheduler).__name__}")
    assert why in message and cls.__name__ in message
    assert "accepted" in message and "FlowMatchEulerDiscreteScheduler" in message
    assert "recommended: FlowMatchEulerDiscreteScheduler with stochastic_sampling=True" in message


# ------------------------------------------------------------------------------------------------- pipelines


class RecordingClassifier(nn.Module):
    """A tiny ReLU classifier on images in [-1, 1] that records every batch it reads (on the class: the hook
    classifies with its own copy)."""

    id2label = dict(TinyReLUClassifier.id2label)
    seen: list = []

    def __init__(self):
        super().__init__()
        self.inner = TinyReLUClassifier()

    def forward(self, x):
        type(self).seen.append(x.detach().clone())
        return self.inner(x)


class X0Spy(SamplerHook):
    """Records x̂0 of the prediction the next correction hook receives."""

    def __init__(self):
        self.x0 = []

    def correct(self, state, pred):
        self.x0.append(state.to_x0(pred).float())
        return pred


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {
        "sd3": make_tiny_sd3(tmp_path_factory.mktemp("sd3")),
        "flux": make_tiny_flux(tmp_path_factory.mktemp("flux")),
        "qwenimage": make_tiny_qwenimage(tmp_path_factory.mktemp("qwen")),
        "wan": make_tiny_wan(tmp_path_factory.mktemp("wan")),
    }


CLASSES = {"sd3": GuidedStableDiffusion3Pipeline, "flux": GuidedFluxPipeline, "qwenimage": GuidedQwenImagePipeline,
           "wan": GuidedWanPipeline}
# diffusers' fast-test sizes; each with a negative prompt so that the guidance slot has two predictions
CALLS = {
    "sd3": dict(prompt="a red circle", height=32, width=32, guidance_scale=5.0, negative_prompt="blurry"),
    "flux": dict(prompt="a red circle", height=8, width=8, max_sequence_length=48, negative_prompt="blurry",
                 true_cfg_scale=4.0),
    "qwenimage": dict(prompt="a red circle", height=32, width=32, max_sequence_length=16, negative_prompt="blurry",
                      true_cfg_scale=4.0),
    "wan": dict(prompt="dance monkey", height=16, width=16, num_frames=9, max_sequence_length=16,
                guidance_scale=6.0, negative_prompt="negative"),
}


@pytest.fixture(scope="module")
def pipes(dirs):
    cache = {}

    def get(family):
        if family not in cache:
            if family == "wan":
                pipe = tiny_wan_pipeline(dirs[family], GuidedWanPipeline)
            else:
                pipe = CLASSES[family].from_pretrained(str(dirs[family]))
                pipe.set_progress_bar_config(disable=True)
            cache[family] = pipe
        return cache[family]

    return get


def call(pipe, family, hooks, steps=2, seed=0, output_type="pt", **kw):
    return pipe(**{**CALLS[family], **kw}, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type=output_type, hooks=hooks, return_dict=False)[0]


def stock_decode(pipe, family, x0):
    """The stock pipeline's decode of x̂0, transcribed from diffusers' pipelines: → images (N, 3, H, W)."""
    vae, config = pipe.vae, pipe.vae.config
    h, w = CALLS[family]["height"], CALLS[family]["width"]
    if family in ("sd3", "flux"):
        z = x0 if family == "sd3" else FluxPipeline._unpack_latents(x0, h, w, pipe.vae_scale_factor)
        return vae.decode(z / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    if family == "qwenimage":
        z = QwenImagePipeline._unpack_latents(x0, h, w, pipe.vae_scale_factor)
    else:
        z = x0
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
    std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
    decoded = vae.decode(z / std + mean, return_dict=False)[0]
    if family == "qwenimage":
        return decoded[:, :, 0]
    return decoded.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (B, 3, F, H, W) → every frame an image


@pytest.mark.parametrize("family", list(CLASSES))
def test_the_classifier_reads_the_pipelines_own_decode_of_x0(pipes, family):
    pipe = pipes(family)
    spy = X0Spy()
    RecordingClassifier.seen.clear()
    hook = guidekit.EluCD(RecordingClassifier(), "green", scale=1.0, softplus_beta=None)
    call(pipe, family, [spy, hook], steps=2)
    assert len(RecordingClassifier.seen) == len(spy.x0) >= 1
    with torch.no_grad():
        for x0, seen in zip(spy.x0, RecordingClassifier.seen):
            expected = stock_decode(pipe, family, x0)
            assert seen.shape == expected.shape
            assert_close_to_scale(seen, expected, rel=1e-5)
    if family == "wan":  # 9 frames per video, each classified with the video's label
        assert RecordingClassifier.seen[0].shape[0] == 9


@pytest.mark.parametrize("family, guidance", [("sd3", "apg"), ("flux", "cfg"), ("qwenimage", "apg"), ("wan", "cfg"),
                                              ("flux", "apg"), ("wan", "apg")])
def test_elucd_runs_on_each_flow_pipeline(pipes, family, guidance):
    """Final latents (the tiny random VAEs barely respond to their input, so the decoded difference can sit at
    float32 rounding: the decode itself is checked above)."""
    pipe = pipes(family)
    slot = guidekit.APG() if guidance == "apg" else guidekit.CFG()
    plain = call(pipe, family, [slot], steps=3, output_type="latent")
    guided = call(pipe, family, [slot, guidekit.EluCD(TinyReLUClassifier(), "blue", scale=50.0)], steps=3,
                  output_type="latent")
    assert plain.shape == guided.shape
    assert torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-4


def test_stochastic_euler_is_guided_end_to_end(pipes):
    pipe = pipes("sd3")
    saved = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(saved.config, stochastic_sampling=True)
    try:
        # the stock loop steps without a generator: the step's noise comes from the global one
        runs = []
        for hook in (guidekit.CFG(), guidekit.ClassifierGuidance(TinyReLUClassifier(), 2, scale=50.0), guidekit.CFG()):
            torch.manual_seed(7)
            runs.append(call(pipe, "sd3", [hook], steps=3, output_type="latent"))
        plain, guided, again = runs
    finally:
        pipe.scheduler = saved
    assert torch.equal(plain, again)  # the same noise per seed: the difference is the guidance
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4


def test_wan_with_its_unipc_scheduler_is_refused_before_sampling(dirs):
    pipe = tiny_wan_pipeline(dirs["wan"], GuidedWanPipeline, "unipc")
    with pytest.raises(ValueError, match="UniPCMultistepScheduler is a multistep solver.*recommended: "
                                         "FlowMatchEulerDiscreteScheduler with stochastic_sampling=True"):
        call(pipe, "wan", [guidekit.EluCD(TinyReLUClassifier(), 0)])


def test_a_lighter_decoder_is_checked_against_the_unpacked_latent_channels(pipes):
    """Flux's hooks see packed tokens (B, N, 4C); the decoder's latent channels are compared with the unpacked C."""
    from guidekit.testing.flow import tiny_flow_vae

    pipe = pipes("flux")
    spy = X0Spy()
    RecordingClassifier.seen.clear()
    decoder = tiny_flow_vae(latent_channels=1, seed=5)
    call(pipe, "flux", [spy, guidekit.EluCD(RecordingClassifier(), 1, softplus_beta=None, decoder=decoder)])
    with torch.no_grad():
        z = FluxPipeline._unpack_latents(spy.x0[0], 8, 8, pipe.vae_scale_factor)
        expected = decoder.decode(z / decoder.config.scaling_factor + decoder.config.shift_factor)[0]
    assert_close_to_scale(RecordingClassifier.seen[0], expected, rel=1e-5)
    with pytest.raises(ValueError, match="decoder: a AutoencoderKL with 4 latent channels .* with 1"):
        call(pipe, "flux", [guidekit.EluCD(TinyReLUClassifier(), 1, decoder=tiny_flow_vae(latent_channels=4))])


def test_the_edm_schedule_on_the_noisy_input_runs_on_qwenimage(pipes):
    pipe = pipes("qwenimage")
    plain = call(pipe, "qwenimage", [guidekit.CFG()], steps=3, output_type="latent")
    hook = guidekit.EluCD(TinyReLUClassifier(), "red", scale=20.0, schedule="edm", input="xt", marginal_temperature=0.0)
    guided = call(pipe, "qwenimage", [guidekit.CFG(), hook], steps=3, output_type="latent")
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["qwenimage", "wan"])
def test_gradient_checkpointing_is_refused_for_video_autoencoders_that_ignore_it(pipes, family):
    """diffusers' Wan and Qwen-Image autoencoders have `gradient_checkpointing` flags that their forward never reads
    (`_supports_gradient_checkpointing = False`): switching them on would save no memory."""
    hook = guidekit.EluCD(TinyReLUClassifier(), 0, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing: True is not accepted .*whose decoder cannot checkpoint"):
        call(pipes(family), family, [hook])


def test_gradient_checkpointing_decodes_the_same_on_sd3(pipes):
    pipe = pipes("sd3")
    runs = [call(pipe, "sd3", [guidekit.EluCD(TinyReLUClassifier(), 0, scale=50.0, gradient_checkpointing=flag)],
                 output_type="latent") for flag in (False, True)]
    assert_close_to_scale(runs[1], runs[0], rel=1e-5)


def test_a_float16_vae_that_asks_for_upcasting_decodes_in_float32(dirs):
    """force_upcast: the hook decodes with a float32 copy of the float16 VAE, through the pipeline's unpacking."""
    pipe = GuidedFluxPipeline.from_pretrained(str(dirs["flux"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    spy = X0Spy()
    RecordingClassifier.seen.clear()
    call(pipe, "flux", [spy, guidekit.EluCD(RecordingClassifier(), 1, softplus_beta=None)], output_type="latent")
    assert pipe.vae.dtype == torch.float16  # the user's VAE is left as it was
    upcast = copy.deepcopy(pipe.vae).float()
    with torch.no_grad():
        expected = stock_decode(SimpleNamespace(vae=upcast, vae_scale_factor=pipe.vae_scale_factor), "flux", spy.x0[0])
    assert RecordingClassifier.seen[0].dtype == torch.float32
    assert_close_to_scale(RecordingClassifier.seen[0], expected, rel=1e-5)
