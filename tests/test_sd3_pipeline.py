"""GuidedStableDiffusion3Pipeline: bit-equal to stock SD3 over diffusers' fast-test argument surface, with no hook
and with CFG(); the guidance slot, the skipped unconditional half, skip-layer guidance and what hooks see."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import guidekit
from guidekit.hooks import SamplerHook
from guidekit.pipelines import GuidedStableDiffusion3Pipeline
from guidekit.testing.flow import make_tiny_sd3

PROMPT = "a red circle on a blue background"
BASE = dict(num_inference_steps=2, height=32, width=32, guidance_scale=5.0, output_type="np")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def pipes(sd3_dir):
    stock = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    hooked = GuidedStableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    for pipe in (stock, hooked):
        pipe.set_progress_bar_config(disable=True)
    return stock, hooked


def run(pipe, seed=0, **kw):
    kw = {**BASE, **kw}
    kw.setdefault("generator", torch.Generator().manual_seed(seed))
    if "prompt" not in kw and "prompt_embeds" not in kw:
        kw["prompt"] = PROMPT
    out = pipe(**kw)
    return np.asarray(out[0] if isinstance(out, tuple) else out.images)


def embeds(pipe):
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, None, None, negative_prompt="blurry", device="cpu")
    return dict(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled)


# diffusers' SD3 fast tests (different prompts per encoder, negative prompts, prompt embeds, skip-layer guidance)
# plus PipelineTesterMixin's argument surface.
CASES = {
    "defaults": {},
    "different-prompts": dict(prompt_2="a green square", prompt_3="on a yellow background"),
    "negative-prompts": dict(negative_prompt="blurry", negative_prompt_2="dark", negative_prompt_3="noisy"),
    "batch-of-prompts": dict(prompt=[PROMPT, "a blue square"], negative_prompt=["x", "y"]),
    "images-per-prompt": dict(num_images_per_prompt=2),
    "generator-list": dict(prompt=[PROMPT, PROMPT], generator=[torch.Generator().manual_seed(s) for s in (1, 2)]),
    "latents": dict(latents=torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))),
    "w=1": dict(guidance_scale=1.0),
    "w=12": dict(guidance_scale=12.0),
    "sigmas": dict(sigmas=[1.0, 0.4]),
    "mu-ignored-without-dynamic-shift": dict(mu=0.7),
    "max-sequence-length": dict(max_sequence_length=16),
    "skip-layer-guidance": dict(num_inference_steps=4, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                                skip_layer_guidance_stop=1.0),
    "joint-attention-kwargs": dict(joint_attention_kwargs={}),
    "tuple": dict(return_dict=False),
    "output-pt": dict(output_type="pt"),
    "output-latent": dict(output_type="latent"),
}


@pytest.mark.parametrize("hooks", [None, "cfg"], ids=["no-hook", "CFG()"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_output_as_stock_bit_for_bit(pipes, case, hooks):
    stock, hooked = pipes
    kw = dict(CASES[case])
    if "generator" in kw:  # generators are consumed: give each pipeline its own
        seeds = [g.initial_seed() for g in kw["generator"]]
        a = run(stock, **{**kw, "generator": [torch.Generator().manual_seed(s) for s in seeds]})
        b = run(hooked, hooks=[guidekit.CFG()] if hooks else None,
                **{**kw, "generator": [torch.Generator().manual_seed(s) for s in seeds]})
    else:
        a = run(stock, **kw)
        b = run(hooked, hooks=[guidekit.CFG()] if hooks else None, **kw)
    assert a.shape == b.shape
    assert np.abs(a - b).max() == 0.0


def test_prompt_embeds_and_every_callback_tensor_input_match_stock(pipes):
    stock, hooked = pipes
    seen = {}

    def callback(name):
        def record(pipe, i, t, tensors):
            seen.setdefault(name, []).append({k: v.clone() for k, v in tensors.items()})
            return tensors
        return record

    inputs = list(StableDiffusion3Pipeline._callback_tensor_inputs)
    a = run(stock, **embeds(stock), callback_on_step_end=callback("stock"), callback_on_step_end_tensor_inputs=inputs)
    b = run(hooked, **embeds(hooked), callback_on_step_end=callback("hooked"), callback_on_step_end_tensor_inputs=inputs)
    assert np.abs(a - b).max() == 0.0
    for step_stock, step_hooked in zip(seen["stock"], seen["hooked"], strict=True):
        for k in inputs:
            assert torch.equal(step_stock[k], step_hooked[k])


def test_a_callback_that_changes_the_latents_is_honoured(pipes):
    stock, hooked = pipes

    def halve(pipe, i, t, tensors):
        return {"latents": tensors["latents"] * 0.5}

    assert np.abs(run(stock, callback_on_step_end=halve) - run(hooked, callback_on_step_end=halve)).max() == 0.0


class Recorder(SamplerHook):
    """Records, per step, what a hook sees: sigma, x0 from the state, and the velocity."""

    def __init__(self):
        self.steps = []

    def correct(self, state, pred):
        sigma = float(state.scheduler.sigmas[state.step_index])
        self.steps.append((sigma, state.latents.clone(), pred.clone(), state.to_x0(pred)))
        return pred


def test_hooks_see_the_velocity_and_convert_with_the_schedulers_sigma(pipes):
    _, hooked = pipes
    recorder = Recorder()
    run(hooked, num_inference_steps=3, hooks=[recorder])
    assert len(recorder.steps) == 3
    for sigma, x, v, x0 in recorder.steps:
        torch.testing.assert_close(x0, x.double() - sigma * v.double(), rtol=1e-12, atol=1e-12)


class CondOnly(SamplerHook):
    slot = "guidance"

    def needs_uncond(self, state):
        return False

    def guide(self, state, pred_cond, pred_uncond):
        assert pred_uncond is None
        return pred_cond


def test_the_unconditional_half_is_skipped_when_the_guidance_hook_does_not_need_it(pipes):
    stock, hooked = pipes
    batches = []
    handle = hooked.transformer.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]),
                                                          with_kwargs=True)
    try:
        skipped = run(hooked, hooks=[CondOnly()])
    finally:
        handle.remove()
    assert batches == [1, 1]
    # stock at w = 1 runs the conditional pass alone, so the velocities, and the images, are the same
    assert np.abs(skipped - run(stock, guidance_scale=1.0)).max() == 0.0


def test_apg_runs_and_differs_from_cfg(pipes):
    _, hooked = pipes
    cfg = run(hooked, guidance_scale=12.0)
    apg = run(hooked, guidance_scale=12.0, hooks=[guidekit.APG()])
    assert np.isfinite(apg).all()
    assert np.abs(apg - cfg).max() > 1e-4


def test_attach_and_from_pipe_share_components_without_conversion(sd3_dir):
    stock = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    stock.transformer.to(torch.bfloat16)
    hooked = guidekit.attach(stock, guidekit.APG())
    assert type(hooked) is GuidedStableDiffusion3Pipeline
    assert hooked.transformer is stock.transformer and hooked.transformer.dtype == torch.bfloat16
    assert type(stock) is StableDiffusion3Pipeline
    assert hooked.scheduler is not stock.scheduler


def test_a_scheduler_that_cannot_run_a_flow_model_is_refused_by_name(sd3_dir):
    from diffusers import FlowMatchLCMScheduler

    pipe = GuidedStableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="scheduler: FlowMatchLCMScheduler is not supported on a flow-matching model"):
        run(pipe)


def test_heun_scheduler_runs_with_hooks_once_per_model_call(sd3_dir):
    from diffusers import FlowMatchHeunDiscreteScheduler

    stock = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    hooked = GuidedStableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    for pipe in (stock, hooked):
        pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    recorder = Recorder()
    assert np.abs(run(stock, num_inference_steps=3) - run(hooked, num_inference_steps=3)).max() == 0.0
    run(hooked, num_inference_steps=3, hooks=[recorder])
    assert len(recorder.steps) == 5  # 2n - 1 model calls
