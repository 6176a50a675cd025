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

    monkeypatch.setattr(demo_mod, "embedded_classifier_path", lambda: None)
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
