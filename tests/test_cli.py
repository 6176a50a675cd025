"""`guidekit generate` end to end on a local checkpoint, and its errors."""

import pytest
from click.testing import CliRunner
from PIL import Image

from guidekit.apps.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_generate_writes_a_png_and_refuses_to_overwrite(tiny_sd_dir, tmp_path):
    out = tmp_path / "apg.png"
    result = run("generate", "a red circle on a blue background", "--model", str(tiny_sd_dir), "--steps", "2",
                 "--size", "32", "--scale", "12", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (32, 32)
    before = out.read_bytes()
    again = run("generate", "something else", "--model", str(tiny_sd_dir), "--steps", "2", "--out", str(out))
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert out.read_bytes() == before  # nothing lost
    assert not list(tmp_path.glob(".*partial"))


def test_generate_without_a_classifier_keeps_the_model_scheduler_and_25_steps(tiny_sd_dir, tmp_path, monkeypatch):
    from guidekit.pipelines import GuidedStableDiffusionPipeline

    seen = []
    real = GuidedStableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((type(self.scheduler).__name__, kwargs["num_inference_steps"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GuidedStableDiffusionPipeline, "__call__", spy)
    result = run("generate", "a red circle", "--model", str(tiny_sd_dir), "--size", "32", "--out",
                 str(tmp_path / "a.png"))
    assert result.exit_code == 0, result.output
    assert seen == [("DDIMScheduler", 25)]
    assert "DDIMScheduler 25 steps" in result.output  # the message names the sampler and the steps
    again = run("generate", "a red circle", "--model", str(tiny_sd_dir), "--size", "32", "--steps", "2", "--out",
                str(tmp_path / "b.png"))
    assert again.exit_code == 0 and seen[-1] == ("DDIMScheduler", 2) and "DDIMScheduler 2 steps" in again.output


def test_generate_cfg_and_apg_differ(tiny_sd_dir, tmp_path):
    common = ["--model", str(tiny_sd_dir), "--steps", "3", "--size", "32", "--scale", "15", "--seed", "1"]
    assert run("generate", "a red circle", "--guidance", "cfg", *common, "--out", str(tmp_path / "c.png")).exit_code == 0
    assert run("generate", "a red circle", "--guidance", "apg", *common, "--out", str(tmp_path / "a.png")).exit_code == 0
    assert Image.open(tmp_path / "c.png").tobytes() != Image.open(tmp_path / "a.png").tobytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-user/no-such-model"], "--model: cannot load 'no-such-user/no-such-model'"),
        (["--size", "33"], "a multiple of 8"),
        (["--size", "big"], "accepted: N or WxH"),
        (["--eta", "2"], "2.0 is not in the range 0.0<=x<=1.0"),
        (["--norm-threshold", "0"], "x>0.0"),
        (["--scale", "-1"], "x>=0.0"),
        (["--out", "image.jpg"], "a path ending in .png"),
    ],
)
def test_generate_errors_name_the_option(tiny_sd_dir, tmp_path, args, message):
    base = ["generate", "a red circle", "--steps", "1", "--out", str(tmp_path / "x.png")]
    if "--model" not in args:
        base += ["--model", str(tiny_sd_dir)]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code != 0
    assert message in result.output


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "without model_index.json" in result.output


def test_help_lists_the_commands():
    result = run("--help")
    assert "generate" in result.output and "bench" in result.output


#----------------------------------------------------------------------------
# Sizes, numbers, model kind, the embedded model, warnings.

@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if `generate` loads a model: the arguments must be refused before anything is allocated."""
    import guidekit.apps.generate as generate_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(generate_mod, "load_pipeline", refuse)


@pytest.mark.parametrize("size", ["100000", "4104", "64x100000", "0"])
def test_generate_refuses_a_size_that_cannot_fit_before_loading(no_model_loading, tmp_path, size):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "a red circle on a blue background", "--size", size,
                                       "--out", str(out)])
    assert result.exit_code == 2, result.output  # a usage error, not a crash
    assert "'--size'" in result.output and "4096" in result.output
    assert not out.exists()


def test_generate_refuses_a_size_over_the_available_memory(tiny_sd_dir, tmp_path, monkeypatch):
    import guidekit.checks as checks

    monkeypatch.setattr(checks, "available_memory", lambda device: 2**10, raising=False)  # 1 KiB free
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "a red circle", "--model", str(tiny_sd_dir), "--steps", "1",
                                       "--size", "64", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "'--size'" in result.output and "64x64" in result.output and "available" in result.output
    assert not out.exists()


@pytest.mark.parametrize("option", ["--scale", "--eta", "--norm-threshold", "--momentum"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_generate_float_options_refuse_nan_and_inf(no_model_loading, tmp_path, option, value):
    result = CliRunner().invoke(main, ["generate", "a red circle", option, value, "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert f"'{option}'" in result.output and "finite" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def _cache_as_hub_model(cache, repo_id: str, folder):
    """Put `folder` into a Hugging Face cache layout under `repo_id`, as a download would."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_sdxl_is_read_from_the_model_index_not_the_name(tiny_sd_dir, tiny_sdxl_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from guidekit.apps.generate import load_pipeline
    from guidekit.pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline

    cache = tmp_path / "hub"
    _cache_as_hub_model(cache, "someone/pixel-model", tiny_sdxl_dir)  # SDXL without "xl" in its id
    _cache_as_hub_model(cache, "someone/xl-lookalike", tiny_sd_dir)  # SD 1.x with "xl" in its id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    pipe, _ = load_pipeline("someone/pixel-model")
    assert isinstance(pipe, GuidedStableDiffusionXLPipeline)
    pipe, _ = load_pipeline("someone/xl-lookalike")
    assert type(pipe) is GuidedStableDiffusionPipeline
    # a local folder named like an SDXL model is read the same way
    local = tmp_path / "my-sdxl-style-folder"
    local.symlink_to(tiny_sd_dir, target_is_directory=True)
    assert type(load_pipeline(str(local))[0]) is GuidedStableDiffusionPipeline


def test_a_pipeline_that_is_not_sd_is_a_clear_error(tiny_sd_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "other"
    shutil.copytree(tiny_sd_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="PixArtAlphaPipeline")))
    result = CliRunner().invoke(main, ["generate", "x", "--model", str(folder), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert "PixArtAlphaPipeline" in result.output and "StableDiffusionXLPipeline" in result.output


def test_missing_embedded_model_is_an_error_not_noise(tmp_path, monkeypatch):
    import guidekit.toy

    missing = tmp_path / "not-installed" / "toy-sd"
    monkeypatch.setattr(guidekit.toy, "default_model_path", lambda: missing)
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "a red circle", "--steps", "1", "--out", str(out)])
    assert result.exit_code != 0
    assert "embedded model" in result.output and str(missing) in result.output and "--model" in result.output
    assert not out.exists()


def test_loading_raises_no_deprecation_warning(tiny_sd_dir, tmp_path):
    import warnings

    out = tmp_path / "x.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        result = run("generate", "a red circle", "--model", str(tiny_sd_dir), "--steps", "1", "--size", "32",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.exists()
