"""The `guidekit` command is quiet by default: no library loading bars or internal notes, but the denoising bars,
the library warnings a user can act on and guidekit's own warnings; `--verbose` shows everything; importing
guidekit changes no library setting.

The end-to-end checks run the command in a subprocess, as a user does: that is the only place where the
libraries' logging handlers (bound to the process's stderr) and import-time messages show as they would.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from guidekit.apps.cli import main

LOADING_BARS = ("Loading pipeline components", "Loading weights")  # diffusers', transformers'
#: transformers' notes on its own internals: optional image backends, and tokenizer lengths that diffusers reports
#: itself in words a user can act on (the truncation below)
TRANSFORMERS_NOTES = ("requires torchvision", "Token indices sequence length")
EMPTY_FLOAT32_NOTE = "should be kept in float32: []"
LONG_PROMPT = ("a red circle on a blue background " * 6).strip()  # more than the embedded model's 32 tokens


def denoising_bar(stderr: str, steps: int) -> bool:
    """Whether `stderr` holds a finished tqdm bar of `steps` steps (the pipeline's progress_bar)."""
    return re.search(rf"100%\|[^|\n\r]*\| {steps}/{steps} \[", stderr) is not None


def run_cli(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", "from guidekit.apps.cli import main; main()", *map(str, args)],
                            capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def nearest_classifier(tmp_path_factory):
    """The embedded classifier with a nearest-neighbour resample in its preprocessor_config, which guidekit
    warns about (TransformersClassifier resizes differentiably, bilinear): a guidekit warning on a real run."""
    from guidekit.toy import default_classifier_path

    folder = tmp_path_factory.mktemp("classifier") / "nearest"
    shutil.copytree(default_classifier_path(), folder)
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["resample"] = 0  # PIL NEAREST
    config_path.write_text(json.dumps(config))
    return folder


def test_a_quiet_run_keeps_the_denoising_bar_and_the_warnings_that_say_something(nearest_classifier, tmp_path):
    result = run_cli("generate", LONG_PROMPT, "--classifier", nearest_classifier, "--label", "red circle",
                     "--steps", "1", "--out", tmp_path / "a.png")
    for noise in LOADING_BARS + TRANSFORMERS_NOTES:
        assert noise not in result.stderr
    assert denoising_bar(result.stderr, 1)
    assert "UserWarning: preprocessor_config: resample 0" in result.stderr  # guidekit's own warning
    assert "input was truncated" in result.stderr  # diffusers' note that the prompt was cut
    assert "wrote " in result.stdout


def test_a_quiet_video_run_has_no_float32_note(tmp_path):
    result = run_cli("video", "a red circle on a blue background", "--frames", "1", "--steps", "1", "--size", "16",
                     "--out", tmp_path / "v.gif")
    assert EMPTY_FLOAT32_NOTE not in result.stderr
    for noise in LOADING_BARS:
        assert noise not in result.stderr
    assert denoising_bar(result.stderr, 1)


def test_verbose_shows_the_loading_bars(tmp_path):
    result = run_cli("--verbose", "generate", "a red circle", "--steps", "1", "--out", tmp_path / "a.png")
    for bar in LOADING_BARS:
        assert bar in result.stderr
    assert denoising_bar(result.stderr, 1)


def test_importing_the_command_line_changes_no_library_setting():
    code = ("import os; import guidekit.apps.cli, guidekit.apps.generate, guidekit.apps.video; "
            "from diffusers.utils import logging as d; from transformers.utils import logging as t; "
            "print(os.environ.get('TRANSFORMERS_VERBOSITY'), t.get_verbosity(), d.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", str(logging.WARNING), "True"]


@pytest.mark.parametrize("flag", [None, "--verbose"])
def test_the_settings_hold_during_the_command_and_come_back_after(tiny_sd_dir, tmp_path, monkeypatch, flag):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from guidekit.pipelines import GuidedStableDiffusionPipeline

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    transformers_logging.set_verbosity_warning()
    seen = []
    real = GuidedStableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((diffusers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GuidedStableDiffusionPipeline, "__call__", spy)
    args = ["generate", "a red circle", "--model", str(tiny_sd_dir), "--steps", "1", "--size", "32",
            "--out", str(tmp_path / "a.png")]
    result = CliRunner().invoke(main, args + ([flag] if flag else []), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen == ([(True, logging.WARNING)] if flag else [(False, logging.ERROR)])
    assert diffusers_logging.is_progress_bar_enabled() and transformers_logging.get_verbosity() == logging.WARNING


def test_only_the_empty_float32_note_is_dropped():
    import torch
    from diffusers import UNet2DConditionModel

    from guidekit.apps.quiet import quiet

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    model = UNet2DConditionModel(block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=8,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), sample_size=8,
                                 layers_per_block=1, attention_head_dim=2)
    collect = Collect()
    library = logging.getLogger("diffusers")
    library.addHandler(collect)
    try:
        model.to(torch.float32)
        if not any(EMPTY_FLOAT32_NOTE in m for m in collect.messages):
            pytest.skip("this diffusers no longer warns on a cast with nothing to keep; the filter can go")
        restore = quiet()
        try:
            collect.messages.clear()
            model.to(torch.float32)
            kept = "There are modules in X that should be kept in float32: ['norm']."
            logging.getLogger("diffusers.models.modeling_utils").warning(kept)
            assert collect.messages == [kept]  # a model that names modules keeps its warning
        finally:
            restore()
        collect.messages.clear()
        model.to(torch.float32)
        assert any(EMPTY_FLOAT32_NOTE in m for m in collect.messages)  # the filter is gone with the command
    finally:
        library.removeHandler(collect)
