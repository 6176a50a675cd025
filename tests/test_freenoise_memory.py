"""FreeNoise's memory splitting: chunked spatial layers and temporal blocks give the unsplit video; the
`guidekit bench --freenoise` tables build (on a very small case, nothing timed)."""

import json

import pytest
import torch
from click.testing import CliRunner

import guidekit
from guidekit.apps.cli import main
from guidekit.attention.freenoise import motion_blocks
from guidekit.pipelines import GuidedAnimateDiffPipeline
from guidekit.testing.animatediff import make_tiny_animatediff
from guidekit.video import chunked_layers
from guidekit.video.motion import spatial_layers
from tolerance import assert_close_to_scale

KW = dict(prompt="a red circle", height=16, width=16, num_inference_steps=2, output_type="latent", guidance_scale=7.5)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff-memory"), max_length=16)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    pipe = GuidedAnimateDiffPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def video(pipe, num_frames, seed=0, **kw):
    return pipe(num_frames=num_frames, generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).frames


class _Rows:
    """Forward pre-hooks recording the largest axis-0 size each group of submodules receives."""

    def __init__(self, modules):
        self.largest = 0
        self.handles = [m.register_forward_pre_hook(self._record) for m in modules]

    def _record(self, module, args):
        self.largest = max(self.largest, args[0].shape[0])

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _probes(unet):
    """The first convolution of every resnet (rows: batch×frames) and every temporal block's first norm
    (rows: batch×pixels; run by the per-window and the shared-projection attention fusion alike): inner
    modules, so they see the chunks the layers are run on."""
    resnets = [m.conv1 for name, m in spatial_layers(unet) if ".resnets." in name]
    attentions = [block.norm1 for _, block in motion_blocks(unet)]
    return _Rows(resnets), _Rows(attentions)


@pytest.mark.parametrize("fusion", ["block", "attention"])
def test_split_long_video_equals_unsplit(ours, fusion):
    # with guidance the UNet batch holds 2 × 20 = 40 frames; 7 and 9 do not divide the rows
    plain = video(ours, 20, hooks=[guidekit.FreeNoise(fusion=fusion)])
    spatial, temporal = _probes(ours.unet)
    try:
        split = video(ours, 20, hooks=[guidekit.FreeNoise(fusion=fusion, spatial_chunk=7, temporal_chunk=9)])
    finally:
        spatial.remove()
        temporal.remove()
    assert_close_to_scale(split, plain, rel=1e-5)
    assert spatial.largest == 7 and temporal.largest == 9  # the chunks were really used


def test_split_with_window_norm_and_short_video(ours):
    hook = guidekit.FreeNoise(norm_scope="window", spatial_chunk=5, temporal_chunk=16)
    assert_close_to_scale(video(ours, 22, hooks=[hook]), video(ours, 22, hooks=[guidekit.FreeNoise(norm_scope="window")]),
                          rel=1e-5)
    # F <= W: the plain model, split
    assert_close_to_scale(video(ours, 8, hooks=[guidekit.FreeNoise(spatial_chunk=3)]), video(ours, 8), rel=1e-5)


def test_unsplit_rows_are_the_whole_batch(ours):
    # the probes' own check: without chunks the layers see every row at once
    spatial, temporal = _probes(ours.unet)
    try:
        video(ours, 20, hooks=[guidekit.FreeNoise()], num_inference_steps=1)
    finally:
        spatial.remove()
        temporal.remove()
    assert spatial.largest == 40 and temporal.largest > 9


def test_layers_are_restored(ours):
    video(ours, 20, hooks=[guidekit.FreeNoise(spatial_chunk=4, temporal_chunk=8)], num_inference_steps=1)
    layers = [m for _, m in spatial_layers(ours.unet)] + [b for _, b in motion_blocks(ours.unet)]
    assert layers and all("forward" not in layer.__dict__ for layer in layers)


def test_chunked_layers_on_the_plain_unet(ours):
    unet = ours.unet
    sample = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    embeddings = torch.randn(16, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = unet(sample, torch.tensor(300), encoder_hidden_states=embeddings).sample
        with chunked_layers(unet, spatial_chunk=3, temporal_chunk=5):
            split = unet(sample, torch.tensor(300), encoder_hidden_states=embeddings).sample
    assert_close_to_scale(split, plain, rel=1e-5)
    names = [name for name, _ in spatial_layers(unet)]
    assert any(".resnets." in n for n in names) and any(".attentions." in n for n in names)
    assert any("samplers." in n for n in names) and not any("motion_modules" in n for n in names)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_chunk": 0}, "spatial_chunk"),
        ({"spatial_chunk": 2.5}, "spatial_chunk"),
        ({"temporal_chunk": 0}, "temporal_chunk"),
        ({"temporal_chunk": "8"}, "temporal_chunk"),
    ],
)
def test_chunk_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        guidekit.FreeNoise(**kwargs)


# ---------------------------------------------------------------- the bench table


def test_bench_freenoise_tables_build(monkeypatch, tmp_path):
    """Tiny lengths, one step, workers in this process: the tables and the JSON come out (no timing asserted)."""
    import guidekit.apps.bench as bench_mod

    calls = []

    def in_process(kind, *args):
        calls.append((kind, *args[:-4]) if kind == "memory" else (kind, args[1], args[-3]))
        run = bench_mod.time_freenoise if kind == "time" else bench_mod.measure_freenoise_memory
        return run(*[str(a) if isinstance(a, type(tmp_path)) else a for a in args])

    monkeypatch.setattr(bench_mod, "_run_freenoise_worker", in_process)
    out = tmp_path / "bench.json"
    args = ["bench", "--no-sd", "--no-elucd", "--no-styleid", "--no-stylessp", "--no-uam", "--freenoise",
            "--rounds", "2", "--freenoise-size", "16", "--freenoise-steps", "1", "--freenoise-frames", "4,20",
            "--freenoise-memory-frames", "4,20", "--freenoise-fusion", "attention", "--freenoise-attention-budget",
            "0.001", "--json", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [c[0] for c in calls] == ["time"] + ["memory"] * 4
    assert calls[0][1:] == ([4, 20], 2)
    assert sorted((c[1], c[3]) for c in calls[1:]) == [("guidekit", 4), ("guidekit", 20), ("guidekit-split", 4),
                                                      ("guidekit-split", 20)]
    assert "| guidekit FreeNoise (attention fusion), time per frame F=20 vs F=4 | <= 1.10 |" in result.output
    assert "| guidekit FreeNoise (attention fusion) vs diffusers enable_free_noise, F=20 | <= 1.00 |" in result.output
    assert "peak RSS rise, unsplit (MiB)" in result.output
    assert "largest gathered Q/K/V/score (MiB), unsplit" in result.output
    data = json.loads(out.read_text())["freenoise"]
    assert [row["frames"] for row in data["memory"]] == [4, 20]
    long = data["memory"][1]
    # F=20: windows (0, 16), (4, 20); the budget (0.001 MiB) is below one pixel row's windows here, so one row
    # at a time, while unbounded the two windows' queries are 2·16/20 = 1.6 times a full-length query
    assert 0 < long["window_tensor_mib"] < long["unbounded_mib"]
    assert long["unbounded_mib"] >= 1.6 * long["full_query_mib"] - 1e-12
    assert all(row["wall_ratio"] > 0 and row["cpu_ratio"] > 0 and row["runs"] == 2 for row in data["time"])
    assert sorted((r["case"], r["frames"]) for r in data["runs"][:6]) == [("diffusers", 20)] * 2 + [
        ("guidekit", 4)] * 2 + [("guidekit", 20)] * 2


def test_bench_frame_options_are_checked():
    result = CliRunner().invoke(main, ["bench", "--freenoise", "--freenoise-frames", "64"])
    assert result.exit_code != 0 and "--freenoise-frames" in result.output


def test_split_with_motion_injection_equals_unsplit(ours):
    # injection replaces the conditional rows (the last ones of the batch) of the down/mid cross-attention;
    # a chunk holds some of them, or none, and must be injected on exactly those
    travel = {0: "a red circle", 12: "a blue square"}
    kw = dict(prompt=travel, num_inference_steps=3)
    plain = video(ours, 20, hooks=[guidekit.FreeNoise(motion_injection=True)], **kw)
    split = video(ours, 20, hooks=[guidekit.FreeNoise(motion_injection=True, spatial_chunk=7)], **kw)
    assert_close_to_scale(split, plain, rel=1e-5)
    uninjected = video(ours, 20, hooks=[guidekit.FreeNoise()], **kw)
    assert (plain - uninjected).abs().max() > 1e-4  # the injection shows in this video


def test_split_sdxl_equals_unsplit(tmp_path_factory):
    # SDXL's added embeddings reach the resnets through temb, one row per frame like the rest
    from guidekit.pipelines import GuidedAnimateDiffSDXLPipeline
    from guidekit.testing.animatediff import make_tiny_animatediff_sdxl

    folder = make_tiny_animatediff_sdxl(tmp_path_factory.mktemp("tiny-animatediff-sdxl-memory"))
    pipe = GuidedAnimateDiffSDXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    plain = video(pipe, 20, hooks=[guidekit.FreeNoise(norm_scope="window")])
    split = video(pipe, 20, hooks=[guidekit.FreeNoise(norm_scope="window", spatial_chunk=6, temporal_chunk=10)])
    assert_close_to_scale(split, plain, rel=1e-5)
