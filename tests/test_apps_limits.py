"""Limits shared by every command: image sizes, finite numbers, and the batch output lock."""

from __future__ import annotations

import click
import pytest

from guidekit.apps.cli import main


def test_image_size_bounds():
    from guidekit.checks import MAX_IMAGE_SIDE, check_image_size

    assert MAX_IMAGE_SIDE == 4096
    assert check_image_size(64, 32, multiple_of=8) == (64, 32)
    assert check_image_size(4096, 4096, multiple_of=8) == (4096, 4096)
    for width, height, message in [
        (100000, 64, r"width: 100000 is not accepted; accepted: a multiple of 8 from 8 to 4096"),
        (64, 4104, r"height: 4104 is not accepted"),
        (0, 64, r"width: 0 is not accepted"),
        (36, 64, r"width: 36 is not accepted; accepted: a multiple of 8"),
        (64.5, 64, r"width: 64.5 is not accepted"),
        (True, 64, r"width: True is not accepted"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_image_size(width, height, multiple_of=8)
    with pytest.raises(ValueError, match="size: 4104 is not accepted"):
        check_image_size(4104, 4104, names=("size", "size"))


def test_every_entry_point_uses_the_shared_size_bound():
    from guidekit.apps.demo import demo
    from guidekit.apps.jobs import COMMON
    from guidekit.checks import MAX_IMAGE_SIDE

    assert COMMON["width"].max == COMMON["height"].max == MAX_IMAGE_SIDE
    max_size = next(p for p in demo.params if p.name == "max_size")
    assert max_size.type.max == MAX_IMAGE_SIDE


def test_memory_estimate_refuses_what_cannot_fit(tiny_sd_dir, monkeypatch):
    import guidekit.checks as checks
    from guidekit.apps.generate import load_pipeline

    pipe, _ = load_pipeline(str(tiny_sd_dir))
    checks.check_image_memory(pipe, 64, 64)  # fits wherever the tests run
    needed = checks.decode_memory_estimate(pipe, 64, 64, images=1)
    assert needed > 64 * 64 * 3 * 4  # at least the decoded image itself, in float32
    assert checks.decode_memory_estimate(pipe, 128, 64, images=2) == 4 * needed  # linear in pixels and images
    monkeypatch.setattr(checks, "available_memory", lambda device: needed - 1)
    with pytest.raises(ValueError, match=r"size: 64x64 needs at least [\d.]+ [KMG]iB to decode on cpu, and [\d.]+ [KMG]iB is available"):
        checks.check_image_memory(pipe, 64, 64)
    monkeypatch.setattr(checks, "available_memory", lambda device: None)  # unknown: nothing to compare with
    checks.check_image_memory(pipe, 64, 64)


def _float_options():
    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        for param in command.params:
            if isinstance(param.type, click.types.FloatParamType):
                yield name, param


# Commands whose float options are still plain click floats (none left).
NOT_YET_FINITE: set = set()


@pytest.mark.parametrize("command, option", [
    pytest.param(name, param, id=f"{name} {param.opts[0]}",
                 marks=pytest.mark.xfail(strict=True, reason="plain click float option") if name in NOT_YET_FINITE else ())
    for name, param in _float_options()
])
def test_every_float_option_refuses_nan_and_inf(command, option):
    ctx = click.Context(main.get_command(click.Context(main), command))
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(click.BadParameter, match="finite"):
            option.type.convert(value, option, ctx)


def test_finite_float_range_keeps_click_range_messages():
    from guidekit.apps.cli import FiniteFloatRange

    kind = FiniteFloatRange(0.0, 1.0)
    assert kind.convert("0.5", None, None) == 0.5
    with pytest.raises(click.BadParameter, match="not in the range 0.0<=x<=1.0"):
        kind.convert("2", None, None)
    with pytest.raises(click.BadParameter, match="'nan' is not a finite number; accepted: a finite number 0.0<=x<=1.0"):
        kind.convert("nan", None, None)
    with pytest.raises(click.BadParameter, match="is not a valid float"):
        kind.convert("many", None, None)


def test_output_lock_is_exclusive_and_released(tmp_path):
    import os

    from guidekit.apps.batch import OutputLocked, output_lock

    out = tmp_path / "runs" / "a"
    with output_lock(out) as path:
        assert path == out / ".lock"
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(OutputLocked, match=rf"--out: {out} is in use by another guidekit batch run \(pid {os.getpid()} "):
            with output_lock(out):
                pass
    with output_lock(out):  # released on exit; the file left behind does not block
        pass
