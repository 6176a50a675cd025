"""FreeNoise's "attention" fusion with shared projections: each frame's norm and projections computed once,
against the per-window loop (the reference form), on random blocks and in a tiny AnimateDiff pipeline."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import guidekit
from guidekit.attention import freenoise
from guidekit.attention.freenoise import motion_blocks, windowed_block_forward
from guidekit.pipelines import GuidedAnimateDiffPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from guidekit.video import plan_windows
from animatediff_calls import load, video
from tolerance import assert_close_to_scale

# (F, W, S): no tail window, tail windows ((F − W) mod S = 2 and 3), an odd window
PLANS = [(20, 16, 4), (22, 16, 4), (27, 16, 4), (12, 5, 2)]


def temporal_block(window: int, bias: bool, seed: int = 0) -> BasicTransformerBlock:
    """A random AnimateDiff temporal block (layer norm, two self-attentions, sinusoidal positions)."""
    torch.manual_seed(seed)
    block = BasicTransformerBlock(
        32, 2, 16, cross_attention_dim=None, activation_fn="geglu", attention_bias=bias, double_self_attention=True,
        positional_embeddings="sinusoidal", num_positional_embeddings=window + 3,
    )
    if bias:  # diffusers initialises no bias to zero, but make sure it is not zero here
        for attn in (block.attn1, block.attn2):
            torch.nn.init.normal_(attn.to_q.bias, std=0.5)
    return block.eval()


def hidden(frames: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return 3.0 * torch.randn(6, frames, 32) + 0.5


def both_forms(block, attn, norm, x, plan, weighting):
    shared = freenoise._shared_projection_attention(attn, norm, block.pos_embed, x, plan, weighting)
    loop = freenoise._windowed_attention(attn, norm, block.pos_embed, x, plan, weighting, None, None, {})
    return shared, loop


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighting", ["pyramid", "flat"])
@pytest.mark.parametrize("frames, window, stride", PLANS)
def test_shared_projections_are_the_window_loop(frames, window, stride, weighting, bias, processor):
    block = temporal_block(window, bias)
    for attn in (block.attn1, block.attn2):
        attn.set_processor(processor())
    x = hidden(frames)
    plan = plan_windows(frames, window, stride)
    with torch.no_grad():
        for attn, norm in ((block.attn1, block.norm1), (block.attn2, block.norm2)):
            assert freenoise._shares_projections(attn, norm, block.pos_embed, x, plan, None, None, {})
            shared, loop = both_forms(block, attn, norm, x, plan, weighting)
            assert shared.shape == loop.shape == x.shape
            assert_close_to_scale(shared, loop, rel=2e-6)


def test_positions_matter_here():
    # the comparison above would pass without the positional term if it did not change the output
    block = temporal_block(16, False)
    x = hidden(22)
    plan = plan_windows(22, 16, 4)
    with torch.no_grad():
        with_positions = freenoise._windowed_attention(block.attn1, block.norm1, block.pos_embed, x, plan, "pyramid",
                                                       None, None, {})
        without = freenoise._windowed_attention(block.attn1, block.norm1, None, x, plan, "pyramid", None, None, {})
    assert (with_positions - without).abs().max() > 1e-2 * with_positions.abs().max()


def count_shared(monkeypatch) -> list:
    """Record every call of the shared-projection form."""
    calls = []
    original = freenoise._shared_projection_attention

    def spy(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(freenoise, "_shared_projection_attention", spy)
    return calls


def reference_block(block, x, window, stride, monkeypatch):
    """`windowed_block_forward` with attention fusion run by the per-window loop."""
    with monkeypatch.context() as patch:
        patch.setattr(freenoise, "_shares_projections", lambda *args, **kwargs: False)
        return windowed_block_forward(block, x, window, stride, fusion="attention")


def test_default_block_takes_the_shared_form(monkeypatch):
    block = temporal_block(16, False)
    x = hidden(22)
    with torch.no_grad():
        expected = reference_block(block, x, 16, 4, monkeypatch)
        calls = count_shared(monkeypatch)
        result = windowed_block_forward(block, x, 16, 4, fusion="attention")
    assert calls == [block.attn1, block.attn2]
    assert_close_to_scale(result, expected, rel=2e-6)


class TaggedProcessor(AttnProcessor2_0):
    """A user processor: the same computation under another type, so the shared form must not assume it."""


@pytest.mark.parametrize("change", ["processor", "rescale", "mask"])
def test_other_attentions_take_the_window_loop(monkeypatch, change):
    block = temporal_block(16, False)
    x = hidden(22)
    plan = plan_windows(22, 16, 4)
    mask = None
    if change == "processor":
        block.attn1.set_processor(TaggedProcessor())
    elif change == "rescale":
        block.attn1.rescale_output_factor = 2.0
    else:
        mask = torch.zeros(6, 1, 16)
    assert not freenoise._shares_projections(block.attn1, block.norm1, block.pos_embed, x, plan, None, mask, {})
    calls = count_shared(monkeypatch)
    with torch.no_grad():
        windowed_block_forward(block, x, 16, 4, attention_mask=mask, fusion="attention")
    assert block.attn1 not in calls


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-shared"), max_length=16)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    return load(GuidedAnimateDiffPipeline, tiny_dir)


@pytest.mark.parametrize("split", [{}, {"temporal_chunk": 7}])
def test_pipeline_frames_are_those_of_the_window_loop(tiny_pipe, monkeypatch, split):
    hook = dict(context_length=16, context_stride=4, fusion="attention", **split)
    with monkeypatch.context() as patch:
        patch.setattr(freenoise, "_shares_projections", lambda *args, **kwargs: False)
        expected = video(tiny_pipe, 22, hooks=[guidekit.FreeNoise(**hook)])
    calls = count_shared(monkeypatch)
    result = video(tiny_pipe, 22, hooks=[guidekit.FreeNoise(**hook)])
    temporal = {id(attn) for _, block in motion_blocks(tiny_pipe.unet) for attn in (block.attn1, block.attn2)}
    assert {id(attn) for attn in calls} == temporal  # every temporal attention took the shared form
    assert_close_to_scale(result, expected, rel=1e-5)


@pytest.mark.parametrize("fusion", ["block", "attention"])
def test_bench_times_the_chosen_fusion(tiny_dir, fusion):
    import guidekit.apps.bench as bench

    _, extra = bench._freenoise_pipeline("guidekit-split", str(tiny_dir), fusion)
    (hook,) = extra["hooks"]
    assert hook.fusion == fusion
    assert bench._freenoise_pipeline("guidekit", str(tiny_dir))[1]["hooks"][0].fusion == "block"


def test_row_chunks_cover_the_rows_once():
    row_bytes = freenoise.window_tensor_bytes(1, 13, 16, 320, 8, 2)
    for device in ("cpu", "meta"):
        for budget in (None, 10**6, 2**26):
            chunks = freenoise._row_chunks(1000, row_bytes, 13 * 16 * 320, budget, torch.device(device))
            assert [i for c in chunks for i in range(1000)[c]] == list(range(1000))
    assert len(freenoise._row_chunks(1000, row_bytes, 13 * 16 * 320, None, torch.device("cpu"))) > 1  # cache
    assert freenoise._row_chunks(1000, row_bytes, 13 * 16 * 320, None, torch.device("meta")) == [slice(0, 1000)]


def test_chunked_rows_and_gradients_are_the_window_loop(monkeypatch):
    monkeypatch.setattr(freenoise, "_row_chunks", lambda rows, *args: [slice(0, 4), slice(4, rows)])
    block = temporal_block(5, True)
    x = hidden(12).requires_grad_()
    plan = plan_windows(12, 5, 2)
    shared, loop = both_forms(block, block.attn1, block.norm1, x, plan, "pyramid")
    assert_close_to_scale(shared, loop, rel=2e-6)
    (grad_shared,) = torch.autograd.grad(shared.square().sum(), x)
    (grad_loop,) = torch.autograd.grad(loop.square().sum(), x)
    assert_close_to_scale(grad_shared, grad_loop, rel=1e-5)
