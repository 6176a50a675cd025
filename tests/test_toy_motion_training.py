"""train-toy-motion: AnimateDiff's recipe on the toy video world, resumable, and the assembled video model folder."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

import guidekit.toy as toy
from guidekit.testing.tiny import make_tiny_sd
from guidekit.toy.train_motion import MotionConfig, build_motion_adapter, motion_module_groups, train_motion


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def _config(**kw):
    base = dict(steps=3, batch=1, frames=4, warmup=1, checkpoint_every=1, log_every=1, heads=2)
    base.update(kw)
    return MotionConfig(**base)


def test_adapter_starts_as_the_identity(tiny_sd):
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd), subfolder="unet")
    adapter = build_motion_adapter(unet, heads=2)
    outs = [m for name, m in adapter.named_modules() if name.endswith("proj_out")]
    assert outs and all(m.weight.abs().max() == 0 and m.bias.abs().max() == 0 for m in outs)
    assert adapter.config.motion_max_seq_length == 32
    # a zero proj_out makes every motion module a residual identity: the video UNet equals the image UNet per frame
    from diffusers import UNetMotionModel

    video_unet = UNetMotionModel.from_unet2d(unet, adapter).eval()
    x = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        video = video_unet(x, 10, hidden).sample
        frames = unet(x[0].permute(1, 0, 2, 3), 10, hidden).sample
    torch.testing.assert_close(video[0].permute(1, 0, 2, 3), frames, rtol=1e-4, atol=1e-5)


def test_training_moves_only_the_motion_modules_and_resumes_exactly(tiny_sd, tmp_path):
    straight = train_motion(tmp_path / "a", tmp_path / "ck-a", _config(), model_path=tiny_sd, progress=False)
    assert straight["finished"] and straight["step"] == 3
    partial = train_motion(tmp_path / "b", tmp_path / "ck-b", _config(), model_path=tiny_sd, progress=False,
                           stop_after=0.0, export_partial=True)
    assert not partial["finished"] and partial["step"] == 1
    assert (tmp_path / "b" / "config.json").exists()  # the unfinished adapter was written
    resumed = train_motion(tmp_path / "b", tmp_path / "ck-b", _config(), model_path=tiny_sd, progress=False)
    assert resumed["finished"]
    a = MotionAdapter.from_pretrained(str(tmp_path / "a")).state_dict()
    b = MotionAdapter.from_pretrained(str(tmp_path / "b")).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    trained = [p for m in motion_module_groups(MotionAdapter.from_pretrained(str(tmp_path / "a"))) for n, p in
               m.named_parameters() if "proj_out" in n]
    assert any(p.abs().max() > 0 for p in trained)  # it learned something
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_continued_training_starts_from_the_given_adapter(tiny_sd, tmp_path):
    first = train_motion(tmp_path / "a", tmp_path / "ck-a", _config(), model_path=tiny_sd, progress=False)
    assert first["finished"]
    # lr 1e-12: the continuation's weights stay those it started from (a fresh start has zero proj_out)
    cont = _config(steps=1, lr=1e-12, init_from=str(tmp_path / "a"), step_offset=3)
    train_motion(tmp_path / "c", tmp_path / "ck-c", cont, model_path=tiny_sd, progress=False)
    a = MotionAdapter.from_pretrained(str(tmp_path / "a")).state_dict()
    c = MotionAdapter.from_pretrained(str(tmp_path / "c")).state_dict()
    proj_out = [k for k in a if "proj_out" in k]
    assert proj_out and any(a[k].abs().max() > 0 for k in proj_out)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="init_from"):
        train_motion(tmp_path / "d", tmp_path / "ck-d", _config(init_from=str(tmp_path)), model_path=tiny_sd,
                     progress=False)


def test_resume_with_other_settings_is_refused(tiny_sd, tmp_path):
    train_motion(tmp_path / "a", tmp_path / "ck", _config(steps=1), model_path=tiny_sd, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_motion(tmp_path / "a", tmp_path / "ck", _config(steps=1, lr=1e-3), model_path=tiny_sd, progress=False)


def test_video_model_folder_loads_with_stock_diffusers(tmp_path, monkeypatch):
    unet = UNet2DConditionModel.from_pretrained(str(toy.default_model_path()), subfolder="unet")
    build_motion_adapter(unet).save_pretrained(str(tmp_path / "adapter"))
    monkeypatch.setattr(toy, "default_motion_adapter_path", lambda: tmp_path / "adapter")
    monkeypatch.setenv("GUIDEKIT_CACHE", str(tmp_path / "cache"))
    folder = toy.default_video_model_path()
    assert folder.parent == tmp_path / "cache"
    assert toy.default_video_model_path() == folder  # reused, not rebuilt
    pipe = AnimateDiffPipeline.from_pretrained(str(folder))
    assert type(pipe.unet).__name__ == "UNetMotionModel"
    assert pipe.unet.config.motion_max_seq_length == 32
    assert Path(folder / "unet").resolve() == (toy.default_model_path() / "unet").resolve()  # not a second copy
