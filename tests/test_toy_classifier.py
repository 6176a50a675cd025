"""The embedded toy classifier (assets/toy-classifier), its training, and eval-elucd's measuring helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guidekit
import guidekit.toy
from guidekit.testing import TinyReLUClassifier
from guidekit.toy import classifier as tc
from guidekit.toy import eval_elucd as ev
from guidekit.toy import world
from guidekit.toy.judge import judge_batch


@pytest.fixture(scope="module")
def shipped():
    from guidekit.guidance import TransformersClassifier

    return TransformersClassifier.from_pretrained(str(guidekit.toy.default_classifier_path()))


def test_labels_are_colour_shape_pairs():
    assert len(tc.LABELS) == 18
    assert tc.LABELS[tc.label_of("a blue triangle on a red striped background")] == "blue triangle"


def test_shipped_classifier_loads_with_auto_model():
    from transformers import AutoModelForImageClassification, ResNetForImageClassification

    path = guidekit.toy.default_classifier_path()
    model = AutoModelForImageClassification.from_pretrained(path)
    assert isinstance(model, ResNetForImageClassification)
    assert model.config.hidden_act == "relu"
    assert [model.config.id2label[i] for i in range(18)] == list(tc.LABELS)
    assert model.config.label2id["red circle"] == 0
    assert (path / "model.safetensors").stat().st_size < 2 * 2**20


def test_shipped_classifier_reads_heldout_world_images(shipped):
    assert shipped.num_labels == 18 and shipped.id2label[17] == "magenta triangle"
    seeds = range(tc.EVAL_BASE + 100_000, tc.EVAL_BASE + 100_090)  # held out (< 10**6), not the card's seeds
    x, y = tc.world_batch(seeds, version=guidekit.toy.MODEL_WORLD_VERSION)  # [-1, 1], what a VAE decodes to
    with torch.no_grad():
        pred = shipped(x).argmax(-1)
    assert float((pred == y).float().mean()) >= 0.95


def test_training_smoke_is_deterministic(tmp_path):
    torch.set_num_threads(1)
    config = tc.ClassifierConfig(steps=3, batch=8, eval_images=0, warmup=1)
    tc.train_classifier(tmp_path / "a", config, log=lambda s: None)
    tc.train_classifier(tmp_path / "b", config, log=lambda s: None)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "preprocessor_config.json").is_file()
    fresh = tc.build_classifier(config)
    assert any(not torch.equal(fresh.state_dict()[k], a[k]) for k in a if a[k].is_floating_point())


def test_training_resumes_to_the_same_weights(tmp_path):
    torch.set_num_threads(1)
    full = tc.ClassifierConfig(steps=4, batch=8, eval_images=0, warmup=1, checkpoint_every=2)
    tc.train_classifier(tmp_path / "full", full, log=lambda s: None)
    import shutil

    # a run that leaves its step-2 checkpoint behind, then a run resumed from it
    tc.train_classifier(tmp_path / "first", full, ckpt_dir=tmp_path / "ck", log=lambda s: None)
    assert (tmp_path / "ck" / "checkpoint.pt").is_file()
    shutil.rmtree(tmp_path / "first")
    tc.train_classifier(tmp_path / "resumed", full, ckpt_dir=tmp_path / "ck", log=lambda s: None)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_measuring_helpers_on_world_images():
    samples = [world.generate(s, version=guidekit.toy.MODEL_WORLD_VERSION) for s in (11, 12, 13, 14)]
    images = np.stack([s.image for s in samples]).astype(np.float64) / 255.0
    labels = [tc.label_of(s.scene) for s in samples]
    judgements = judge_batch(images)
    assert ev.class_hits(judgements, labels) == [True] * 4
    wrong = [(y + 1) % 18 for y in labels]
    assert not any(ev.class_hits(judgements, wrong))
    # the centroid of the judge's mask is the centroid of the world's own mask, to within a pixel
    for s, j in zip(samples, judgements):
        cx, cy = ev.centroid(j)
        ys, xs = np.nonzero(s.mask)
        assert abs(cx - xs.mean()) < 1.0 and abs(cy - ys.mean()) < 1.0
    m = ev.measure(images, labels)
    assert m["accuracy"] == m["colour_accuracy"] == m["shape_accuracy"] == m["accuracy_lenient"] == 1.0
    assert 0.8 < m["fidelity"] <= 1.0
    # the class's colour with another shape, and the class's shape in another colour: one part right each
    from guidekit.toy.classifier import LABELS
    same_colour = [LABELS.index(next(l for l in LABELS if l.split()[0] == LABELS[y].split()[0] and l != LABELS[y]))
                   for y in labels]
    same_shape = [LABELS.index(next(l for l in LABELS if l.split()[1] == LABELS[y].split()[1] and l != LABELS[y]))
                  for y in labels]
    assert ev.class_hits(judgements, same_colour, "colour") == [True] * 4
    assert not any(ev.class_hits(judgements, same_colour, "shape") + ev.class_hits(judgements, same_colour))
    assert ev.class_hits(judgements, same_shape, "shape") == [True] * 4
    assert not any(ev.class_hits(judgements, same_shape, "colour"))
    with pytest.raises(ValueError, match="part"):
        ev.class_hits(judgements, labels, "texture")
    # all four as one class: diversity counts their distinct backgrounds and spread of centres
    d = ev.diversity(judgements, [0] * 4)
    assert d["backgrounds"] == len({s.scene.background for s in samples}) == d["backgrounds_all"]
    pts = np.array([ev.centroid(j) for j in judgements])
    assert d["position_std"] == pytest.approx(float(np.sqrt(pts.var(axis=0).mean())))
    # the same image twice: one background, no spread
    same = ev.diversity([judgements[0]] * 2, [3, 3])
    assert same["backgrounds"] == 1 and same["position_std"] == 0.0


def test_noise_is_fixed_per_class_and_sample():
    a = ev.noise([2, 5], 3)
    b = ev.noise([5], 2)
    assert a.shape == (6, 4, 16, 16)
    assert torch.equal(a[3:5], b)


def test_method_rows_hold_the_ablations(monkeypatch):
    rows = ev.method_rows((2.0, 5.0))
    names = [r["method"] for r in rows]
    assert names[0] == "unguided" and names.count("EluCD") == 2 and names.count("ClassifierGuidance") == 2
    assert all(r["scale"] == 5.0 for r in rows[5:])
    # each ablation switches one calibration part of the recommendation the other way
    smoothed = {**guidekit.toy.RECOMMENDED_ELUCD, "softplus_beta": 3.0, "joint_temperature": 1.0}
    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD", smoothed)
    ablations = {r["method"]: r["kwargs"] for r in ev.method_rows((2.0,))[4:]}
    assert ablations == {"EluCD, no smoothing": {"softplus_beta": None}, "EluCD, τ₂ = τ₁": {"marginal_temperature": 1.0},
                         "EluCD, no boost": {"gamma": 0.0}}
    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD", {**smoothed, "softplus_beta": None})
    ablations = {r["method"]: r["kwargs"] for r in ev.method_rows((2.0,))[4:]}
    assert ablations["EluCD, Softplus(3) smoothing"] == {"softplus_beta": 3.0} and len(ablations) == 3


HOOK_SETTINGS = ("scale", "softplus_beta", "joint_temperature", "marginal_temperature", "schedule", "gamma", "input",
                 "start", "stop", "gradient_checkpointing", "labels")
CALIBRATION = {"softplus_beta", "joint_temperature", "marginal_temperature"}


def _differences(a, b) -> set:
    return {k for k in HOOK_SETTINGS if getattr(a, k) != getattr(b, k)}


@pytest.mark.parametrize("softplus_beta", [None, 3.0], ids=["relu", "softplus"])
def test_a_classifier_guidance_row_differs_from_elucd_by_the_calibration_only(monkeypatch, softplus_beta):
    """The plain ClassifierGuidance rows also drop EluCD's sine boost; the "sine boost" row keeps it, so it and
    the EluCD row at the same scale differ by the calibration alone (smoothing and temperatures)."""
    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD", {**guidekit.toy.RECOMMENDED_ELUCD, "softplus_beta": softplus_beta})
    rows = {(r["method"], r["scale"]): r for r in ev.method_rows((1.0, 2.0), ablation_scale=2.0)}
    clf, labels = TinyReLUClassifier(), [0, 1]
    hook = lambda method: ev._hooks(rows[(method, 2.0)], clf, labels)[0]  # noqa: E731
    elucd, boosted, plain = hook("EluCD"), hook("ClassifierGuidance, sine boost"), hook("ClassifierGuidance")
    assert type(boosted) is guidekit.ClassifierGuidance
    assert boosted.gamma == elucd.gamma == guidekit.toy.RECOMMENDED_ELUCD["gamma"] > 0
    assert _differences(boosted, elucd) and _differences(boosted, elucd) <= CALIBRATION
    assert _differences(plain, boosted) == {"gamma"}


def test_recommended_elucd_builds_a_hook(shipped):
    hook = guidekit.EluCD(shipped, "red circle", **guidekit.toy.RECOMMENDED_ELUCD)
    assert hook.labels == 0 and hook.scale == guidekit.toy.RECOMMENDED_ELUCD["scale"] > 0
    assert "classifier" not in guidekit.toy.RECOMMENDED_ELUCD and "labels" not in guidekit.toy.RECOMMENDED_ELUCD


def test_render_uses_one_generator_per_sample_and_puts_the_scheduler_back(shipped):
    from diffusers import DDIMScheduler, DDPMScheduler

    from guidekit.toy.evaluate import load_pipeline

    pipe = load_pipeline()
    own = pipe.scheduler
    row = {"method": "EluCD", "scale": 1.0, "kwargs": {}}
    together = ev.render(pipe, row, shipped, [0, 4], 1, steps=3, batch=2, scheduler="ddpm")
    apart = ev.render(pipe, row, shipped, [0, 4], 1, steps=3, batch=1, scheduler="ddpm")
    assert pipe.scheduler is own
    # an image does not depend on the batch it was drawn in (ancestral noise included)
    np.testing.assert_allclose(together, apart, rtol=0, atol=2e-5)
    # the step noise is the sample's own: another class's sample 0 differs from the same start noise
    g = ev.step_generators([0, 4], 2)
    assert len(g) == 4 and g[0].initial_seed() != g[2].initial_seed() != g[1].initial_seed()
    ddpm = ev.scheduler_for(pipe, "ddpm")
    assert isinstance(ddpm, DDPMScheduler) and isinstance(ev.scheduler_for(pipe, "ddim"), DDIMScheduler)
    assert ddpm.config.prediction_type == own.config.prediction_type
    assert ddpm.config.timestep_spacing == own.config.timestep_spacing
    with pytest.raises(ValueError, match="scheduler"):
        ev.scheduler_for(pipe, "euler")


def test_recommended_elucd_sampler_is_one_render_accepts():
    sampler = guidekit.toy.RECOMMENDED_ELUCD_SAMPLER
    assert sampler["scheduler"] in ev.SCHEDULERS and sampler["steps"] >= 1
