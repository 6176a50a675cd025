"""The EluCD hook on the tiny SD pipelines: one step against a by-hand computation, composition, labels,
the user's classifier left alone, no NaN, and the effect of a simple "redness" classifier."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from torch import nn

import guidekit
from guidekit.guidance import TorchClassifier, TransformersClassifier
from guidekit.hooks import SamplerHook
from guidekit.pipelines import GuidedStableDiffusionPipeline
from guidekit.testing import TinyReLUClassifier
from tolerance import assert_close_to_scale

KW = dict(num_inference_steps=4, height=32, width=32, output_type="np")
PROMPT = "a red circle on a blue background"


def load(folder):
    pipe = GuidedStableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load(tiny_sd_dir)


@pytest.fixture(scope="module")
def sd_v(tiny_sd_v_dir):
    return load(tiny_sd_v_dir)


def run(pipe, hooks=None, seed=0, prompt=PROMPT, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), hooks=hooks, **{**KW, **kw}).images


class ConvNet(TinyReLUClassifier):
    """The tiny ReLU classifier, with its Softplus forward written out for the by-hand references."""

    def forward_smoothed(self, x, beta):
        return self.fc(F.softplus(self.conv(x), beta=beta).mean(dim=(2, 3)))


class Redness(nn.Module):
    """A fixed linear classifier on the decoded image: logit_red = mean(R − (G + B)/2), logit_cyan = −logit_red."""

    id2label = {0: "red", 1: "cyan"}

    def __init__(self, gain=10.0, nan=False):
        super().__init__()
        self.gain, self.nan = gain, nan

    def forward(self, x):
        red = (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean(dim=(1, 2))
        logits = torch.stack([red, -red], dim=1) * self.gain
        return logits * float("nan") if self.nan else logits


class Constant(nn.Module):
    """A classifier that ignores its input: its gradient is zero."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, -1.0]))

    def forward(self, x):
        return self.bias.expand(x.shape[0], 2)


def redness(images):
    x = torch.from_numpy(images).double()
    return (x[..., 0] - (x[..., 1] + x[..., 2]) / 2).mean(dim=(1, 2))


class Record(SamplerHook):
    """Records the prediction and what the step's x0 conversion needs."""

    def __init__(self):
        self.steps = []

    def correct(self, state, pred):
        index = state._sigma_index
        self.steps.append(
            dict(pred=pred.clone(), x=state.model_input.clone(), t=int(state.timestep), i=state.step_index, sigma_index=index)
        )
        return pred


# ---------------------------------------------------------------------------------------------------- by hand


def by_hand(pipe, clf, label, step, n, steps_before, prediction_type, scale, beta, tau1, tau2, gamma, schedule, inp,
            eta=0.0):
    """One step of the hook, re-derived: x̂0, the gradient through the decoder, the weight, the prediction."""
    sched = pipe.scheduler
    levels = []  # (ᾱ_t, ᾱ_prev) of every step up to this one
    for rec in steps_before + [step]:
        if isinstance(sched, EulerDiscreteScheduler):
            s, s_next = float(sched.sigmas[rec["sigma_index"]]), float(sched.sigmas[rec["sigma_index"] + 1])
            levels.append((1 / (1 + s * s), 1 / (1 + s_next * s_next)))
        else:
            ac = sched.alphas_cumprod.double()
            prev = rec["t"] - sched.config.num_train_timesteps // n
            levels.append((float(ac[rec["t"]]), float(ac[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)))
    a, ap = levels[-1]
    alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    x, p = step["x"].double(), step["pred"].double()
    x0 = {"epsilon": (x - sigma * p) / alpha, "v_prediction": alpha * x - sigma * p, "sample": p}[prediction_type]
    if inp == "x0":
        point = x0.clone()
    else:
        rms = x.flatten(1).square().mean(1).sqrt().clamp_min(1.0)
        point = x / rms.view(-1, 1, 1, 1)
    point.requires_grad_(True)
    with torch.enable_grad():
        image = pipe.vae.decode(point.float() / pipe.vae.config.scaling_factor).sample
        logits = clf.forward_smoothed(image, beta)
        log_p = tau1 * logits[torch.arange(len(label)), label] - torch.logsumexp(tau2 * logits, dim=1)
        (g,) = torch.autograd.grad(log_p.sum(), point)

    def post_var(a_t, a_prev):
        return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)

    i = step["i"]
    if schedule == "ddpm":
        max_var = max(post_var(*lv) for lv in levels)
        weight = post_var(a, ap) + gamma * max_var * math.sin(math.pi * (n - 1 - i) / n)
        u = scale * weight * g
    else:
        big_g = 0.004 * scale
        lam = max(big_g * (n + 1 - i) / (n + 1), 1e-5) + big_g * gamma * math.sin(math.pi * i / n)
        rms = lambda v: v.flatten(1).square().mean(1).sqrt().view(-1, 1, 1, 1)  # noqa: E731
        u = g / rms(g) * rms(x) * lam
    # the scheduler's own coefficient of x̂0 in x_{t−1} (model-input units), so that x_{t−1} moves by u
    if isinstance(sched, EulerDiscreteScheduler):  # x' = x + (σ' − σ)·(x − x̂0)/σ on latents x = x̂0 + σ·ε
        s, s_next = math.sqrt((1 - a) / a), math.sqrt((1 - ap) / ap)
        c = (1 - s_next / s) * math.sqrt(ap)
    else:  # DDIM: x' = √ᾱ'·x̂0 + √(1 − ᾱ' − η²·Σ)·ε̂ (+ noise) with ε̂ = (x − √ᾱ·x̂0)/√(1 − ᾱ)
        assert isinstance(sched, DDIMScheduler)
        c = math.sqrt(ap) - math.sqrt(1 - ap - eta**2 * post_var(a, ap)) * math.sqrt(a / (1 - a))
    x0_new = x0 + u / c
    return {
        "epsilon": (x - alpha * x0_new) / sigma,
        "v_prediction": (alpha * x - x0_new) / sigma,
        "sample": x0_new,
    }[prediction_type]


CASES = {
    "eps-cfg-ddpm": dict(model="eps", guidance=None, schedule="ddpm", input="x0"),
    "v-apg-ddpm": dict(model="v", guidance="apg", schedule="ddpm", input="x0"),
    "x0pred-cfg-ddpm": dict(model="sample", guidance=None, schedule="ddpm", input="x0"),
    "eps-euler-ddpm": dict(model="euler", guidance=None, schedule="ddpm", input="x0"),
    "eps-cfg-edm-xt": dict(model="eps", guidance=None, schedule="edm", input="xt"),
    "eps-ddim-eta-ddpm": dict(model="eps", guidance=None, schedule="ddpm", input="x0", eta=0.6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_the_formula_by_hand(case, sd, sd_v):
    cfg = CASES[case]
    pipe = sd_v if cfg["model"] == "v" else sd
    if cfg["model"] == "sample":
        pipe = GuidedStableDiffusionPipeline.from_pipe(
            sd, scheduler=DDIMScheduler.from_config(sd.scheduler.config, prediction_type="sample")
        )
    elif cfg["model"] == "euler":
        pipe = GuidedStableDiffusionPipeline.from_pipe(sd, scheduler=EulerDiscreteScheduler.from_config(sd.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    prediction_type = pipe.scheduler.config.prediction_type
    clf = ConvNet()
    settings = dict(scale=1000.0, beta=2.0, tau1=1.5, tau2=0.7, gamma=0.4)
    scale = settings["scale"] if cfg["schedule"] == "ddpm" else 25.0
    hook = guidekit.EluCD(
        clf, ["green", "blue"], scale=scale, softplus_beta=settings["beta"], joint_temperature=settings["tau1"],
        marginal_temperature=settings["tau2"], schedule=cfg["schedule"], gamma=settings["gamma"], input=cfg["input"],
    )
    before, after = Record(), Record()
    hooks = ([guidekit.APG(norm_threshold=3.0)] if cfg["guidance"] == "apg" else []) + [before, hook, after]
    eta = cfg.get("eta", 0.0)
    run(pipe, hooks, prompt=[PROMPT, PROMPT], guidance_scale=7.5, eta=eta)
    n = len(before.steps)
    for i in (1, n - 2):
        s = dict(settings, scale=scale)
        expected = by_hand(
            pipe, clf, torch.tensor([1, 2]), before.steps[i], n, before.steps[:i], prediction_type,
            s["scale"], s["beta"], s["tau1"], s["tau2"], s["gamma"], cfg["schedule"], cfg["input"], eta,
        )
        change = expected - before.steps[i]["pred"].double()
        assert change.abs().max() > 1e-2 * expected.abs().max()  # the step does move
        assert_close_to_scale(after.steps[i]["pred"].double(), expected, 2e-4)


# ---------------------------------------------------------------------------------------------------- pipelines


def test_zero_scale_gives_the_unguided_image_exactly(sd):
    assert (run(sd, [guidekit.EluCD(ConvNet(), "red", scale=0.0)]) == run(sd)).all()
    apg = dict(norm_threshold=3.0)
    with_apg = run(sd, [guidekit.APG(**apg), guidekit.EluCD(ConvNet(), "red", scale=0.0)], guidance_scale=9.0)
    assert (with_apg == run(sd, [guidekit.APG(**apg)], guidance_scale=9.0)).all()


def test_composes_with_apg(sd):
    apg_only = run(sd, [guidekit.APG(norm_threshold=3.0)], guidance_scale=9.0)
    both = run(sd, [guidekit.APG(norm_threshold=3.0), guidekit.EluCD(Redness(), "red", scale=300.0)], guidance_scale=9.0)
    assert torch.isfinite(torch.from_numpy(both)).all()
    assert redness(both)[0] > redness(apg_only)[0]


@pytest.mark.parametrize("clf", [Constant(), Redness(nan=True)], ids=["zero-gradient", "nan-logits"])
def test_never_nan_and_no_correction_without_a_usable_gradient(sd, clf):
    images = run(sd, [guidekit.EluCD(clf, 0, scale=1e6)])
    assert torch.isfinite(torch.from_numpy(images)).all()
    assert (images == run(sd)).all()


def test_the_users_classifier_is_untouched_and_smoothed_once(sd):
    clf = ConvNet().train()
    state = copy.deepcopy(clf.state_dict())
    hook = guidekit.EluCD(clf, "red", scale=30.0)
    run(sd, [hook])
    smoothed = hook._smoothed
    run(sd, [hook])
    assert hook._smoothed is smoothed and hook.softplus_replaced == 1
    assert isinstance(smoothed.model.relu, nn.Softplus) and not smoothed.training
    assert isinstance(clf.relu, nn.ReLU) and clf.training
    assert all(p.requires_grad and p.grad is None for p in clf.parameters())
    assert all(torch.equal(v, state[k]) for k, v in clf.state_dict().items())


def test_a_second_call_gives_the_same_image(sd):
    hook = guidekit.EluCD(Redness(), "red", scale=300.0)
    assert (run(sd, [hook]) == run(sd, [hook])).all()


def test_classifier_guidance_is_the_uncalibrated_hook(sd):
    cg = guidekit.ClassifierGuidance(ConvNet(), "blue", scale=30.0)
    assert (cg.softplus_beta, cg.joint_temperature, cg.marginal_temperature, cg.gamma) == (None, 1.0, 1.0, 0.0)
    same = guidekit.EluCD(ConvNet(), 2, scale=30.0, softplus_beta=None, marginal_temperature=1.0, gamma=0.0)
    assert (run(sd, [cg]) == run(sd, [same])).all()
    assert not (run(sd, [cg]) == run(sd, [guidekit.EluCD(ConvNet(), 2, scale=30.0)])).all()


def test_gradient_checkpointing_gives_the_same_image_and_restores_the_vae(sd):
    flags = [(m, m.gradient_checkpointing) for m in sd.vae.decoder.modules() if hasattr(m, "gradient_checkpointing")]
    plain = run(sd, [guidekit.EluCD(ConvNet(), "red", scale=30.0)])
    checkpointed = run(sd, [guidekit.EluCD(ConvNet(), "red", scale=30.0, gradient_checkpointing=True)])
    assert abs(plain - checkpointed).max() < 1e-5
    assert all(m.gradient_checkpointing == flag for m, flag in flags)


def test_unsupported_scheduler_is_refused_at_call(sd):
    pipe = GuidedStableDiffusionPipeline.from_pipe(sd, scheduler=UniPCMultistepScheduler.from_config(sd.scheduler.config))
    with pytest.raises(ValueError, match="scheduler"):
        run(pipe, [guidekit.EluCD(ConvNet(), "red")])


# ---------------------------------------------------------------------------------------------------- labels


def test_labels_by_name_case_insensitive_and_per_image():
    assert guidekit.EluCD(ConvNet(), "GREEN").labels == 1
    assert guidekit.EluCD(ConvNet(), ["blue", 0, " Red "]).labels == (2, 0, 0)


@pytest.mark.parametrize(
    "labels, match",
    [
        ("gren", r"'gren' is not a label.*did you mean 'green'.*'red', 'green', 'blue'"),
        (3, r"3 is not a class.*\[0, 3\)"),
        (-1, "not a class"),
        ([], "empty list"),
        (True, "not accepted"),
        (1.0, "not accepted"),
    ],
)
def test_label_errors(labels, match):
    with pytest.raises(ValueError, match=match):
        guidekit.EluCD(ConvNet(), labels)


def test_label_name_without_id2label_is_an_error():
    with pytest.raises(ValueError, match="no id2label"):
        guidekit.EluCD(Constant(), "cat")


def test_label_list_must_match_the_batch(sd):
    hook = guidekit.EluCD(ConvNet(), ["red", "green", "blue"], scale=1.0)
    with pytest.raises(ValueError, match="3 labels were given for a batch of 2 images"):
        run(sd, [hook], num_images_per_prompt=2)


@pytest.mark.parametrize("name, value", [("scale", -1.0), ("softplus_beta", 0.0), ("gamma", float("nan")), ("schedule", "x"), ("input", "eps")])
def test_argument_errors(name, value):
    with pytest.raises(ValueError, match=name):
        guidekit.EluCD(ConvNet(), 0, **{name: value})


# ---------------------------------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers ResNet with three named labels and its preprocessor config, saved to a folder."""
    from guidekit.testing import CONVNEXT_PROCESSOR, make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-resnet"), processor=CONVNEXT_PROCESSOR)


def test_transformers_adapter_preprocesses_in_torch_as_its_config_says(hf_dir):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(hf_dir))
    adapter = TransformersClassifier(model)
    assert adapter.id2label == {0: "red", 1: "green", 2: "blue"}
    images = torch.rand(2, 3, 32, 40) * 2 - 1
    x = F.interpolate((images + 1) / 2, size=(27, 33), mode="bilinear", antialias=True)  # short side 24 / 0.875
    x = x[..., 1:25, 4:28]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(adapter.preprocess(images), (x - mean) / std)
    torch.testing.assert_close(adapter(images), model(pixel_values=(x - mean) / std).logits)
    loaded = TransformersClassifier.from_pretrained(str(hf_dir), size=16)
    assert loaded.preprocess(images).shape[-2:] == (16, 16)


def test_transformers_adapter_needs_a_normalisation(hf_dir, tmp_path):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(hf_dir))
    model.save_pretrained(str(tmp_path))  # no preprocessor_config.json there
    bare = AutoModelForImageClassification.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="image_mean"):
        TransformersClassifier(bare)
    assert TransformersClassifier(bare, image_mean=0.5, image_std=0.5).resize is None


def test_hook_takes_a_transformers_model_and_leaves_it_untouched(sd, hf_dir):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(hf_dir))
    state = copy.deepcopy(model.state_dict())
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    hook = guidekit.EluCD(model, "Blue", scale=100.0)
    images = run(sd, [hook])
    assert torch.isfinite(torch.from_numpy(images)).all() and not (images == run(sd)).all()
    assert hook.softplus_replaced == relus > 0
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == relus
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_torch_adapter_range_size_and_normalisation():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.mean(dim=(2, 3))

    images = torch.rand(1, 3, 8, 8) * 2 - 1
    TorchClassifier(Probe(), input_range=(0, 1), size=4, mean=0.5, std=0.25)(images)
    expected = (F.interpolate((images + 1) / 2, size=(4, 4), mode="bilinear", antialias=True) - 0.5) / 0.25
    torch.testing.assert_close(seen[-1], expected)
    TorchClassifier(Probe())(images)
    assert torch.equal(seen[-1], images)
    with pytest.raises(ValueError, match="input_range"):
        TorchClassifier(Probe(), input_range=(0, 255))


# ---------------------------------------------------------------------------------------------------- effect


@pytest.mark.parametrize("model", ["eps", "v"])
def test_guiding_toward_red_makes_the_image_redder(model, sd, sd_v):
    pipe = sd if model == "eps" else sd_v
    prompts = [PROMPT, PROMPT]
    base = redness(run(pipe, prompt=prompts, seed=1))
    toward = redness(run(pipe, [guidekit.EluCD(Redness(), ["red", "cyan"], scale=300.0)], prompt=prompts, seed=1))
    assert toward[0] > base[0] + 0.005
    assert toward[1] < base[1] - 0.005


def test_sdxl_pipeline(tiny_sdxl_dir):
    from guidekit.pipelines import GuidedStableDiffusionXLPipeline

    pipe = GuidedStableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe, seed=1)
    assert (run(pipe, [guidekit.EluCD(Redness(), "red", scale=0.0)], seed=1) == base).all()
    guided = run(pipe, [guidekit.EluCD(Redness(), "red", scale=300.0)], seed=1)
    assert torch.isfinite(torch.from_numpy(guided)).all()
    assert redness(guided)[0] > redness(base)[0]


def test_pixel_model_classifies_the_clipped_x0_directly():
    """Without a VAE the classifier reads x̂0 clipped to [-1, 1] (the official DDPM path), gradient at that point."""
    from guidekit.hooks import SamplerState
    from guidekit.testing.tiny import sd_ddim_scheduler

    sched = sd_ddim_scheduler()
    sched.set_timesteps(5)
    clf = ConvNet()
    hook = guidekit.EluCD(clf, ["red", "blue"], scale=2.0, softplus_beta=4.0, gamma=0.5)
    state = SamplerState(num_steps=5, scheduler=sched, prediction_type="epsilon")
    g = torch.Generator().manual_seed(0)
    outs, ins = [], []
    for i, t in enumerate(sched.timesteps[:2]):
        x, pred = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        state.update(i, t, x, model_input=x)
        ins.append((x, pred, int(t)))
        outs.append(hook.correct(state, pred))
    ac = sched.alphas_cumprod.double()
    levels = [(float(ac[t]), float(ac[t - 200])) for _, _, t in ins]
    post_var = [(1 - ap) / (1 - a) * (1 - a / ap) for a, ap in levels]
    (x, pred, t), (a, ap) = ins[1], levels[1]
    x0 = (x.double() - math.sqrt(1 - a) * pred.double()) / math.sqrt(a)
    point = x0.clamp(-1, 1).requires_grad_(True)
    logits = clf.forward_smoothed(point.float(), 4.0)
    log_p = logits[[0, 1], [0, 2]] - torch.logsumexp(0.5 * logits, dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), point)
    weight = post_var[1] + 0.5 * max(post_var) * math.sin(math.pi * 3 / 5)
    c = math.sqrt(ap) - math.sqrt(1 - ap) * math.sqrt(a / (1 - a))  # DDIM's coefficient of x̂0 in x_{t−1} (η = 0)
    x0_new = x0 + 2.0 * weight * grad / c
    expected = (x.double() - math.sqrt(a) * x0_new) / math.sqrt(1 - a)
    assert (expected - pred).abs().max() > 1e-3
    assert_close_to_scale(outs[1].double(), expected, 1e-5)
