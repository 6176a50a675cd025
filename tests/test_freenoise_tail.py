"""FreeNoise's tail window [F − W, F): block fusion against diffusers' own FreeNoise (its
`FreeNoiseTransformerBlock` and `AnimateDiffPipeline.enable_free_noise`), and both tail options of both fusions
against the fusion written out."""

import copy

import pytest
import torch
from diffusers import AnimateDiffPipeline
from diffusers.models.attention import BasicTransformerBlock, FreeNoiseTransformerBlock

import guidekit
from guidekit.attention.freenoise import windowed_block_forward
from guidekit.pipelines import GuidedAnimateDiffPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from guidekit.video import fuse_windows, plan_windows, window_weights
from animatediff_calls import load, video
from tolerance import assert_close_to_scale

W, S = 16, 4
# no tail (20, 24), one frame after the last regular window (21, 25), two or three (22, 23, 27, 30)
FRAMES = [20, 21, 22, 23, 25, 27, 30]
BLOCK_ARGS = ("dim", "num_attention_heads", "attention_head_dim", "dropout", "cross_attention_dim", "activation_fn",
              "attention_bias", "only_cross_attention", "double_self_attention", "positional_embeddings",
              "num_positional_embeddings")


def temporal_block(seed: int = 0) -> BasicTransformerBlock:
    """A random AnimateDiff temporal block (two self-attentions, sinusoidal positions for W frames)."""
    torch.manual_seed(seed)
    block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=None, activation_fn="geglu",
                                  double_self_attention=True, positional_embeddings="sinusoidal",
                                  num_positional_embeddings=W)
    return block.eval()


def diffusers_block(block, weighting: str) -> FreeNoiseTransformerBlock:
    """diffusers' FreeNoiseTransformerBlock with `block`'s weights, as `enable_free_noise` builds it."""
    fused = FreeNoiseTransformerBlock(**{name: getattr(block, name) for name in BLOCK_ARGS}, context_length=W,
                                      context_stride=S, weighting_scheme=weighting)
    fused.load_state_dict(block.state_dict(), strict=True)
    return fused.eval()


def regular_stop(num_frames: int) -> int:
    """The last frame + 1 of the regular windows (starts 0, S, 2S, …)."""
    return (num_frames - W) // S * S + W


@pytest.mark.parametrize("num_frames", FRAMES)
@pytest.mark.parametrize("weighting", ["pyramid", "flat"])
def test_block_fusion_is_diffusers_block_where_it_is_correct(num_frames, weighting):
    block = temporal_block()
    hidden = torch.randn(3, num_frames, 32, generator=torch.Generator().manual_seed(num_frames))
    with torch.no_grad():
        ours = windowed_block_forward(block, hidden, W, S, weighting, fusion="block")
        theirs = diffusers_block(block, weighting)(hidden)
        # diffusers' flat weights are always normalised right, and a frame only the tail window covers is that
        # window's output whatever the weights: the reference for the tail frames
        flat = diffusers_block(block, "flat")(hidden)
    covered = regular_stop(num_frames)
    assert_close_to_scale(ours[:, :covered], theirs[:, :covered], rel=1e-6)
    assert_close_to_scale(ours[:, covered:], flat[:, covered:], rel=1e-6)
    if weighting == "flat" or num_frames - covered <= 1:
        assert_close_to_scale(ours, theirs, rel=1e-6)  # diffusers is right on every frame here


def test_the_full_tail_is_a_different_fusion():
    block = temporal_block()
    hidden = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        new = windowed_block_forward(block, hidden, W, S, "pyramid", fusion="block")
        full = windowed_block_forward(block, hidden, W, S, "pyramid", fusion="block", tail="full")
    difference = (new - full).abs().amax(dim=(0, 2))
    # the tail window (5, 21) changes frames 5–19 only with the full tail
    assert difference[:5].max() == 0 and bool((difference[5:20] > 1e-3).all())


def literal_block(block, hidden, spans, weighting, fusion):
    """FreeNoise's fusion written out: per window the attention half (block) or each attention (attention),
    each window contributing the frames of its span with its weights, each frame's weights normalised."""
    num_frames = hidden.size(1)

    def fuse(outputs):
        total = torch.zeros_like(hidden)
        weight = torch.zeros(num_frames, 1, dtype=hidden.dtype)
        for ((start, stop), (first, _)), output in zip(spans, outputs):
            w = window_weights(stop - start, weighting)[first - start:].to(hidden.dtype)[:, None]
            total[:, first:stop] += w * output[:, first - start:]
            weight[first:stop] += w
        return total / weight

    def attention(attn, norm, x):
        return fuse([attn(block.pos_embed(norm(x[:, start:stop]))) for (start, stop), _ in spans])

    if fusion == "block":
        outputs = []
        for (start, stop), _ in spans:
            x = hidden[:, start:stop]
            x = x + block.attn1(block.pos_embed(block.norm1(x)))
            outputs.append(x + block.attn2(block.pos_embed(block.norm2(x))))
        h = fuse(outputs)
    else:
        h = hidden + attention(block.attn1, block.norm1, hidden)
        h = h + attention(block.attn2, block.norm2, h)
    return h + block.ff(block.norm3(h))


@pytest.mark.parametrize("fusion", ["block", "attention"])
@pytest.mark.parametrize("tail", ["new", "full"])
@pytest.mark.parametrize("num_frames", [21, 27])
def test_both_tails_of_both_fusions_are_the_written_out_fusion(fusion, tail, num_frames):
    block = temporal_block(1)
    hidden = torch.randn(2, num_frames, 32, generator=torch.Generator().manual_seed(2))
    plan = plan_windows(num_frames, W, S)
    if tail == "full":
        spans = [(window, window) for window in plan]
    else:
        spans = [(window, window) for window in plan[:-1]] + [(plan[-1], (regular_stop(num_frames), num_frames))]
    with torch.no_grad():
        result = windowed_block_forward(block, hidden, W, S, "pyramid", fusion=fusion, tail=tail)
        expected = literal_block(block, hidden, spans, "pyramid", fusion)
    assert_close_to_scale(result, expected, rel=2e-6)


def test_attention_fusion_keeps_the_full_tail_by_default():
    # the official VideoCrafter fusion over every window of the plan, the tail window included
    block = temporal_block(1)
    hidden = torch.randn(2, 27, 32, generator=torch.Generator().manual_seed(3))
    plan = plan_windows(27, W, S)

    def fused(attn, norm, x):
        return fuse_windows([attn(block.pos_embed(norm(x[:, a:b]))) for a, b in plan], plan, 27, "pyramid")

    with torch.no_grad():
        h = hidden + fused(block.attn1, block.norm1, hidden)
        h = h + fused(block.attn2, block.norm2, h)
        expected = h + block.ff(block.norm3(h))
        result = windowed_block_forward(block, hidden, W, S, "pyramid", fusion="attention")
    assert_close_to_scale(result, expected, rel=1e-6)
    assert guidekit.FreeNoise().tail == "full" and guidekit.FreeNoise(fusion="block").tail == "new"


def test_fused_spans_worked_by_hand():
    from guidekit.video import fused_spans

    assert fused_spans(22, 16, 4, "new") == [((0, 16), (0, 16)), ((4, 20), (4, 20)), ((6, 22), (20, 22))]
    assert fused_spans(22, 16, 4, "full") == [((0, 16), (0, 16)), ((4, 20), (4, 20)), ((6, 22), (6, 22))]
    assert fused_spans(20, 16, 4, "new") == fused_spans(20, 16, 4, "full")  # no tail window
    assert fused_spans(18, 16, 4, "new") == [((0, 16), (0, 16)), ((2, 18), (16, 18))]
    assert fused_spans(12, 16, 4, "new") == [((0, 12), (0, 12))]
    with pytest.raises(ValueError, match="tail: 'end' is not accepted"):
        fused_spans(22, 16, 4, "end")
    with pytest.raises(ValueError, match="tail"):
        guidekit.FreeNoise(tail="diffusers")


# ---------------------------------------------------------------- the pipeline, against enable_free_noise


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff-tail"), max_length=16)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load(GuidedAnimateDiffPipeline, tiny_dir)


@pytest.fixture(scope="module")
def stock(tiny_dir):
    return load(AnimateDiffPipeline, tiny_dir)


@pytest.mark.parametrize(
    "num_frames, weighting",
    [(20, "pyramid"), (21, "pyramid"), (25, "pyramid"), (22, "flat"), (27, "flat"), (21, "flat")],
)
def test_block_fusion_is_diffusers_free_noise(ours, stock, num_frames, weighting):
    # where diffusers' tail is right: no tail window, one tail frame, or flat weights
    hook = guidekit.FreeNoise(context_length=W, context_stride=S, weighting=weighting, noise="shuffle", fusion="block")
    result = video(ours, num_frames, hooks=[hook])
    stock.enable_free_noise(context_length=W, context_stride=S, weighting_scheme=weighting,
                            noise_type="shuffle_context")
    try:
        expected = video(stock, num_frames)
    finally:
        stock.disable_free_noise()
    assert result.shape == (1, 4, num_frames, 8, 8)
    assert_close_to_scale(result, expected, rel=1e-5)
