"""GuidedDiTPipeline on a tiny random DiT: stock equality with no hook or CFG, APG, EluCD, attach, label names."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

import guidekit
from guidekit.hooks import SamplerHook
from guidekit.pipelines import GuidedDiTPipeline
from guidekit.testing import TinyReLUClassifier, tiny_vae

ID2LABEL = {0: "red square, scarlet square", 1: "green circle", 2: "blue triangle"}
KW = dict(num_inference_steps=4, output_type="np")


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A tiny DiT checkpoint (learned sigma, 8×8 latents, 16 px images) with label names, as on the Hub."""
    folder = tmp_path_factory.mktemp("tiny-dit")
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=1000,
    )
    vae = tiny_vae(sample_size=16)
    DiTPipeline(transformer, vae, DDIMScheduler()).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {str(k): v for k, v in ID2LABEL.items()}  # the stock pipeline does not write it
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def load(cls, folder):
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock(dit_dir):
    return load(DiTPipeline, dit_dir)


@pytest.fixture(scope="module")
def guided(dit_dir):
    return load(GuidedDiTPipeline, dit_dir)


def run(pipe, labels=(0, 2), seed=0, **kw):
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **{**KW, **kw}).images


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_stock_equality(stock, guided, scale):
    expected = run(stock, guidance_scale=scale)
    assert expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(run(guided, guidance_scale=scale), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(run(guided, guidance_scale=scale, hooks=[guidekit.CFG()]), expected, rtol=0, atol=1e-5)


def test_stock_equality_default_scale_and_ddpm(dit_dir, stock, guided):
    # Default scale (4.0), and an ancestral scheduler: stock draws the step noise for both CFG halves.
    np.testing.assert_allclose(run(guided), run(stock), rtol=0, atol=1e-5)
    for pipe in (stock, guided):
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    try:
        torch.manual_seed(7)
        expected = run(stock, labels=[1])
        torch.manual_seed(7)
        np.testing.assert_allclose(run(guided, labels=[1]), expected, rtol=0, atol=1e-5)
    finally:
        for pipe in (stock, guided):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def test_guidance_matters_and_apg_differs(guided):
    cfg = run(guided, guidance_scale=4.0)
    assert np.abs(cfg - run(guided, guidance_scale=1.0)).max() > 1e-3
    apg = run(guided, guidance_scale=4.0, hooks=[guidekit.APG()])
    assert np.isfinite(apg).all()
    assert np.abs(apg - cfg).max() > 1e-4


class Record(SamplerHook):
    def __init__(self):
        self.preds, self.types = [], []

    def correct(self, state, pred):
        self.preds.append(pred.clone())
        self.types.append(state.prediction_type)
        return pred


def test_correction_sees_guided_eps(guided):
    record = Record()
    run(guided, guidance_scale=4.0, hooks=[record])
    assert len(record.preds) == 4
    assert record.preds[0].shape == (2, 4, 8, 8)  # ε only: the learned-variance channels are not guided
    assert set(record.types) == {"epsilon"}


TinyClassifier = TinyReLUClassifier  # a ReLU classifier on images in [-1, 1]


def test_elucd_runs_and_scale_zero_is_unguided(guided):
    unguided = run(guided, guidance_scale=4.0)
    zero = run(guided, guidance_scale=4.0, hooks=[guidekit.EluCD(TinyClassifier(), "red", scale=0.0)])
    np.testing.assert_array_equal(zero, unguided)
    steered = run(guided, guidance_scale=4.0, hooks=[guidekit.EluCD(TinyClassifier(), ["red", "blue"], scale=50.0)])
    assert np.isfinite(steered).all()
    assert np.abs(steered - unguided).max() > 1e-4
    with_apg = run(guided, hooks=[guidekit.APG(), guidekit.EluCD(TinyClassifier(), 2, scale=50.0)])
    assert np.isfinite(with_apg).all()


def test_attach_maps_dit_and_keeps_labels(stock):
    assert stock.get_label_ids(["scarlet square", "blue triangle"]) == [0, 2]
    hooked = guidekit.attach(stock, guidekit.APG())
    assert type(hooked) is GuidedDiTPipeline and type(stock) is DiTPipeline
    assert hooked.transformer is stock.transformer and hooked.vae is stock.vae
    assert hooked.get_label_ids(["scarlet square", "green circle"]) == [0, 1]
    hooked.set_progress_bar_config(disable=True)
    apg = run(hooked, guidance_scale=4.0)
    np.testing.assert_allclose(apg, run(hooked, guidance_scale=4.0, hooks=[guidekit.APG()]), rtol=0, atol=1e-6)


def test_label_names_and_save_roundtrip(guided, tmp_path):
    ids = guided.get_label_ids(["red square", "green circle"])
    assert ids == [0, 1]
    with pytest.raises(ValueError, match="does not exist"):
        guided.get_label_ids(["purple star"])
    guided.save_pretrained(tmp_path)
    assert load(GuidedDiTPipeline, tmp_path).labels == guided.labels
    assert load(DiTPipeline, tmp_path).labels == guided.labels
    out = guided(ids, generator=torch.Generator().manual_seed(1), num_inference_steps=2, output_type="pil").images
    assert len(out) == 2 and out[0].size == (16, 16)
