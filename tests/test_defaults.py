"""`guidekit.apps.defaults.resolve_defaults`: the one place every entry point takes its defaults from.

The embedded model's recommendation is replaced by distinct values, so that no test depends on the real ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import guidekit.toy as toy
from guidekit.apps.defaults import (DEFAULT_STEPS, PAPER_CLASSIFIER_SCALE, STOCK_SCALE, paper_apg, resolve_defaults,
                                    scheduler_for, using_sampler)
from guidekit.apps.families import FAMILIES

FAMILY = {f.name: f for f in FAMILIES}
DISTINCT_APG = {"eta": 0.25, "norm_threshold": 3.5, "momentum": -0.1}
DISTINCT_ELUCD = {"scale": 7.0, "softplus_beta": 2.0, "joint_temperature": 0.9, "marginal_temperature": 0.4,
                  "schedule": "ddpm", "gamma": 0.2, "start": 0.25, "stop": 0.75}
DISTINCT_SAMPLER = {"scheduler": "ddpm", "steps": 60}


@pytest.fixture
def recommendation(monkeypatch, tiny_sd_dir, tmp_path):
    """The tiny model stands for the embedded one, a folder for the embedded classifier; distinct values."""
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    monkeypatch.setattr(toy, "default_model_path", lambda: Path(tiny_sd_dir))
    monkeypatch.setattr(toy, "default_classifier_path", lambda: classifier)
    monkeypatch.setattr(toy, "DEFAULT_GUIDANCE_SCALE", 4.5)
    monkeypatch.setattr(toy, "DEFAULT_STEPS", 17)
    monkeypatch.setattr(toy, "RECOMMENDED_APG", dict(DISTINCT_APG))
    monkeypatch.setattr(toy, "RECOMMENDED_ELUCD", dict(DISTINCT_ELUCD))
    monkeypatch.setattr(toy, "RECOMMENDED_ELUCD_SAMPLER", dict(DISTINCT_SAMPLER))
    return {"model": str(tiny_sd_dir), "classifier": str(classifier)}


def test_the_embedded_model_gets_its_recommendation(recommendation):
    for d in (resolve_defaults(), resolve_defaults("image", model=recommendation["model"]),
              resolve_defaults(embedded=True, model="anything/else")):
        assert (d.method, d.guidance_scale, d.steps, d.apg, d.sampler, d.classifier) == \
            ("apg", 4.5, 17, DISTINCT_APG, None, None)
        assert d.recommended == "toy-sd"
    video = resolve_defaults("video", model=recommendation["model"])
    assert (video.method, video.guidance_scale, video.steps, video.apg) == ("cfg", 4.5, 17, DISTINCT_APG)


def test_user_values_always_win(recommendation):
    d = resolve_defaults(model=recommendation["model"], method="cfg", guidance_scale=12, steps=3, eta=1.0,
                         norm_threshold=20, momentum=0.0, prompt="")
    assert (d.method, d.guidance_scale, d.steps, d.apg) == ("cfg", 12.0, 3, {"eta": 1.0, "norm_threshold": 20,
                                                                              "momentum": 0.0})
    c = resolve_defaults("classifier", model=recommendation["model"], classifier=recommendation["classifier"],
                         steps=5, classifier_scale=0.5)
    assert c.steps == 5 and c.classifier == dict(DISTINCT_ELUCD, scale=0.5) and c.scheduler == "ddpm"


def test_other_models_get_their_family_or_stock_defaults(recommendation, tmp_path):
    other = str(tmp_path)  # not the embedded model
    paper = paper_apg()
    assert paper == {"eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}  # guidekit.APG's signature
    for family, scale in ((None, STOCK_SCALE), (FAMILY["sd"], STOCK_SCALE), (FAMILY["sdxl"], STOCK_SCALE),
                          (FAMILY["sd3"], 7.0), (FAMILY["flux"], 4.0), (FAMILY["qwenimage"], 4.0)):
        d = resolve_defaults(model=other, family=family)
        assert (d.guidance_scale, d.steps, d.apg, d.recommended) == (scale, DEFAULT_STEPS, paper, None), family
    wan = resolve_defaults("video", model=other, family=FAMILY["wan"])
    assert (wan.method, wan.guidance_scale) == ("cfg", 5.0)
    assert resolve_defaults(model="org/hub-id").guidance_scale == STOCK_SCALE
    assert resolve_defaults(model=recommendation["model"], embedded=False).recommended is None


def test_an_empty_prompt_has_scale_1_unless_a_negative_prompt_or_a_scale_is_given(recommendation):
    assert resolve_defaults(prompt="").guidance_scale == 1.0
    assert resolve_defaults(prompt="  ", family=FAMILY["flux"], model="org/x").guidance_scale == 1.0
    assert resolve_defaults(prompt="", negative_prompt="blurry").guidance_scale == 4.5
    assert resolve_defaults(prompt="", guidance_scale=6).guidance_scale == 6.0
    assert resolve_defaults(prompt="a red circle").guidance_scale == 4.5


def test_the_classifier_recommendation_needs_both_embedded_parts(recommendation, tmp_path):
    both = resolve_defaults("classifier", model=recommendation["model"], classifier=recommendation["classifier"])
    assert both.classifier_recommended and both.classifier == DISTINCT_ELUCD
    assert (both.sampler, both.steps) == ({"scheduler": "ddpm", "scheduler_kwargs": {}}, 60)
    plain = resolve_defaults(model=recommendation["model"], classifier=recommendation["classifier"],
                             calibration="plain")  # "image" with a classifier is a classifier request
    assert plain.request == "classifier"
    assert plain.classifier == {"scale": 7.0, "schedule": "ddpm", "start": 0.25, "stop": 0.75}
    for kwargs in ({"model": recommendation["model"], "classifier": str(tmp_path)},
                   {"model": str(tmp_path), "classifier": recommendation["classifier"]}):
        d = resolve_defaults("classifier", **kwargs)
        assert not d.classifier_recommended
        assert (d.classifier, d.sampler) == ({"scale": PAPER_CLASSIFIER_SCALE}, None)
    assert d.steps == DEFAULT_STEPS


def test_bad_requests_and_methods_name_the_argument():
    with pytest.raises(ValueError, match="request: 'audio' is not accepted; accepted: 'image', 'classifier', 'video'"):
        resolve_defaults("audio")
    with pytest.raises(ValueError, match="method: 'pag' is not accepted; accepted: 'cfg', 'apg'"):
        resolve_defaults(method="pag")


def test_the_sampler_is_swapped_in_for_the_block_only(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    own = pipe.scheduler
    with using_sampler(pipe, {"scheduler": "ddpm", "scheduler_kwargs": {}}) as scheduler:
        assert type(scheduler).__name__ == "DDPMScheduler" and pipe.scheduler is scheduler
        assert scheduler.config.prediction_type == own.config.prediction_type
    assert pipe.scheduler is own
    with pytest.raises(RuntimeError), using_sampler(pipe, {"scheduler": "EulerDiscreteScheduler",
                                                           "scheduler_kwargs": {"timestep_spacing": "trailing"}}) as s:
        assert type(s).__name__ == "EulerDiscreteScheduler" and s.config.timestep_spacing == "trailing"
        raise RuntimeError
    assert pipe.scheduler is own
    with using_sampler(pipe, None) as scheduler:
        assert scheduler is own
    with pytest.raises(ValueError, match="scheduler: 'NoSuchScheduler' is not accepted; accepted: ddpm, ddim"):
        scheduler_for(pipe, "NoSuchScheduler")
