"""A batch manifest row records what its pipeline call actually ran with: the method and scale, the steps, the
scheduler class and every hook's settings (`settings`), compared here with what a spy sees at the call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guidekit.apps import batch as batch_mod
from guidekit.apps.defaults import hook_settings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from guidekit.testing import PLAIN_PROCESSOR, make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-resnet-settings"), processor=PLAIN_PROCESSOR)


@pytest.fixture(scope="module")
def tiny_video_dir(tmp_path_factory):
    from guidekit.testing.animatediff import make_tiny_animatediff

    return make_tiny_animatediff(tmp_path_factory.mktemp("tiny-animatediff-settings"), max_length=8)


def _spy(monkeypatch, cls) -> list:
    seen = []
    real = cls.__call__

    def spy(self, *args, **kwargs):
        hooks = list(kwargs.get("hooks") or [])
        seen.append({"method": None, "guidance_scale": kwargs.get("guidance_scale"),
                     "steps": kwargs.get("num_inference_steps"), "scheduler": type(self.scheduler).__name__,
                     "hooks": [hook_settings(h) for h in hooks]})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    return seen


def _rows(out: Path) -> dict:
    return {r["line"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def _as_called(settings: dict) -> dict:
    """A recorded `settings` as the spy sees the call (which has no method name nor recommendation)."""
    return {**{k: v for k, v in settings.items() if k != "recommended"}, "method": None}


def test_image_rows_record_what_the_call_ran(tmp_path, tiny_sd_dir, classifier_dir, monkeypatch):
    from guidekit.pipelines import GuidedStableDiffusionPipeline

    seen = _spy(monkeypatch, GuidedStableDiffusionPipeline)
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "a red circle", "steps": 2},  # the defaults: APG with the paper's settings, 7.5
             {"prompt": "a red circle", "steps": 3, "guidance": "cfg", "guidance_scale": 5},
             {"prompt": "", "steps": 4, "classifier": str(classifier_dir), "label": "green", "classifier_scale": 9,
              "calibration": "plain"}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(tiny_sd_dir)) == 0
    rows = _rows(out)
    by_steps = {call["steps"]: call for call in seen}
    for line, row in rows.items():
        settings = row["settings"]
        assert _as_called(settings) == by_steps[settings["steps"]], line
        assert settings["method"] == row["params"]["guidance"] and settings["recommended"] is None
    apg = rows[1]["settings"]
    assert (apg["method"], apg["guidance_scale"], apg["scheduler"]) == ("apg", 7.5, "DDIMScheduler")
    assert {k: apg["hooks"][0][k] for k in ("hook", "eta", "norm_threshold", "momentum")} == \
        {"hook": "APG", "eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}
    assert rows[2]["settings"]["hooks"] == [] and rows[2]["settings"]["guidance_scale"] == 5.0  # CFG: built in
    clf = rows[3]["settings"]
    assert clf["guidance_scale"] == 1.0  # an empty prompt: no guidance by default
    assert [h["hook"] for h in clf["hooks"]] == ["APG", "ClassifierGuidance"] and clf["hooks"][1]["scale"] == 9.0


def test_video_rows_record_what_the_call_ran(tmp_path, tiny_video_dir, monkeypatch):
    from guidekit.pipelines import GuidedAnimateDiffPipeline

    seen = _spy(monkeypatch, GuidedAnimateDiffPipeline)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a red circle", "frames": 10, "steps": 1, "guidance": "apg",
                                "freenoise": {"context_length": 8, "context_stride": 2}}) + "\n")
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, video_model=tiny_video_dir) == 0
    settings = _rows(out)[1]["settings"]
    assert [_as_called(settings)] == seen
    assert settings["guidance_scale"] == 7.5 and settings["recommended"] is None
    assert [h["hook"] for h in settings["hooks"]] == ["APG", "FreeNoise"]
    assert {k: settings["hooks"][1][k] for k in ("context_length", "context_stride")} == \
        {"context_length": 8, "context_stride": 2}
