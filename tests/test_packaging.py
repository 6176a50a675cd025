"""The wheel installs guidekit alone: pipelines/ and apps/ only as guidekit.pipelines and guidekit.apps."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{result.stderr[-3000:]}")
    return next(out.glob("guidekit-*.whl"))


def test_wheel_has_no_bare_top_level_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert all(t == "guidekit" or t.startswith("guidekit-") for t in top), top
    assert "guidekit/pipelines/__init__.py" in names
    assert "guidekit/apps/cli.py" in names
    assert any(n.startswith("guidekit/assets/") for n in names)


def test_console_script_points_into_the_package(wheel):
    entry_points = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "guidekit = guidekit.apps.cli:main" in text
