"""`save_video`: frames to an animated GIF or WebP file with Pillow (no diffusers needed), or to an H.264 MP4 file
with PyAV (the optional extra `guidekit[mp4]`)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Union

__all__ = ["VIDEO_FORMATS", "MP4_SUFFIX", "mp4_available", "save_video"]

#: File suffix -> Pillow format name.
VIDEO_FORMATS = {".gif": "GIF", ".webp": "WEBP"}
#: The suffix of H.264 MP4 files, written with PyAV when it is installed (`pip install "guidekit[mp4]"`).
MP4_SUFFIX = ".mp4"
INSTALL_MP4 = "pip install \"guidekit[mp4]\" (or pip install av)"


def _accepted_suffixes() -> str:
    return ", ".join(VIDEO_FORMATS)


def mp4_available() -> bool:
    """Whether `save_video` can write MP4 here: PyAV is installed and has an H.264 encoder."""
    try:
        import av
    except ImportError:
        return False
    return bool(_h264_encoder(av))


def _h264_encoder(av):
    return next((name for name in ("libx264", "h264") if name in av.codecs_available), None)


def _to_uint8_frames(frames: Any):
    """`frames` as a uint8 numpy array (F, H, W, 3); ValueError for anything else."""
    import numpy as np

    layouts = "a list of PIL images, a numpy array (F, H, W, 3) or a torch tensor (F, 3, H, W) / (F, H, W, 3)"
    if isinstance(frames, (list, tuple)):
        from PIL import Image

        if not frames:
            raise ValueError("frames: an empty list is not accepted; accepted: at least one frame")
        if not all(isinstance(f, Image.Image) for f in frames):
            raise ValueError(f"frames: a list of non-images is not accepted; accepted: {layouts}")
        sizes = {f.size for f in frames}
        if len(sizes) != 1:
            raise ValueError(f"frames: images of sizes {sorted(sizes)} are not accepted; accepted: one size for all")
        return np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])

    array = None
    if type(frames).__module__.startswith("torch"):
        import torch

        if isinstance(frames, torch.Tensor):
            if frames.ndim == 4 and frames.shape[1] == 3:  # (F, 3, H, W), torch's channels-first layout
                frames = frames.permute(0, 2, 3, 1)
            array = frames.detach().to("cpu", torch.float64).numpy()
            if array.ndim == 4 and array.shape[-1] == 3:
                return _float_to_uint8(array, "frames")
    if array is None and isinstance(frames, np.ndarray):
        array = frames
        if array.ndim == 4 and array.shape[-1] == 3:
            if array.dtype == np.uint8:
                return array
            if np.issubdtype(array.dtype, np.floating):
                return _float_to_uint8(array.astype(np.float64), "frames")
            raise ValueError(f"frames: a numpy array of dtype {array.dtype} is not accepted; accepted: float in "
                             "[0, 1] or uint8")
    if array is not None:
        raise ValueError(f"frames: shape {tuple(array.shape)} is not accepted; accepted: {layouts}")
    raise ValueError(f"frames: a {type(frames).__name__} is not accepted; accepted: {layouts}")


def _float_to_uint8(array, name: str):
    import numpy as np

    if array.shape[0] == 0 or array.size == 0:
        raise ValueError(f"{name}: shape {tuple(array.shape)} has no pixels; accepted: at least one frame of 1x1")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: non-finite values (nan or inf) are not accepted; accepted: values in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name}: values from {low:g} to {high:g} are not accepted; accepted: values in [0, 1]")
    return np.round(array * 255.0).astype(np.uint8)


def save_video(frames: Any, path: Union[str, os.PathLike], fps: float = 8, loop: int = 0) -> Path:
    """Write `frames` as an animated GIF or WebP, or an H.264 MP4, chosen by the suffix of `path` (".gif", ".webp",
    or ".mp4" when PyAV is installed: `pip install "guidekit[mp4]"`).

    The file is written to a temporary file in the same folder and moved into place, so `path` is either
    the old file or the complete new one, never a partial write.

    Args:
        frames: a list of PIL images of one size; a numpy array (F, H, W, 3), float in [0, 1] or uint8; or a
            torch tensor (F, 3, H, W) or (F, H, W, 3) in [0, 1] (channels first when dimension 1 is 3).
            Values outside [0, 1] (and nan, inf) are refused, not clamped.
        path (`str` or `os.PathLike`): the output file; its folder must exist.
        fps (`float`, defaults to `8`): frames per second, in (0, 100] (GIF stores frame times in 10 ms steps).
        loop (`int`, defaults to `0`): how many times the animation repeats; 0 loops forever. MP4 stores no loop
            count: with ".mp4" only 0 is accepted.

    MP4 files are H.264 in yuv420p (what browsers and players read), so their width and height must be even;
    the pixels are stored lossily, unlike WebP (lossless) and GIF (256 colours per frame).

    Consecutive identical frames are stored once with their durations added (both formats do this), so a
    reader may see fewer frames than were written; the playback is the same.

    Returns:
        `Path`: `path`.
    """
    path = Path(path)
    fmt = VIDEO_FORMATS.get(path.suffix.lower())
    mp4 = path.suffix.lower() == MP4_SUFFIX
    if mp4 and not mp4_available():
        raise ValueError(f"path: {str(path)!r}: writing MP4 needs PyAV with an H.264 encoder, which is not installed; "
                         f"install it with {INSTALL_MP4}; accepted suffixes without it: {_accepted_suffixes()}")
    if fmt is None and not mp4:
        accepted = _accepted_suffixes() + (f", {MP4_SUFFIX}" if mp4_available() else "")
        raise ValueError(f"path: {str(path)!r} has suffix {path.suffix!r}; accepted suffixes: {accepted}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= 100:
        raise ValueError(f"fps: {fps!r} is not accepted; accepted: a finite number in (0, 100]")
    if isinstance(loop, bool) or not isinstance(loop, int) or loop < 0:
        raise ValueError(f"loop: {loop!r} is not accepted; accepted: an integer >= 0 (0 loops forever)")
    if mp4 and loop != 0:
        raise ValueError(f"loop: {loop!r} is not accepted with .mp4, which stores no loop count; accepted: 0")
    array = _to_uint8_frames(frames)
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"frames: shape {tuple(array.shape)} has no pixels; accepted: at least one frame of 1x1")
    if mp4:
        height, width = array.shape[1:3]
        if width % 2 or height % 2:
            raise ValueError(f"frames: {width}x{height} is not accepted for .mp4 (H.264 in yuv420p needs even sizes); "
                             f"accepted: an even width and height, or {_accepted_suffixes()}")
        return _write_atomic(path, lambda stream: _write_mp4(array, stream, fps))

    from PIL import Image

    images = [Image.fromarray(frame) for frame in array]
    duration = 1000.0 / fps
    options: dict = dict(save_all=True, append_images=images[1:], loop=loop)
    if fmt == "GIF":
        options.update(duration=max(10, int(round(duration / 10.0)) * 10), disposal=1)
    else:
        options.update(duration=int(round(duration)), lossless=True)
    return _write_atomic(path, lambda stream: images[0].save(stream, format=fmt, **options))


def _write_mp4(array, stream, fps: float) -> None:
    """`array` (F, H, W, 3) uint8 as H.264 (yuv420p) in an MP4 container written to the binary `stream`."""
    from fractions import Fraction

    import av

    with av.open(stream, mode="w", format="mp4") as container:
        video = container.add_stream(_h264_encoder(av), rate=Fraction(fps).limit_denominator(1001))
        video.height, video.width = array.shape[1:3]
        video.pix_fmt = "yuv420p"
        for frame in array:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())  # flush the encoder's delayed frames


def _write_atomic(path: Path, write) -> Path:
    """Call `write(binary stream)` on a temporary file beside `path`, then move it into place."""
    folder = path.parent if str(path.parent) else Path(".")
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it, not mkstemp's 0600
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
