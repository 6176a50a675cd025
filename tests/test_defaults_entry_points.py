"""The same request through every entry point on the embedded models gets the same settings.

Each request (an image, unconditional classifier guidance, a video) goes through `guidekit generate` or
`guidekit video`, a `guidekit batch` job and the demo's backend, starting from the demo's own slider values where
the tab has them. The pipeline call is replaced by a spy that records what it was asked to run (scale, steps,
size, scheduler class and every hook's settings) and returns blank images, so no denoising step runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import guidekit
import guidekit.toy
from guidekit.apps.defaults import hook_settings

torch.set_num_threads(1)

PROMPT = "a red circle on a blue background"
LABEL = "red circle"
FRAMES = 16


@pytest.fixture(scope="module")
def embedded():
    try:
        return {"model": Path(guidekit.toy.default_model_path()),
                "classifier": Path(guidekit.toy.default_classifier_path()),
                "adapter": Path(guidekit.toy.default_motion_adapter_path())}
    except FileNotFoundError as e:
        pytest.skip(f"the embedded models are not installed: {e}")


def _record(self, kwargs: dict) -> dict:
    scale = kwargs.get("guidance_scale")
    hooks = list(kwargs.get("hooks") or [])
    # CFG and APG give the conditional prediction at w <= 1: a slot hook there changes nothing, and entry points
    # may leave it out
    slot = (guidekit.APG, guidekit.CFG)
    return {"guidance_scale": scale, "steps": kwargs.get("num_inference_steps"), "width": kwargs.get("width"),
            "height": kwargs.get("height"), "scheduler": type(self.scheduler).__name__,
            "hooks": [hook_settings(h) for h in hooks if not (isinstance(h, slot) and scale <= 1)]}


@pytest.fixture
def calls(monkeypatch, tmp_path_factory):
    """Every image and video pipeline call's settings, in order; the calls return blank outputs."""
    from guidekit.pipelines import GuidedAnimateDiffPipeline, GuidedStableDiffusionPipeline

    monkeypatch.setenv("GUIDEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))  # the assembled video model
    seen = []

    def image_call(self, prompt=None, **kwargs):
        seen.append({"kind": "image", **_record(self, kwargs)})
        n = len(prompt) if isinstance(prompt, list) else 1
        w, h = kwargs.get("width") or 64, kwargs.get("height") or 64
        images = np.zeros((n, h, w, 3), np.float32) if kwargs.get("output_type") == "np" else \
            [Image.new("RGB", (w, h))] * n
        return SimpleNamespace(images=images, nsfw_content_detected=None)

    def video_call(self, prompt=None, **kwargs):
        seen.append({"kind": "video", "frames": kwargs.get("num_frames"), **_record(self, kwargs)})
        return SimpleNamespace(frames=[np.zeros((kwargs["num_frames"], kwargs["height"], kwargs["width"], 3),
                                                np.float32)])

    monkeypatch.setattr(GuidedStableDiffusionPipeline, "__call__", image_call)
    monkeypatch.setattr(GuidedAnimateDiffPipeline, "__call__", video_call)
    return seen


def _cli(*args):
    from guidekit.apps.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _batch(tmp_path, job: dict) -> dict:
    """Run one job with the embedded models; its manifest row."""
    from guidekit.apps.batch import run_batch

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(job) + "\n")
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    assert run_batch(jobs, out) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    return rows[0]


def _called(row: dict, call: dict) -> None:
    """The manifest row records what the call ran with."""
    settings = row["settings"]
    assert settings["recommended"] == "toy-sd"
    scale = settings["guidance_scale"]
    hooks = [h for h in settings["hooks"] if not (h["hook"] in ("APG", "CFG") and scale <= 1)]
    assert {**{k: settings[k] for k in ("guidance_scale", "steps", "scheduler")}, "hooks": hooks} == \
        {k: call[k] for k in ("guidance_scale", "steps", "scheduler", "hooks")}
    assert (row["params"]["width"], row["params"]["height"]) == (call["width"], call["height"])


def _component(app, elem_id):
    found = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0].value


@pytest.fixture(scope="module")
def demo(embedded):
    """The demo on the embedded models: its backends, and where its sliders start."""
    from guidekit.apps.demo import DemoBackend, Limits, build_demo, video_backend
    from guidekit.apps.jobs import load_pipeline

    pipe, name = load_pipeline(None)
    limits = Limits()
    app = build_demo(pipe, name, limits)
    ids = ("gen-steps", "gen-eta", "gen-norm", "gen-momentum", "clf-scale", "clf-steps", "video-length",
           "video-stride", "video-scale", "video-steps", "video-size", "video-fusion")
    sliders = {elem_id: _component(app, elem_id) for elem_id in ids}
    app.close()
    video, note = video_backend(pipe, None, limits)
    assert video is not None, note
    return SimpleNamespace(backend=DemoBackend(pipe, name, limits), video=video, sliders=sliders)


def test_an_image_request_gets_the_same_settings_everywhere(embedded, demo, calls, tmp_path):
    _cli("generate", PROMPT, "--out", tmp_path / "cli.png")
    cli = calls.pop()
    assert [h["hook"] for h in cli["hooks"]] == ["APG"]  # the default method
    _called(_batch(tmp_path, {"prompt": PROMPT}), calls.pop())
    # the batch call is checked against its own record above; here against the command's call
    _cli("generate", PROMPT, "--out", tmp_path / "cli2.png")
    assert calls.pop() == cli
    _batch(tmp_path, {"prompt": PROMPT, "seed": 1})
    assert calls.pop() == cli
    # the demo's Generate tab, its values left out (an API caller's request): CFG, then APG
    demo.backend.compare(PROMPT, "", 0, None, None, None, None, None, None, None)
    cfg, apg = calls[-2:]
    assert apg == cli and cfg == {**cli, "hooks": []}
    # and its sliders start at the same steps and APG settings
    rec = cli["hooks"][0]
    assert demo.sliders["gen-steps"] == cli["steps"]
    assert (demo.sliders["gen-eta"], demo.sliders["gen-norm"], demo.sliders["gen-momentum"]) == \
        (rec["eta"], rec["norm_threshold"], rec["momentum"])
    assert cli["guidance_scale"] == guidekit.toy.DEFAULT_GUIDANCE_SCALE
    assert {k: rec[k] for k in guidekit.toy.RECOMMENDED_APG} == guidekit.toy.RECOMMENDED_APG


def test_a_classifier_request_gets_the_same_settings_everywhere(embedded, demo, calls, tmp_path):
    clf = embedded["classifier"]
    _cli("generate", "", "--classifier", clf, "--label", LABEL, "--out", tmp_path / "cli.png")
    cli = calls.pop()
    row = _batch(tmp_path, {"prompt": "", "classifier": str(clf), "label": LABEL})
    _called(row, calls[-1])
    assert calls.pop() == cli
    # the demo's Classifier guidance tab from its sliders' values (the embedded classifier: an empty path)
    demo.backend.classifier_guidance("", LABEL, demo.sliders["clf-scale"], 0, demo.sliders["clf-steps"])
    unguided, naive, elucd = calls[-3:]
    assert elucd == cli
    assert unguided == {**cli, "hooks": []} and naive["hooks"][0]["hook"] == "ClassifierGuidance"
    # what they agree on is the recommendation: unconditional, the recommended sampler, steps and EluCD settings
    rec, sampler = guidekit.toy.RECOMMENDED_ELUCD, guidekit.toy.RECOMMENDED_ELUCD_SAMPLER
    assert (cli["guidance_scale"], cli["steps"]) == (1.0, sampler["steps"])
    assert cli["scheduler"] == {"ddpm": "DDPMScheduler"}.get(sampler["scheduler"], sampler["scheduler"])
    assert cli["hooks"][0]["hook"] == "EluCD" and {k: cli["hooks"][0][k] for k in rec} == rec


def test_a_video_request_gets_the_same_settings_everywhere(embedded, demo, calls, tmp_path):
    _cli("video", PROMPT, "--frames", FRAMES, "--out", tmp_path / "cli.gif")
    cli = calls.pop()
    assert cli["kind"] == "video" and cli["frames"] == FRAMES
    row = _batch(tmp_path, {"prompt": PROMPT, "frames": FRAMES})
    _called(row, calls[-1])
    assert calls.pop() == cli
    # the demo's Long video tab from its sliders' values; its right-hand video is FreeNoise's
    s = demo.sliders
    demo.video.long_video(PROMPT, FRAMES, s["video-length"], s["video-stride"], 0, s["video-scale"], s["video-steps"],
                          s["video-size"], s["video-fusion"])
    plain, freenoise = calls[-2:]
    # The tab starts at fewer steps than the CLI on purpose (the measured demo default that shows FreeNoise's
    # effect within about a minute, apps.demo_measure.VIDEO_DEFAULT); everything else is the CLI's.
    from guidekit.apps.demo_measure import VIDEO_DEFAULT

    assert freenoise["steps"] == plain["steps"] == VIDEO_DEFAULT["steps"]
    assert {**freenoise, "steps": cli["steps"]} == cli
    assert plain["hooks"][0] == {**cli["hooks"][0], "noise": "random"}  # the other: fresh noise per window
    assert cli["guidance_scale"] == guidekit.toy.DEFAULT_GUIDANCE_SCALE and cli["steps"] == guidekit.toy.DEFAULT_STEPS
    assert [h["hook"] for h in cli["hooks"]] == ["FreeNoise"]  # CFG: the video default
