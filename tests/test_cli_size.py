"""`--size` against the pipeline's real size rule: a usage error naming the option, never a traceback."""

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from guidekit.apps.cli import main


@pytest.fixture(scope="module")
def embedded_pipe():
    from guidekit.apps.generate import load_pipeline

    return load_pipeline(None)[0]


def refuses(result, value, multiple):
    assert result.exit_code == 2, result.output  # a click usage error, not a crash
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and "divisible" not in result.output
    assert "'--size'" in result.output and f"{value} is not accepted" in result.output
    assert f"a multiple of {multiple}" in result.output


@pytest.mark.parametrize("size, value", [("100", 100), ("36", 36), ("64x100", 100)])
def test_generate_refuses_sizes_the_embedded_pipeline_refuses(tmp_path, size, value):
    # The embedded model's VAE factor is 4, but diffusers' Stable Diffusion pipeline needs multiples of 8.
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "a red circle on a blue background", "--size", size, "--steps", "1",
                                       "--out", str(out)])
    refuses(result, value, 8)
    assert not out.exists()


def test_video_refuses_sizes_the_embedded_pipeline_refuses(tmp_path):
    out = tmp_path / "v.gif"
    result = CliRunner().invoke(main, ["video", "a red circle", "--size", "100", "--frames", "8", "--steps", "1",
                                       "--out", str(out)])
    refuses(result, 100, 8)
    assert not out.exists()


def test_generate_accepts_a_multiple_of_8_that_is_not_one_of_16(tmp_path):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["generate", "a red circle", "--size", "40x56", "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (40, 56)


def test_size_multiple_is_what_diffusers_check_inputs_accepts(embedded_pipe):
    # Every size the rule accepts passes the pipeline's own check, and every size it refuses fails there.
    from guidekit.apps.jobs import size_multiple

    multiple = size_multiple(embedded_pipe)
    for side in range(4, 133, 4):
        try:
            embedded_pipe.check_inputs("x", side, 64, None)
            ok = True
        except ValueError:
            ok = False
        assert ok == (side % multiple == 0), side


def test_size_multiple_counts_a_transformer_patch():
    # Stable Diffusion 3 checks sizes against vae_scale_factor · patch_size (16 for 8 and 2).
    from diffusers import StableDiffusion3Pipeline

    from guidekit.apps.jobs import size_multiple

    pipe = SimpleNamespace(vae_scale_factor=8, patch_size=2, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2)))
    assert size_multiple(pipe) == 16
    for side in range(8, 129, 8):
        try:
            StableDiffusion3Pipeline.check_inputs(pipe, "x", None, None, side, 64)
            ok = True
        except ValueError:
            ok = False
        assert ok == (side % 16 == 0), side


def test_style_images_use_the_same_rule(embedded_pipe):
    # The style command refuses what style jobs in `guidekit batch` and the demo refuse.
    from PIL import Image

    from guidekit.apps.jobs import JobError, resolve
    from guidekit.apps.style import check_style_images, style_pipeline

    image = Image.new("RGB", (36, 36))
    with pytest.raises(ValueError, match="CONTENT width: 36 is not accepted; accepted: a multiple of 8"):
        check_style_images(style_pipeline(embedded_pipe), image, Image.new("RGB", (64, 64)))
    job = {"content_image": "c.png", "style_image": "s.png", "width": 36, "height": 36}
    with pytest.raises(JobError, match="36 is not accepted; accepted: a multiple of 8"):
        resolve(job, embedded_pipe)
