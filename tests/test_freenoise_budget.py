"""FreeNoise's `attention_budget`: attention fusion with shared projections attends its windows in chunks of pixel
rows whose gathered tensors stay within the budget on every device, with the same result as one batch."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import guidekit
from guidekit.attention import freenoise
from guidekit.attention.freenoise import DEFAULT_ATTENTION_BUDGET, record_window_tensors, window_tensor_bytes
from guidekit.pipelines import GuidedAnimateDiffPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from guidekit.video import plan_windows
from animatediff_calls import load, video
from tolerance import assert_close_to_scale


def temporal_block(seed: int = 0) -> BasicTransformerBlock:
    torch.manual_seed(seed)
    block = BasicTransformerBlock(32, 2, 16, cross_attention_dim=None, activation_fn="geglu",
                                  double_self_attention=True, positional_embeddings="sinusoidal",
                                  num_positional_embeddings=16)
    return block.eval()


@pytest.mark.parametrize("device", ["cuda", "mps", "meta", "cpu"])
@pytest.mark.parametrize("num_frames, windows", [(64, 13), (256, 61)])
def test_default_budget_bounds_the_gathered_tensors_on_every_device(device, num_frames, windows):
    # SD 1.5's largest temporal layer at 512 px with guidance: 2·64·64 pixel rows, 320 channels, 8 heads, fp16
    rows, inner, heads, itemsize = 2 * 64 * 64, 320, 8, 2
    assert len(plan_windows(num_frames, 16, 4)) == windows
    row_bytes = window_tensor_bytes(1, windows, 16, inner, heads, itemsize)
    full_query = rows * num_frames * inner * itemsize
    # unbounded, the windows' queries are n·W/F times a full-length one: 3.25 at F = 64, 3.8125 at F = 256
    assert rows * row_bytes == pytest.approx(windows * 16 / num_frames * full_query)
    chunks = freenoise._row_chunks(rows, row_bytes, windows * 16 * inner, DEFAULT_ATTENTION_BUDGET,
                                   torch.device(device))
    assert [i for c in chunks for i in range(rows)[c]] == list(range(rows))
    assert max(c.stop - c.start for c in chunks) * row_bytes <= DEFAULT_ATTENTION_BUDGET


def test_a_budget_below_one_row_takes_one_row():
    row_bytes = window_tensor_bytes(1, 13, 16, 320, 8, 2)
    chunks = freenoise._row_chunks(5, row_bytes, 13 * 16 * 320, 1, torch.device("cuda"))
    assert chunks == [slice(i, i + 1) for i in range(5)]


def spy_window_attention(monkeypatch) -> list:
    """The bytes of every batch of gathered queries the shared form attends."""
    sizes = []
    original = freenoise._window_attention

    def spy(attn, query, key, value):
        sizes.append(query.numel() * query.element_size())
        return original(attn, query, key, value)

    monkeypatch.setattr(freenoise, "_window_attention", spy)
    return sizes


@pytest.mark.parametrize("tail", ["new", "full"])
def test_chunked_is_unchunked(monkeypatch, tail):
    monkeypatch.setattr(freenoise, "_CPU_CACHE_ELEMENTS", 1 << 40)  # the budget alone splits, as off the CPU
    block = temporal_block()
    hidden = torch.randn(50, 27, 32, generator=torch.Generator().manual_seed(0))
    plan = plan_windows(27, 16, 4)
    row_bytes = window_tensor_bytes(1, len(plan), 16, 32, 2, 4)
    sizes = spy_window_attention(monkeypatch)
    with torch.no_grad():
        whole = freenoise.windowed_block_forward(block, hidden, 16, 4, fusion="attention", tail=tail,
                                                 attention_budget=None)
        assert sizes == [50 * row_bytes] * 2  # one batch of all rows per attention
        sizes.clear()
        chunked = freenoise.windowed_block_forward(block, hidden, 16, 4, fusion="attention", tail=tail,
                                                   attention_budget=7 * row_bytes + 5)
    assert sizes == ([7 * row_bytes] * 7 + [row_bytes]) * 2  # 50 rows: 7 chunks of 7 and one of 1, per attention
    assert_close_to_scale(chunked, whole, rel=1e-6)


def test_record_counts_the_bounded_and_the_unbounded_size(monkeypatch):
    block = temporal_block()
    hidden = torch.randn(40, 64, 32, generator=torch.Generator().manual_seed(1))
    row_bytes = window_tensor_bytes(1, 13, 16, 32, 2, 4)
    with torch.no_grad(), record_window_tensors() as record:
        freenoise.windowed_block_forward(block, hidden, 16, 4, fusion="attention", attention_budget=3 * row_bytes)
    assert record.largest == 3 * row_bytes
    assert record.unbounded == 40 * row_bytes
    assert record.full_query == 40 * 64 * 32 * 4
    assert record.unbounded / record.full_query == pytest.approx(13 * 16 / 64)  # 3.25
    with torch.no_grad(), record_window_tensors() as per_window:
        freenoise.windowed_block_forward(block, hidden, 16, 4, fusion="block")
    assert per_window.largest == per_window.unbounded == window_tensor_bytes(40, 1, 16, 32, 2, 4)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return load(GuidedAnimateDiffPipeline, make_tiny_animatediff(tmp_path_factory.mktemp("tiny-budget"), max_length=16))


def test_pipeline_with_a_small_budget_is_the_unbounded_one(tiny_pipe, monkeypatch):
    monkeypatch.setattr(freenoise, "_CPU_CACHE_ELEMENTS", 1 << 40)
    sizes = spy_window_attention(monkeypatch)
    unbounded = video(tiny_pipe, 22, hooks=[guidekit.FreeNoise(attention_budget=None)])
    largest_unbounded = max(sizes)
    sizes.clear()
    bounded = video(tiny_pipe, 22, hooks=[guidekit.FreeNoise(attention_budget=8192)])
    assert max(sizes) <= 8192 < largest_unbounded
    assert_close_to_scale(bounded, unbounded, rel=1e-5)


@pytest.mark.parametrize("value", [0, -1, 1.5, "64MiB"])
def test_budget_errors(value):
    with pytest.raises(ValueError, match="attention_budget"):
        guidekit.FreeNoise(attention_budget=value)
