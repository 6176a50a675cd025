"""Argument checks shared by the FreeNoise core; each raises a ValueError naming the argument and what is accepted."""

from __future__ import annotations

from typing import Optional

import torch


def check_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None, extra: str = "") -> int:
    """Return `value` if it is an int (not a bool) in [low, high]; raise ValueError otherwise.

    Args:
        name (`str`): the argument's name, used in the message.
        value: the value to check; floats, even integral ones, are refused so that frame counts are never rounded.
        low (`int`, *optional*): the smallest accepted value.
        high (`int`, *optional*): the largest accepted value.
        extra (`str`, defaults to `""`): why the bound is there, appended to the message.
    """
    if low is not None and high is not None:
        accepted = f"an integer from {low} to {high}"
    elif low is not None:
        accepted = f"an integer >= {low}"
    elif high is not None:
        accepted = f"an integer <= {high}"
    else:
        accepted = "an integer"
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: {accepted}{extra}")
    return value


def check_context(context_length, context_stride, max_length=None) -> tuple[int, int]:
    """Check a FreeNoise window length W and stride S: 1 <= W <= max_length (if given) and 1 <= S <= W.

    Args:
        context_length: W, the frames one window holds (the motion model's training length).
        context_stride: S, the frames between the starts of two windows.
        max_length (`int`, *optional*): the motion model's positional limit (e.g. diffusers'
            `motion_max_seq_length`); a window longer than it would show the model positions it has no
            embedding for.
    """
    if max_length is not None:
        max_length = check_int("max_length", max_length, 1)
        check_int("context_length", context_length, 1, max_length,
                  extra=" (max_length, the motion model's positional limit)")
    else:
        check_int("context_length", context_length, 1)
    # S > W would leave frames between two windows that no window covers (and the shuffle would copy
    # from frames that are not rescheduled yet)
    check_int("context_stride", context_stride, 1, context_length, extra=" (context_length)")
    return context_length, context_stride


def check_tensor(name: str, tensor, dims: int, layout: str) -> torch.Tensor:
    """Return `tensor` if it is a non-empty floating-point torch.Tensor with `dims` dimensions.

    Args:
        name (`str`): the argument's name, used in the message.
        tensor: the value to check.
        dims (`int`): the required number of dimensions.
        layout (`str`): the expected layout, e.g. "(B, C, F, H, W)", used in the message.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: a {type(tensor).__name__} is not accepted; accepted: a torch.Tensor {layout}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: dtype {tensor.dtype} is not accepted; accepted: a floating-point tensor")
    if tensor.dim() != dims or tensor.numel() == 0:
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} is not accepted; accepted: a non-empty {dims}-D tensor {layout}"
        )
    return tensor
