"""Hooked pipelines: stock equality, loading paths, attach(), call-level errors."""

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)

import guidekit
from guidekit.pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline

KW = dict(num_inference_steps=4, height=32, width=32, output_type="np")


def images(pipe, seed=0, **kw):
    return pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


def load(cls, folder):
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    return load(StableDiffusionPipeline, tiny_sd_dir), load(GuidedStableDiffusionPipeline, tiny_sd_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load(StableDiffusionXLPipeline, tiny_sdxl_dir), load(GuidedStableDiffusionXLPipeline, tiny_sdxl_dir)


@pytest.mark.parametrize("hooks", [None, [guidekit.CFG()]], ids=["no-hook", "cfg"])
@pytest.mark.parametrize("extra", [{}, {"guidance_scale": 1.0}, {"guidance_rescale": 0.7, "guidance_scale": 9.0}],
                         ids=["default", "w=1", "rescale"])
def test_sd_equals_stock(sd, hooks, extra):
    stock, hooked = sd
    diff = np.abs(images(stock, **extra) - images(hooked, hooks=hooks, **extra)).max()
    assert diff <= 1e-5


@pytest.mark.parametrize("hooks", [None, [guidekit.CFG()]], ids=["no-hook", "cfg"])
def test_sdxl_equals_stock(sdxl, hooks):
    stock, hooked = sdxl
    assert np.abs(images(stock) - images(hooked, hooks=hooks)).max() <= 1e-5
    assert np.abs(images(stock, guidance_scale=8.0) - images(hooked, hooks=hooks, guidance_scale=8.0)).max() <= 1e-5


def test_sd_equals_stock_with_euler_and_batches(sd):
    stock, hooked = sd
    for pipe in (stock, hooked):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    try:
        a = stock(["a red circle", "a blue square"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), **KW).images
        b = hooked(["a red circle", "a blue square"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), **KW).images
        assert np.abs(a - b).max() <= 1e-5
        apg = hooked("a red circle", hooks=[guidekit.APG()], generator=torch.Generator().manual_seed(3), **KW).images
        assert np.isfinite(apg).all()
    finally:
        for pipe in (stock, hooked):
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)


def test_from_pipe_and_attach_do_not_mutate_the_stock_pipeline(sd):
    stock, _ = sd
    before = images(stock, guidance_scale=12.0)
    apg_pipe = guidekit.attach(stock, guidekit.APG())
    assert type(stock) is StableDiffusionPipeline
    assert isinstance(apg_pipe, GuidedStableDiffusionPipeline)
    assert apg_pipe.unet is stock.unet  # shared weights, no copy
    apg_pipe.set_progress_bar_config(disable=True)
    with_apg = images(apg_pipe, guidance_scale=12.0)
    assert np.abs(with_apg - before).max() > 1e-3
    np.testing.assert_array_equal(images(stock, guidance_scale=12.0), before)
    # attached hooks equal passing them per call
    explicit = images(GuidedStableDiffusionPipeline.from_pipe(stock), guidance_scale=12.0, hooks=[guidekit.APG()])
    np.testing.assert_allclose(with_apg, explicit, atol=1e-6)


def test_attach_sdxl_and_rejects_other_pipelines(sdxl):
    stock, _ = sdxl
    assert isinstance(guidekit.attach(stock, guidekit.APG()), GuidedStableDiffusionXLPipeline)
    with pytest.raises(ValueError, match="pipe: str is not supported by attach; accepted:"):
        guidekit.attach("not a pipeline", guidekit.APG())
    with pytest.raises(ValueError, match="both fill the guidance slot"):
        guidekit.attach(stock, guidekit.APG(), guidekit.CFG())


def test_call_errors(sd):
    _, hooked = sd
    with pytest.raises(ValueError, match="guidance_scale: inf is not accepted"):
        images(hooked, guidance_scale=float("inf"))
    with pytest.raises(ValueError, match="guidance_scale: the call passes 7.5 but APG"):
        images(hooked, guidance_scale=7.5, hooks=[guidekit.APG(guidance_scale=12.0)])
    with pytest.raises(ValueError, match="both fill the guidance slot"):
        images(hooked, hooks=[guidekit.APG(), guidekit.APG()])


def test_hook_scale_is_used_when_the_call_passes_none(sd):
    _, hooked = sd
    a = images(hooked, hooks=[guidekit.APG(guidance_scale=12.0)])
    b = images(hooked, guidance_scale=12.0, hooks=[guidekit.APG()])
    np.testing.assert_array_equal(a, b)


def test_unsupported_scheduler_in_x0_space_is_an_error_at_call(tiny_sd_dir):
    pipe = load(GuidedStableDiffusionPipeline, tiny_sd_dir)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="scheduler: APG\\(space='x0'\\) needs x0 conversions"):
        images(pipe, hooks=[guidekit.APG()])
    assert np.isfinite(images(pipe, hooks=[guidekit.APG(space="model")])).all()


def test_callback_on_step_end_sees_and_changes_latents_as_in_stock(sd):
    stock, hooked = sd
    seen = {"stock": [], "hooked": []}

    def callback(name):
        def fn(pipe, i, t, kwargs):
            seen[name].append(float(kwargs["latents"].abs().mean()))
            return {"latents": kwargs["latents"] * 0.9}  # a change the rest of the loop must use

        return fn

    a = images(stock, callback_on_step_end=callback("stock"), callback_on_step_end_tensor_inputs=["latents"])
    b = images(hooked, callback_on_step_end=callback("hooked"), callback_on_step_end_tensor_inputs=["latents"])
    assert np.abs(a - b).max() <= 1e-5
    assert seen["stock"] == pytest.approx(seen["hooked"]) and len(seen["hooked"]) == KW["num_inference_steps"]
