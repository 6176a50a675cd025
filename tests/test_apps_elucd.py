"""`guidekit generate --classifier` (EluCD from the command line) and the EluCD, pixel EluCD and StyleID rows of
`guidekit bench`."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from guidekit.apps.cli import main


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


def test_help_names_the_classifier_options():
    result = CliRunner().invoke(main, ["generate", "--help"])
    for option in ("--classifier", "--label", "--classifier-scale", "--calibration", "guidekit.EluCD"):
        assert option in result.output


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
