"""The demo's Classifier guidance tab: unguided, naive classifier guidance and EluCD from the same noise."""

from __future__ import annotations

import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random transformers ResNet with three named labels and its preprocessor config, saved to a folder."""
    from guidekit.testing import PLAIN_PROCESSOR, make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-resnet-demo"), processor=PLAIN_PROCESSOR)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from guidekit.apps.jobs import load_pipeline

    return load_pipeline(str(tiny_sd_dir))[0]


@pytest.fixture(scope="module")
def backend(pipe):
    from guidekit.apps.demo import DemoBackend, Limits

    return DemoBackend(pipe, "tiny", Limits(max_steps=8, max_size=64))


def test_three_images_from_the_same_noise_with_readings(backend, classifier_dir):
    assert backend.classifier_labels(str(classifier_dir)) == ["red", "green", "blue"]
    unguided, naive, elucd, summary = backend.classifier_guidance(str(classifier_dir), "green", 50.0, 3, 2)
    assert unguided.size == naive.size == elucd.size == (32, 32)
    assert unguided.tobytes() != naive.tobytes() and unguided.tobytes() != elucd.tobytes()
    assert naive.tobytes() != elucd.tobytes()
    assert "Class **green** (id 1)" in summary and "classifier scale 50" in summary and "seed 3" in summary
    for row in ("| **Unguided** |", "| **Naive (ClassifierGuidance)** |", "| **EluCD** |"):
        assert row in summary
    assert "judge" not in summary  # the tiny model is not the embedded one

    # Scale 0: all three are the unguided image; a label given by id reads the same class.
    zero = backend.classifier_guidance(str(classifier_dir), "1", 0.0, 3, 2)
    assert zero[0].tobytes() == zero[1].tobytes() == zero[2].tobytes() == unguided.tobytes()
    assert "Class **green** (id 1)" in zero[3]


def test_the_judge_reads_the_images_on_the_embedded_model(pipe, classifier_dir):
    from guidekit.apps.demo import DemoBackend, Limits

    backend = DemoBackend(pipe, "tiny", Limits(max_steps=8, max_size=64), embedded=True)
    *images, summary = backend.classifier_guidance(str(classifier_dir), "red", 1.0, 0, 1)
    assert len(images) == 3 and "judge: colour, shape" in summary
    assert summary.count("| **") == 3


@pytest.mark.parametrize("args, message", [
    (("{clf}", "purple", 1.0, 0, 2), "label: 'purple' is not a label of this classifier"),
    (("{clf}", "", 1.0, 0, 2), "class: pick the class"),
    (("{clf}", "red", 1000.0, 0, 2), "classifier scale"),
    (("{clf}", "red", 1.0, 0, 99), "steps: 99 is over this demo's limit"),
    (("{missing}", "red", 1.0, 0, 2), "is not a folder"),
])
def test_errors_are_messages(backend, classifier_dir, tmp_path, args, message):
    args = tuple(a.format(clf=classifier_dir, missing=tmp_path / "missing") if isinstance(a, str) else a
                 for a in args)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        backend.classifier_guidance(*args)


def test_without_an_embedded_classifier_the_tab_asks_for_a_folder(backend, monkeypatch):
    import guidekit.apps.demo as demo_mod
    import guidekit.apps.demo_classifier as tab_mod

    monkeypatch.setattr(tab_mod, "embedded_classifier_path", lambda: None)
    with pytest.raises(ValueError, match="the embedded classifier is not installed; reinstall guidekit"):
        backend.classifier_labels("")
    app = demo_mod.build_demo(backend.pipe, "tiny", demo_mod.Limits(max_steps=8, max_size=64))
    config = json.dumps(app.config)
    assert "Classifier guidance" in config and "clf-path" in config and "No embedded classifier here" in config
    assert any(d.get("api_name") == "classifier_guidance" for d in app.config["dependencies"])


def test_the_tab_is_for_sd_pipelines_only(pipe):
    from guidekit.apps.demo import classifier_tab_available

    assert classifier_tab_available(pipe)
    assert not classifier_tab_available(object())


# ------------------------------------------------------------- the embedded model's recommended EluCD settings

# Stand-ins for guidekit.toy.RECOMMENDED_ELUCD / RECOMMENDED_ELUCD_SAMPLER, distinct from every default.
DISTINCT_ELUCD = {"scale": 7.0, "softplus_beta": 2.0, "joint_temperature": 0.9, "marginal_temperature": 0.4,
                  "schedule": "ddpm", "gamma": 0.2, "start": 0.25, "stop": 0.75}
DISTINCT_SAMPLER = {"scheduler": "ddpm", "steps": 60}


@pytest.fixture
def embedded_classifier(classifier_dir, monkeypatch):
    """The tiny classifier stands for the embedded one; the recommendation is replaced by distinct values."""
    from pathlib import Path

    import guidekit.toy

    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD", dict(DISTINCT_ELUCD))
    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD_SAMPLER", dict(DISTINCT_SAMPLER))
    monkeypatch.setattr(guidekit.toy, "default_classifier_path", lambda: Path(classifier_dir))


@pytest.fixture
def calls(pipeline_calls):
    return pipeline_calls


def test_embedded_pair_runs_all_three_with_the_recommended_sampler(pipe, classifier_dir, embedded_classifier, calls):
    from guidekit.apps.demo import DemoBackend, Limits

    backend = DemoBackend(pipe, "tiny", Limits(max_steps=8, max_size=64), embedded=True)
    own = pipe.scheduler
    *images, summary = backend.classifier_guidance("", "green", 4.0, 3, 2)  # empty: the embedded classifier
    assert [c["scheduler"] for c in calls] == ["DDPMScheduler"] * 3
    assert pipe.scheduler is own
    unguided, naive, elucd = (c["hook"] for c in calls)
    assert unguided is None
    assert {k: getattr(elucd, k) for k in DISTINCT_ELUCD} == dict(DISTINCT_ELUCD, scale=4.0)  # the slider's scale
    assert type(naive).__name__ == "ClassifierGuidance"
    assert (naive.scale, naive.schedule, naive.start, naive.stop, naive.gamma) == (4.0, "ddpm", 0.25, 0.75, 0.0)
    assert "DDPM (DDPMScheduler), 2 steps, EluCD window 0.25–0.75" in summary

    # scale 0: the three runs start from the same noise and take the same DDPM step noise
    calls.clear()
    zero = backend.classifier_guidance(str(classifier_dir), "green", 0.0, 3, 2)  # the same folder, named
    assert zero[0].tobytes() == zero[1].tobytes() == zero[2].tobytes()
    assert [c["scheduler"] for c in calls] == ["DDPMScheduler"] * 3


@pytest.mark.parametrize("embedded", [True, False])
def test_other_model_or_classifier_keeps_the_model_scheduler(pipe, classifier_dir, calls, monkeypatch, embedded):
    from pathlib import Path

    import guidekit.toy
    from guidekit.apps.demo import DemoBackend, Limits

    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD", dict(DISTINCT_ELUCD))
    if not embedded:  # another model with the embedded classifier; else the embedded model, another classifier
        monkeypatch.setattr(guidekit.toy, "default_classifier_path", lambda: Path(classifier_dir))
    backend = DemoBackend(pipe, "tiny", Limits(max_steps=8, max_size=64), embedded=embedded)
    *images, summary = backend.classifier_guidance(str(classifier_dir), "green", 4.0, 3, 2)
    assert [c["scheduler"] for c in calls] == ["DDIMScheduler"] * 3
    elucd = calls[2]["hook"]
    assert (elucd.scale, elucd.gamma, elucd.start, elucd.stop) == (4.0, 0.3, 0.0, 1.0)  # the paper's defaults
    assert "DDIMScheduler, 2 steps, the paper's defaults" in summary


def _component(app, elem_id):
    found = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


@pytest.mark.parametrize("embedded", [True, False])
def test_the_sliders_start_at_the_recommendation_on_the_embedded_model(pipe, embedded_classifier, embedded):
    from guidekit.apps.demo import DEFAULT_CLASSIFIER_SCALE, Limits, build_demo

    for max_steps, rec_steps in ((64, 60), (40, 40)):  # the recommended steps, at most the demo's limit
        app = build_demo(pipe, "tiny", Limits(max_steps=max_steps, max_size=64), embedded=embedded)
        scale, steps = _component(app, "clf-scale"), _component(app, "clf-steps")
        if embedded:
            assert (scale.value, steps.value) == (7.0, rec_steps)
            assert "default 7" in scale.label and "RECOMMENDED_ELUCD" in scale.info
        else:
            assert (scale.value, steps.value) == (DEFAULT_CLASSIFIER_SCALE, 25)
        app.close()


def test_the_default_step_limit_fits_the_recommended_sampler():
    import guidekit.toy
    from click.testing import CliRunner
    from guidekit.apps.demo import Limits, demo

    assert Limits().max_steps == 100 >= guidekit.toy.RECOMMENDED_ELUCD_SAMPLER["steps"]
    text = " ".join(CliRunner().invoke(demo, ["--help"], terminal_width=200).output.split())
    assert "Most denoising steps one request may ask for" in text and "[default: 100;" in text


def test_a_multistep_scheduler_is_refused_before_any_run(pipe, classifier_dir, monkeypatch):
    """The model's own PNDM scheduler: the hooks' refusal, naming the accepted and the recommended scheduler,
    before the unguided image is drawn."""
    from diffusers import PNDMScheduler

    from guidekit.apps.demo import DemoBackend, Limits

    pndm = type(pipe).from_pipe(pipe, scheduler=PNDMScheduler.from_config(pipe.scheduler.config))
    backend = DemoBackend(pndm, "tiny", Limits(max_steps=8, max_size=64))
    called = []
    monkeypatch.setattr(type(pndm), "__call__", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=r"scheduler: PNDMScheduler .*accepted by EluCD: .*recommended: DDPMScheduler"):
        backend.classifier_guidance(str(classifier_dir), "red", 1.0, 0, 2)
    assert not called


@pytest.mark.parametrize("embedded", [True, False])
def test_the_class_and_seed_start_at_the_measured_pick_with_the_embedded_classifier(pipe, embedded):
    from guidekit.apps.demo import Limits, build_demo, embedded_classifier_path
    from guidekit.apps.demo_measure import CLASSIFIER_DEFAULT

    if embedded_classifier_path() is None:
        pytest.skip("the embedded classifier is not installed")
    app = build_demo(pipe, "tiny", Limits(max_steps=8, max_size=64), embedded=embedded)
    label, seed = _component(app, "clf-label"), _component(app, "clf-seed")
    # the pick belongs to the embedded classifier, whatever the model: another classifier keeps its first class
    assert (label.value, seed.value) == (CLASSIFIER_DEFAULT["label"], CLASSIFIER_DEFAULT["seed"])
    app.close()


def test_the_start_of_another_classifier_is_its_first_class_and_seed_0():
    from guidekit.apps.demo_classifier import classifier_start

    assert classifier_start(["cat", "dog"], embedded_classifier=False) == ("cat", 0)
    assert classifier_start([], embedded_classifier=False) == (None, 0)
    # a classifier without the picked class (another build of the embedded one) keeps its first class too
    assert classifier_start(["cat", "red circle"], embedded_classifier=True) == ("red circle", 1)
    assert classifier_start(["cat"], embedded_classifier=True) == ("cat", 0)


def test_judge_reading_says_no_shape_where_the_strict_judge_finds_only_a_colour(monkeypatch):
    import guidekit.toy.judge as judge_module
    from guidekit.apps.demo_classifier import judge_reading

    class Reading:
        def __init__(self, colour, shape):
            self.colour, self.shape = colour, shape

    for found, text in (((None, None), "no shape"), (("blue", None), "blue, no shape"),
                        (("red", "circle"), "red, circle")):
        monkeypatch.setattr(judge_module, "judge", lambda image, found=found: Reading(*found))
        assert judge_reading(None) == text
