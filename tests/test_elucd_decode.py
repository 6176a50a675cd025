"""EluCD's decode path: float32 decoding where the autoencoder's config asks for it (as diffusers' SDXL pipeline
decodes), a lighter `decoder` for the classifier's input, and one warning per call when gradients were zeroed."""

import copy
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn

import guidekit
from guidekit.guidance import classifier_gradient, edm_rescale_gradient
from guidekit.hooks import SamplerState
from guidekit.pipelines import GuidedStableDiffusionPipeline
from guidekit.testing import tiny_vae
from guidekit.testing.tiny import sd_ddim_scheduler
from tolerance import assert_close_to_scale

KW = dict(num_inference_steps=4, height=32, width=32, output_type="np")
PROMPT = "a red circle on a blue background"
NONFINITE = re.compile(r"non-finite for (\d+) of (\d+) ")


@pytest.fixture(scope="module")
def sd(tiny_sd_dir):
    pipe = GuidedStableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, hooks=None, seed=0, **kw):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), hooks=hooks, **{**KW, **kw}).images


class Redness(nn.Module):
    """logit_red = gain·mean(R − (G + B)/2), logit_cyan = −logit_red; `nan_for` images get NaN logits."""

    id2label = {0: "red", 1: "cyan"}

    def __init__(self, gain=10.0, nan_for=()):
        super().__init__()
        self.gain, self.nan_for = gain, tuple(nan_for)
        self.seen = []  # what the hook's copy of this classifier read: `record` is shared by the copies
        self.record = self.seen.append

    def forward(self, x):
        self.record(x.detach().clone())
        red = (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean(dim=(1, 2))
        logits = torch.stack([red, -red], dim=1) * self.gain
        if self.nan_for:
            poison = torch.zeros(x.shape[0], 1, dtype=x.dtype)
            poison[list(self.nan_for)] = float("nan")
            logits = logits + poison
        return logits


def nonfinite_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and NONFINITE.search(str(w.message))]


# ------------------------------------------------------------------ one step, called directly


def one_step(vae, classifier, dtype, decoder=None, seed=0):
    """Two DDIM steps of the hook on a random latent batch; returns (hook, state, last x̂0 by hand, output)."""
    sched = sd_ddim_scheduler()
    sched.set_timesteps(4)
    extra = {} if decoder is None else {"decoder": decoder}
    hook = guidekit.EluCD(classifier, "red", scale=50.0, softplus_beta=None, **extra)
    state = SamplerState(num_steps=4, scheduler=sched, prediction_type="epsilon",
                         extras={"pipeline": SimpleNamespace(vae=vae)})
    hook.validate(state)
    g = torch.Generator().manual_seed(seed)
    out = None
    for i, t in enumerate(sched.timesteps[:2]):
        x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
        pred = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
        state.update(i, t, x, model_input=x)
        out = hook.correct(state, pred)
    a = float(sched.alphas_cumprod[int(t)])
    x0 = (x.double() - (1 - a) ** 0.5 * pred.double()) / a ** 0.5
    return hook, state, x0, out


def half_vae(force_upcast, overflow=False):
    torch.manual_seed(3)
    vae = tiny_vae()
    vae.register_to_config(force_upcast=force_upcast)
    if overflow:
        # conv_in's output exceeds float16's range (65504) while float32 holds it easily; the GroupNorm after it
        # brings it back to order one, so a float32 decode is fine and a float16 one is NaN.
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(1e4)
    return vae.half()


def test_force_upcast_decodes_and_backpropagates_in_float32_and_leaves_the_vae_float16():
    vae = half_vae(force_upcast=True)
    before = copy.deepcopy(vae.state_dict())
    seen = []

    def record(module, args):
        seen.append((args[0].dtype, next(vae.parameters()).dtype))

    vae.decoder.conv_in.register_forward_pre_hook(record)  # travels into the hook's copy: one hook object
    clf = Redness()
    hook, state, x0, out = one_step(vae, clf, torch.float16)
    # The decoder ran in float32 while the user's VAE stayed float16 the whole time.
    assert seen and all(d == torch.float32 and user == torch.float16 for d, user in seen)
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in vae.state_dict().items())
    # What the classifier read is the float32 decode of x̂0, computed independently.
    vae32 = AutoencoderKL.from_config(vae.config)
    vae32.load_state_dict({k: v.float() for k, v in before.items()})
    with torch.no_grad():
        expected = vae32.decode(x0.float() / vae.config.scaling_factor).sample
    # x̂0 comes from float16 inputs, so compare at float16's resolution.
    assert_close_to_scale(clf.seen[-1].double(), expected.double(), 2e-2)
    hook.end(state)
    assert "decoder" not in state.memory(hook)  # the call's copy is dropped at the end


def test_without_force_upcast_a_float16_vae_decodes_in_float16_as_diffusers_does():
    vae = half_vae(force_upcast=False)
    seen = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    one_step(vae, Redness(), torch.float16)
    assert seen == [torch.float16, torch.float16]


def test_a_vae_that_overflows_in_float16_still_guides_when_it_asks_for_upcasting():
    """The reproduction: in float16 the decode overflows, the gradient is NaN and is zeroed; upcast, it guides."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hook, state, _, out = one_step(half_vae(force_upcast=True, overflow=True), Redness(), torch.float16)
        hook.end(state)
    assert not nonfinite_warnings(record)
    assert torch.isfinite(out).all()
    # The guided prediction differs from the unguided one for both images (a zero gradient would not move it).
    _, _, _, unguided = one_step(half_vae(force_upcast=True, overflow=True), Redness(gain=0.0), torch.float16)
    assert ((out.double() - unguided.double()).flatten(1).abs().amax(dim=1) > 1e-3).all()


def test_a_vae_that_overflows_in_float16_warns_once_with_the_count():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hook, state, _, out = one_step(half_vae(force_upcast=False, overflow=True), Redness(), torch.float16)
        assert not nonfinite_warnings(record)  # counted per step, reported once at the end of the call
        hook.end(state)
    found = nonfinite_warnings(record)
    assert len(found) == 1
    assert NONFINITE.search(str(found[0].message)).groups() == ("4", "4")  # 2 images × 2 steps
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ the warning, in a pipeline call


@pytest.mark.parametrize("nan_for, expected", [((0, 1), "8 of 8"), ((1,), "4 of 8")])
def test_a_call_with_zeroed_gradients_warns_exactly_once_with_the_count(sd, nan_for, expected):
    hook = guidekit.EluCD(Redness(nan_for=nan_for), "red", scale=300.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        images = run(sd, [hook], num_images_per_prompt=2)
    found = nonfinite_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert f"non-finite for {expected} image-steps" in str(found[0].message)
    assert "guidance did nothing for them" in str(found[0].message)
    assert torch.isfinite(torch.from_numpy(images)).all()
    with warnings.catch_warnings(record=True) as record:  # a clean call says nothing
        warnings.simplefilter("always")
        run(sd, [guidekit.EluCD(Redness(), "red", scale=300.0)])
    assert not nonfinite_warnings(record)


def test_classifier_gradient_warns_with_the_count_or_returns_it():
    x = torch.ones(3, 4)
    x[1, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"non-finite for 1 of 3 samples"):
        grad = classifier_gradient(lambda v: v.pow(2).sum(dim=1), x)
    assert torch.equal(grad[1], torch.zeros(4)) and torch.equal(grad[0], torch.full((4,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad2, zeroed = classifier_gradient(lambda v: v.pow(2).sum(dim=1), x, return_nonfinite=True)
    assert zeroed == 1 and torch.equal(grad2, grad)


def test_edm_rescale_warns_when_it_zeroes_a_nonfinite_gradient():
    grad = torch.ones(2, 3, 2, 2)
    grad[0, 0, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match=r"non-finite for 1 of 2 samples"):
        out = edm_rescale_gradient(grad, torch.ones(2, 3, 2, 2), 0.01)
    assert (out[0] == 0).all()


# ------------------------------------------------------------------ the lighter decoder


class VAEDecode(nn.Module):
    """A stand-in decoder computing exactly the VAE's decode, reached through the decoder plumbing: it takes the
    model's latents unscaled (scaling_factor 1.0, like AutoencoderTiny) and applies the VAE's own scaling."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.config = SimpleNamespace(scaling_factor=1.0, latent_channels=vae.config.latent_channels)
        self.calls = 0

    def decode(self, z, return_dict=False):
        self.calls += 1
        return (self.vae.decode(z / self.vae.config.scaling_factor).sample,)


def test_a_decoder_computing_the_vae_decode_gives_the_same_image(sd):
    base = run(sd, [guidekit.EluCD(Redness(), "red", scale=300.0)], seed=1)
    decoder = VAEDecode(sd.vae)
    same = run(sd, [guidekit.EluCD(Redness(), "red", scale=300.0, decoder=decoder)], seed=1)
    assert decoder.calls == 4
    assert_close_to_scale(torch.from_numpy(same).double(), torch.from_numpy(base).double(), 1e-6)
    assert (base != run(sd, seed=1)).any()  # and the guidance did something


def test_the_decoder_replaces_the_vae_for_the_classifier_and_gets_unscaled_latents():
    vae = tiny_vae()
    torch.manual_seed(4)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    got = []
    tiny.decoder.register_forward_pre_hook(lambda m, args: got.append(args[0].detach().clone()))
    vae_calls = []
    vae.decoder.register_forward_pre_hook(lambda m, args: vae_calls.append(1))
    clf = Redness()
    _, _, x0, out = one_step(vae, clf, torch.float32, decoder=tiny)
    assert not vae_calls and len(got) == 2
    assert_close_to_scale(got[-1].double(), x0, 1e-5)  # AutoencoderTiny: scaling_factor 1.0, no shift
    with torch.no_grad():
        expected = tiny.decode(x0.float()).sample
    assert_close_to_scale(clf.seen[-1].double(), expected.double(), 1e-5)
    assert torch.isfinite(out).all()


def test_decoder_argument_errors(sd):
    with pytest.raises(ValueError, match=r"decoder: Linear is not accepted"):
        guidekit.EluCD(Redness(), "red", decoder=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"decoder: .*latent channels is not accepted"):
        wrong = AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                                num_encoder_blocks=(1,), num_decoder_blocks=(1,), latent_channels=3)
        run(sd, [guidekit.EluCD(Redness(), "red", decoder=wrong)], num_inference_steps=2)
    sched = sd_ddim_scheduler()
    sched.set_timesteps(2)
    pixel = SamplerState(num_steps=2, scheduler=sched, prediction_type="epsilon", extras={"pipeline": SimpleNamespace()})
    with pytest.raises(ValueError, match=r"decoder: .*no VAE"):
        guidekit.EluCD(Redness(), "red", decoder=VAEDecode(tiny_vae())).validate(pixel)


# ------------------------------------------------------------------ the bench rows


def test_bench_prints_the_latent_dit_rows(monkeypatch, tmp_path):
    """--dit adds the latent EluCD rows (SD VAE and AutoencoderTiny decodes against unguided), here with tiny
    components: plumbing only, no timing asserted."""
    import json

    from click.testing import CliRunner
    from diffusers import DiTTransformer2DModel

    import guidekit.apps.bench as bench_mod
    from guidekit.apps.cli import main

    def tiny_models(size):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                            in_channels=4, out_channels=8, patch_size=2, sample_size=8)
        tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
        return transformer.eval(), tiny_vae(16).eval(), tiny.eval()

    monkeypatch.setattr(bench_mod, "dit_models", tiny_models)
    monkeypatch.setattr(bench_mod, "resnet50_classifier", bench_mod.tiny_classifier)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--no-sd", "--no-uam", "--no-elucd", "--no-styleid",
                                       "--no-stylessp", "--dit", "--dit-repeats", "1", "--json", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["dit"]
    assert [r["case"] for r in rows] == ["DiT EluCD, SD VAE decode vs unguided",
                                         "DiT EluCD, AutoencoderTiny decode vs unguided"]
    assert all(r["wall_ratio"] > 0 and r["timed_steps"] == bench_mod.DIT_STEPS for r in rows)
    assert "| DiT EluCD, AutoencoderTiny decode vs unguided |" in result.output
