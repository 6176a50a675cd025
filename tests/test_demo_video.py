"""The demo's Long video tab: plain sliding windows vs FreeNoise on a tiny AnimateDiff model, its input checks, the
message without a video model, and the two videos playing in a real headless Chromium."""

from __future__ import annotations

import base64
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from test_demo import demo_page, free_port, needs_browser, set_number  # noqa: E402

torch.set_num_threads(1)

LIMITS = dict(max_steps=8, max_size=64, max_frames=24)


@pytest.fixture(scope="module")
def tiny_video_dir(tmp_path_factory):
    from guidekit.testing.animatediff import make_tiny_animatediff

    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff"), max_length=8)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from guidekit.apps.jobs import load_pipeline

    return load_pipeline(str(tiny_sd_dir))[0]


@pytest.fixture(scope="module")
def video(pipe, tiny_video_dir):
    from guidekit.apps.demo import Limits, video_backend

    backend, note = video_backend(pipe, str(tiny_video_dir), Limits(**LIMITS))
    assert backend is not None and note == ""
    return backend


def frame_count(path) -> int:
    with Image.open(path) as im:
        return getattr(im, "n_frames", 1)


#----------------------------------------------------------------------------
# Without a server.

def test_prompt_text_is_a_prompt_or_a_schedule():
    from guidekit.apps.demo import parse_prompt_text
    from guidekit.apps.jobs import JobError

    assert parse_prompt_text(" a red circle \n on blue ", 16) == "a red circle on blue"
    assert parse_prompt_text("0: a red circle\n\n 12 : a blue circle", 16) == {0: "a red circle", 12: "a blue circle"}
    assert parse_prompt_text("4: a red circle", 16) == "a red circle"
    for text, message in [("", "prompt: required"), ("0: a\nno frame", "is not `FRAME: prompt`"),
                          ("0: a\n16: b", "frame 16 .* is not below the number of frames 16"),
                          ("3: a\n3: b", "frame 3 is given twice"), ("0:", "is not `FRAME: prompt`")]:
        with pytest.raises(JobError, match=message):
            parse_prompt_text(text, 16)


def test_two_videos_with_numbers(video):
    calls = []
    plain, freenoise, summary = video.long_video("0: a red circle\n10: a blue circle", 12, 8, 4, 3, 7.5, 2, 32,
                                                 progress=lambda share, desc: calls.append((share, desc)))
    assert plain.endswith(".webp") and freenoise.endswith(".webp")
    assert frame_count(plain) == frame_count(freenoise) == 12
    assert Image.open(plain).size == (32, 32)
    assert "12 frames, 32x32, 2 steps" in summary and "seed 3" in summary and "2 key prompts" in summary
    assert "| **Sliding windows, i.i.d. noise** |" in summary and "| **FreeNoise** |" in summary
    assert [share for share, _ in calls] == [0.25, 0.5, 0.75, 1.0]
    # the next request replaces the files of the last one
    again = video.long_video("a red circle", 9, 8, 4, 3, 1.0, 1, 32)
    assert not os.path.exists(plain) and frame_count(again[1]) == 9


def test_same_start_when_one_window_covers_every_frame(video):
    import numpy as np

    plain, freenoise, summary = video.long_video("a red circle", 8, 8, 4, 1, 7.5, 2, 32)
    with Image.open(plain) as a, Image.open(freenoise) as b:
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    assert "one window" in summary


def test_fusion_and_motion_injection_reach_both_videos(video, monkeypatch):
    import guidekit.apps.jobs as jobs

    seen = []
    real = jobs.generate_video

    def spy(pipe, params, *args, **kwargs):
        seen.append(params)
        return real(pipe, params, *args, **kwargs)

    monkeypatch.setattr(jobs, "generate_video", spy)
    _, _, summary = video.long_video("0: a red circle\n9: a blue circle", 10, 8, 2, 0, 7.5, 1, 32, "block", True)
    assert [p["freenoise"]["noise"] for p in seen] == ["random", "shuffle"]
    # the official steps, as the job records them (FreeNoise's motion_injection=True)
    assert all(p["freenoise"]["fusion"] == "block" and p["freenoise"]["motion_injection"] == [0.1, 0.3] for p in seen)
    assert "fused at each transformer block" in summary and "motion injection" in summary
    seen.clear()
    _, _, summary = video.long_video("0: a red circle\n9: a blue circle", 10, 8, 2, 0, 7.5, 1, 32)
    assert all(p["freenoise"]["fusion"] == "attention" and p["freenoise"]["motion_injection"] is None for p in seen)
    assert "fused at each temporal attention" in summary and "motion injection" not in summary


def test_embedded_video_model_starts_at_its_scale_and_is_judged(pipe, tiny_video_dir):
    from guidekit.apps.demo import Limits, VideoBackend
    from guidekit.apps.jobs import load_video_pipeline
    from guidekit.toy import DEFAULT_GUIDANCE_SCALE

    vpipe = load_video_pipeline(str(tiny_video_dir), pipe)
    assert VideoBackend(vpipe, Limits(**LIMITS)).default_scale == 7.5
    embedded = VideoBackend(vpipe, Limits(**LIMITS), embedded=True)
    assert embedded.default_scale == DEFAULT_GUIDANCE_SCALE
    size = embedded.default_size
    _, _, summary = embedded.long_video("a red circle on a blue background", 10, 8, 2, 0, 3.0, 1, size)
    assert "| judge: frames read as their prompt | teleports |" in summary and "/10 |" in summary
    # at another size than the model's own the judge's pixel thresholds do not hold: no judge columns
    _, _, summary = embedded.long_video("a red circle on a blue background", 10, 8, 2, 0, 3.0, 1, size // 2)
    assert "judge" not in summary


def test_video_judge_reading_on_world_clips():
    import numpy as np

    from guidekit.apps.demo import video_judge_reading
    from guidekit.toy import video_world

    caption = "a red circle on a blue background"
    frames = video_world.render_clip(video_world.clip_from_caption(caption, 3), 20).frames / 255.0
    assert video_judge_reading(frames, caption) == "20/20 | 0"
    # a schedule scores the frames held on one caption only: 0..4 (A) and 15..19 (B), the blend in between not
    other = "a red circle on a green background"
    assert video_judge_reading(frames, {4: caption, 15: other}) == "5/10 | 0"
    # a jump of the shape is a teleport
    jumped = np.concatenate([frames[:10], video_world.render_clip(video_world.clip_from_caption(caption, 9), 10).frames
                             / 255.0])
    assert video_judge_reading(jumped, caption).endswith("| 1")
    assert video_judge_reading(frames, "a cat").startswith("– |")


@pytest.mark.parametrize("change, message", [
    (dict(motion_injection=True), "motion injection: needs a prompt schedule"),
    (dict(fusion="window"), "fusion: got 'window'; accepted: attention, block"),
    (dict(frames=25), "frames: 25 is over this demo's limit; accepted: 1 to 24"),
    (dict(context_length=9), "context_length: 9 is above the video model's motion_max_seq_length 8"),
    (dict(context_stride=5, context_length=4), "context_stride: 5 is not accepted; accepted: an integer from 1 to 4"),
    (dict(steps=9), "steps: 9 is over this demo's limit"),
    (dict(size=36), "width: expected .*multiple of 8, got 36"),
    (dict(size=128), "width: 128 is over this demo's limit"),
    (dict(guidance_scale=31.0), "guidance_scale: 31 is over this demo's limit"),
    (dict(prompt="0: a\n12: b"), "frame 12 .* is not below the number of frames 12"),
    (dict(seed=1.5), "seed: expected an integer"),
])
def test_bad_inputs_are_messages(video, change, message):
    from guidekit.apps.jobs import JobError

    args = dict(prompt="a red circle", frames=12, context_length=8, context_stride=4, seed=0, guidance_scale=7.5,
                steps=2, size=32)
    with pytest.raises(JobError, match=message):
        video.long_video(**{**args, **change})


def test_missing_video_model_is_a_message_in_the_tab(pipe, monkeypatch):
    import guidekit.apps.jobs as jobs
    from guidekit.apps.demo import build_demo

    monkeypatch.setattr(jobs, "embedded_video_model_path", lambda: None)
    app = build_demo(pipe, "tiny")
    notes = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "video-missing"]
    assert notes and "--video-model" in notes[0].value
    assert "/long_video" not in {d.api_name and "/" + d.api_name for d in app.fns.values()}


def test_a_bad_video_model_is_refused_naming_the_option(pipe, tmp_path, tiny_sd_dir):
    from guidekit.apps.demo import build_demo
    from guidekit.apps.jobs import JobError

    with pytest.raises(JobError, match="--video-model: .* is not a folder"):
        build_demo(pipe, "tiny", video_model=str(tmp_path / "missing"))
    with pytest.raises(JobError, match="--video-model: .* is a StableDiffusionPipeline"):
        build_demo(pipe, "tiny", video_model=str(tiny_sd_dir))


def test_a_motion_adapter_pairs_with_the_image_model(pipe, tmp_path):
    from guidekit.apps.demo import Limits, video_backend
    from guidekit.testing.animatediff import tiny_motion_adapter

    tiny_motion_adapter(max_length=8).save_pretrained(str(tmp_path / "adapter"))
    backend, _ = video_backend(pipe, str(tmp_path / "adapter"), Limits(**LIMITS))
    assert backend.max_length == 8 and backend.pipe.vae is pipe.vae  # the image model's modules, shared
    _, freenoise, _ = backend.long_video("a red circle", 10, 8, 2, 0, 7.5, 1, 32)
    assert frame_count(freenoise) == 10


#----------------------------------------------------------------------------
# Through the API and in a real browser.

@pytest.fixture(scope="module")
def server(pipe, tiny_video_dir):
    from guidekit.apps.demo import Limits, build_demo, launch

    app = build_demo(pipe, "tiny", Limits(**LIMITS), video_model=str(tiny_video_dir))
    _, url, _ = launch(app, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    app.close()


def test_api_long_video(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    plain, freenoise, summary = client.predict("a red circle", 10, 8, 4, 0, 7.5, 2, 32, api_name="/long_video")
    assert frame_count(plain) == frame_count(freenoise) == 10
    assert "| **FreeNoise** |" in summary and "fused at each temporal attention" in summary
    _, _, summary = client.predict("0: a red circle\n9: a blue circle", 10, 8, 4, 0, 7.5, 1, 32, "block", True,
                                   api_name="/long_video")
    assert "fused at each transformer block" in summary and "motion injection" in summary


FETCH_BYTES = """async (img) => {
    const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    let s = ''; for (const b of buf) s += String.fromCharCode(b);
    return btoa(s);
}"""


def distinct_screenshots(page, element, shots: int = 10) -> int:
    """How many different pictures of `element` the page shows over about a second: more than one means the browser
    plays the animation (a canvas would not tell: drawImage paints an animated image's first frame only)."""
    seen = set()
    for _ in range(shots):
        seen.add(element.screenshot(animations="allow"))
        page.wait_for_timeout(100)
    return len(seen)


@pytest.mark.browser
@needs_browser
def test_browser_long_video_plays(server, tmp_path):
    import io

    from playwright.sync_api import expect

    with demo_page(server, "Long video") as page:
        page.locator("#video-prompt textarea").fill("0: a red circle\n6: a blue circle", timeout=60_000)
        set_number(page, "video-frames", 12)
        set_number(page, "video-length", 8)
        set_number(page, "video-stride", 4)
        set_number(page, "video-steps", 2)
        page.locator("#video-fusion").get_by_text("each transformer block").click()
        page.locator("#video-injection input").check()
        page.locator("#video-button").click()
        summary = page.locator("#video-summary")
        expect(summary).to_contain_text("frame-to-frame change", timeout=120_000)
        text = summary.inner_text()
        assert "12 frames" in text and "2 steps" in text
        assert "fused at each transformer block" in text and "motion injection" in text
        for side in ("plain", "freenoise"):
            img = page.locator(f"#video-{side} img")
            expect(img).to_be_visible(timeout=60_000)
            page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle(),
                                   timeout=60_000)
            data = base64.b64decode(img.evaluate(FETCH_BYTES))
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "WEBP" and im.n_frames == 12, (side, im.format)
            assert distinct_screenshots(page, img) > 1, f"the {side} video does not play"
        assert "Error" not in page.locator("body").inner_text()
        page.screenshot(path=str(tmp_path / "long-video.png"), full_page=True)


def test_cli_names_a_bad_video_model(tmp_path):
    from click.testing import CliRunner

    from guidekit.apps.demo import demo
    from guidekit.apps.models import _embedded_model_path

    if _embedded_model_path() is None or not (_embedded_model_path() / "model_index.json").is_file():
        pytest.skip("no embedded image model in this install")
    result = CliRunner().invoke(demo, ["--video-model", str(tmp_path / "missing"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--video-model'" in result.output and "is not a folder" in result.output


def test_the_embedded_video_model_is_the_default(pipe, tiny_video_dir, tmp_path, monkeypatch):
    import guidekit.apps.jobs as jobs
    from guidekit.apps.demo import Limits, video_backend

    monkeypatch.setattr(jobs, "embedded_video_model_path", lambda: tiny_video_dir)
    backend, note = video_backend(pipe, None, Limits(**LIMITS))
    assert backend is not None and note == "" and backend.max_length == 8
    # installed but broken: a message in the tab, not a crash
    (tmp_path / "model_index.json").write_text('{"_class_name": "AnimateDiffPipeline"}')
    monkeypatch.setattr(jobs, "embedded_video_model_path", lambda: tmp_path)
    backend, note = video_backend(pipe, None, Limits(**LIMITS))
    assert backend is None and "the embedded video model cannot be loaded" in note


@pytest.mark.parametrize("embedded", [True, False])
def test_the_tab_starts_longer_than_one_window(pipe, tiny_video_dir, embedded):
    """On the embedded video model the frames and steps start at the measured pick (several windows), elsewhere at
    the tab's own example length and the resolver's steps."""
    import gradio as gr

    from guidekit.apps.defaults import FREENOISE_DEFAULTS
    from guidekit.apps.demo import Limits, VideoBackend, _video_tab, video_backend
    from guidekit.apps.demo_measure import VIDEO_DEFAULT
    from guidekit.apps.demo_video import EXAMPLE_FRAMES, EXAMPLE_VIDEO_SEED

    limits = Limits(max_steps=100, max_size=64, max_frames=64)
    backend, _ = video_backend(pipe, str(tiny_video_dir), limits)
    backend = VideoBackend(backend.pipe, limits, embedded=embedded)
    with gr.Blocks() as app:
        _video_tab(backend, "", {})
    start = {b.elem_id: b.value for b in app.blocks.values() if getattr(b, "elem_id", None)}
    frames = VIDEO_DEFAULT["frames"] if embedded else EXAMPLE_FRAMES
    steps = VIDEO_DEFAULT["steps"] if embedded else backend.defaults().steps
    assert (start["video-frames"], start["video-steps"], start["video-seed"]) == (frames, steps, EXAMPLE_VIDEO_SEED)
    assert start["video-frames"] > FREENOISE_DEFAULTS["context_length"], "the default video is one window"
