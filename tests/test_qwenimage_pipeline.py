"""GuidedQwenImagePipeline against the stock QwenImagePipeline on a tiny random checkpoint (diffusers' Qwen-Image
fast-test configs, saved and loaded back): the same output bit for bit over the fast tests' argument surface,
the hooks' view of the flow step, and where Qwen-Image's per-token norm rescale sits."""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

import guidekit
from guidekit.pipelines import GuidedQwenImagePipeline
from guidekit.testing import make_tiny_qwenimage
from guidekit.testing.qwenimage import QWEN_TEMPLATE_PREFIX_TOKENS
from tolerance import assert_close_to_scale

PROMPT = "a red circle on a blue background"
BASE = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
TRUE_CFG = dict(negative_prompt="blurry")  # true_cfg_scale's stock default is 4.0
STEPS = BASE["num_inference_steps"]
TOKENS = (BASE["height"] // 8) * (BASE["width"] // 8)  # VAE factor 4, 2x2 packing
CHANNELS = 16  # 4 latent channels x 2 x 2


@pytest.fixture(scope="session")
def tiny_qwenimage_dir(tmp_path_factory):
    return make_tiny_qwenimage(tmp_path_factory.mktemp("tiny-qwenimage"))


def load(cls, folder):
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pair(tiny_qwenimage_dir):
    return load(QwenImagePipeline, tiny_qwenimage_dir), load(GuidedQwenImagePipeline, tiny_qwenimage_dir)


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


def scale_latents(pipe, i, t, kwargs):
    # Every callback tensor input comes back changed, so the loop must use what the callback returns.
    return {"latents": kwargs["latents"] * 0.9, "prompt_embeds": kwargs["prompt_embeds"] * 1.1}


CASES = {
    "prompt": {},
    "true-cfg": TRUE_CFG,
    "true-cfg-at-1": dict(negative_prompt="blurry", true_cfg_scale=1.0),
    "true-cfg-2.5": dict(negative_prompt="blurry", true_cfg_scale=2.5),
    "batch-of-prompts": dict(prompt=[PROMPT, "a blue square"], negative_prompt=["x", "a dark and noisy picture"]),
    "images-per-prompt": dict(num_images_per_prompt=2, **TRUE_CFG),
    "generator-list": dict(prompt=[PROMPT, PROMPT], generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                           **TRUE_CFG),
    "latents": dict(latents=torch.randn(1, TOKENS, CHANNELS, generator=torch.Generator().manual_seed(4)), **TRUE_CFG),
    "non-square": dict(height=64, width=32, **TRUE_CFG),
    "three-steps": dict(num_inference_steps=3, **TRUE_CFG),
    "sigmas": dict(num_inference_steps=3, sigmas=[1.0, 0.6, 0.3], **TRUE_CFG),
    "max-sequence-length": dict(max_sequence_length=8, **TRUE_CFG),
    "attention-kwargs": dict(attention_kwargs={"scale": 0.5}, **TRUE_CFG),
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
    stock, hooked = pair
    kw = CASES[case]
    expected = run(stock, **kw)
    for hooks in (None, [guidekit.CFG()]):
        actual = run(hooked, **kw, hooks=hooks)
        assert actual.shape == expected.shape
        assert (actual.double() - expected.double()).abs().max().item() == 0.0, hooks


def test_prompt_embeds_with_masks_give_stock_output(pair):
    stock, hooked = pair
    # Prompts of different lengths: the shorter one's mask has zeros, so the masks are passed on (not None).
    pos, pos_mask = stock.encode_prompt([PROMPT, "a cat"], max_sequence_length=16)
    neg, neg_mask = stock.encode_prompt(["blurry", "a dark and noisy picture"], max_sequence_length=16)
    assert pos_mask is not None and neg_mask is not None
    kw = dict(prompt_embeds=pos, prompt_embeds_mask=pos_mask, negative_prompt_embeds=neg,
              negative_prompt_embeds_mask=neg_mask)
    assert (run(hooked, **kw) - run(stock, **kw)).abs().max().item() == 0.0


def test_template_prefix_is_dropped_whole_so_cfg_has_an_effect(pair):
    """The offline tokenizer splits the template prefix into the 34 tokens the pipeline drops, so the embeddings
    kept are the prompt's own and prompt and negative differ; otherwise true CFG would change nothing."""
    stock, _ = pair
    template = stock.prompt_template_encode
    assert stock.prompt_template_encode_start_idx == QWEN_TEMPLATE_PREFIX_TOKENS
    prefix = template[: template.index("{}")]
    assert len(stock.tokenizer(prefix).input_ids) == QWEN_TEMPLATE_PREFIX_TOKENS
    assert len(stock.tokenizer(template.format(PROMPT)).input_ids) > QWEN_TEMPLATE_PREFIX_TOKENS + len(PROMPT) // 4
    pos, _ = stock.encode_prompt(PROMPT, max_sequence_length=16)
    neg, _ = stock.encode_prompt("blurry", max_sequence_length=16)
    assert not torch.equal(pos[:, : neg.shape[1]], neg)
    guided = run(stock, output_type="latent", **TRUE_CFG)
    unguided = run(stock, output_type="latent")
    assert (guided - unguided).abs().max().item() > 1e-3 * unguided.abs().max().item()


def test_callback_sees_every_tensor_input(pair):
    stock, hooked = pair
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
    stock, hooked = pair
    seen = []

    class Recorder(guidekit.CFG):
        def guide(self, state, pred_cond, pred_uncond):
            seen.append(state.guidance_scale)
            return super().guide(state, pred_cond, pred_uncond)

    run(hooked, hooks=[Recorder()], **TRUE_CFG)
    assert seen == [4.0] * STEPS  # the stock default of true_cfg_scale
    own = run(hooked, hooks=[guidekit.CFG(guidance_scale=2.5)], **TRUE_CFG)
    assert (own - run(stock, true_cfg_scale=2.5, **TRUE_CFG)).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="guidance_scale"):
        run(hooked, hooks=[guidekit.APG(guidance_scale=2.0)], true_cfg_scale=3.0, **TRUE_CFG)


def test_apg_runs_and_differs_from_cfg(pair):
    _, hooked = pair
    cfg = run(hooked, output_type="latent", **TRUE_CFG)
    apg = run(hooked, output_type="latent", hooks=[guidekit.APG(norm_threshold=0.5)], **TRUE_CFG)
    assert torch.isfinite(apg).all()
    assert (apg - cfg).abs().max().item() > 1e-3 * cfg.abs().max().item()


@pytest.mark.parametrize("kw", [dict(), dict(negative_prompt="blurry", true_cfg_scale=1.0)],
                         ids=["no-negative", "scale-1"])
def test_apg_without_true_cfg_is_refused(pair, kw):
    _, hooked = pair
    with pytest.raises(ValueError, match=r"negative_prompt.*true_cfg_scale > 1"):
        run(hooked, hooks=[guidekit.APG()], **kw)


def test_norm_rescale_must_be_a_bool(pair):
    _, hooked = pair
    with pytest.raises(ValueError, match="norm_rescale: 'yes'"):
        run(hooked, norm_rescale="yes", **TRUE_CFG)


class TransformerCalls:
    """Records the transformer's calls: text embeddings, image tokens and output velocity."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.calls.append({"text": kwargs["encoder_hidden_states"], "latents": kwargs["hidden_states"].clone(),
                           "v": output[0].clone()})

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
    stock, hooked = pair
    pos, _ = stock.encode_prompt(PROMPT, max_sequence_length=16)
    neg, _ = stock.encode_prompt("blurry", max_sequence_length=16)
    kw = dict(prompt_embeds=pos, negative_prompt_embeds=neg)
    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, **kw)
    texts = [c["text"] for c in spy.calls]
    assert len(texts) == 2 * STEPS  # conditional first, then unconditional, each step
    assert all(torch.equal(a, b) for a, b in zip(texts, [pos, neg] * STEPS))
    hook = UncondFromStep1()
    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, hooks=[hook], **kw)
    assert len(spy.calls) == 2 * STEPS - 1
    assert hook.given == [False] + [True] * (STEPS - 1)
    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, prompt_embeds=pos)
    assert len(spy.calls) == STEPS


def expected_qwen_sigmas(n, tokens, base_seq=256, max_seq=8192, base_shift=0.5, max_shift=0.9, terminal=0.02):
    """Qwen-Image's schedule from its definition: sigmas 1 .. 1/n, time-shifted by mu (linear in the token count;
    the pipeline reads the scheduler's config), then stretched so that the last one is `terminal`."""
    mu = base_shift + (tokens - base_seq) * (max_shift - base_shift) / (max_seq - base_seq)
    shifted = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in np.linspace(1.0, 1.0 / n, n)]
    stretch = (1 - shifted[-1]) / (1 - terminal)
    return [1 - (1 - s) / stretch for s in shifted]


class Seen(guidekit.SamplerHook):
    """A correction hook that records what it is given: latents, velocity and the state's x0."""

    def __init__(self):
        self.records = []

    def correct(self, state, pred):
        self.records.append((state.latents.clone(), pred.clone(), state.to_x0(pred)))
        return pred


def test_hook_sees_x0_as_latents_minus_sigma_v(pair):
    _, hooked = pair
    seen = Seen()
    with TransformerCalls(hooked.transformer) as spy:
        run(hooked, hooks=[seen], num_inference_steps=3, **TRUE_CFG)
    sigmas = expected_qwen_sigmas(3, TOKENS)
    assert len(seen.records) == 3
    for i, (latents, v, x0) in enumerate(seen.records):
        assert torch.equal(latents, spy.calls[2 * i]["latents"])  # the latents the transformer saw
        assert_close_to_scale(x0, latents.double() - sigmas[i] * v.double(), 1e-6)


def token_norms(x):
    return x.double().norm(dim=-1)


@pytest.mark.parametrize("guidance", ["cfg", "apg"])
def test_norm_rescale_follows_the_guidance_slot(pair, guidance):
    """With the rescale, the corrections get the slot's result with each token at the conditional velocity's
    norm (APG included: APG's x0-space result is rescaled in v space); without it, the slot's result as is."""
    _, hooked = pair
    w = 4.0
    for norm_rescale in (True, False):
        seen = Seen()
        slot = guidekit.CFG() if guidance == "cfg" else guidekit.APG(norm_threshold=0.5)
        with TransformerCalls(hooked.transformer) as spy:
            run(hooked, hooks=[slot, seen], norm_rescale=norm_rescale, **TRUE_CFG)
        for i, (_, v, _) in enumerate(seen.records):
            cond, uncond = spy.calls[2 * i]["v"], spy.calls[2 * i + 1]["v"]
            if norm_rescale:
                assert_close_to_scale(token_norms(v), token_norms(cond), 1e-5)
            elif guidance == "cfg":
                expected = uncond.double() + w * (cond.double() - uncond.double())
                assert_close_to_scale(v, expected, 1e-5)
            else:
                assert (token_norms(v) - token_norms(cond)).abs().max().item() > 1e-3 * token_norms(cond).max().item()


def test_attach_shares_components_without_conversion(tiny_qwenimage_dir):
    stock = load(QwenImagePipeline, tiny_qwenimage_dir)
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
    assert type(attached) is GuidedQwenImagePipeline and type(stock) is QwenImagePipeline
    for name in ("transformer", "vae", "text_encoder", "tokenizer"):
        assert getattr(attached, name) is getattr(stock, name)
    assert stock.transformer.dtype == torch.bfloat16 and stock.vae.dtype == torch.float32
    assert attached.scheduler is not stock.scheduler
    assert dict(attached.scheduler.config) == dict(stock.scheduler.config)


def test_attached_apg_and_from_pipe(pair):
    stock, hooked = pair
    attached = guidekit.attach(stock, guidekit.APG(norm_threshold=0.5))
    attached.set_progress_bar_config(disable=True)
    direct = run(hooked, hooks=[guidekit.APG(norm_threshold=0.5)], **TRUE_CFG)
    assert (run(attached, **TRUE_CFG) - direct).abs().max().item() == 0.0
    plain = GuidedQwenImagePipeline.from_pipe(stock)
    plain.set_progress_bar_config(disable=True)
    assert plain.transformer is stock.transformer
    assert (run(plain, **TRUE_CFG) - run(stock, **TRUE_CFG)).abs().max().item() == 0.0


def test_apg_batch_row_equals_single_call(pair):
    """APG's radius is per batch row on the packed (B, N, 4C) latents: with a radius that clips both rows (their
    x0 differences have norms near 0.18 and 0.13 at the first step) and a large scale, so that the clipping
    shows through the norm rescale, a batch of two gives each row the image of its own call."""
    _, hooked = pair
    kw = dict(hooks=[guidekit.APG(norm_threshold=0.05)], true_cfg_scale=20.0, output_type="latent")
    single = run(hooked, generator=torch.Generator().manual_seed(7), negative_prompt="blurry", **kw)
    batch = run(hooked, prompt=[PROMPT, "a blue square"], negative_prompt=["blurry", "dark"],
                generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **kw)
    assert_close_to_scale(batch[:1], single, 1e-5)


def test_cfg_warns_when_the_call_asks_for_guidance_it_cannot_run(pair):
    """CFG keeps the stock output when true CFG is off, and says so (the stock pipeline logs it too)."""
    _, hooked = pair
    with pytest.warns(UserWarning, match=r"true CFG is off .*missing: a negative prompt"):
        run(hooked, output_type="latent")  # w = 4.0 by default
    with pytest.warns(UserWarning, match=r"true CFG is off .*missing: true_cfg_scale > 1"):
        run(hooked, negative_prompt="blurry", true_cfg_scale=1.0, output_type="latent")
    with pytest.warns(UserWarning, match="guidance_scale=2.0 is ignored"):
        run(hooked, guidance_scale=2.0, output_type="latent", **TRUE_CFG)
