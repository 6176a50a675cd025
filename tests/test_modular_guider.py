"""APGGuider: guidekit's APG as a diffusers guider, on fixed tensors and in a tiny Modular SDXL pipeline."""

import numpy as np
import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.guider_utils import BaseGuidance

from guidekit.guidance.apg_math import apg_step
from guidekit.guidance.diffusers_guider import APGGuider
from guidekit.testing import guidance_pairs
from tolerance import assert_close_to_scale


def random_steps(n_steps=4, **kwargs):
    return guidance_pairs(n_steps=n_steps, **kwargs)


def guide_by_hand(guider, conds, unconds):
    """Drive the guider as the Modular SDXL denoise step does: set_state, prepare_inputs, __call__."""
    outs = []
    n = len(conds)
    for i, (cond, uncond) in enumerate(zip(conds, unconds)):
        guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(999 - i))
        batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
        for batch in batches:
            guider.prepare_models(None)
            batch.noise_pred = cond if batch.prompt_embeds.item() == 1 else uncond
            guider.cleanup_models(None)
        outs.append(guider(batches)[0])
    return outs


# ---------------------------------------------------------------------------------------------- fixed tensors


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("r", [None, 5.0])
@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_forward_equals_apg_step(eta, r, beta):
    conds, unconds = random_steps()
    guider = APGGuider(guidance_scale=6.0, eta=eta, norm_threshold=r, momentum=beta)
    running = None
    for i, (cond, uncond) in enumerate(zip(conds, unconds)):
        guider.set_state(step=i, num_inference_steps=len(conds), timestep=torch.tensor(0))
        out = guider.forward(cond, uncond)
        expected, running = apg_step(cond, uncond, 6.0, eta=eta, norm_threshold=r, momentum=beta, running=running)
        assert torch.equal(out.pred, expected)
        assert out.pred_cond is cond and out.pred_uncond is uncond


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_matches_diffusers_normalized_guidance_with_momentum_and_reset(eta):
    """Paper scale w + 1 here = diffusers' original formulation at w; momentum carried, reset between calls."""
    w, r, beta = 4.0, 5.0, -0.5
    conds, unconds = random_steps(n_steps=4)
    guider = APGGuider(guidance_scale=w + 1, eta=eta, norm_threshold=r, momentum=beta)
    for call in range(2):  # two simulated pipeline calls: the second must not see the first one's momentum
        buffer = MomentumBuffer(beta)
        outs = guide_by_hand(guider, conds, unconds)
        for out, cond, uncond in zip(outs, conds, unconds):
            expected = normalized_guidance(cond, uncond, w, buffer, eta, r, use_original_formulation=True)
            assert_close_to_scale(out, expected, rel=1e-5)  # diffusers: float32 math on values up to ~40
    # and the momentum did matter: without it the later steps differ
    plain = [normalized_guidance(c, u, w, None, eta, r, use_original_formulation=True) for c, u in zip(conds, unconds)]
    assert not torch.allclose(outs[-1], plain[-1], rtol=1e-3, atol=1e-3)


def test_matches_diffusers_apg_guider_through_the_protocol():
    w, r, beta = 4.0, 5.0, -0.5
    conds, unconds = random_steps(n_steps=3)
    ours = guide_by_hand(APGGuider(guidance_scale=w + 1, eta=0.0, norm_threshold=r, momentum=beta), conds, unconds)
    theirs = AdaptiveProjectedGuidance(
        guidance_scale=w,
        adaptive_projected_guidance_momentum=beta,
        adaptive_projected_guidance_rescale=r,
        eta=0.0,
        use_original_formulation=True,
    )
    theirs = guide_by_hand(theirs, conds, unconds)
    for a, b in zip(ours, theirs):
        assert_close_to_scale(a, b, rel=1e-5)  # float32 math on the diffusers side, values up to ~150


def test_cfg_limit_equals_diffusers_cfg():
    conds, unconds = random_steps(n_steps=2)
    ours = guide_by_hand(APGGuider(guidance_scale=7.5, eta=1.0, norm_threshold=None, momentum=0.0), conds, unconds)
    theirs = guide_by_hand(ClassifierFreeGuidance(guidance_scale=7.5), conds, unconds)
    for a, b in zip(ours, theirs):
        assert_close_to_scale(a, b, rel=1e-5)  # float32 math on the diffusers side, values up to ~150


def test_window_uses_cfg_outside_and_momentum_only_inside():
    conds, unconds = random_steps(n_steps=4)
    w, beta = 5.0, -0.5
    outs = guide_by_hand(APGGuider(guidance_scale=w, momentum=beta, start=0.5, stop=1.0), conds, unconds)
    for i in (0, 1):  # progress 0, 0.25: plain CFG
        torch.testing.assert_close(outs[i], unconds[i] + w * (conds[i] - unconds[i]))
    running = None  # the momentum average starts at the first APG step
    for i in (2, 3):
        expected, running = apg_step(conds[i], unconds[i], w, momentum=beta, running=running)
        torch.testing.assert_close(outs[i], expected)


def test_num_conditions_and_batches():
    guider = APGGuider()
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(1))
    batches = guider.prepare_inputs({"x": (torch.ones(1), torch.zeros(1))})
    assert guider.num_conditions == 2
    assert [getattr(b, BaseGuidance._identifier_key) for b in batches] == ["pred_cond", "pred_uncond"]
    guider.prepare_models(None)
    assert guider.is_conditional
    guider.prepare_models(None)
    assert guider.is_unconditional

    for no_uncond in (APGGuider(guidance_scale=1.0), APGGuider(enabled=False)):
        no_uncond.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(1))
        assert no_uncond.num_conditions == 1
        (batch,) = no_uncond.prepare_inputs({"x": (torch.ones(1), torch.zeros(1))})
        batch.noise_pred = torch.full((1, 2), 3.0)
        assert torch.equal(no_uncond([batch])[0], batch.noise_pred)

    disabled = APGGuider()
    disabled.disable()
    assert disabled.num_conditions == 1


def test_keeps_dtype():
    conds, unconds = random_steps(n_steps=1)
    out = APGGuider().forward(conds[0].half(), unconds[0].half()).pred
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_config_round_trip(tmp_path):
    guider = APGGuider(guidance_scale=5.0, eta=0.25, norm_threshold=None, momentum=0.0, start=0.1, stop=0.9)
    guider.save_pretrained(tmp_path)
    loaded = APGGuider.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(guider.config)
    assert loaded.norm_threshold is None and loaded.eta == 0.25 and loaded._start == 0.1
    assert guider.new(guidance_scale=3.0).guidance_scale == 3.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"eta": 1.5}, "eta"),
        ({"norm_threshold": 0.0}, "norm_threshold"),
        ({"norm_threshold": "big"}, "norm_threshold"),
        ({"momentum": -1.0}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"start": 1.0}, "start"),
        ({"start": 0.5, "stop": 0.5}, "start"),
        ({"stop": 1.5}, "stop"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        APGGuider(**kwargs)


# ---------------------------------------------------------------------------------------------- Modular SDXL


@pytest.fixture(scope="module")
def modular_sdxl(tiny_sdxl_dir):
    """The Modular SDXL pipeline from the standard-layout tiny checkpoint (model_index.json, no modular config)."""
    from diffusers import ModularPipeline
    from diffusers.modular_pipelines import StableDiffusionXLModularPipeline

    pipe = ModularPipeline.from_pretrained(str(tiny_sdxl_dir))
    assert isinstance(pipe, StableDiffusionXLModularPipeline)
    # Only the text-to-image components (the checkpoint has no image encoder / feature extractor).
    names = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
    pipe.load_components(names=names)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.guider, ClassifierFreeGuidance)
    return pipe


def _generate(pipe, output="latents"):
    return pipe(
        prompt="a red cube",
        negative_prompt="",
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output=output,
        output_type="np",
    )


def test_modular_sdxl_runs_with_apg_guider(modular_sdxl, monkeypatch):
    pipe = modular_sdxl
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=7.5))
    cfg = _generate(pipe)

    guider = APGGuider(guidance_scale=7.5)
    pipe.update_components(guider=guider)
    assert pipe.guider is guider
    first = _generate(pipe)
    assert guider._running is not None  # momentum was used
    second = _generate(pipe)
    assert torch.isfinite(first).all()
    assert first.shape == cfg.shape == (1, 4, 16, 16)
    assert (first - cfg).abs().max() > 1e-3
    assert torch.equal(first, second)  # momentum reset at step 0 of every call

    # the equality above is meaningful: without the reset, the second call starts from the old momentum
    monkeypatch.setattr(APGGuider, "set_state", BaseGuidance.set_state)
    assert not torch.equal(_generate(pipe), first)
    monkeypatch.undo()

    # decoded images too
    image = _generate(pipe, output="images")
    assert isinstance(image, np.ndarray) and image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_modular_sdxl_apg_cfg_limit_equals_default_guider(modular_sdxl):
    pipe = modular_sdxl
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=7.5))
    cfg = _generate(pipe)
    pipe.update_components(guider=APGGuider(guidance_scale=7.5, eta=1.0, norm_threshold=None, momentum=0.0))
    torch.testing.assert_close(_generate(pipe), cfg, rtol=1e-4, atol=1e-4)
