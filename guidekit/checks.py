"""Argument checks that raise a ValueError naming the argument, its value and what is accepted."""

from __future__ import annotations

import math
from typing import Iterable, Optional


def check_number(
    name: str,
    value,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
):
    """Return `value` as float if it is a finite number within the bounds; raise ValueError otherwise."""
    if value is None and allow_none:
        return None
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    accepted = f"a finite number in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if allow_none:
        accepted += " or None"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}")
    return number


def check_choice(name: str, value, choices: Iterable):
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {', '.join(repr(c) for c in choices)}")
    return value


def check_window(start, stop) -> tuple[float, float]:
    """`start`/`stop` as fractions of the steps, 0 <= start < stop <= 1 (diffusers guiders' convention)."""
    start = check_number("start", start, 0.0, 1.0)
    stop = check_number("stop", stop, 0.0, 1.0)
    if start >= stop:
        raise ValueError(f"start: {start} must be below stop: {stop}; accepted: 0 <= start < stop <= 1")
    return start, stop


#----------------------------------------------------------------------------
# Image sizes: one bound for every entry point (generate, batch jobs, the demo).

# Largest width or height, in pixels, any guidekit command accepts. 4096 is a multiple of every VAE factor
# in use (8 for SD/SDXL, 2 for the test models); already at this size an SD 1.x VAE decode needs tens of GiB.
MAX_IMAGE_SIDE = 4096


def check_image_size(width, height, multiple_of: int = 8, names=("width", "height")) -> tuple[int, int]:
    """Return (width, height) if each is an integer multiple of `multiple_of` in [multiple_of, MAX_IMAGE_SIDE].

    `names` are the argument names the error message uses (e.g. ("--size", "--size") for the command line).
    """
    top = MAX_IMAGE_SIDE - MAX_IMAGE_SIDE % multiple_of
    kind = "an integer" if multiple_of == 1 else f"a multiple of {multiple_of}"
    accepted = f"{kind} from {multiple_of} to {top} pixels"
    for name, value in zip(names, (width, height)):
        ok = isinstance(value, int) and not isinstance(value, bool) and multiple_of <= value <= top
        if not ok or value % multiple_of:
            raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}")
    return width, height


def available_memory(device) -> Optional[int]:
    """Bytes that a new allocation on `device` can use now, or None where this cannot be told."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # memory torch has cached but not handed out is free to torch too
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            import psutil  # a dependency of accelerate
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    return None  # mps, xpu, ...: no reliable figure


def decode_memory_estimate(pipe, width: int, height: int, images: int = 1) -> int:
    """A lower bound, in bytes, of what the VAE decode of `images` images of width x height allocates at once.

    The decoder's last block works at full resolution: the upsampled input of the block before it and two
    activations of the last block are alive together (a resnet keeps its input for the residual). The
    UNet works on 1/64 of the pixels and needs less. The real peak is higher; this bound only serves to
    refuse sizes that cannot fit, never to promise that a size will.
    """
    vae = pipe.vae
    channels = vae.config.get("block_out_channels")
    if channels is None:
        # Qwen-Image's and Wan's VAE (base_dim, dim_mult): its decoder ends at no fewer than base_dim channels
        # at full resolution; base_dim for both keeps this a lower bound
        channels = [int(vae.config.get("base_dim", 0))] * 2
    channels = list(channels)
    full_res = channels[0]
    upsampled = channels[1] if len(channels) > 1 else channels[0]
    if getattr(vae, "use_slicing", False):
        images = 1  # sliced decode: one image at a time
    itemsize = vae.dtype.itemsize if hasattr(vae.dtype, "itemsize") else 4
    return images * width * height * (upsampled + 2 * full_res) * itemsize


def check_image_memory(pipe, width: int, height: int, images: int = 1, name: str = "size") -> None:
    """Raise ValueError if decoding `images` images of width x height on `pipe`'s device needs more memory than
    is available there. Sizes whose need cannot be bounded (tiled VAE decode, unknown free memory) pass."""
    if getattr(pipe.vae, "use_tiling", False):
        return  # tiles bound the decoder's memory whatever the size
    free = available_memory(pipe.device)
    if free is None:
        return
    needed = decode_memory_estimate(pipe, width, height, images)
    if needed > free:
        per_call = f" with {images} images per call" if images > 1 else ""
        raise ValueError(
            f"{name}: {width}x{height}{per_call} needs at least {_bytes(needed)} to decode on {pipe.device}, "
            f"and {_bytes(free)} is available; accepted: a smaller size"
            + (" or fewer images per call" if images > 1 else "")
        )


def _bytes(n: int) -> str:
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
