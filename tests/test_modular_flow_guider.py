"""APGGuider in the Modular flow-matching pipelines (built offline from tiny components): the one-line swap
`pipe.update_components(guider=APGGuider(...))` gives diffusers' own AdaptiveProjectedGuidance output where the
two are configured alike."""

import pytest
import torch
from diffusers import ModularPipeline
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

from guidekit.guidance.diffusers_guider import APGGuider
from tolerance import assert_close_to_scale


def sd3(folder):
    from guidekit.testing.flow import make_tiny_sd3

    make_tiny_sd3(folder)
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
             "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"]
    return names, dict(height=32, width=32)


def qwenimage(folder):
    from guidekit.testing.qwenimage import make_tiny_qwenimage

    make_tiny_qwenimage(folder)
    return ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"], dict(height=32, width=32, max_sequence_length=16)


def wan(folder):
    from guidekit.testing.wan import make_tiny_wan

    make_tiny_wan(folder, scheduler="unipc")
    return ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"], dict(
        height=16, width=16, num_frames=9, max_sequence_length=16)


FAMILIES = {"sd3": sd3, "qwenimage": qwenimage, "wan": wan}


@pytest.fixture(autouse=True)
def plain_text_without_ftfy(monkeypatch):
    """diffusers' Modular Wan text encoder calls `ftfy.fix_text` without checking that ftfy is installed (the
    classic WanPipeline checks); stand in with the identity when it is missing."""
    import types

    from diffusers.modular_pipelines.wan import encoders

    if getattr(encoders, "ftfy", None) is None:
        monkeypatch.setattr(encoders, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


@pytest.fixture(scope="module", params=list(FAMILIES))
def modular(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    names, call = FAMILIES[request.param](folder)
    pipe = ModularPipeline.from_pretrained(str(folder))
    pipe.load_components(names=names)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.guider, ClassifierFreeGuidance)
    return pipe, call


def generate(pipe, call):
    return pipe(prompt="a red cube", negative_prompt="blurry", num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output="latents", **call)


def test_apg_guider_equals_diffusers_apg_configured_alike(modular):
    pipe, call = modular
    w, r, beta = 4.0, 5.0, -0.5
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=w + 1))
    cfg = generate(pipe, call)
    pipe.update_components(guider=AdaptiveProjectedGuidance(
        guidance_scale=w, adaptive_projected_guidance_momentum=beta, adaptive_projected_guidance_rescale=r,
        eta=0.0, use_original_formulation=True))
    theirs = generate(pipe, call)
    pipe.update_components(guider=APGGuider(guidance_scale=w + 1, eta=0.0, norm_threshold=r, momentum=beta))
    ours = generate(pipe, call)
    assert torch.isfinite(ours).all()
    assert (ours - cfg).abs().max() > 1e-3  # APG did something at this radius
    assert_close_to_scale(ours, theirs, rel=1e-5)  # diffusers' guider computes in float32
