"""`guidekit.video.save_video` to MP4: a clear error naming the package without PyAV, and with it (the optional
extra guidekit[mp4], not a test dependency) an H.264 file with every frame, the size and the frame rate."""

import sys

import numpy as np
import pytest

from guidekit.video import save_video
from guidekit.video.export import mp4_available


def frames(count=6, height=16, width=24):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def test_without_pyav_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    assert not mp4_available()
    with pytest.raises(ValueError, match=r'needs PyAV .* pip install "guidekit\[mp4\]" \(or pip install av\); '
                                         r"accepted suffixes without it: \.gif, \.webp"):
        save_video(frames(), tmp_path / "v.mp4")
    assert not list(tmp_path.iterdir())


def test_a_video_job_asking_for_mp4_without_pyav_names_the_field(monkeypatch):
    from guidekit.apps.jobs import JobError, parse_job

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(JobError, match=r"line 2: format: 'mp4' needs PyAV .*accepted without it: 'gif', 'webp'"):
        parse_job({"prompt": "x", "frames": 4, "format": "mp4"}, line=2)


needs_pyav = pytest.mark.skipif(not mp4_available(), reason='PyAV not installed (pip install "guidekit[mp4]")')


@needs_pyav
def test_mp4_round_trip(tmp_path):
    import av

    path = save_video(frames(6), tmp_path / "v.mp4", fps=7.5)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 7.5 and stream.codec_context.name == "h264"
    assert len(decoded) == 6 and decoded[0].shape == (16, 24, 3)
    assert [f.name for f in tmp_path.iterdir()] == ["v.mp4"]


@needs_pyav
@pytest.mark.parametrize("size, kwargs, message", [
    ((16, 23), {}, r"frames: 23x16 is not accepted for \.mp4 \(H.264 in yuv420p needs even sizes\)"),
    ((16, 24), {"loop": 2}, r"loop: 2 is not accepted with \.mp4"),
])
def test_mp4_refusals(tmp_path, size, kwargs, message):
    with pytest.raises(ValueError, match=message):
        save_video(frames(3, *size), tmp_path / "v.mp4", **kwargs)
    assert not list(tmp_path.iterdir())
