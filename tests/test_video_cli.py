"""`guidekit.video.save_video` (GIF/WebP round trips and refusals) and `guidekit video` on a tiny AnimateDiff
checkpoint: frame count, prompt travel, and its usage errors."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageSequence

from guidekit.apps.cli import SUBCOMMANDS, main
from guidekit.video import save_video

MAX_LENGTH = 16  # the tiny adapter's motion_max_seq_length


def distinct_frames(count=5, height=12, width=20):
    """uint8 frames (F, H, W, 3), each a different flat colour with a moving bar, so no two are alike."""
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        frames[i] = (40 * i % 256, 255 - 30 * i % 256, 90)
        frames[i, :, i % width] = 255
    return frames


def read_back(path):
    with Image.open(path) as im:
        return im.format, im.size, sum(1 for _ in ImageSequence.Iterator(im)), im.info.get("loop")


# ---------------------------------------------------------------- save_video


@pytest.mark.parametrize("suffix, fmt", [(".gif", "GIF"), (".webp", "WEBP"), (".GIF", "GIF")])
def test_round_trip_frame_count_and_size(tmp_path, suffix, fmt):
    path = save_video(distinct_frames(5), tmp_path / f"v{suffix}", fps=10)
    assert read_back(path)[:3] == (fmt, (20, 12), 5)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("kind", ["float", "pil", "torch_first", "torch_last"])
def test_every_input_layout_gives_the_same_video(tmp_path, kind):
    uint8 = distinct_frames(4)
    floats = uint8.astype(np.float32) / 255.0
    frames = {
        "float": floats,
        "pil": [Image.fromarray(f) for f in uint8],
        "torch_first": torch.from_numpy(floats).permute(0, 3, 1, 2),
        "torch_last": torch.from_numpy(floats),
    }[kind]
    save_video(uint8, tmp_path / "ref.webp")
    save_video(frames, tmp_path / "x.webp")
    assert read_back(tmp_path / "x.webp")[:3] == ("WEBP", (20, 12), 4)
    with Image.open(tmp_path / "ref.webp") as a, Image.open(tmp_path / "x.webp") as b:
        for fa, fb in zip(ImageSequence.Iterator(a), ImageSequence.Iterator(b)):
            assert fa.convert("RGB").tobytes() == fb.convert("RGB").tobytes()  # lossless WebP: exact


def test_fps_and_loop_are_stored(tmp_path):
    save_video(distinct_frames(3), tmp_path / "v.gif", fps=5, loop=2)
    with Image.open(tmp_path / "v.gif") as im:
        assert im.info["duration"] == 200 and im.info["loop"] == 2


def test_bad_suffix_names_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match=r"\.gif, \.webp"):
        save_video(distinct_frames(2), tmp_path / "v.avi")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", [1.5, -0.01, float("nan"), float("inf")])
@pytest.mark.parametrize("as_torch", [False, True])
def test_values_outside_unit_range_are_refused_not_clamped(tmp_path, value, as_torch):
    frames = np.full((2, 4, 4, 3), 0.5, dtype=np.float32)
    frames[1, 2, 3, 0] = value
    if as_torch:
        frames = torch.from_numpy(frames)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_video(frames, tmp_path / "v.gif")
    assert not list(tmp_path.iterdir())


def test_existing_file_is_replaced_whole(tmp_path):
    path = tmp_path / "v.gif"
    save_video(distinct_frames(3), path)
    save_video(distinct_frames(6), path)
    assert read_back(path)[2] == 6


@pytest.mark.parametrize("frames", [[], np.zeros((2, 4, 4)), np.zeros((2, 4, 4, 3), dtype=np.int64), "frames"])
def test_other_inputs_are_refused(tmp_path, frames):
    with pytest.raises(ValueError, match="frames"):
        save_video(frames, tmp_path / "v.gif")


# ---------------------------------------------------------------- guidekit video


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from guidekit.testing.animatediff import make_tiny_animatediff

    folder = make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff"), max_length=MAX_LENGTH)
    return folder / "_image", folder / "_adapter"


def invoke(tiny, *args, out=None):
    model, adapter = tiny
    base = ["video", "--model", str(model), "--motion-adapter", str(adapter), "--steps", "2", "--size", "16"]
    if out is not None:
        base += ["--out", str(out)]
    return CliRunner().invoke(main, base + list(args))


def test_command_is_registered():
    assert SUBCOMMANDS["video"] == "guidekit.apps.video:video"
    assert "video" in CliRunner().invoke(main, ["--help"]).output


@pytest.mark.parametrize("frames, extra", [(6, ["--no-freenoise"]), (20, []), (20, ["--fusion", "block", "--apg"])])
def test_writes_a_gif_with_the_asked_frames(tiny, tmp_path, frames, extra):
    out = tmp_path / "v.gif"
    result = invoke(tiny, "a red circle", "--frames", str(frames), *extra, out=out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} ({frames} frames, 16x16" in result.output
    assert read_back(out)[:3] == ("GIF", (16, 16), frames)
    if frames > MAX_LENGTH:
        assert "FreeNoise W=16 S=4" in result.output


def test_prompt_travel_with_motion_injection_writes_webp(tiny, tmp_path):
    out = tmp_path / "travel.webp"
    result = invoke(tiny, "--prompt", "0:a red circle", "--prompt", "19:a blue circle", "--frames", "20",
                    "--context-stride", "2", "--motion-injection", "--injection-blocks", "up,down", "--fps", "4",
                    out=out)
    assert result.exit_code == 0, result.output
    assert "2 key prompts" in result.output and "motion injection (down,up)" in result.output
    assert read_back(out)[:3] == ("WEBP", (16, 16), 20)


def test_prompt_travel_reaches_the_pipeline(tiny, tmp_path, monkeypatch):
    from guidekit.pipelines import GuidedAnimateDiffPipeline

    seen = {}
    original = GuidedAnimateDiffPipeline.__call__

    def spy(self, prompt=None, **kwargs):
        seen["prompt"], seen["hooks"] = prompt, kwargs.get("hooks")
        return original(self, prompt, **kwargs)

    monkeypatch.setattr(GuidedAnimateDiffPipeline, "__call__", spy)
    result = invoke(tiny, "a cat", "--prompt", "5: a dog ", "--prompt", "2:a bird", "--frames", "8",
                    "--context-length", "4", "--context-stride", "2", out=tmp_path / "t.gif")
    assert result.exit_code == 0, result.output
    assert seen["prompt"] == {0: "a cat", 2: "a bird", 5: "a dog"}
    (freenoise,) = seen["hooks"]
    assert (freenoise.context_length, freenoise.context_stride, freenoise.fusion) == (4, 2, "attention")


@pytest.mark.parametrize(
    "args, option, message",
    [
        (["--prompt", "a red circle"], "'--prompt'", "FRAME:TEXT"),
        (["--prompt", "-1:a red circle"], "'--prompt'", "FRAME:TEXT"),
        (["--prompt", "3:"], "'--prompt'", "FRAME:TEXT"),
        (["--prompt", "8:a red circle"], "'--prompt'", "not below --frames 8"),
        (["--prompt", "0:a", "--prompt", "0:b"], "'--prompt'", "given twice"),
        (["x", "--context-length", "17"], "'--context-length'", "motion_max_seq_length 16"),
        (["x", "--context-stride", "5", "--context-length", "4"], "'--context-stride'", "--context-length 4"),
        (["x", "--motion-injection"], "'--motion-injection'", "--prompt"),
        (["x", "--injection-blocks", "down"], "'--injection-blocks'", "--motion-injection"),
        (["--prompt", "0:a", "--motion-injection", "--injection-blocks", "down,side"], "'--injection-blocks'",
         "comma-separated selection of down, mid, up"),
        (["--prompt", "0:a", "--motion-injection", "--injection-blocks", "up,up"], "'--injection-blocks'",
         "each at most once"),
        (["x", "--no-freenoise", "--frames", "17"], "'--frames'", "motion_max_seq_length 16"),
        (["x", "--no-freenoise", "--fusion", "block"], "'--fusion'", "--no-freenoise"),
        (["x", "--scale", "nan"], "'--scale'", "finite"),
        (["x", "--size", "9"], "'--size'", "multiple of 8"),
        (["x", "--frames", "0"], "'--frames'", "x>=1"),
        (["x", "--out", "v.avi"], "'--out'", ".gif or .webp"),
    ],
)
def test_usage_errors_name_the_option(tiny, tmp_path, args, option, message):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "v.gif")]
    result = invoke(tiny, "--frames", "8", *args)
    assert result.exit_code == 2, result.output
    assert option in result.output and message in result.output
    assert not (tmp_path / "v.gif").exists()


def test_no_prompt_is_a_usage_error(tiny, tmp_path):
    result = invoke(tiny, out=tmp_path / "v.gif")
    assert result.exit_code == 2 and "PROMPT" in result.output


def test_existing_output_is_kept_without_overwrite(tiny, tmp_path):
    out = tmp_path / "v.gif"
    out.write_bytes(b"keep me")
    result = invoke(tiny, "a red circle", "--frames", "2", out=out)
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"
    result = invoke(tiny, "a red circle", "--frames", "2", "--overwrite", out=out)
    assert result.exit_code == 0, result.output
    assert read_back(out)[2] == 2


@pytest.mark.parametrize("which", ["--model", "--motion-adapter"])
def test_missing_folders_are_clear_errors(tiny, tmp_path, which):
    model, adapter = tiny
    paths = {"--model": str(model), "--motion-adapter": str(adapter)}
    paths[which] = str(tmp_path / "missing")
    result = CliRunner().invoke(main, ["video", "x", "--model", paths["--model"], "--motion-adapter",
                                       paths["--motion-adapter"], "--out", str(tmp_path / "v.gif")])
    assert result.exit_code == 2, result.output
    assert f"'{which}'" in result.output and "is not a folder" in result.output
    # a folder that is not a model: named too
    paths[which] = str(tmp_path)
    result = CliRunner().invoke(main, ["video", "x", "--model", paths["--model"], "--motion-adapter",
                                       paths["--motion-adapter"], "--out", str(tmp_path / "v.gif")])
    assert result.exit_code == 2 and f"'{which}'" in result.output and "has no" in result.output


@pytest.mark.parametrize("given", ["--model", "--motion-adapter"])
def test_model_and_adapter_come_together(tiny, tmp_path, given):
    paths = dict(zip(["--model", "--motion-adapter"], map(str, tiny)))
    result = CliRunner().invoke(main, ["video", "x", given, paths[given], "--out", str(tmp_path / "v.gif")])
    assert result.exit_code != 0
    missing = "--motion-adapter" if given == "--model" else "--model"
    assert missing in result.output and "neither" in result.output
    assert not (tmp_path / "v.gif").exists()


def test_embedded_video_model_is_the_default(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    import guidekit.toy
    from guidekit.toy.train_motion import build_motion_adapter

    unet = UNet2DConditionModel.from_pretrained(str(guidekit.toy.default_model_path()), subfolder="unet")
    build_motion_adapter(unet).save_pretrained(str(tmp_path / "adapter"))
    monkeypatch.setattr(guidekit.toy, "default_motion_adapter_path", lambda: tmp_path / "adapter")
    out = tmp_path / "v.gif"
    result = CliRunner().invoke(main, ["video", "a red circle on a blue background", "--frames", "3", "--steps", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "w=3" in result.output  # the embedded model's guidance scale
    with Image.open(out) as image:
        assert image.n_frames == 3 and image.size == (64, 64)


def test_the_injection_block_names_are_freenoises():
    from guidekit.apps.video import INJECTION_BLOCK_NAMES
    from guidekit.attention.freenoise import INJECTION_BLOCKS

    assert INJECTION_BLOCK_NAMES == tuple(INJECTION_BLOCKS)
