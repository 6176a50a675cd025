"""`guidekit generate --classifier` (EluCD from the command line) and the EluCD, pixel EluCD and StyleID rows of
`guidekit bench`."""

import importlib
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from guidekit.apps.cli import main

# its help texts read guidekit.toy's values: import it before any test patches them
importlib.import_module("guidekit.apps.generate")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random transformers ResNet with three named labels and its preprocessor config, saved to a folder."""
    from guidekit.testing import CONVNEXT_PROCESSOR, make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("tiny-resnet"), processor=CONVNEXT_PROCESSOR)


def generate(tiny_sd_dir, out, *extra):
    args = ["generate", "a red circle", "--model", str(tiny_sd_dir), "--guidance", "cfg", "--steps", "3",
            "--size", "32", "--seed", "1", "--out", str(out), *extra]
    return CliRunner().invoke(main, args)


def pixels(path):
    return Image.open(path).tobytes()


def test_classifier_by_name_and_by_id_writes_the_same_png(tiny_sd_dir, classifier_dir, tmp_path):
    by_name = generate(tiny_sd_dir, tmp_path / "name.png", "--classifier", str(classifier_dir), "--label", "Green",
                       "--classifier-scale", "50")
    assert by_name.exit_code == 0, by_name.output
    assert "EluCD" in by_name.output
    by_id = generate(tiny_sd_dir, tmp_path / "id.png", "--classifier", str(classifier_dir), "--label", "1",
                     "--classifier-scale", "50")
    assert by_id.exit_code == 0, by_id.output
    assert Image.open(tmp_path / "name.png").size == (32, 32)
    assert pixels(tmp_path / "name.png") == pixels(tmp_path / "id.png")
    plain = generate(tiny_sd_dir, tmp_path / "none.png")
    assert plain.exit_code == 0, plain.output
    assert pixels(tmp_path / "name.png") != pixels(tmp_path / "none.png")  # the correction does something


def test_plain_calibration_runs_and_differs_from_elucd(tiny_sd_dir, classifier_dir, tmp_path):
    common = ["--classifier", str(classifier_dir), "--label", "red", "--classifier-scale", "50"]
    elucd = generate(tiny_sd_dir, tmp_path / "e.png", *common)
    plain = generate(tiny_sd_dir, tmp_path / "p.png", *common, "--calibration", "plain")
    assert elucd.exit_code == 0 and plain.exit_code == 0, elucd.output + plain.output
    assert "ClassifierGuidance" in plain.output
    assert pixels(tmp_path / "e.png") != pixels(tmp_path / "p.png")


def test_classifier_scale_zero_is_the_image_without_a_classifier(tiny_sd_dir, classifier_dir, tmp_path):
    with_zero = generate(tiny_sd_dir, tmp_path / "zero.png", "--classifier", str(classifier_dir), "--label", "blue",
                         "--classifier-scale", "0")
    without = generate(tiny_sd_dir, tmp_path / "without.png")
    assert with_zero.exit_code == 0 and without.exit_code == 0, with_zero.output + without.output
    assert pixels(tmp_path / "zero.png") == pixels(tmp_path / "without.png")


@pytest.fixture
def no_model_loading(monkeypatch):
    import guidekit.apps.generate as generate_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the diffusion model was loaded before the classifier arguments were checked")

    monkeypatch.setattr(generate_mod, "load_pipeline", refuse)


@pytest.mark.parametrize(
    "label, message",
    [("purple", ["'red'", "'green'", "'blue'"]), ("gren", ["did you mean 'green'"]), ("7", ["int in [0, 3)"])],
)
def test_an_unknown_label_is_a_usage_error_listing_the_labels(no_model_loading, tiny_sd_dir, classifier_dir, tmp_path,
                                                             label, message):
    result = generate(tiny_sd_dir, tmp_path / "x.png", "--classifier", str(classifier_dir), "--label", label)
    assert result.exit_code == 2, result.output
    assert "'--label'" in result.output
    for part in message:
        assert part in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--label", "red"], "without --classifier"),
        (["--classifier", "{clf}"], "is required with --classifier"),
        (["--classifier", "{clf}", "--label", "red", "--classifier-scale", "-1"], "x>=0.0"),
        (["--classifier", "{clf}", "--label", "red", "--classifier-scale", "nan"], "finite"),
        (["--classifier", "{clf}", "--label", "red", "--calibration", "other"], "'elucd', 'plain'"),
        (["--classifier", "{missing}", "--label", "red"], "is not a folder"),
    ],
)
def test_classifier_option_errors(no_model_loading, tiny_sd_dir, classifier_dir, tmp_path, extra, message):
    extra = [a.format(clf=classifier_dir, missing=tmp_path / "missing") for a in extra]
    result = generate(tiny_sd_dir, tmp_path / "x.png", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_folder_that_is_not_a_classifier_is_a_clear_error(no_model_loading, tiny_sd_dir, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    result = generate(tiny_sd_dir, tmp_path / "x.png", "--classifier", str(folder), "--label", "red")
    assert result.exit_code == 1, result.output
    assert "--classifier: cannot load" in result.output


def test_a_multistep_scheduler_is_refused_before_sampling(tiny_sd_dir, classifier_dir, tmp_path):
    """A model whose own scheduler is a multistep solver: a usage error with the hook's message, and no image."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    folder = tmp_path / "pndm-model"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(str(folder))
    out = tmp_path / "x.png"
    result = generate(folder, out, "--classifier", str(classifier_dir), "--label", "red")
    assert result.exit_code == 1 and not out.exists(), result.output
    assert "--classifier: the model's scheduler: PNDMScheduler is a multistep solver" in result.output
    assert "recommended: DDPMScheduler" in result.output and "Traceback" not in result.output


def test_help_names_the_classifier_options():
    result = CliRunner().invoke(main, ["generate", "--help"])
    for option in ("--classifier", "--label", "--classifier-scale", "--calibration", "guidekit.EluCD"):
        assert option in result.output


# ------------------------------------------------------------- the embedded model's recommended EluCD settings

# Stand-ins for guidekit.toy.RECOMMENDED_ELUCD / RECOMMENDED_ELUCD_SAMPLER, distinct from every default, so that
# the tests never depend on the real values (and stay fast: 2 steps).
DISTINCT_ELUCD = {"scale": 7.0, "softplus_beta": 2.0, "joint_temperature": 0.9, "marginal_temperature": 0.4,
                  "schedule": "ddpm", "gamma": 0.2, "start": 0.25, "stop": 0.75}
DISTINCT_SAMPLER = {"scheduler": "ddpm", "steps": 2}


@pytest.fixture
def recommended(monkeypatch):
    import guidekit.toy

    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD", dict(DISTINCT_ELUCD))
    monkeypatch.setattr(guidekit.toy, "RECOMMENDED_ELUCD_SAMPLER", dict(DISTINCT_SAMPLER))


@pytest.fixture
def embedded_pair(tiny_sd_dir, classifier_dir, monkeypatch, recommended):
    """Make the tiny checkpoint and the tiny classifier stand for the embedded model and classifier."""
    from pathlib import Path

    import guidekit.toy

    monkeypatch.setattr(guidekit.toy, "default_model_path", lambda: Path(tiny_sd_dir))
    monkeypatch.setattr(guidekit.toy, "default_classifier_path", lambda: Path(classifier_dir))


@pytest.fixture
def calls(pipeline_calls):
    return pipeline_calls


def run_generate(out, *extra):
    args = ["generate", "a red circle", "--guidance", "cfg", "--size", "32", "--seed", "1", "--out", str(out), *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def elucd_kwargs(hook) -> dict:
    return {k: getattr(hook, k) for k in DISTINCT_ELUCD}


def test_generate_embedded_pair_gets_the_recommended_settings_and_sampler(embedded_pair, classifier_dir, calls,
                                                                           tmp_path):
    result = run_generate(tmp_path / "a.png", "--classifier", str(classifier_dir), "--label", "green")
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["scheduler"] == "DDPMScheduler" and call["steps"] == DISTINCT_SAMPLER["steps"]
    hook = call["hooks"][-1]
    assert type(hook).__name__ == "EluCD" and elucd_kwargs(hook) == DISTINCT_ELUCD
    # the pipeline's own scheduler (the model's) is back after the call
    assert call["pipe"].scheduler is not None and type(call["pipe"].scheduler).__name__ != "DDPMScheduler"
    assert "DDPMScheduler 2 steps" in result.output and "EluCD s=7" in result.output

    # the same model named by its folder
    from guidekit.toy import default_model_path

    again = run_generate(tmp_path / "b.png", "--model", str(default_model_path()), "--classifier", str(classifier_dir),
                         "--label", "green")
    assert again.exit_code == 0, again.output
    assert calls[1]["scheduler"] == "DDPMScheduler" and elucd_kwargs(calls[1]["hooks"][-1]) == DISTINCT_ELUCD


def test_generate_embedded_pair_user_values_win(embedded_pair, classifier_dir, calls, tmp_path):
    result = run_generate(tmp_path / "a.png", "--classifier", str(classifier_dir), "--label", "green",
                          "--classifier-scale", "4", "--steps", "3")
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["scheduler"] == "DDPMScheduler" and call["steps"] == 3
    assert elucd_kwargs(call["hooks"][-1]) == dict(DISTINCT_ELUCD, scale=4.0)
    assert "DDPMScheduler 3 steps" in result.output


def test_generate_embedded_pair_plain_shares_the_window(embedded_pair, classifier_dir, calls, tmp_path):
    result = run_generate(tmp_path / "a.png", "--classifier", str(classifier_dir), "--label", "green",
                          "--calibration", "plain")
    assert result.exit_code == 0, result.output
    hook = calls[0]["hooks"][-1]
    assert type(hook).__name__ == "ClassifierGuidance" and calls[0]["scheduler"] == "DDPMScheduler"
    assert (hook.scale, hook.schedule, hook.start, hook.stop) == (7.0, "ddpm", 0.25, 0.75)
    assert (hook.softplus_beta, hook.gamma) == (None, 0.0)  # uncalibrated: only the calibration differs


@pytest.mark.parametrize("other", ["model", "classifier"])
def test_generate_other_model_or_classifier_keeps_the_paper_defaults(recommended, tiny_sd_dir, classifier_dir, calls,
                                                                      tmp_path, monkeypatch, other):
    from pathlib import Path

    import guidekit.toy

    if other == "classifier":  # the embedded model, another classifier
        monkeypatch.setattr(guidekit.toy, "default_model_path", lambda: Path(tiny_sd_dir))
    else:  # another model, the embedded classifier
        monkeypatch.setattr(guidekit.toy, "default_classifier_path", lambda: Path(classifier_dir))
    result = run_generate(tmp_path / "a.png", "--model", str(tiny_sd_dir), "--classifier", str(classifier_dir),
                          "--label", "green")
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["scheduler"] == "DDIMScheduler" and call["steps"] == 25
    hook = call["hooks"][-1]
    assert (hook.scale, hook.softplus_beta, hook.gamma, hook.start, hook.stop) == (1.0, 3.0, 0.3, 0.0, 1.0)
    assert "DDIMScheduler 25 steps" in result.output


def test_the_recommended_sampler_is_swapped_back_on_error(tiny_sd_dir):
    from guidekit.apps.generate import load_pipeline
    from guidekit.toy.eval_elucd import using_scheduler

    pipe = load_pipeline(str(tiny_sd_dir))[0]
    own = pipe.scheduler
    with pytest.raises(RuntimeError, match="boom"):
        with using_scheduler(pipe, "ddpm") as scheduler:
            assert pipe.scheduler is scheduler and type(scheduler).__name__ == "DDPMScheduler"
            assert scheduler.config.prediction_type == own.config.prediction_type
            raise RuntimeError("boom")
    assert pipe.scheduler is own
    with using_scheduler(pipe, None) as scheduler:
        assert scheduler is own


def test_help_states_both_step_defaults():
    import guidekit.toy

    result = CliRunner().invoke(main, ["generate", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert "Default: 25; with --classifier the embedded classifier on the embedded model, " \
        f"{guidekit.toy.RECOMMENDED_ELUCD_SAMPLER['steps']} (guidekit.toy.RECOMMENDED_ELUCD_SAMPLER)" in text


# ---------------------------------------------------------------------------------------------------- bench


def test_bench_prints_the_elucd_and_styleid_rows(monkeypatch, tmp_path):
    """One round, one step, workers run in this process (no timing is asserted)."""
    import guidekit.apps.bench as bench_mod

    cases = []

    def in_process(case, folder, steps, size):
        cases.append(case)
        return bench_mod.measure(case, str(folder), steps, size, calls=1)

    monkeypatch.setattr(bench_mod, "_run_worker", in_process)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--models", "tiny", "--rounds", "1", "--steps", "2", "--no-uam",
                                       "--no-stylessp", "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(cases) == ["apg", "cfg", "elucd", "stock"]
    assert "| tiny | guidekit CFG() + EluCD() |" in result.output
    assert "| tiny | CFG + EluCD vs CFG |" in result.output and "peak memory vs CFG" in result.output
    data = json.loads(out.read_text())
    assert data["elucd"][0]["case"] == "CFG + EluCD vs CFG" and data["elucd"][0]["mem_ratio"] > 0
    assert "| StyleID transfer (no style cache) vs DDIM inversion + reconstruction |" in result.output
    assert "| StyleID transfer (style cached) vs DDIM inversion + reconstruction |" in result.output
    assert [row["model"] for row in data["styleid"]] == ["tiny", "tiny"]


def test_bench_without_elucd_has_no_elucd_rows(monkeypatch):
    import guidekit.apps.bench as bench_mod

    monkeypatch.setattr(bench_mod, "_run_worker",
                        lambda case, folder, steps, size: [{"case": case, "wall_s": 1.0, "cpu_s": 1.0, "peak_mib": 100.0}])
    result = CliRunner().invoke(main, ["bench", "--models", "tiny", "--rounds", "1", "--no-uam", "--no-elucd",
                                       "--no-styleid", "--no-stylessp"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "EluCD" not in result.output and "StyleID" not in result.output


def test_the_pixel_bench_classifier_reads_what_the_resnet50_adapter_feeds():
    """microsoft/resnet-50's preprocessing: a 64 px sample is resized (short side 224 / 0.875) and centre-cropped
    to 224 × 224, which the pixel row's ResNet-50-size classifier must read too."""
    import guidekit.apps.bench as bench_mod
    from guidekit.guidance import TransformersClassifier
    from guidekit.testing.classifiers import tiny_resnet_classifier

    clf = TransformersClassifier(tiny_resnet_classifier(0).eval(), preprocessor_config=bench_mod.RESNET50_PROCESSOR)
    assert bench_mod.classifier_input_size(clf, 64) == "224x224"
    assert clf.resize == ("shortest_edge", 256) and clf.crop == (224, 224)


def test_bench_prints_the_pixel_elucd_row(monkeypatch, tmp_path):
    """--pixel adds the pixel-UNet EluCD row (here with a tiny UNet and the tiny classifier: no timing asserted)."""
    import guidekit.apps.bench as bench_mod
    from diffusers import UNet2DModel

    def tiny_unet(size):
        torch.manual_seed(0)
        return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                           layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"))

    monkeypatch.setattr(bench_mod, "pixel_unet", tiny_unet)
    monkeypatch.setattr(bench_mod, "resnet50_classifier", bench_mod.tiny_classifier)
    fake = {"wall_s": 1.0, "cpu_s": 1.0, "peak_mib": 100.0}
    monkeypatch.setattr(bench_mod, "_run_worker", lambda case, folder, steps, size: [{"case": case, **fake}])
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--models", "tiny", "--rounds", "1", "--no-uam", "--no-elucd",
                                       "--no-styleid", "--no-stylessp", "--pixel", "--json", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"| {bench_mod.PIXEL_CASE} |" in result.output and "wall per step vs unguided" in result.output
    row = json.loads(out.read_text())["pixel"][0]
    assert row["case"] == bench_mod.PIXEL_CASE and row["wall_ratio"] > 0 and row["elucd_s_per_step"] > 0
    # the size the classifier's own preprocessing feeds it, and CPU time named for what it is (the whole process's)
    assert row["classifier_input"] == "16x16" and "classifier_input=16x16" in result.output
    assert row["process_cpu_ratio"] > 0 and "cpu_ratio" not in {k for k in row if k != "process_cpu_ratio"}
    no_pixel = CliRunner().invoke(main, ["bench", "--models", "tiny", "--rounds", "1", "--no-uam", "--no-elucd",
                                         "--no-styleid", "--no-stylessp"], catch_exceptions=False)
    assert "pixel" not in no_pixel.output  # off by default


def test_bench_prints_the_stylessp_rows_from_fake_workers(monkeypatch):
    """The StyleSSP rows are ratios of the medians of the two transfer cases, with and without a style cache."""
    import guidekit.apps.bench as bench_mod

    def fake(case, folder, steps, size):
        if case not in bench_mod.TRANSFER_CASES:
            return [{"case": case, "wall_s": 1.0, "cpu_s": 1.0, "peak_mib": 100.0}]
        wall = {"styleid-transfer": 2.0, "stylessp-transfer": 3.0}[case]
        return [{"case": case, "style_cache": cache, "wall_s": wall / (2 if cache else 1), "cpu_s": wall,
                 "peak_mib": 100.0} for cache in (False, True)]

    monkeypatch.setattr(bench_mod, "_run_worker", fake)
    result = CliRunner().invoke(main, ["bench", "--models", "tiny", "--rounds", "1", "--no-uam", "--no-elucd",
                                       "--no-styleid"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "StyleID + StyleSSP() vs StyleID, tiny, style not cached" in result.output
    assert "StyleID + StyleSSP() vs StyleID, tiny, style cached" in result.output
    assert "1.500x" in result.output or "1.50x" in result.output, result.output
