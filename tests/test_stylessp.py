"""StyleSSP on the StyleID pipeline (tiny random SD components): the hook's start point against
`frequency_start_point` of the content's inverted latent with the generator's noise, identities (α = 1,
scale 0), per-sample generators, the negative-guided inversion against its one-step formula, costs, errors."""

import pytest
import torch

import guidekit
from guidekit.hooks import SamplerHook, SamplerState
from guidekit.inversion import ddim_levels
from guidekit.latents import StyleSSP, frequency_start_point
from guidekit.latents.stylessp import draw_noise
from guidekit.pipelines.styleid_sd import adain_latents
from test_styleid import pipe  # noqa: F401  (the tiny StyleID pipeline, a shared fixture)

torch.set_num_threads(1)

STEPS = 3
LATENT = (1, 4, 16, 16)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)


class _Recorder(SamplerHook):
    """Keeps the call's extras and the start latent it receives (place it after the hook under test)."""

    def init_latents(self, state, latents):
        self.extras = dict(state.extras)
        self.seen = latents.clone()
        return latents


class _Counter:
    def __init__(self, unet):
        self.calls, self.rows = 0, 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls += 1
        self.rows += (args[0] if args else kwargs["sample"]).shape[0]


@pytest.fixture
def counter(pipe):
    c = _Counter(pipe.unet)
    yield c
    c.handle.remove()


def _run(pipe, images, hooks=(), seed=3, **kwargs):
    rec = _Recorder()
    out = pipe.transfer(*images, num_inference_steps=STEPS, hooks=[*hooks, rec], output_type="pt",
                        generator=torch.Generator().manual_seed(seed), **kwargs)
    return out, rec


def _noise(seed=3):
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- frequency start point


def test_exports():
    assert guidekit.StyleSSP is StyleSSP and guidekit.latents.StyleSSP is StyleSSP


def test_start_point_filters_the_adain_start_by_default(pipe, images):
    hook = StyleSSP(negative_inversion=False)
    assert hook.order == "adain_first"
    out, rec = _run(pipe, images, hooks=[hook])
    ex = rec.extras
    assert torch.equal(ex["content_start_zT"], ex["content_zT"])  # no guided inversion at scale 0
    adain = adain_latents(ex["content_zT"], ex["style_zT"])
    expected = frequency_start_point(adain, _noise())
    assert torch.equal(out.start_latents, expected) and torch.equal(rec.seen, expected)
    # it changed the start point: not StyleID's, and another seed gives another one
    assert not torch.allclose(expected, adain, atol=1e-3)
    other, _ = _run(pipe, images, hooks=[hook], seed=4)
    assert not torch.allclose(other.start_latents, expected, atol=1e-3)


def test_adain_after_the_frequency_step_undoes_its_lowering_of_the_means(pipe, images):
    """The frequency step scales a constant offset by α (its mask is 1 at every channel's spatial mean), so the
    filtered AdaIN start keeps the lowering; AdaIN after the step ("frequency_first") sets the style's means
    and standard deviations back exactly."""
    _, rec = _run(pipe, images, hooks=[StyleSSP(negative_inversion=False)])
    z_c, z_s = rec.extras["content_zT"], rec.extras["style_zT"]
    adain = adain_latents(z_c, z_s)
    alpha = StyleSSP().alpha
    shifted = frequency_start_point(adain + 0.5, _noise()) - frequency_start_point(adain, _noise())
    torch.testing.assert_close(shifted, torch.full_like(shifted, alpha * 0.5), atol=1e-5, rtol=0)

    first, _ = _run(pipe, images, hooks=[StyleSSP(negative_inversion=False, order="frequency_first")])
    expected = adain_latents(frequency_start_point(z_c, _noise()), z_s)
    assert torch.equal(first.start_latents, expected)
    for stat in (lambda z: z.mean(dim=(2, 3)), lambda z: z.std(dim=(2, 3))):
        torch.testing.assert_close(stat(expected).double(), stat(z_s).double(), atol=1e-4, rtol=1e-4)
    # without AdaIN both orders filter the content's z_T
    for order in ("frequency_first", "adain_first"):
        out, _ = _run(pipe, images, hooks=[StyleSSP(negative_inversion=False, order=order)], init_adain=False)
        assert torch.equal(out.start_latents, frequency_start_point(z_c, _noise()))
    # non-default parameters reach frequency_start_point
    params = dict(alpha=0.4, d_s=0.5, d_t=0.7, d_l=0.6, range_over="batch")
    out, _ = _run(pipe, images, hooks=[StyleSSP(negative_inversion=False, **params)], init_adain=False)
    assert torch.equal(out.start_latents, frequency_start_point(z_c, _noise(), **params))


def test_alpha_one_and_frequency_off_are_exactly_styleid(pipe, images):
    base, _ = _run(pipe, images)
    for hook in (StyleSSP(alpha=1.0, negative_inversion=False), StyleSSP(frequency=False, negative_inversion=False)):
        out, _ = _run(pipe, images, hooks=[hook])
        assert torch.equal(out.start_latents, base.start_latents)
        assert torch.equal(out.images, base.images)


def test_per_sample_generators_make_samples_independent_of_the_batch():
    # The StyleID pipeline takes one content per call; the hook itself works on batches (other pipelines).
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def start(latents, seeds):
        state = SamplerState(num_steps=1, scheduler=None, generator=[torch.Generator().manual_seed(s) for s in seeds])
        return StyleSSP(negative_inversion=False).init_latents(state, latents)

    batch = start(z, [10, 11, 12])
    for i, seed in enumerate((10, 11, 12)):
        assert torch.equal(batch[i : i + 1], start(z[i : i + 1], [seed]))
    assert torch.equal(batch[1:], start(z[1:], [11, 12]))
    # a list of one generator equals that generator on a batch of one, in the pipeline too
    noise = draw_noise((1, 4, 8, 8), [torch.Generator().manual_seed(5)], "cpu")
    assert torch.equal(noise, draw_noise((1, 4, 8, 8), torch.Generator().manual_seed(5), "cpu"))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        start(z, [1, 2])


def test_list_generator_in_the_pipeline(pipe, images):
    a = pipe.transfer(*images, num_inference_steps=2, hooks=[StyleSSP(negative_inversion=False)], output_type="pt",
                      generator=torch.Generator().manual_seed(7))
    b = pipe.transfer(*images, num_inference_steps=2, hooks=[StyleSSP(negative_inversion=False)], output_type="pt",
                      generator=[torch.Generator().manual_seed(7)])
    assert torch.equal(a.images, b.images)


# ---------------------------------------------------------------------------- negative-guided inversion


def test_scale_zero_is_the_plain_inversion_and_costs_nothing(pipe, images, counter):
    base, _ = _run(pipe, images, cache_style=False)
    plain_rows = counter.rows
    out, rec = _run(pipe, images, negative_inversion_scale=0.0, style_prompt="a dog", content_prompt="a cat",
                    cache_style=False)
    assert torch.equal(out.images, base.images) and counter.rows == 2 * plain_rows
    assert rec.extras["negative_inversion_scale"] == 0.0


def test_guided_inversion_differs_and_costs_one_inversion_of_two_rows(pipe, images, counter):
    base, _ = _run(pipe, images, cache_style=False)
    before = counter.calls, counter.rows
    out, rec = _run(pipe, images, negative_inversion_scale=0.5, style_prompt="a dog", cache_style=False)
    calls, rows = counter.calls - before[0], counter.rows - before[1]
    assert (calls, rows) == (before[0] + STEPS, before[1] + 2 * STEPS)
    ex = rec.extras
    assert not torch.allclose(ex["content_start_zT"], ex["content_zT"], atol=1e-4)
    assert torch.equal(out.start_latents, adain_latents(ex["content_start_zT"], ex["style_zT"]))
    assert not torch.allclose(out.images, base.images, atol=1e-4)
    # the hook asks for the same inversion; an explicit argument overrides it
    hooked, _ = _run(pipe, images, hooks=[StyleSSP(alpha=1.0)], style_prompt="a dog")
    assert torch.equal(hooked.images, out.images)
    off, _ = _run(pipe, images, hooks=[StyleSSP(alpha=1.0)], style_prompt="a dog", negative_inversion_scale=0)
    assert torch.equal(off.images, base.images)
    # the larger the scale, the further the start moves from the plain one
    far, rec2 = _run(pipe, images, negative_inversion_scale=2.0, style_prompt="a dog")
    gap = lambda r: float((r.extras["content_start_zT"] - r.extras["content_zT"]).norm())  # noqa: E731
    assert gap(rec2) > gap(rec) > 0


def test_inversion_guidance_scale_is_w_inv_and_the_deprecated_alias_is_s(pipe, images):
    """StyleSSP(inversion_guidance_scale=w) asks `transfer` for s = w − 1; negative_guidance=s (deprecated, with
    a FutureWarning) gives the same images, and negative_guidance=0 the same as negative_inversion=False."""
    explicit, _ = _run(pipe, images, negative_inversion_scale=1.0, style_prompt="a dog")
    hooked, rec = _run(pipe, images, hooks=[StyleSSP(alpha=1.0, inversion_guidance_scale=2.0)], style_prompt="a dog")
    assert rec.extras["negative_inversion_scale"] == 1.0 and torch.equal(hooked.images, explicit.images)
    with pytest.warns(FutureWarning, match="inversion_guidance_scale=1 \\+ s"):
        alias = StyleSSP(alpha=1.0, negative_guidance=1.0)
    assert torch.equal(_run(pipe, images, hooks=[alias], style_prompt="a dog")[0].images, explicit.images)
    with pytest.warns(FutureWarning):
        off = StyleSSP(negative_guidance=0)
    new, _ = _run(pipe, images, hooks=[StyleSSP(negative_inversion=False)])
    assert torch.equal(_run(pipe, images, hooks=[off])[0].images, new.images)


def test_one_step_guided_inversion_moves_along_the_positive_minus_negative_direction(pipe, images):
    """With one step, z_1 = a·z_0 + b·ε̃ and b > 0 (towards noise), so the guided minus the plain z_1 is
    b·s·(ε(z_0, c⁺) − ε(z_0, c⁻)): away from the style image's description, by exactly b·s. A sign error
    (moving towards c⁻) or the official-form mix-up (ε(c⁻) + s·Δ) fails this."""
    kwargs = dict(content_prompt="a red square", style_prompt="a blue circle")
    out1 = pipe.transfer(*images, num_inference_steps=1, hooks=[rec := _Recorder()], output_type="pt",
                         negative_inversion_scale=0.5, **kwargs)
    ex = rec.extras
    scheduler = ex["pipeline"].scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    levels = ddim_levels(scheduler)
    ab_t, ab_p = float(levels.alpha_bar[0]), float(levels.alpha_bar_prev[0])
    b = (1 - ab_t) ** 0.5 - (ab_t / ab_p) ** 0.5 * (1 - ab_p) ** 0.5
    assert b > 0
    t = levels.timesteps[0]
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(["a red square", "a blue circle", ""], "cpu", 1, False)
        z0 = ex["content_z0"]
        eps = pipe.unet(z0.repeat(3, 1, 1, 1), t, encoder_hidden_states=embeds).sample.double()
    pos, neg, null = eps[0:1], eps[1:2], eps[2:3]
    a = (ab_t / ab_p) ** 0.5
    plain = a * z0.double() + b * null
    torch.testing.assert_close(ex["content_zT"].double(), plain, atol=1e-4, rtol=1e-4)
    guided = ex["content_start_zT"].double()
    expected = a * z0.double() + b * (pos + 0.5 * (pos - neg))
    torch.testing.assert_close(guided, expected, atol=1e-4, rtol=1e-4)
    # the negative part alone: away from c⁻ along ε(c⁺) − ε(c⁻)
    shift = guided - (a * z0.double() + b * pos)
    direction = pos - neg
    assert float((shift * direction).sum()) > 0
    torch.testing.assert_close(shift, 0.5 * b * direction, atol=1e-4, rtol=1e-3)
    assert float(direction.norm()) > 1e-2  # the check is not vacuous on this model
    assert out1.start_latents.shape == LATENT


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(d_s=0), "d_s"),
        (dict(d_t=1.2), "d_t"),
        (dict(d_l=-0.3), "d_l"),
        (dict(filter_type="ideal"), "not implemented"),
        (dict(filter_type="nope"), "filter_type"),
        (dict(range_over="all"), "range_over"),
        (dict(inversion_guidance_scale=-0.5), "inversion_guidance_scale"),
        (dict(inversion_guidance_scale=0.9), "inversion_guidance_scale"),
        (dict(inversion_guidance_scale=float("inf")), "inversion_guidance_scale"),
        (dict(frequency=1), "frequency"),
        (dict(negative_inversion=None), "negative_inversion"),
        (dict(order="last"), "order"),
    ],
)
def test_hook_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StyleSSP(**kwargs)


def test_call_errors_before_any_model_call(pipe, images, counter):
    cases = [
        (dict(hooks=[StyleSSP()]), "style_prompt: None"),
        (dict(negative_inversion_scale=0.5), "style_prompt: None"),
        (dict(negative_inversion_scale=-1, style_prompt="a dog"), "negative_inversion_scale"),
        (dict(negative_inversion_scale=float("nan"), style_prompt="a dog"), "negative_inversion_scale"),
        (dict(hooks=[StyleSSP(), StyleSSP(inversion_guidance_scale=2.0)], style_prompt="a dog"), "different negative"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe.transfer(*images, num_inference_steps=2, **kwargs)
    assert counter.calls == 0
    # a pipeline without the negative-guided inversion refuses a hook that asks for it
    with pytest.raises(ValueError, match="does not run"):
        StyleSSP().validate(SamplerState(num_steps=1, scheduler=None, extras={"style_prompt": "a dog"}))
    StyleSSP(negative_inversion=False).validate(SamplerState(num_steps=1, scheduler=None))


def test_explicit_scale_zero_switches_the_hooks_negative_inversion_off(pipe, images, counter):
    # the explicit argument wins over the hook's w_inv, so no style_prompt is needed
    off, rec = _run(pipe, images, hooks=[StyleSSP()], negative_inversion_scale=0, cache_style=False)
    plain_rows = counter.rows
    ref, _ = _run(pipe, images, hooks=[StyleSSP(negative_inversion=False)], cache_style=False)
    assert torch.equal(off.images, ref.images) and counter.rows == 2 * plain_rows  # no guided inversion ran
    assert rec.extras["negative_inversion_scale"] == 0.0


class _Shift(SamplerHook):
    """An earlier start-point hook: adds a constant."""

    def __init__(self, by):
        self.by = by

    def init_latents(self, state, latents):
        return latents + self.by


def test_earlier_hooks_start_latents_are_kept_in_both_orders(pipe, images):
    _, rec = _run(pipe, images, hooks=[StyleSSP(negative_inversion=False)])
    z_c, z_s = rec.extras["content_zT"], rec.extras["style_zT"]
    adain = adain_latents(z_c, z_s)
    # frequency_first: StyleSSP's change of the AdaIN start, AdaIN(freq(z_c)) − AdaIN(z_c), on top of what it got
    out, _ = _run(pipe, images, hooks=[_Shift(100.0), StyleSSP(negative_inversion=False, order="frequency_first")])
    expected = adain + 100.0 + (adain_latents(frequency_start_point(z_c, _noise()), z_s) - adain)
    torch.testing.assert_close(out.start_latents, expected, atol=1e-5 * 100, rtol=0)
    # adain_first filters the latent it receives
    out, _ = _run(pipe, images, hooks=[_Shift(100.0), StyleSSP(negative_inversion=False, order="adain_first")])
    assert torch.equal(out.start_latents, frequency_start_point(adain + 100.0, _noise()))
    # without AdaIN both orders filter the latent they receive
    for order in ("frequency_first", "adain_first"):
        out, _ = _run(pipe, images, hooks=[_Shift(3.0), StyleSSP(negative_inversion=False, order=order)], init_adain=False)
        assert torch.equal(out.start_latents, frequency_start_point(z_c + 3.0, _noise()))
