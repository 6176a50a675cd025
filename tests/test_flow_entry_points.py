"""SD3, Flux and Qwen-Image folders through the entry points: `guidekit generate`, batch jobs and the demo.

The family comes from model_index.json; the guidance slot's scale goes where the family's pipeline takes it
(SD3: guidance_scale; Flux, Qwen-Image: true_cfg_scale with a negative prompt, "" when none is given); methods
the family cannot run are refused naming the method and the family.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import guidekit
from guidekit.apps.generate import generate
from guidekit.pipelines import GuidedFluxPipeline, GuidedQwenImagePipeline, GuidedStableDiffusion3Pipeline

# family name -> (tiny checkpoint maker, hooked class, pipeline argument of the scale, label in messages)
FAMILIES = {
    "sd3": ("guidekit.testing.flow:make_tiny_sd3", GuidedStableDiffusion3Pipeline, "guidance_scale",
            "Stable Diffusion 3"),
    "flux": ("guidekit.testing.flux:make_tiny_flux", GuidedFluxPipeline, "true_cfg_scale", "Flux"),
    "qwenimage": ("guidekit.testing.qwenimage:make_tiny_qwenimage", GuidedQwenImagePipeline, "true_cfg_scale",
                  "Qwen-Image"),
}
SIZE = 16  # a multiple of every tiny model's size rule; small enough for seconds on a CPU


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    """The tiny checkpoints saved to folders, as a user's would be (model_index.json with the stock class)."""
    import importlib

    dirs = {}
    for name, (maker, *_rest) in FAMILIES.items():
        module, attr = maker.split(":")
        dirs[name] = Path(getattr(importlib.import_module(module), attr)(tmp_path_factory.mktemp(name)))
    return dirs


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from guidekit.testing.wan import make_tiny_wan

    return Path(make_tiny_wan(tmp_path_factory.mktemp("wan")))


@pytest.fixture
def calls(monkeypatch):
    """Each call of a flow hooked pipeline: (its class, the keyword arguments it was called with)."""
    seen = []
    for cls in (GuidedStableDiffusion3Pipeline, GuidedFluxPipeline, GuidedQwenImagePipeline):
        original = cls.__call__

        def spy(self, *args, _original=original, **kwargs):
            seen.append((type(self), kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    return seen


def run_generate(*args):
    return CliRunner().invoke(generate, [str(a) for a in args], catch_exceptions=False)


#----------------------------------------------------------------------------
# guidekit generate

@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_apg_and_cfg_on_the_family_class_and_scale(family, flow_dirs, calls, tmp_path):
    _maker, cls, scale_name, _label = FAMILIES[family]
    pixels = {}
    for method in ("apg", "cfg"):
        out = tmp_path / f"{method}.png"
        result = run_generate("a red circle", "--model", flow_dirs[family], "--guidance", method, "--scale", 5,
                              "--steps", 2, "--size", SIZE, "--out", out)
        assert result.exit_code == 0, result.output
        with Image.open(out) as im:
            assert im.size == (SIZE, SIZE)
            pixels[method] = np.asarray(im.convert("RGB"), dtype=np.int16)
        used, kwargs = calls[-1]
        assert used is cls
        assert kwargs[scale_name] == 5.0
        hook = kwargs["hooks"][0]
        assert isinstance(hook, guidekit.APG if method == "apg" else guidekit.CFG)
        if scale_name == "true_cfg_scale":
            # a negative prompt, so that the unconditional pass that CFG and APG mix runs at all
            assert kwargs["negative_prompt"] == ""
            assert kwargs.get("guidance_scale") is None  # the distilled-guidance input is left at its default
    assert np.abs(pixels["apg"] - pixels["cfg"]).max() > 0  # APG (eta 0, momentum) is not CFG at the same w


def test_generate_keeps_a_given_negative_prompt(flow_dirs, calls, tmp_path):
    result = run_generate("a red circle", "--model", flow_dirs["flux"], "--negative-prompt", "blurry", "--steps", 1,
                          "--size", SIZE, "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert calls[-1][1]["negative_prompt"] == "blurry"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from guidekit.testing import CONVNEXT_PROCESSOR, make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-resnet"), processor=CONVNEXT_PROCESSOR)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_runs_classifier_guidance_on_flow_families(family, flow_dirs, calls, classifier_dir, tmp_path):
    import guidekit

    result = run_generate("a cat", "--model", flow_dirs[family], "--classifier", classifier_dir, "--label", "1",
                          "--classifier-scale", "50", "--steps", 2, "--size", SIZE, "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.png").exists()
    cls, kwargs = calls[-1]
    assert cls is FAMILIES[family][1]
    assert any(isinstance(h, guidekit.EluCD) for h in kwargs["hooks"])


def test_generate_refuses_a_wan_folder_naming_what_runs_it(wan_dir, tmp_path):
    result = CliRunner().invoke(generate, ["a cat", "--model", str(wan_dir), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1, result.output
    assert "WanPipeline" in result.output and "guidekit video --model" in result.output
    assert not (tmp_path / "x.png").exists()


def test_size_rule_of_packed_latents():
    """Flux packs 2x2 latent pixels into a token with a transformer patch_size of 1: sizes are multiples of twice
    the VAE factor (FluxPipeline asks for vae_scale_factor * 2), 16 for its VAE factor 8."""
    from guidekit.apps.jobs import default_size, size_multiple

    config = SimpleNamespace(patch_size=1)
    flux_like = SimpleNamespace(vae_scale_factor=8, transformer=SimpleNamespace(config=config),
                                _pack_latents=staticmethod(lambda *a: None), default_sample_size=128)
    assert size_multiple(flux_like) == 16
    assert default_size(flux_like) == 1024  # no UNet: default_sample_size times the VAE factor


#----------------------------------------------------------------------------
# Batch jobs

def write_jobs(path: Path, *rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_batch_on_a_flow_model_records_family_and_scale(flow_dirs, tmp_path, capsys):
    from guidekit.apps import batch as batch_mod

    common = dict(prompt="a red circle", steps=2, width=SIZE, height=SIZE)
    jobs = write_jobs(tmp_path / "jobs.jsonl", dict(common, guidance="apg", guidance_scale=5, name="a"),
                      dict(common, guidance="cfg", guidance_scale=3, negative_prompt="blurry"))
    out = tmp_path / "out"
    assert batch_mod.run_batch(jobs, out, model=str(flow_dirs["flux"])) == 0
    rows = sorted((json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()),
                  key=lambda r: r["line"])
    assert [r["family"] for r in rows] == ["flux", "flux"]
    assert rows[0]["scale"] == {"true_cfg_scale": 5.0, "negative_prompt": ""}
    assert rows[1]["scale"] == {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}
    assert rows[0]["model"]["class"] == "GuidedFluxPipeline"
    assert all((out / r["file"]).is_file() for r in rows)


def test_batch_refuses_methods_the_family_cannot_run_when_the_file_is_read(flow_dirs, tmp_path, capsys):
    from guidekit.apps import batch as batch_mod

    (tmp_path / "c.png").write_bytes(b"")
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "c.png")
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      dict(content_image="c.png", style_image="c.png", name="style"),
                      dict(prompt="a cat", guidance="cfg", guidance_rescale=0.7))
    out = tmp_path / "out"
    # --strict stops before any model weights load: the family comes from model_index.json alone
    assert batch_mod.run_batch(jobs, out, model=str(flow_dirs["qwenimage"]), strict=True) == 2
    err = capsys.readouterr().err
    assert "line 1 (job 'style'): content_image: StyleID style transfer does not run on Qwen-Image" in err
    assert "line 2: guidance_rescale:" in err and "Qwen-Image" in err
    assert not (out / "manifest.jsonl").exists()


def test_read_jobs_keeps_every_job_without_a_family(tmp_path):
    from guidekit.apps.jobs import read_jobs

    jobs = write_jobs(tmp_path / "jobs.jsonl", dict(prompt="a cat", classifier=str(tmp_path), label=1))
    parsed, errors = read_jobs(jobs)
    assert len(parsed) == 1 and errors == []


#----------------------------------------------------------------------------
# The demo's backend

def test_demo_generate_tab_on_a_flow_folder(flow_dirs, calls):
    from guidekit.apps.demo import DemoBackend, Limits
    from guidekit.apps.jobs import JobError, load_pipeline

    pipe, name = load_pipeline(str(flow_dirs["sd3"]))
    backend = DemoBackend(pipe, name, Limits(max_steps=4, max_size=64))
    cfg, apg, summary = backend.compare("a red circle", "", 0, 2, SIZE, SIZE, 6.0, 0.0, 15.0, -0.5)
    assert cfg.size == apg.size == (SIZE, SIZE) and "APG" in summary
    assert [c[0] for c in calls] == [GuidedStableDiffusion3Pipeline] * 2
    assert all(kwargs["guidance_scale"] == 6.0 for _, kwargs in calls)
    for run, method in ((lambda: backend.reconstruct_edit(None, "a", "b", 0, 2, SIZE, 5.0), "UAM"),
                        (lambda: backend.style(None, None, "", 0, 2, SIZE, 0.75, 1.5, 0.7), "StyleID")):
        with pytest.raises(JobError, match=f"{method}.*does not run on Stable Diffusion 3"):
            run()


@pytest.mark.parametrize("apg", [False, True])
def test_video_runs_a_wan_folder_with_the_wan_class(apg, wan_dir, monkeypatch, tmp_path):
    from guidekit.apps.video import video
    from guidekit.pipelines import GuidedWanPipeline

    seen = []
    original = GuidedWanPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((type(self), kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GuidedWanPipeline, "__call__", spy)
    out = tmp_path / "x.gif"
    args = ["a cat", "--model", str(wan_dir), "--frames", "5", "--steps", "2", "--size", str(SIZE), "--scale", "4",
            "--out", str(out)] + (["--apg"] if apg else [])
    result = CliRunner().invoke(video, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size == (SIZE, SIZE) and im.n_frames == 5
    (used, kwargs), = seen
    assert used is GuidedWanPipeline and kwargs["guidance_scale"] == 4.0 and kwargs["num_frames"] == 5
    assert isinstance(kwargs["hooks"][0], guidekit.APG if apg else guidekit.CFG)


@pytest.mark.parametrize("option, method", [(["--context-length", "8"], "FreeNoise"),
                                            (["--prompt", "4:a red cat"], "prompt travel"),
                                            (["--frames", "6"], "4k + 1")])
def test_video_refuses_what_wan_cannot_run(option, method, wan_dir, tmp_path):
    from guidekit.apps.video import video

    result = CliRunner().invoke(video, ["a cat", "--model", str(wan_dir), "--size", str(SIZE), "--out",
                                        str(tmp_path / "x.gif"), *option])
    assert result.exit_code == 2, result.output
    assert method in result.output and option[0] in result.output
    assert not (tmp_path / "x.gif").exists()


def test_video_refuses_an_image_flow_model(flow_dirs, tmp_path):
    from guidekit.apps.video import video

    result = CliRunner().invoke(video, ["a cat", "--model", str(flow_dirs["sd3"]), "--out", str(tmp_path / "x.gif")])
    assert result.exit_code == 2, result.output
    assert "Stable Diffusion 3" in result.output and "guidekit generate" in result.output


def test_style_refuses_a_flow_model_naming_styleid_and_the_family(flow_dirs, tmp_path):
    from guidekit.apps.style import style

    for name in ("content.png", "style.png"):
        Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(tmp_path / name)
    result = CliRunner().invoke(style, [str(tmp_path / "content.png"), str(tmp_path / "style.png"), "--model",
                                        str(flow_dirs["flux"]), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert "StyleID" in result.output and "Flux" in result.output and "--model" in result.output


def test_true_cfg_scale_of_one_is_the_conditional_pass_and_below_one_is_refused(flow_dirs, calls, tmp_path):
    """Flux runs no unconditional pass at true_cfg_scale <= 1. CFG and APG at w = 1 are the conditional prediction
    (APG asks for no unconditional pass at w <= 1), so w = 1 runs the conditional pass alone; w < 1, which
    elsewhere extrapolates towards the unconditional prediction, is refused."""
    result = run_generate("a red circle", "--model", flow_dirs["flux"], "--guidance", "apg", "--scale", 1,
                          "--steps", 1, "--size", SIZE, "--out", tmp_path / "one.png")
    assert result.exit_code == 0, result.output
    (_cls, kwargs), = calls
    assert kwargs["true_cfg_scale"] == 1.0 and kwargs["negative_prompt"] is None and kwargs["hooks"] == []
    result = CliRunner().invoke(generate, ["a cat", "--model", str(flow_dirs["flux"]), "--scale", "0.5",
                                           "--out", str(tmp_path / "half.png")])
    assert result.exit_code == 2 and "--scale" in result.output and "below 1" in result.output, result.output
    from guidekit.apps.demo import DemoBackend, Limits
    from guidekit.apps.jobs import JobError, load_pipeline

    pipe, name = load_pipeline(str(flow_dirs["flux"]))
    backend = DemoBackend(pipe, name, Limits(max_steps=4, max_size=64))
    grid, table = backend.sweep("a red circle", "", 0, 1, SIZE, SIZE, "1, 3", 0.0, 15.0, -0.5)
    assert [row[0] for row in table] == [1.0, 3.0]
    with pytest.raises(JobError, match="guidance_scale: 0.5 is below 1"):
        backend.sweep("a red circle", "", 0, 1, SIZE, SIZE, "0.5", 0.0, 15.0, -0.5)
