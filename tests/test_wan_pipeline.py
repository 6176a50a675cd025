"""GuidedWanPipeline against the stock WanPipeline on tiny offline checkpoints (diffusers' fast-test configs):
bit-equal videos over the stock argument surface with no hook and with CFG (Wan 2.1, Wan 2.2's two experts, TI2V;
FlowMatchEuler and UniPC with flow sigmas), and what the hooks see: the velocity's x0 against the scheduler's sigma,
5-D (B, C, F, H, W) latents, the scale of the expert of each step, an unconditional pass only when asked for."""

import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

import guidekit
from guidekit.hooks import SamplerHook
from guidekit.pipelines import GuidedWanPipeline
from guidekit.testing.wan import make_tiny_wan, tiny_wan_pipeline

PROMPT = "dance monkey"
# diffusers' Wan fast-test inputs (2 steps, 16x16, 9 frames, 16 text tokens, w = 6)
BASE = dict(num_inference_steps=2, height=16, width=16, num_frames=9, max_sequence_length=16, guidance_scale=6.0,
            negative_prompt="negative", output_type="np")


@pytest.fixture(scope="session")
def wan_dirs(tmp_path_factory):
    """Tiny Wan checkpoints saved with `save_pretrained`, one folder per layout (FlowMatchEuler shift 7 inside)."""
    return {variant: make_tiny_wan(tmp_path_factory.mktemp(variant), variant)
            for variant in ("wan2.1", "wan2.2", "wan2.2-low-only", "wan2.2-ti2v")}


@pytest.fixture(scope="module")
def pairs(wan_dirs):
    """(stock, hooked) loaded with `from_pretrained` from the same folder, per (layout, scheduler); cached."""
    cache = {}

    def get(variant="wan2.1", scheduler="euler"):
        if (variant, scheduler) not in cache:
            folder = wan_dirs[variant]
            cache[variant, scheduler] = (tiny_wan_pipeline(folder, WanPipeline, scheduler),
                                         tiny_wan_pipeline(folder, GuidedWanPipeline, scheduler))
        return cache[variant, scheduler]

    return get


STOCK_DEFAULT = object()  # a BASE argument left out of the call, so that the pipeline's default applies


def run(pipe, seed=0, **kw):
    """One call with BASE's arguments overridden by `kw`; generators are made fresh (they are consumed)."""
    kw = {k: v for k, v in {**BASE, **kw}.items() if v is not STOCK_DEFAULT}
    seeds = kw.pop("seeds", None)
    if seeds:
        kw["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    else:
        kw["generator"] = torch.Generator().manual_seed(seed)
    if "prompt" not in kw and "prompt_embeds" not in kw:
        kw["prompt"] = PROMPT
    out = pipe(**kw)
    return out[0] if isinstance(out, tuple) else out.frames


def as_array(frames):
    if isinstance(frames, torch.Tensor):
        return frames.numpy()
    if isinstance(frames, list):  # "pil": a list of videos, each a list of PIL images
        return np.stack([np.stack([np.asarray(image) for image in video]) for video in frames])
    return np.asarray(frames)


def assert_stock(stock, hooked, **kw):
    """The hooked pipeline with no hook and with CFG() gives exactly the stock output (max abs diff 0.0)."""
    reference = as_array(run(stock, **kw))
    for hooks in (None, [guidekit.CFG()]):
        out = as_array(run(hooked, hooks=hooks, **kw))
        assert out.shape == reference.shape
        assert np.abs(out.astype(np.float64) - reference.astype(np.float64)).max() == 0.0, f"hooks={hooks}"


EVERY_TENSOR = ["latents", "prompt_embeds", "negative_prompt_embeds"]


def tensor_callback(pipe, i, t, kwargs):
    """Sees every tensor input and changes them all mid-run, so the loop must use what it gets back."""
    assert sorted(kwargs) == sorted(pipe._callback_tensor_inputs)
    if i == 0:
        kwargs["latents"] = kwargs["latents"] * 0.5
        kwargs["prompt_embeds"] = kwargs["prompt_embeds"] * 0.9
        kwargs["negative_prompt_embeds"] = kwargs["negative_prompt_embeds"] + 0.1
    return kwargs


CASES = {
    "defaults": {},
    "stock-default-scale": dict(guidance_scale=STOCK_DEFAULT, negative_prompt=STOCK_DEFAULT),
    "no-negative-prompt": dict(negative_prompt=None),
    "batch-of-prompts": dict(prompt=[PROMPT, "a cat"], negative_prompt=["negative", "blurry"]),
    "videos-per-prompt": dict(num_videos_per_prompt=2),
    "generator-list": dict(prompt=[PROMPT, PROMPT], negative_prompt=["negative"] * 2, seeds=[1, 2]),
    "latents": dict(latents=torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(4))),
    "w=1": dict(guidance_scale=1.0),
    "w=0.5": dict(guidance_scale=0.5),
    "w=12": dict(guidance_scale=12.0),
    "frames-rounded": dict(num_frames=7),
    "taller-than-wide": dict(height=32, width=16),
    "output-pt": dict(output_type="pt"),
    "output-pil": dict(output_type="pil"),
    "output-latent": dict(output_type="latent"),
    "tuple": dict(return_dict=False),
    "callback-every-tensor": dict(callback_on_step_end=tensor_callback,
                                  callback_on_step_end_tensor_inputs=EVERY_TENSOR),
    "attention-kwargs": dict(attention_kwargs={"scale": 0.5}),
    "three-steps": dict(num_inference_steps=3),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_wan21_matches_stock_bit_for_bit_with_flow_euler(pairs, case):
    assert_stock(*pairs("wan2.1", "euler"), **CASES[case])


UNIPC_CASES = ["defaults", "batch-of-prompts", "latents", "w=1", "output-latent", "callback-every-tensor",
               "three-steps"]


@pytest.mark.parametrize("case", UNIPC_CASES, ids=UNIPC_CASES)
def test_wan21_matches_stock_bit_for_bit_with_unipc_flow_sigmas(pairs, case):
    assert_stock(*pairs("wan2.1", "unipc"), **CASES[case])


def test_prompt_embeds_match_stock_and_the_prompt(pairs):
    stock, hooked = pairs("wan2.1", "euler")
    with torch.no_grad():
        pos, neg = stock.encode_prompt(PROMPT, "negative", max_sequence_length=16, device="cpu")
    embeds = dict(prompt_embeds=pos, negative_prompt_embeds=neg, negative_prompt=None)
    assert_stock(stock, hooked, **embeds)
    np.testing.assert_array_equal(run(hooked, **embeds), run(hooked))


WAN22_CASES = {
    "w2=w": dict(guidance_scale=6.0),
    "w2=3": dict(guidance_scale=6.0, guidance_scale_2=3.0),
    "w=w2=1": dict(guidance_scale=1.0, guidance_scale_2=1.0),
    "w2=3-batch": dict(guidance_scale=4.0, guidance_scale_2=3.0, prompt=[PROMPT, "a cat"],
                       negative_prompt=["negative", "blurry"]),
    "w2=3-callback": dict(guidance_scale_2=3.0, callback_on_step_end=tensor_callback,
                          callback_on_step_end_tensor_inputs=EVERY_TENSOR),
}


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
@pytest.mark.parametrize("case", list(WAN22_CASES), ids=list(WAN22_CASES))
def test_wan22_two_experts_match_stock_bit_for_bit(pairs, case, scheduler):
    assert_stock(*pairs("wan2.2", scheduler), **WAN22_CASES[case])


def test_wan22_low_noise_expert_alone_and_ti2v_match_stock(pairs):
    """diffusers' other Wan 2.2 layouts: `transformer=None` with boundary 1.0, and TI2V's per-token timesteps."""
    assert_stock(*pairs("wan2.2-low-only", "unipc"), guidance_scale_2=3.0)
    for scheduler in ("euler", "unipc"):
        assert_stock(*pairs("wan2.2-ti2v", scheduler), height=32, width=32)


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_bfloat16_transformer_matches_stock_and_hooks_see_the_stock_latents(wan_dirs, scheduler):
    """A bf16 transformer (loaded as diffusers keeps its norms and embeddings in fp32): the forward gets the latents
    cast to bf16, the hooks get the loop's own latents, float32 at the start. The dtype after a step is the
    scheduler's: FlowMatchEuler returns the model output's dtype (bf16), UniPC the sample's (float32)."""
    folder = str(wan_dirs["wan2.1"])
    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    stock, hooked = (tiny_wan_pipeline(folder, cls, scheduler, transformer=transformer)
                     for cls in (WanPipeline, GuidedWanPipeline))
    assert_stock(stock, hooked)
    stock_dtypes = []

    def after_step(pipe, i, t, kwargs):
        stock_dtypes.append(kwargs["latents"].dtype)
        return kwargs

    run(stock, callback_on_step_end=after_step)
    recorder = Recorder()
    run(hooked, hooks=[recorder])
    assert [r["latents"].dtype for r in recorder.records] == [torch.float32] + stock_dtypes[:-1]
    assert all(r["v"].dtype == torch.bfloat16 for r in recorder.records)


# ---------------------------------------------------------------------------------------------- what hooks see


class Recorder(SamplerHook):
    """A correction hook that records what it sees at each step and changes nothing."""

    def __init__(self):
        self.records = []

    def correct(self, state, pred):
        self.records.append(dict(step=state.step_index, t=state.timestep, latents=state.latents, v=pred,
                                 x0=state.to_x0(pred), scale=state.guidance_scale, expert=state.extras.get("expert")))
        return pred


class FirstStepCFG(guidekit.CFG):
    """CFG that asks for the unconditional pass at the first step only."""

    def needs_uncond(self, state):
        return state.step_index == 0 and super().needs_uncond(state)


class TransformerSpy:
    """Counts each transformer's forwards per step and keeps their outputs (conditional first within a step)."""

    def __init__(self, monkeypatch, pipe):
        self.calls = []
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name)
            if model is not None:
                monkeypatch.setattr(model, "forward", self._wrap(name, model.forward))

    def _wrap(self, name, forward):
        def spy(*args, **kwargs):
            out = forward(*args, **kwargs)
            self.calls.append((name, kwargs["timestep"].flatten()[0].item(), out[0]))
            return out

        return spy

    def per_step(self):
        """[(expert, number of forwards)] in step order."""
        steps = []
        for name, t, _ in self.calls:
            if steps and steps[-1][0] == (name, t):
                steps[-1][1] += 1
            else:
                steps.append([(name, t), 1])
        return [(name, n) for (name, _), n in steps]


def test_unconditional_pass_runs_only_when_the_guidance_hook_needs_it(pairs, monkeypatch):
    stock, hooked = pairs("wan2.1", "euler")
    spy = TransformerSpy(monkeypatch, hooked)
    run(hooked, num_inference_steps=3)
    assert [n for _, n in spy.per_step()] == [2, 2, 2]
    spy.calls.clear()
    run(hooked, num_inference_steps=3, hooks=[FirstStepCFG()])
    assert [n for _, n in spy.per_step()] == [2, 1, 1]
    spy.calls.clear()
    run(hooked, num_inference_steps=3, guidance_scale=1.0)  # w <= 1: no negative encoded, one pass per step
    assert [n for _, n in spy.per_step()] == [1, 1, 1]


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_hooks_see_x0_from_the_scheduler_sigma_and_5d_latents(pairs, scheduler):
    """x0 = x − σ·v with σ = scheduler.sigmas[i] (on UniPC t is int64, 999 and 750, and σ ≠ t/1000), on float32
    latents in Wan's (B, C, F, H, W) layout: 16 channels, (9 − 1)/4 + 1 = 3 frames, 32/8 x 16/8 pixels."""
    _, hooked = pairs("wan2.1", scheduler)
    recorder = Recorder()
    run(hooked, height=32, width=16, hooks=[recorder])
    sigmas = hooked.scheduler.sigmas
    assert [r["step"] for r in recorder.records] == [0, 1]
    for r in recorder.records:
        assert r["latents"].shape == (1, 16, 3, 4, 2) and r["v"].shape == (1, 16, 3, 4, 2)
        sigma = float(sigmas[r["step"]])
        expected = r["latents"].double() - sigma * r["v"].double()
        torch.testing.assert_close(r["x0"], expected, rtol=1e-12, atol=1e-12)
    if scheduler == "unipc":
        assert [int(r["t"]) for r in recorder.records] == [999, 750]
        assert abs(float(sigmas[1]) - 0.750) > 1e-4  # the sigma is not t/1000: reading it from t would be wrong


def test_state_scale_follows_the_expert_of_each_step(pairs, monkeypatch):
    """Wan 2.2, boundary 875: step 0 (t = 1000) runs `transformer` at w, step 1 (t ≈ 47) `transformer_2` at w2."""
    _, hooked = pairs("wan2.2", "euler")
    spy = TransformerSpy(monkeypatch, hooked)
    recorder = Recorder()
    run(hooked, guidance_scale=6.0, guidance_scale_2=3.0, hooks=[recorder])
    assert [(r["expert"], r["scale"]) for r in recorder.records] == [("transformer", 6.0), ("transformer_2", 3.0)]
    assert spy.per_step() == [("transformer", 2), ("transformer_2", 2)]
    # the velocity each step hands on is uncond + w_expert (cond − uncond) of that expert's two passes
    (_, _, c0), (_, _, u0), (_, _, c1), (_, _, u1) = spy.calls
    torch.testing.assert_close(recorder.records[0]["v"], u0 + 6.0 * (c0 - u0), rtol=0, atol=0)
    torch.testing.assert_close(recorder.records[1]["v"], u1 + 3.0 * (c1 - u1), rtol=0, atol=0)


def test_a_hook_scale_stands_for_guidance_scale(pairs):
    """APG(guidance_scale=4) with no call scale: both experts at 4, unless the call gives guidance_scale_2."""
    _, hooked = pairs("wan2.2", "euler")
    for call, expected in (({}, [4.0, 4.0]), (dict(guidance_scale_2=3.0), [4.0, 3.0])):
        recorder = Recorder()
        run(hooked, guidance_scale=STOCK_DEFAULT, hooks=[guidekit.APG(guidance_scale=4.0), recorder], **call)
        assert [r["scale"] for r in recorder.records] == expected


def test_each_expert_scale_decides_alone_whether_it_guides(pairs, monkeypatch):
    """w <= 1 < w2 guides the low-noise expert only, w2 <= 1 < w the high-noise one only (stock WanPipeline
    guides neither expert in the first case and runs an unconditional pass at w2 in the second)."""
    _, hooked = pairs("wan2.2", "euler")
    spy = TransformerSpy(monkeypatch, hooked)
    recorder = Recorder()
    run(hooked, guidance_scale=1.0, guidance_scale_2=3.0, hooks=[recorder])
    assert spy.per_step() == [("transformer", 1), ("transformer_2", 2)]
    (_, _, c0), (_, _, c1), (_, _, u1) = spy.calls
    torch.testing.assert_close(recorder.records[0]["v"], c0, rtol=0, atol=0)
    torch.testing.assert_close(recorder.records[1]["v"], u1 + 3.0 * (c1 - u1), rtol=0, atol=0)
    spy.calls.clear()
    run(hooked, guidance_scale=6.0, guidance_scale_2=1.0)
    assert spy.per_step() == [("transformer", 2), ("transformer_2", 1)]


def test_a_callback_changing_the_scale_applies_from_the_next_step(pairs, monkeypatch):
    _, hooked = pairs("wan2.1", "euler")
    spy = TransformerSpy(monkeypatch, hooked)

    def cutoff(pipe, i, t, kwargs):
        pipe._guidance_scale = 1.0
        return kwargs

    run(hooked, num_inference_steps=3, callback_on_step_end=cutoff)
    assert [n for _, n in spy.per_step()] == [2, 1, 1]


@pytest.mark.parametrize("variant,scheduler", [("wan2.1", "euler"), ("wan2.2", "unipc")])
def test_apg_runs_finite_and_differs_from_cfg(pairs, variant, scheduler):
    _, hooked = pairs(variant, scheduler)
    cfg = run(hooked, output_type="latent", hooks=[guidekit.CFG()])
    apg = run(hooked, output_type="latent", hooks=[guidekit.APG()])
    assert apg.shape == cfg.shape and torch.isfinite(apg).all()
    assert (apg - cfg).abs().max() > 1e-3 * cfg.abs().max()


def test_apg_reads_the_scale_of_each_expert(pairs):
    """APG(guidance_scale=None) guides each Wan 2.2 step with that expert's scale: with w = w2 = 1 the call's
    output is the unguided one, and a second scale of 1 changes the output of a guided call."""
    _, hooked = pairs("wan2.2", "euler")
    unguided = run(hooked, output_type="latent", guidance_scale=1.0, guidance_scale_2=1.0)
    both = run(hooked, output_type="latent", guidance_scale=6.0, guidance_scale_2=6.0, hooks=[guidekit.APG()])
    high_only = run(hooked, output_type="latent", guidance_scale=6.0, guidance_scale_2=1.0, hooks=[guidekit.APG()])
    assert torch.equal(run(hooked, output_type="latent", guidance_scale=1.0, guidance_scale_2=1.0,
                           hooks=[guidekit.APG()]), unguided)
    assert not torch.equal(both, high_only) and not torch.equal(high_only, unguided)


# ---------------------------------------------------------------------------------------------- attach, from_pipe


def test_attach_returns_the_hooked_class_sharing_components(pairs):
    stock, hooked = pairs("wan2.2", "unipc")
    attached = guidekit.attach(stock, guidekit.APG())
    assert type(attached) is GuidedWanPipeline and type(stock) is WanPipeline
    for name in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer"):
        assert getattr(attached, name) is getattr(stock, name)
    assert attached.scheduler is not stock.scheduler and attached.scheduler.config == stock.scheduler.config
    assert attached.config.boundary_ratio == 0.875
    attached.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(attached), run(hooked, hooks=[guidekit.APG()]))


@pytest.mark.parametrize("variant,scheduler", [("wan2.1", "euler"), ("wan2.2-low-only", "unipc")])
def test_from_pipe_shares_components_and_matches_stock(pairs, variant, scheduler):
    stock, _ = pairs(variant, scheduler)
    hooked = GuidedWanPipeline.from_pipe(stock)
    hooked.set_progress_bar_config(disable=True)
    assert hooked.transformer is stock.transformer and hooked.transformer_2 is stock.transformer_2
    assert (hooked.config.boundary_ratio, hooked.config.expand_timesteps) == (
        stock.config.boundary_ratio, stock.config.expand_timesteps)
    assert_stock(stock, hooked, guidance_scale_2=3.0 if variant != "wan2.1" else None)


def test_save_load_round_trip(pairs, tmp_path):
    _, hooked = pairs("wan2.2", "euler")
    hooked.save_pretrained(str(tmp_path))
    again = tiny_wan_pipeline(tmp_path, GuidedWanPipeline)
    assert again.config.boundary_ratio == 0.875 and again.transformer_2 is not None
    np.testing.assert_array_equal(run(again, hooks=[guidekit.APG()]), run(hooked, hooks=[guidekit.APG()]))


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_by_name(pairs, wan_dirs):
    _, hooked = pairs("wan2.2", "euler")
    with pytest.raises(ValueError, match="guidance_scale_2: nan"):
        run(hooked, guidance_scale_2=math.nan)
    with pytest.raises(ValueError, match="guidance_scale: inf"):
        run(hooked, guidance_scale=math.inf)
    _, wan21 = pairs("wan2.1", "euler")
    with pytest.raises(ValueError, match="guidance_scale_2"):  # stock's own check: no second expert
        run(wan21, guidance_scale_2=3.0)
    # UniPC.from_config(FlowMatchEuler config) silently gives an epsilon UniPC: refused on a flow model
    not_flow = GuidedWanPipeline.from_pretrained(str(wan_dirs["wan2.1"]),
                                                 scheduler=UniPCMultistepScheduler.from_config(wan21.scheduler.config))
    with pytest.raises(ValueError, match="scheduler: UniPCMultistepScheduler with use_flow_sigmas=False"):
        run(not_flow)
