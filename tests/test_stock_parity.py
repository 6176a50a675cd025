"""The essential cases of diffusers' own pipeline tests (PipelineTesterMixin), run against the hooked
pipelines next to the stock ones: the same outputs over a wide argument surface, save/load, batch
consistency, every callback tensor input, tuple outputs, attention slicing."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from guidekit.pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline

PROMPT = "a red circle on a blue background"
BASE = dict(num_inference_steps=3, height=32, width=32, output_type="np")

PAIRS = {"sd": (StableDiffusionPipeline, GuidedStableDiffusionPipeline),
         "sdxl": (StableDiffusionXLPipeline, GuidedStableDiffusionXLPipeline)}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pair(request):
    folder = request.getfixturevalue("tiny_sd_dir" if request.param == "sd" else "tiny_sdxl_dir")
    pipes = []
    for cls in PAIRS[request.param]:
        pipe = cls.from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return request.param, pipes[0], pipes[1]


def outputs(pipe, kind, seed=0, **kw):
    kw = {**BASE, **kw}
    if "generator" not in kw:
        kw["generator"] = torch.Generator().manual_seed(seed)
    if "prompt" not in kw and "prompt_embeds" not in kw:
        kw["prompt"] = PROMPT
    out = pipe(**kw)
    return out[0] if isinstance(out, tuple) else out.images


def embeds(pipe, kind):
    if kind == "sd":
        pos, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, "blurry")
        return dict(prompt_embeds=pos, negative_prompt_embeds=neg)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu", negative_prompt="blurry")
    return dict(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=neg_pooled)


CASES = {
    "defaults": {},
    "negative-prompt": dict(negative_prompt="blurry"),
    "batch-of-prompts": dict(prompt=[PROMPT, "a blue square on a red background"], negative_prompt=["x", "y"]),
    "images-per-prompt": dict(num_images_per_prompt=2),
    "generator-list": dict(prompt=[PROMPT, PROMPT], generator=[torch.Generator().manual_seed(s) for s in (1, 2)]),
    "latents": dict(latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))),
    "w=1": dict(guidance_scale=1.0),
    "w=12": dict(guidance_scale=12.0),
    "rescale": dict(guidance_scale=8.0, guidance_rescale=0.5),
    "eta": dict(eta=0.5),
    "tuple": dict(return_dict=False),
    "output-pt": dict(output_type="pt"),
    "output-latent": dict(output_type="latent"),
}
# Not listed: `timesteps`/`sigmas` (DDIM refuses custom schedules), and `clip_skip` / a LoRA `scale` in
# `cross_attention_kwargs`, which fail in the stock pipelines themselves with transformers 5's CLIPTextModel.


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_output_as_stock(pair, case):
    kind, stock, hooked = pair
    kw = dict(CASES[case])
    if "generator" in kw:  # generators are consumed: give each pipeline its own
        seeds = [g.initial_seed() for g in kw["generator"]]
        make = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
        a, b = outputs(stock, kind, **{**kw, "generator": make()}), outputs(hooked, kind, **{**kw, "generator": make()})
    else:
        a, b = outputs(stock, kind, **kw), outputs(hooked, kind, **kw)
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-5


def test_prompt_embeds_give_the_prompt_output(pair):
    kind, stock, hooked = pair
    from_text = outputs(hooked, kind, negative_prompt="blurry")
    from_embeds = outputs(hooked, kind, **embeds(hooked, kind))
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-5 * max(1.0, float(np.abs(from_text).max())))
    np.testing.assert_allclose(outputs(stock, kind, **embeds(stock, kind)), from_embeds, atol=1e-5)


def test_batch_and_single_give_the_same_image(pair):
    kind, _, hooked = pair
    single = outputs(hooked, kind, generator=torch.Generator().manual_seed(7))
    batch = outputs(hooked, kind, prompt=[PROMPT] * 3, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    np.testing.assert_allclose(batch[0], single[0], atol=1e-4)


def test_save_load_round_trip(pair, tmp_path):
    kind, _, hooked = pair
    hooked.save_pretrained(str(tmp_path))
    again = type(hooked).from_pretrained(str(tmp_path))
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(outputs(again, kind), outputs(hooked, kind))


def test_every_callback_tensor_input_is_passed(pair):
    kind, stock, hooked = pair
    names = list(hooked._callback_tensor_inputs)
    assert names == list(stock._callback_tensor_inputs)
    seen = []

    def callback(pipe, i, t, kwargs):
        assert sorted(kwargs) == sorted(names)
        seen.append(i)
        return kwargs

    outputs(hooked, kind, guidance_scale=6.0, negative_prompt="blurry", callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=names)
    assert seen == list(range(BASE["num_inference_steps"]))


def test_attention_slicing_gives_the_same_output(pair):
    kind, _, hooked = pair
    before = outputs(hooked, kind)
    hooked.enable_attention_slicing(slice_size=1)
    try:
        np.testing.assert_allclose(outputs(hooked, kind), before, atol=1e-5)
    finally:
        hooked.disable_attention_slicing()


def test_components_are_the_stock_ones(pair):
    _, stock, hooked = pair
    assert set(hooked.components) == set(stock.components)
