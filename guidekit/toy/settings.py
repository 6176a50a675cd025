"""The recommended settings of the embedded models, keyed by the model folder (`settings_for`).

A folder is recognised by its denoiser's weights, not by its path: a copy of the embedded model's folder, or a
folder assembled from links to it (the embedded video model), gets the same settings, and a folder with other
weights never does, whatever its name. The weights are compared by size first, so a large foreign checkpoint is never hashed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

__all__ = ["settings_for", "embedded_name"]


def _toy_sd_path() -> Path:
    from guidekit import toy

    return Path(toy.default_model_path())  # looked up at call time: tests point it at another folder


def _toy_sd_settings() -> dict:
    from guidekit import toy

    # Read at call time, so that a changed recommendation (or a test's stand-in) is what callers get.
    return {
        "guidance_scale": float(toy.DEFAULT_GUIDANCE_SCALE),
        "steps": int(toy.DEFAULT_STEPS),
        "apg": dict(toy.RECOMMENDED_APG),
        "elucd": dict(toy.RECOMMENDED_ELUCD),
        "elucd_sampler": dict(toy.RECOMMENDED_ELUCD_SAMPLER),
    }


#: The embedded models: name -> (its folder, the denoiser weights file inside it that identifies it, its settings).
#: A new embedded model adds one entry.
EMBEDDED: dict[str, tuple[Callable[[], Path], str, Callable[[], dict]]] = {
    "toy-sd": (_toy_sd_path, "unet/diffusion_pytorch_model.safetensors", _toy_sd_settings),
}

_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime) -> SHA-256 of the file


def _digest(path: Path) -> str:
    real = os.path.realpath(path)
    info = os.stat(real)
    key = (real, info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as fh:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _same_file(candidate: Path, reference: Path) -> bool:
    """Whether two weight files hold the same bytes: the same file (through links), or equal size and hash."""
    try:
        if os.path.realpath(candidate) == os.path.realpath(reference):
            return True
        if os.path.getsize(candidate) != os.path.getsize(reference):
            return False
        return _digest(candidate) == _digest(reference)
    except OSError:
        return False


def embedded_name(path) -> Optional[str]:
    """The name of the embedded model (a key of `EMBEDDED`, e.g. "toy-sd") whose weights the diffusers folder
    `path` holds, or None: any other folder, a hub id, a path that does not exist, None.

    Args:
        path (`str` or `os.PathLike`): a diffusers pipeline folder.
    """
    if path is None:
        return None
    try:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            return None
    except (OSError, TypeError, ValueError):
        return None
    for name, (home, weights, _) in EMBEDDED.items():
        candidate = folder / weights
        if not candidate.is_file():
            continue
        try:
            reference = home() / weights
        except (FileNotFoundError, OSError):  # this embedded model is not installed
            continue
        if _same_file(candidate, reference):
            return name
    return None


def settings_for(path) -> Optional[dict]:
    """The recommended settings of the embedded model in the folder `path`, or None for any other model (whose
    defaults are then the methods' paper values and the pipeline's own; `guidekit.apps.defaults` applies them).

    The folder is recognised by its denoiser weights (`embedded_name`), so a copy of the embedded folder, or a
    folder linking to its weights (the embedded video model), gets the same settings. Each call returns new dicts
    built from `guidekit.toy`'s constants as they are at the call.

    Args:
        path (`str` or `os.PathLike`): a diffusers pipeline folder.

    Returns:
        `dict` or `None`: the keys
            - `guidance_scale` (`float`): the CFG/APG scale of the model card's measurements;
            - `steps` (`int`): the denoising steps;
            - `apg` (`dict`): `guidekit.APG` keyword arguments;
            - `elucd` (`dict`): `guidekit.EluCD` keyword arguments other than the classifier and labels, for the
              embedded classifier;
            - `elucd_sampler` (`dict` or `None`): how to sample with `elucd`: optional `scheduler` (a diffusers
              scheduler class name, or "ddpm"/"ddim", built from the model's scheduler config),
              `scheduler_kwargs` (given to that scheduler's `from_config`) and `steps`.
    """
    name = embedded_name(path)
    return None if name is None else EMBEDDED[name][2]()
