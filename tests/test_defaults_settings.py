"""`guidekit.toy.settings_for`: the embedded model's recommended settings, found by the folder's weights."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import guidekit.toy as toy
from guidekit.toy import settings as settings_mod

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def embedded():
    try:
        path = Path(toy.default_model_path())
    except FileNotFoundError as e:
        pytest.skip(f"no embedded model: {e}")
    return path


def _expected() -> dict:
    return {"guidance_scale": toy.DEFAULT_GUIDANCE_SCALE, "steps": toy.DEFAULT_STEPS, "apg": toy.RECOMMENDED_APG,
            "elucd": toy.RECOMMENDED_ELUCD, "elucd_sampler": toy.RECOMMENDED_ELUCD_SAMPLER}


def test_the_embedded_folder_gets_the_constants(embedded):
    settings = toy.settings_for(embedded)
    assert settings == _expected()
    assert toy.settings_for(str(embedded)) == settings
    assert settings_mod.embedded_name(embedded) == "toy-sd"


def test_a_copy_and_a_linked_folder_are_recognised_by_their_weights(embedded, tmp_path):
    copy = tmp_path / "my-copy"
    (copy / "unet").mkdir(parents=True)
    shutil.copyfile(embedded / WEIGHTS, copy / WEIGHTS)
    assert toy.settings_for(copy) == _expected()
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink((embedded / "unet").resolve(), linked / "unet", target_is_directory=True)
    assert toy.settings_for(linked) == _expected()


def test_other_weights_of_the_same_size_are_not_the_embedded_model(embedded, tmp_path):
    other = tmp_path / "other"
    (other / "unet").mkdir(parents=True)
    data = bytearray((embedded / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # the same size, one byte different
    (other / WEIGHTS).write_bytes(bytes(data))
    assert toy.settings_for(other) is None


def test_other_models_and_paths_get_none(tiny_sd_dir, tmp_path):
    assert toy.settings_for(tiny_sd_dir) is None
    for path in (None, "org/name", tmp_path / "missing", tmp_path):
        assert toy.settings_for(path) is None


def test_values_are_read_at_call_time_and_returned_as_copies(embedded, monkeypatch):
    monkeypatch.setattr(toy, "RECOMMENDED_APG", {"eta": 0.5, "norm_threshold": 1.5, "momentum": 0.1})
    monkeypatch.setattr(toy, "DEFAULT_GUIDANCE_SCALE", 4.5)
    settings = toy.settings_for(embedded)
    assert settings["apg"] == {"eta": 0.5, "norm_threshold": 1.5, "momentum": 0.1}
    assert settings["guidance_scale"] == 4.5
    settings["apg"]["eta"] = 0.9
    settings["elucd"]["scale"] = -1
    assert toy.RECOMMENDED_APG["eta"] == 0.5 and toy.RECOMMENDED_ELUCD["scale"] != -1


def test_the_embedded_folder_follows_default_model_path(tiny_sd_dir, monkeypatch):
    """Which folder is the embedded model is read at call time (tests stand a tiny model in for it)."""
    monkeypatch.setattr(toy, "default_model_path", lambda: Path(tiny_sd_dir))
    assert toy.settings_for(tiny_sd_dir) == _expected()
