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


def test_generate_cfg_and_apg_differ(tiny_sd_dir, tmp_path):
    common = ["--model", str(tiny_sd_dir), "--steps", "3", "--size", "32", "--scale", "15", "--seed", "1"]
    assert run("generate", "a red circle", "--guidance", "cfg", *common, "--out", str(tmp_path / "c.png")).exit_code == 0
    assert run("generate", "a red circle", "--guidance", "apg", *common, "--out", str(tmp_path / "a.png")).exit_code == 0
    assert Image.open(tmp_path / "c.png").tobytes() != Image.open(tmp_path / "a.png").tobytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-user/no-such-model"], "--model: cannot load 'no-such-user/no-such-model'"),
        (["--size", "33"], "multiples of 2"),
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
