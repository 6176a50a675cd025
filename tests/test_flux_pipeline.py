"""GuidedFluxPipeline against the stock FluxPipeline on tiny random checkpoints (diffusers' Flux fast-test
configs, saved and loaded back): the same output bit for bit over the fast tests' argument surface, and the
hooks' view of the flow step (velocity, sigma, x0, true-CFG passes)."""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import guidekit
from guidekit.guidance.apg_math import apg_step
from guidekit.pipelines import GuidedFluxPipeline
from guidekit.testing import make_tiny_flux
from tolerance import assert_close_to_scale

PROMPT = "a red circle on a blue background"
BASE = dict(height=8, width=8, num_inference_steps=2, max_sequence_length=48, output_type="np")
TRUE_CFG = dict(negative_prompt="blurry", true_cfg_scale=3.0)
STEPS = BASE["num_inference_steps"]
TOKENS = (BASE["height"] // 2) * (BASE["width"] // 2)  # VAE factor 1, 2x2 packing


@pytest.fixture(scope="session")
def tiny_flux_dirs(tmp_path_factory):
    """Tiny Flux.1 checkpoints: a plain transformer and a guidance-distilled one (`guidance_embeds=True`)."""
    return {
        "plain": make_tiny_flux(tmp_path_factory.mktemp("tiny-flux")),
        "distilled": make_tiny_flux(tmp_path_factory.mktemp("tiny-flux-distilled"), guidance_embeds=True),
    }


def load(cls, folder):
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["plain", "distilled"])
def pair(request, tiny_flux_dirs):
    folder = tiny_flux_dirs[request.param]
    return request.param, load(FluxPipeline, folder), load(GuidedFluxPipeline, folder)


def seeded(kw):
    """`kw` with fresh generators (they are consumed by a call), seed 0 unless the case lists its own, and
    fresh dicts (the pipelines may change the attention kwargs they are given)."""
    kw = {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}
    gen = kw.get("generator")
    if isinstance(gen, list):
        kw["generator"] = [torch.Generator().manual_seed(g.initial_seed()) for g in gen]
    elif gen is None:
        kw["generator"] = torch.Generator().manual_seed(0)
    return kw


def run(pipe, **kw):
    kw = seeded({**BASE, **kw})
    if "prompt" not in kw and "prompt_embeds" not in kw:
        kw["prompt"] = PROMPT
    out = pipe(**kw)
    images = out[0] if isinstance(out, tuple) else out.images
    if isinstance(images, list):  # PIL
        images = np.stack([np.asarray(im) for im in images])
    return torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images


def encoded(pipe):
    pos, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=BASE["max_sequence_length"])
    neg, neg_pooled, _ = pipe.encode_prompt("blurry", None, max_sequence_length=BASE["max_sequence_length"])
    return dict(prompt_embeds=pos, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                negative_pooled_prompt_embeds=neg_pooled)


def scale_latents(pipe, i, t, kwargs):
    # Every callback tensor input comes back changed, so the loop must use what the callback returns.
    return {"latents": kwargs["latents"] * 0.9, "prompt_embeds": kwargs["prompt_embeds"] * 1.1}


CASES = {
    "prompt": {},
    "negative-prompt-without-true-cfg": dict(negative_prompt="blurry"),
    "true-cfg": TRUE_CFG,
    "true-cfg-at-1": dict(negative_prompt="blurry", true_cfg_scale=1.0),
    "true-cfg-without-negative": dict(true_cfg_scale=3.0),
    "batch-of-prompts": dict(prompt=[PROMPT, "a blue square"], negative_prompt=["x", "y"], true_cfg_scale=2.0),
    "images-per-prompt": dict(num_images_per_prompt=2, **TRUE_CFG),
    "generator-list": dict(prompt=[PROMPT, PROMPT], generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                           **TRUE_CFG),
    "latents": dict(latents=torch.randn(1, TOKENS, 4, generator=torch.Generator().manual_seed(4)), **TRUE_CFG),
    "prompt-2": dict(prompt_2="a green triangle", negative_prompt_2="noisy", **TRUE_CFG),
    "embedded-guidance": dict(guidance_scale=7.0, **TRUE_CFG),
    "non-square": dict(height=16, width=8, **TRUE_CFG),
    "three-steps": dict(num_inference_steps=3, **TRUE_CFG),
    "sigmas": dict(num_inference_steps=3, sigmas=[1.0, 0.6, 0.3], **TRUE_CFG),
    "max-sequence-length": dict(max_sequence_length=16, **TRUE_CFG),
    "joint-attention-kwargs": dict(joint_attention_kwargs={"scale": 0.5}, **TRUE_CFG),
    "output-pt": dict(output_type="pt", **TRUE_CFG),
    "output-pil": dict(output_type="pil", **TRUE_CFG),
    "output-latent": dict(output_type="latent", **TRUE_CFG),
    "tuple": dict(return_dict=False, **TRUE_CFG),
    "callback-every-tensor-input": dict(callback_on_step_end=scale_latents,
                                        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **TRUE_CFG),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_output_as_stock(pair, case):
    """No hook and `hooks=[guidekit.CFG()]` both give the stock output, bit for bit."""
    _, stock, hooked = pair
    kw = CASES[case]
    expected = run(stock, **kw)
    for hooks in (None, [guidekit.CFG()]):
        actual = run(hooked, **kw, hooks=hooks)
        assert actual.shape == expected.shape
        assert (actual.double() - expected.double()).abs().max().item() == 0.0, hooks


@pytest.mark.parametrize("true_cfg", [False, True], ids=["cfg-off", "true-cfg"])
def test_prompt_embeds_give_stock_output(pair, true_cfg):
    _, stock, hooked = pair
    kw = dict(encoded(stock), true_cfg_scale=3.0 if true_cfg else 1.0)
    if not true_cfg:
        kw.pop("negative_prompt_embeds"), kw.pop("negative_pooled_prompt_embeds")
    assert (run(hooked, **kw) - run(stock, **kw)).abs().max().item() == 0.0


def test_callback_sees_every_tensor_input(pair):
    _, stock, hooked = pair
    names = list(hooked._callback_tensor_inputs)
    assert names == list(stock._callback_tensor_inputs)
    seen = []

    def callback(pipe, i, t, kwargs):
        assert sorted(kwargs) == sorted(names)
        seen.append(i)
        return {}

    run(hooked, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=names, **TRUE_CFG)
    assert seen == list(range(STEPS))


def test_hook_scale_comes_from_true_cfg_scale(pair):
    """A hook's scale None reads `true_cfg_scale`, never the embedded `guidance_scale`; a hook's own scale
    stands in for `true_cfg_scale` exactly."""
    _, stock, hooked = pair
    seen = []

    class Recorder(guidekit.CFG):
        def guide(self, state, pred_cond, pred_uncond):
            seen.append(state.guidance_scale)
            return super().guide(state, pred_cond, pred_uncond)

    run(hooked, hooks=[Recorder()], guidance_scale=7.0, **TRUE_CFG)
    assert seen == [TRUE_CFG["true_cfg_scale"]] * STEPS
    own = run(hooked, hooks=[guidekit.CFG(guidance_scale=3.0)], negative_prompt="blurry")
    assert (own - run(stock, **TRUE_CFG)).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="guidance_scale"):
        run(hooked, hooks=[guidekit.APG(guidance_scale=2.0)], negative_prompt="blurry", true_cfg_scale=3.0)


def test_apg_runs_and_differs_from_cfg(pair):
    _, _, hooked = pair
    cfg = run(hooked, output_type="latent", **TRUE_CFG)
    apg = run(hooked, output_type="latent", hooks=[guidekit.APG(norm_threshold=0.5)], **TRUE_CFG)
    assert torch.isfinite(apg).all()
    assert (apg - cfg).abs().max().item() > 1e-3 * cfg.abs().max().item()


@pytest.mark.parametrize("kw", [dict(), dict(negative_prompt="blurry"), dict(true_cfg_scale=3.0)],
                         ids=["no-negative", "scale-1", "no-negative-scale-3"])
def test_apg_without_true_cfg_is_refused(pair, kw):
    kind, _, hooked = pair
    with pytest.raises(ValueError, match=r"negative_prompt.*true_cfg_scale > 1") as info:
        run(hooked, hooks=[guidekit.APG()], **kw)
    assert ("guidance-distilled" in str(info.value)) == (kind == "distilled")


class TransformerCalls:
    """Records the transformer's calls (their text embeddings and image tokens) through a forward pre-hook."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append({"text": kwargs["encoder_hidden_states"], "latents": kwargs["hidden_states"].clone()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class UncondFromStep1(guidekit.CFG):
    """CFG that skips the unconditional pass at step 0 (it records what it was given)."""

    def __init__(self):
        super().__init__()
        self.given = []

    def needs_uncond(self, state):
        return state.step_index >= 1 and super().needs_uncond(state)

    def guide(self, state, pred_cond, pred_uncond):
        self.given.append(pred_uncond is not None)
        return super().guide(state, pred_cond, pred_uncond)


def test_uncond_pass_runs_only_when_the_hook_needs_it(pair):
    _, stock, hooked = pair
    neg = encoded(stock)
    kw = dict(neg, true_cfg_scale=3.0)
    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, **kw)
    # True CFG: conditional pass first, then the unconditional one, each step.
    texts = [c["text"] for c in spy.calls]
    assert len(texts) == 2 * STEPS
    assert all(torch.equal(a, b) for a, b in zip(texts, [neg["prompt_embeds"], neg["negative_prompt_embeds"]] * STEPS))
    hook = UncondFromStep1()
    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, hooks=[hook], **kw)
    assert len(spy.calls) == 2 * STEPS - 1
    assert hook.given == [False] + [True] * (STEPS - 1)
    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, prompt_embeds=neg["prompt_embeds"], pooled_prompt_embeds=neg["pooled_prompt_embeds"])
    assert len(spy.calls) == STEPS


def expected_flux_sigmas(n, tokens, base_seq=256, max_seq=4096, base_shift=0.5, max_shift=1.15):
    """Flux's schedule from its definition: sigmas 1 .. 1/n, time-shifted by mu (linear in the token count)."""
    mu = base_shift + (tokens - base_seq) * (max_shift - base_shift) / (max_seq - base_seq)
    return [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in np.linspace(1.0, 1.0 / n, n)]


def test_hook_sees_x0_as_latents_minus_sigma_v(pair):
    _, _, hooked = pair
    records = []

    class Recorder(guidekit.SamplerHook):
        def correct(self, state, pred):
            records.append((state.latents.clone(), pred.clone(), state.to_x0(pred)))
            return pred

    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, hooks=[Recorder()], num_inference_steps=3, **TRUE_CFG)
    sigmas = expected_flux_sigmas(3, TOKENS)
    assert len(records) == 3
    for i, (latents, v, x0) in enumerate(records):
        assert torch.equal(latents, spy.calls[2 * i]["latents"])  # the latents the transformer saw
        expected = latents.double() - sigmas[i] * v.double()
        assert_close_to_scale(x0, expected, 1e-6)


def test_attach_shares_components_without_conversion(tiny_flux_dirs):
    stock = load(FluxPipeline, tiny_flux_dirs["distilled"])
    stock.transformer.to(torch.bfloat16)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            attached = guidekit.attach(stock, guidekit.APG())
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert type(attached) is GuidedFluxPipeline and type(stock) is FluxPipeline
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert getattr(attached, name) is getattr(stock, name)
    assert stock.transformer.dtype == torch.bfloat16 and stock.vae.dtype == torch.float32
    assert attached.scheduler is not stock.scheduler
    assert dict(attached.scheduler.config) == dict(stock.scheduler.config)


def test_attached_apg_and_from_pipe(pair):
    _, stock, hooked = pair
    attached = guidekit.attach(stock, guidekit.APG(norm_threshold=0.5))
    attached.set_progress_bar_config(disable=True)
    direct = run(hooked, hooks=[guidekit.APG(norm_threshold=0.5)], **TRUE_CFG)
    assert (run(attached, **TRUE_CFG) - direct).abs().max().item() == 0.0
    plain = GuidedFluxPipeline.from_pipe(stock)
    plain.set_progress_bar_config(disable=True)
    assert plain.transformer is stock.transformer
    assert (run(plain, **TRUE_CFG) - run(stock, **TRUE_CFG)).abs().max().item() == 0.0


def paper_apg(cond, uncond, w, r, beta, running):
    """Algorithm 1 of the APG paper for ONE sample (numpy, float64): momentum, rescale to radius r, drop the
    part of the difference parallel to the conditional prediction."""
    delta = cond - uncond
    running = delta if running is None else delta + beta * running
    delta = running * min(1.0, r / np.linalg.norm(running))
    unit = cond / np.linalg.norm(cond)
    orthogonal = delta - np.sum(delta * unit) * unit
    return cond + (w - 1) * orthogonal, running


def test_apg_radius_is_per_batch_row_on_packed_latents():
    """Packed (B, N, 64) latents: r and the projection act on each batch row over all of its N x 64 values."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.05, 1.0, 20.0]).view(-1, 1, 1)  # r = 5 clips some rows and not others
    conds = [torch.randn(3, 16, 64, generator=g, dtype=torch.float64) * scales for _ in range(2)]
    unconds = [c + torch.randn(3, 16, 64, generator=g, dtype=torch.float64) * scales for c in conds]
    running, rows = None, [None] * 3
    for cond, uncond in zip(conds, unconds):
        guided, running = apg_step(cond, uncond, 4.0, norm_threshold=5.0, momentum=-0.5, running=running)
        for b in range(3):
            expected, rows[b] = paper_apg(cond[b].numpy(), uncond[b].numpy(), 4.0, 5.0, -0.5, rows[b])
            np.testing.assert_allclose(guided[b].numpy(), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def test_apg_batch_row_equals_single_call(pair):
    """End to end: APG with a clipping radius on a batch of two gives each row the image of its own call."""
    _, _, hooked = pair
    apg = lambda: [guidekit.APG(norm_threshold=1e-3)]  # noqa: E731 - clips every row
    single = run(hooked, hooks=apg(), output_type="latent", generator=torch.Generator().manual_seed(7), **TRUE_CFG)
    batch = run(hooked, hooks=apg(), output_type="latent", prompt=[PROMPT, "a blue square"],
                negative_prompt=["blurry", "dark"], true_cfg_scale=3.0,
                generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    assert_close_to_scale(batch[:1], single, 1e-5)


def test_cfg_warns_when_the_call_asks_for_guidance_it_cannot_run(pair):
    """CFG keeps the stock output when true CFG is off, and says so when the call asked for guidance."""
    _, _, hooked = pair
    with pytest.warns(UserWarning, match=r"true CFG is off .*missing: true_cfg_scale > 1"):
        run(hooked, negative_prompt="blurry", output_type="latent")
    with pytest.warns(UserWarning, match=r"true CFG is off .*missing: a negative prompt"):
        run(hooked, true_cfg_scale=3.0, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run(hooked, output_type="latent")  # the stock default: no negative, w = 1
