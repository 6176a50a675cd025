"""FreeNoise on AnimateDiff: GuidedAnimateDiffPipeline against the stock pipeline and diffusers' FreeNoise,
the tail-window fix, generators, composition with APG, and argument errors."""

import copy

import pytest
import torch
from diffusers import AnimateDiffPipeline
from diffusers.models.attention import FreeNoiseTransformerBlock

import guidekit
from guidekit.attention.freenoise import motion_blocks, windowed_block_forward
from guidekit.hooks import HookConflictError, SamplerState
from guidekit.pipelines import GuidedAnimateDiffPipeline, GuidedStableDiffusionPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from guidekit.video import fuse_windows, fusion_weights, plan_windows
from animatediff_calls import load, video
from tolerance import assert_close_to_scale

MAX_LENGTH = 16  # the tiny adapter's motion_max_seq_length: F = 20 frames need FreeNoise


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff"), max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load(GuidedAnimateDiffPipeline, tiny_dir)


@pytest.fixture()
def stock(tiny_dir):
    # a fresh one per test: enable_free_noise changes the model
    return load(AnimateDiffPipeline, tiny_dir)


# ---------------------------------------------------------------- stock equality


@pytest.mark.parametrize("extra", [{}, {"guidance_scale": 1.0}, {"negative_prompt": "blurry", "guidance_scale": 5.0}])
def test_no_hook_is_stock_bit_for_bit(ours, stock, extra):
    torch.testing.assert_close(video(ours, 8, **extra), video(stock, 8, **extra), rtol=0, atol=0)


def test_no_hook_decoded_frames_are_stock(ours, stock):
    kw = dict(output_type="np", num_inference_steps=1)
    torch.testing.assert_close(torch.as_tensor(video(ours, 4, **kw)), torch.as_tensor(video(stock, 4, **kw)), rtol=0, atol=0)


@pytest.mark.parametrize("noise", ["shuffle", "repeat", "random"])
def test_short_video_with_freenoise_is_the_plain_pipeline(ours, noise):
    # F <= W: one window covers every frame, so nothing is rescheduled or fused
    plain = video(ours, 12)
    torch.testing.assert_close(video(ours, 12, hooks=[guidekit.FreeNoise(noise=noise)]), plain, rtol=0, atol=0)


def test_model_is_restored_after_the_call(ours):
    video(ours, 20, hooks=[guidekit.FreeNoise()])
    assert all("forward" not in block.__dict__ for _, block in motion_blocks(ours.unet))
    torch.testing.assert_close(video(ours, 8), video(ours, 8), rtol=0, atol=0)


# ---------------------------------------------------------------- diffusers' FreeNoise


def test_matches_diffusers_free_noise_where_it_is_correct(ours, stock):
    # (F − W) mod S = 0: no tail window, where diffusers' fusion is right
    hook = guidekit.FreeNoise(context_length=16, context_stride=4, weighting="pyramid", noise="shuffle", fusion="block")
    result = video(ours, 20, hooks=[hook])
    stock.enable_free_noise(context_length=16, context_stride=4, weighting_scheme="pyramid", noise_type="shuffle_context")
    expected = video(stock, 20)
    assert result.shape == (1, 4, 20, 8, 8)
    assert_close_to_scale(result, expected, rel=1e-5)


def test_attach_gives_a_hooked_copy_of_a_stock_animatediff_pipeline(ours, stock):
    hook = guidekit.FreeNoise(context_length=16, context_stride=4)
    attached = guidekit.attach(stock, hook)
    assert isinstance(attached, GuidedAnimateDiffPipeline) and type(stock) is AnimateDiffPipeline
    attached.set_progress_bar_config(disable=True)
    torch.testing.assert_close(video(attached, 20), video(ours, 20, hooks=[hook]), rtol=0, atol=0)


def test_initial_noise_is_diffusers_shuffle(ours, stock):
    stock.enable_free_noise(context_length=16, context_stride=4, noise_type="shuffle_context")
    g = torch.Generator().manual_seed(3)
    expected = stock.prepare_latents(1, 4, 27, 16, 16, torch.float32, "cpu", g)
    g = torch.Generator().manual_seed(3)
    latents = ours.prepare_latents(1, 4, 27, 16, 16, torch.float32, "cpu", g)
    state = SamplerState(num_steps=1, scheduler=ours.scheduler, generator=g)
    torch.testing.assert_close(guidekit.FreeNoise().init_latents(state, latents), expected, rtol=0, atol=0)


def _diffusers_block(block):
    """diffusers' FreeNoiseTransformerBlock with `block`'s weights, built as `enable_free_noise` builds it."""
    names = ("dim", "num_attention_heads", "attention_head_dim", "dropout", "cross_attention_dim", "activation_fn",
             "attention_bias", "only_cross_attention", "double_self_attention", "positional_embeddings",
             "num_positional_embeddings")
    fused = FreeNoiseTransformerBlock(
        **{name: getattr(block, name) for name in names}, context_length=16, context_stride=4, weighting_scheme="pyramid"
    )
    fused.load_state_dict(block.state_dict(), strict=True)
    return fused


@pytest.mark.parametrize("num_frames", [22, 27, 30])
def test_tail_window_is_exact_where_diffusers_scales_it(ours, num_frames):
    # (F − W) mod S >= 2: diffusers adds one scalar weight for the tail frames and shrinks them
    assert (num_frames - 16) % 4 >= 2
    plan = plan_windows(num_frames, 16, 4)
    weights = fusion_weights(plan, num_frames, "pyramid")
    torch.testing.assert_close(weights.sum(0), torch.ones(num_frames, dtype=torch.float64), rtol=0, atol=1e-15)

    # zero attention outputs: every window's residual stream is its input, so a correct fusion is the
    # identity and the block is x + FF(norm3(x)) (the plain block cannot run F > its positional limit)
    block = copy.deepcopy(motion_blocks(ours.unet)[0][1])
    for attn in (block.attn1, block.attn2):
        torch.nn.init.zeros_(attn.to_out[0].weight)
        torch.nn.init.zeros_(attn.to_out[0].bias)
    hidden = torch.randn(3, num_frames, block.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hidden + block.ff(block.norm3(hidden))
        result = windowed_block_forward(block, hidden, 16, 4, "pyramid")
        theirs = _diffusers_block(block)(hidden)
    assert_close_to_scale(result, expected, rel=1e-6)
    # diffusers: right before the tail window, wrong on its last frames
    covered = plan[-2][1]
    assert_close_to_scale(theirs[:, :covered], expected[:, :covered], rel=1e-6)
    assert (theirs[:, -1] - expected[:, -1]).abs().max() > 1e-2


def _random_block(ours):
    block = copy.deepcopy(motion_blocks(ours.unet)[0][1])
    hidden = torch.randn(3, 27, block.dim, generator=torch.Generator().manual_seed(1))
    return block, hidden


def test_attention_fusion_is_the_videocrafter_formula(ours):
    # each attention's output fused over the windows (official attention_freenoise.py), written out here
    block, hidden = _random_block(ours)
    plan = plan_windows(27, 16, 4)

    def fused(attn, norm, x):
        outputs = [attn(block.pos_embed(norm(x[:, start:stop]))) for start, stop in plan]
        return fuse_windows(outputs, plan, 27, "pyramid")

    with torch.no_grad():
        h = hidden + fused(block.attn1, block.norm1, hidden)
        h = h + fused(block.attn2, block.norm2, h)
        expected = h + block.ff(block.norm3(h))
        result = windowed_block_forward(block, hidden, 16, 4, "pyramid", fusion="attention")
        per_block = windowed_block_forward(block, hidden, 16, 4, "pyramid", fusion="block")
    assert_close_to_scale(result, expected, rel=1e-6)
    assert (per_block - result).abs().max() > 1e-3  # the two fusion points are different methods


def test_fusions_agree_on_disjoint_windows(ours):
    # S = W: every frame lies in one window, so where the fusion happens cannot matter
    block, _ = _random_block(ours)
    hidden = torch.randn(2, 32, block.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = windowed_block_forward(block, hidden, 16, 16, fusion="attention")
        b = windowed_block_forward(block, hidden, 16, 16, fusion="block")
    assert_close_to_scale(a, b, rel=1e-6)


def test_attention_fusion_pipeline(ours):
    plain = video(ours, 12)
    torch.testing.assert_close(video(ours, 12, hooks=[guidekit.FreeNoise(fusion="attention")]), plain, rtol=0, atol=0)
    a = video(ours, 22, hooks=[guidekit.FreeNoise(fusion="attention")])
    b = video(ours, 22, hooks=[guidekit.FreeNoise(fusion="block")])
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_tail_video_differs_from_diffusers(ours, stock):
    result = video(ours, 22, hooks=[guidekit.FreeNoise(fusion="block")])
    stock.enable_free_noise(context_length=16, context_stride=4, weighting_scheme="pyramid", noise_type="shuffle_context")
    expected = video(stock, 22)
    assert torch.isfinite(result).all()
    assert (result[:, :, -2:] - expected[:, :, -2:]).abs().max() > 1e-3


# ---------------------------------------------------------------- noise, generators, composition


def test_list_of_generators_gives_each_sample_its_own_video(ours):
    hook = guidekit.FreeNoise(context_stride=2)
    both = video(ours, 20, prompt=["a red circle"] * 2, hooks=[hook],
                 generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    second = video(ours, 20, hooks=[hook], generator=[torch.Generator().manual_seed(2)])
    assert_close_to_scale(both[1:], second, rel=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-2


def test_repeat_and_random_noise():
    latents = torch.randn(2, 4, 20, 3, 3)
    state = SamplerState(num_steps=1, scheduler=None, generator=torch.Generator().manual_seed(0))
    repeated = guidekit.FreeNoise(noise="repeat").init_latents(state, latents)
    torch.testing.assert_close(repeated[:, :, 16:], latents[:, :, :4], rtol=0, atol=0)
    fresh = guidekit.FreeNoise(noise="random").init_latents(state, latents)
    torch.testing.assert_close(fresh[:, :, :16], latents[:, :, :16], rtol=0, atol=0)
    assert not torch.equal(fresh[:, :, 16:], latents[:, :, 16:])
    state.extras["user_latents"] = True  # the user's own latents are kept
    torch.testing.assert_close(guidekit.FreeNoise().init_latents(state, latents), latents, rtol=0, atol=0)


def test_apg_composes_with_freenoise(ours):
    cfg = video(ours, 20, guidance_scale=9.0, hooks=[guidekit.FreeNoise()])
    apg = video(ours, 20, guidance_scale=9.0, hooks=[guidekit.APG(), guidekit.FreeNoise()])
    assert torch.isfinite(apg).all() and apg.shape == cfg.shape
    assert (apg - cfg).abs().max() > 1e-4


def test_prompt_schedule(ours):
    torch.testing.assert_close(video(ours, 8, prompt={0: "a red circle"}), video(ours, 8), rtol=0, atol=0)
    travel = video(ours, 20, prompt={0: "a red circle", 12: "a blue square"}, hooks=[guidekit.FreeNoise()])
    assert torch.isfinite(travel).all()
    with pytest.raises(ValueError, match="frame key 10"):
        video(ours, 8, prompt={0: "a", 10: "b"})


# ---------------------------------------------------------------- motion injection

TRAVEL = {0: "a red circle", 12: "a blue square"}


class _Spy:
    """Records the encoder_hidden_states each cross-attention layer sees, then runs the layer's processor."""

    def __init__(self, name, original, log):
        self.name, self.original, self.log = name, original, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.log.append((self.name, encoder_hidden_states.clone()))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


@pytest.mark.parametrize(
    "blocks, injected_parts",
    [
        (None, ("down_blocks", "mid_block")),
        (("up",), ("up_blocks",)),
        (("mid", "down", "up"), ("down_blocks", "mid_block", "up_blocks")),
    ],
)
def test_motion_injection_reads_the_last_prompt_in_the_chosen_layers(ours, blocks, injected_parts):
    from guidekit.attention import attention_layers

    processors = ours.unet.attn_processors
    cross = attention_layers(ours.unet, "cross")
    assert {name.split(".")[0] for name in cross} == {"down_blocks", "mid_block", "up_blocks"}
    log = []
    ours.unet.set_attn_processor({**processors, **{n: _Spy(n, processors[n], log) for n in cross}})
    try:
        options = {} if blocks is None else {"injection_blocks": blocks}  # None: the official down and mid blocks
        hook = guidekit.FreeNoise(motion_injection=True, **options)  # steps i < 0.1·N or i > 0.3·N
        video(ours, 20, prompt=TRAVEL, num_inference_steps=4, guidance_scale=5.0, hooks=[hook])
    finally:
        ours.unet.set_attn_processor(processors)
    last = ours.encode_prompt(TRAVEL[12], "cpu", 1, False)[0][0]
    per_layer_calls = len(log) // 4
    for index, (name, states) in enumerate(log):
        step = index // per_layer_calls
        uncond, cond = states.chunk(2)
        injected = step in (0, 2, 3) and name.split(".")[0] in injected_parts
        assert torch.equal(cond.eq(last).all(dim=(1, 2)).all(), torch.tensor(injected)), (name, step)
        assert not uncond.eq(last).all(dim=(1, 2)).any()  # the unconditional pass is never injected


def test_motion_injection_without_effect(ours):
    plain = video(ours, 20, prompt=TRAVEL, hooks=[guidekit.FreeNoise()])
    # never active: i < 0 or i > N never holds
    never = video(ours, 20, prompt=TRAVEL, hooks=[guidekit.FreeNoise(motion_injection=(0.0, 1.0))])
    torch.testing.assert_close(never, plain, rtol=0, atol=0)
    # one prompt everywhere: the injected prompt is the per-frame one
    same = {0: "a red circle", 12: "a red circle"}
    torch.testing.assert_close(
        video(ours, 20, prompt=same, hooks=[guidekit.FreeNoise(motion_injection=True)]),
        video(ours, 20, prompt=same, hooks=[guidekit.FreeNoise()]), rtol=0, atol=0,
    )
    injected = video(ours, 20, prompt=TRAVEL, hooks=[guidekit.FreeNoise(motion_injection=True)])
    assert (injected - plain).abs().max() > 1e-4
    assert all(type(p).__name__ != "MotionInjectionProcessor" for p in ours.unet.attn_processors.values())


def test_motion_injection_needs_a_prompt_schedule(ours):
    with pytest.raises(ValueError, match="motion_injection: needs a"):
        video(ours, 20, hooks=[guidekit.FreeNoise(motion_injection=True)])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"context_length": 0}, "context_length"),
        ({"context_length": 16.0}, "context_length"),
        ({"context_stride": 0}, "context_stride"),
        ({"context_stride": 17}, "context_stride"),
        ({"weighting": "triangle"}, "weighting"),
        ({"noise": "shuffle_context"}, "noise"),
        ({"fusion": "unet"}, "fusion"),
        ({"motion_injection": {"steps": (5, 15)}}, "motion_injection"),
        ({"motion_injection": (0.5, 0.2)}, "motion_injection"),
        ({"motion_injection": (0.1, 1.5)}, "motion_injection"),
        ({"injection_blocks": ()}, "injection_blocks"),
        ({"injection_blocks": ("down", "side")}, "injection_blocks"),
        ({"injection_blocks": 3}, "injection_blocks"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        guidekit.FreeNoise(**kwargs)


def test_context_longer_than_the_motion_model_is_refused(ours):
    with pytest.raises(ValueError, match="motion_max_seq_length"):
        video(ours, 40, hooks=[guidekit.FreeNoise(context_length=24)])
    assert all("forward" not in block.__dict__ for _, block in motion_blocks(ours.unet))


def test_long_video_without_freenoise_is_refused(ours):
    with pytest.raises(ValueError, match="num_frames: 20 is above the motion model's motion_max_seq_length 16"):
        video(ours, 20)


def test_image_pipeline_is_refused(tiny_sd_dir):
    pipe = load(GuidedStableDiffusionPipeline, tiny_sd_dir)
    with pytest.raises(ValueError, match="motion modules"):
        pipe("a", num_inference_steps=1, height=16, width=16, output_type="latent", hooks=[guidekit.FreeNoise()])


def test_conflicts(ours, stock):
    with pytest.raises(HookConflictError):
        video(ours, 20, hooks=[guidekit.FreeNoise(), guidekit.FreeNoise()])
    pipe = GuidedAnimateDiffPipeline.from_pipe(stock)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise()
    with pytest.raises(HookConflictError, match="disable_free_noise"):
        video(pipe, 20, hooks=[guidekit.FreeNoise()])
    pipe.disable_free_noise()
    pipe.enable_free_init(num_iters=2)
    with pytest.raises(ValueError, match="FreeInit"):
        video(pipe, 8)
