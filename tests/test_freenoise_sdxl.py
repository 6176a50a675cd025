"""AnimateDiff SDXL: GuidedAnimateDiffSDXLPipeline against the stock pipeline, FreeNoise windows (exact tail),
prompt schedules with per-frame pooled embeddings, generators, APG, attach, and argument errors."""

import copy

import pytest
import torch
from diffusers import AnimateDiffSDXLPipeline, MotionAdapter, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding

import guidekit
from guidekit.attention import freenoise
from guidekit.attention.freenoise import motion_blocks
from guidekit.pipelines import GuidedAnimateDiffSDXLPipeline
from guidekit.testing.animatediff import make_tiny_animatediff_sdxl
from tolerance import assert_close_to_scale

MAX_LENGTH = 16  # the tiny adapter's motion_max_seq_length: F = 20 frames need FreeNoise
KW = dict(prompt="a red circle", height=16, width=16, num_inference_steps=2, output_type="latent")
TRAVEL = {0: "a red circle", 7: "a blue square"}


def load(cls, folder, **kwargs):
    pipe = cls.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff_sdxl(tmp_path_factory.mktemp("tiny-animatediff-sdxl"), max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load(GuidedAnimateDiffSDXLPipeline, tiny_dir)


@pytest.fixture(scope="module")
def stock(tiny_dir):
    return load(AnimateDiffSDXLPipeline, tiny_dir)


def video(pipe, num_frames, seed=0, **kw):
    generator = kw.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(num_frames=num_frames, generator=generator, **{**KW, **kw}).frames


def variant(ours, edit):
    """A copy of `ours` with its own UNet, changed by `edit(unet)`."""
    unet = copy.deepcopy(ours.unet)
    edit(unet)
    pipe = GuidedAnimateDiffSDXLPipeline.from_pipe(ours, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- stock equality


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"guidance_scale": 1.0},
        {"negative_prompt": "blurry", "guidance_scale": 7.0, "hooks": [guidekit.CFG()]},
        {
            "prompt": ["a red circle", "a blue square"],
            "negative_original_size": (8, 8),
            "negative_target_size": (16, 16),
        },
        {"guidance_rescale": 0.7, "prompt_2": "a square"},
    ],
)
def test_no_hook_is_stock_bit_for_bit(ours, stock, extra):
    hooks = extra.pop("hooks", None)
    torch.testing.assert_close(video(ours, 8, hooks=hooks, **extra), video(stock, 8, **extra), rtol=0, atol=0)


def test_no_hook_decoded_frames_are_stock(ours, stock):
    kw = dict(output_type="np", num_inference_steps=1)
    ours_frames, stock_frames = torch.as_tensor(video(ours, 4, **kw)), torch.as_tensor(video(stock, 4, **kw))
    torch.testing.assert_close(ours_frames, stock_frames, rtol=0, atol=0)


def test_added_embedding_comes_from_the_image_unet(tiny_dir):
    # diffusers' from_unet2d leaves the SDXL add_embedding random; the hooked pipeline copies the image model's
    image_unet = UNet2DConditionModel.from_pretrained(str(tiny_dir / "_image"), subfolder="unet")
    adapter = MotionAdapter.from_pretrained(str(tiny_dir / "_adapter"))
    loaded = load(GuidedAnimateDiffSDXLPipeline, tiny_dir / "_image", motion_adapter=adapter)
    image_pipe = load(StableDiffusionXLPipeline, tiny_dir / "_image")
    piped = GuidedAnimateDiffSDXLPipeline.from_pipe(image_pipe, motion_adapter=adapter)
    for pipe in (loaded, piped):
        for name, value in image_unet.add_embedding.state_dict().items():
            torch.testing.assert_close(pipe.unet.add_embedding.state_dict()[name], value, rtol=0, atol=0)
    piped.set_progress_bar_config(disable=True)
    assert torch.isfinite(video(piped, 4, num_inference_steps=1)).all()


def test_callback_sees_the_stock_tensors(ours, stock):
    names = list(AnimateDiffSDXLPipeline._callback_tensor_inputs)

    def run(pipe):
        seen = []

        def callback(pipe, step, t, tensors):
            seen.append({name: tensors[name].clone() for name in names})
            return {}

        latents = video(pipe, 4, guidance_scale=5.0, callback_on_step_end=callback,
                        callback_on_step_end_tensor_inputs=names)
        return latents, seen

    (ours_latents, ours_seen), (stock_latents, stock_seen) = run(ours), run(stock)
    torch.testing.assert_close(ours_latents, stock_latents, rtol=0, atol=0)
    for a, b in zip(ours_seen, stock_seen, strict=True):
        for name in names:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- FreeNoise


@pytest.mark.parametrize("noise", ["shuffle", "random"])
def test_short_video_with_freenoise_is_the_plain_pipeline(ours, noise):
    # F <= W: one window covers every frame, so nothing is rescheduled or fused
    plain = video(ours, 12)
    torch.testing.assert_close(video(ours, 12, hooks=[guidekit.FreeNoise(noise=noise)]), plain, rtol=0, atol=0)


def test_long_video_runs_the_temporal_attention_on_windows(ours, monkeypatch):
    _, block = motion_blocks(ours.unet)[0]
    lengths = []
    # the window loop runs the attention module per window; the shared-projection form attends all windows at once
    handle = block.attn1.register_forward_hook(lambda module, args, output: lengths.append(output.shape[1]))
    attend = freenoise._window_attention
    monkeypatch.setattr(freenoise, "_window_attention",
                        lambda attn, query, key, value: lengths.append(query.shape[2]) or attend(attn, query, key, value))
    try:
        result = video(ours, 20, hooks=[guidekit.FreeNoise(context_length=16, context_stride=4)])
    finally:
        handle.remove()
    assert result.shape == (1, 4, 20, 8, 8) and torch.isfinite(result).all()
    assert set(lengths) == {16}  # windows (0, 16), (4, 20) per call, never the 20 frames at once
    assert all("forward" not in block.__dict__ for _, block in motion_blocks(ours.unet))


def _identity_attentions(unet):
    """Zero the temporal attention outputs and give the positional embeddings 64 positions.

    Every window's residual stream is then its input, so an exact fusion is the identity and the windowed
    model equals the plain one at any F (which the longer positional table lets run).
    """
    for _, block in motion_blocks(unet):
        for attn in (block.attn1, block.attn2):
            torch.nn.init.zeros_(attn.to_out[0].weight)
            torch.nn.init.zeros_(attn.to_out[0].bias)
        block.pos_embed = SinusoidalPositionalEmbedding(block.dim, 64)
    unet.register_to_config(motion_max_seq_length=64)


@pytest.mark.parametrize("num_frames, fusion", [(22, "block"), (27, "attention")])
def test_tail_window_is_exact(ours, num_frames, fusion):
    # (F − W) mod S >= 2: diffusers' SD FreeNoise shrinks these tail frames; here they are normalised exactly
    assert (num_frames - 16) % 4 >= 2
    pipe = variant(ours, _identity_attentions)
    latents = torch.randn(1, 4, num_frames, 8, 8, generator=torch.Generator().manual_seed(0))  # kept as given
    plain = video(pipe, num_frames, latents=latents, hooks=[])
    hook = guidekit.FreeNoise(context_length=16, context_stride=4, fusion=fusion)
    windowed = video(pipe, num_frames, latents=latents, hooks=[hook])
    assert_close_to_scale(windowed, plain, rel=1e-5)


def test_chunked_layers_with_per_frame_pooled_embeddings_are_exact(ours):
    # the per-frame added embedding reaches every chunk of the spatial layers
    travel = {0: "a red circle", 12: "a blue square"}
    whole = video(ours, 20, prompt=travel, hooks=[guidekit.FreeNoise()])
    chunked = video(ours, 20, prompt=travel, hooks=[guidekit.FreeNoise(spatial_chunk=7, temporal_chunk=5)])
    assert_close_to_scale(chunked, whole, rel=1e-5)


def test_user_latents_of_one_window_are_extended(ours):
    latents = torch.randn(1, 4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    result = video(ours, 20, latents=latents, hooks=[guidekit.FreeNoise()])
    assert result.shape == (1, 4, 20, 8, 8) and torch.isfinite(result).all()


def test_apg_composes_with_freenoise(ours):
    cfg = video(ours, 20, guidance_scale=9.0, hooks=[guidekit.FreeNoise()])
    apg = video(ours, 20, guidance_scale=9.0, hooks=[guidekit.APG(), guidekit.FreeNoise()])
    assert torch.isfinite(apg).all() and apg.shape == cfg.shape
    assert (apg - cfg).abs().max() > 1e-4


def test_list_of_generators_gives_each_sample_its_own_video(ours):
    hook = guidekit.FreeNoise(context_stride=2)
    both = video(ours, 20, prompt=["a red circle"] * 2, hooks=[hook],
                 generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    second = video(ours, 20, hooks=[hook], generator=[torch.Generator().manual_seed(2)])
    assert_close_to_scale(both[1:], second, rel=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-2


def test_attach_gives_a_hooked_copy_of_a_stock_pipeline(ours, stock):
    hook = guidekit.FreeNoise(context_length=16, context_stride=4)
    attached = guidekit.attach(stock, hook)
    assert isinstance(attached, GuidedAnimateDiffSDXLPipeline) and type(stock) is AnimateDiffSDXLPipeline
    assert attached.unet is stock.unet
    attached.set_progress_bar_config(disable=True)
    torch.testing.assert_close(video(attached, 20), video(ours, 20, hooks=[hook]), rtol=0, atol=0)


# ---------------------------------------------------------------- prompt schedules


def test_one_key_schedule_is_the_plain_prompt(ours):
    torch.testing.assert_close(video(ours, 8, prompt={0: "a red circle"}), video(ours, 8), rtol=0, atol=0)


def _frame_independent(unet):
    # zero proj_out: every motion module adds nothing, so each frame is denoised on its own
    for name, module in unet.named_modules():
        if ".motion_modules." in f".{name}." and name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def _guidance_off_after_first_step(pipe, step, t, tensors):
    pipe._guidance_scale = 1.0  # later steps run the conditional batch alone
    return tensors


@pytest.mark.parametrize("callback", [None, _guidance_off_after_first_step])
def test_key_frames_get_their_prompts_token_and_pooled_embeddings(ours, callback):
    # with frames independent, a key frame of a schedule is that frame of its own prompt's plain video; this
    # holds only if the pooled embedding (SDXL's added conditioning) follows the schedule too
    pipe = variant(ours, _frame_independent)
    kw = dict(guidance_scale=5.0, callback_on_step_end=callback)
    travel = video(pipe, 8, prompt=TRAVEL, **kw)
    first = video(pipe, 8, prompt=TRAVEL[0], **kw)
    last = video(pipe, 8, prompt=TRAVEL[7], **kw)
    assert_close_to_scale(travel[:, :, 0], first[:, :, 0], rel=1e-5)
    assert_close_to_scale(travel[:, :, 7], last[:, :, 7], rel=1e-5)
    assert (travel[:, :, 3] - first[:, :, 3]).abs().max() > 1e-4  # in between: a blend


def test_prompt_2_schedule(ours):
    same = video(ours, 8, prompt=TRAVEL, prompt_2=dict(TRAVEL))
    torch.testing.assert_close(same, video(ours, 8, prompt=TRAVEL), rtol=0, atol=0)
    other = video(ours, 8, prompt=TRAVEL, prompt_2={0: "a square", 7: "a circle"})
    assert (other - same).abs().max() > 1e-4


def test_schedule_with_freenoise_and_motion_injection(ours):
    travel = {0: "a red circle", 12: "a blue square"}
    plain = video(ours, 20, prompt=travel, hooks=[guidekit.FreeNoise()])
    injected = video(ours, 20, prompt=travel, hooks=[guidekit.FreeNoise(motion_injection=True)])
    assert torch.isfinite(injected).all() and (injected - plain).abs().max() > 1e-4
    assert all(type(p).__name__ != "MotionInjectionProcessor" for p in ours.unet.attn_processors.values())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in ours.unet.modules())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": {0: "a", 10: "b"}}, "frame key 10"),
        ({"prompt": {}}, "empty dict"),
        ({"prompt": {0: 3}}, r"prompt\[0\]"),
        ({"prompt": TRAVEL, "prompt_2": {0: "a"}}, "prompt_2"),
        ({"prompt": TRAVEL, "prompt_2": "a"}, "prompt_2"),
        ({"prompt": "a", "prompt_2": {0: "a"}}, "prompt_2"),
        ({"prompt": TRAVEL, "negative_prompt": ["x"]}, "negative_prompt"),
        ({"prompt": TRAVEL, "negative_prompt_2": ["x"]}, "negative_prompt_2"),
    ],
)
def test_argument_errors(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        video(ours, 8, **kwargs)


def test_long_video_without_freenoise_is_refused(ours):
    with pytest.raises(ValueError, match="num_frames: 20 is above the motion model's motion_max_seq_length 16"):
        video(ours, 20)
    with pytest.raises(ValueError, match="motion_max_seq_length"):
        video(ours, 40, hooks=[guidekit.FreeNoise(context_length=24)])


def test_free_init_is_refused(ours):
    pipe = GuidedAnimateDiffSDXLPipeline.from_pipe(ours)
    pipe.enable_free_init(num_iters=2)
    with pytest.raises(ValueError, match="FreeInit"):
        video(pipe, 8)


def test_schedule_with_precomputed_embeddings_is_refused(ours):
    pooled = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        video(ours, 8, prompt=TRAVEL, pooled_prompt_embeds=pooled)


class _Spy:
    """Records the encoder_hidden_states a cross-attention layer sees, then runs the layer's processor."""

    def __init__(self, name, original, log):
        self.name, self.original, self.log = name, original, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        self.log.append((self.name, encoder_hidden_states.clone()))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


def test_motion_injection_reads_the_last_prompt_of_both_text_encoders(ours):
    from guidekit.attention import attention_layers

    travel = {0: "a red circle", 12: "a blue square"}
    processors = ours.unet.attn_processors
    cross = attention_layers(ours.unet, "cross")
    log = []
    ours.unet.set_attn_processor({**processors, **{n: _Spy(n, processors[n], log) for n in cross}})
    try:
        # one step: i < 0.1·N holds, so the down and mid layers read the last prompt
        video(ours, 20, prompt=travel, num_inference_steps=1, guidance_scale=5.0,
              hooks=[guidekit.FreeNoise(motion_injection=True)])
    finally:
        ours.unet.set_attn_processor(processors)
    last = ours.encode_prompt(travel[12], device="cpu", do_classifier_free_guidance=False)[0][0]
    assert {name.split(".")[0] for name, _ in log} == {"down_blocks", "mid_block", "up_blocks"}
    for name, states in log:
        cond = states[20:]
        injected = name.split(".")[0] in ("down_blocks", "mid_block")
        assert bool(cond.eq(last).all()) == injected, name
