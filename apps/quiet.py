"""What the `guidekit` command (and the demo it starts) keeps off the terminal unless `--verbose` is given.

On every run, diffusers and transformers print messages about their own internals: loading bars for files read
from disk in a fraction of a second, transformers' notes on optional image backends and checkpoint keys, and
diffusers' float32 note on every AnimateDiff model. They say nothing a user can act on and bury guidekit's own
output. `quiet()` hides exactly those and keeps:

- the denoising progress bars: diffusers' pipelines draw them with tqdm directly, not through the
  `diffusers.utils.logging.tqdm` that the switch below turns off;
- download bars (huggingface_hub's): a first download of a hub model takes minutes and must show that it runs;
- diffusers' warnings other than the one named below, e.g. that a prompt was truncated to the text encoder's length;
- every message and warning of guidekit itself (Python warnings and the `guidekit.*` loggers are left alone).

Only the command line calls this: importing guidekit as a library changes no global setting.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

#: diffusers' `ModelMixin.to()` warns on every cast to a dtype, also when the model keeps no module in float32
#: (its check reads `self._keep_in_fp32_modules or []`, which is never None). AnimateDiff pipelines cast on every
#: load: `UNetMotionModel.from_unet2d` ends with `model.to(unet.dtype)` when the pipeline joins an image UNet and a
#: MotionAdapter, whatever dtype the caller asked for. The empty list marks the message as saying nothing; a model
#: that does list modules keeps the warning.
EMPTY_FLOAT32_NOTE = ("diffusers.models.modeling_utils", "that should be kept in float32: []")


class _DropMessage(logging.Filter):
    """Drops the records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _no_bar(factory, args, kwargs):
    return factory(*args, **{**kwargs, "disable": True})


def quiet() -> Callable[[], None]:
    """Hide the third-party messages and loading bars described in this module's docstring, from now on.

    Call it before the libraries are imported by the command (transformers warns at import time). A
    `TRANSFORMERS_VERBOSITY` set in the environment wins over the level set here.

    Returns:
        A function with no argument that puts every setting changed here back as it was (the command line calls
        it when the command ends, so that a caller of `main(standalone_mode=False)` gets its libraries back as
        they were).
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    undo = []
    if not os.environ.get("TRANSFORMERS_VERBOSITY"):
        level = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        undo.append(lambda: transformers_logging.set_verbosity(level))
    if hasattr(transformers_logging, "set_tqdm_hook"):
        # only transformers' own bars ("Loading weights"); disable_progress_bar() would hide downloads too
        previous = transformers_logging.set_tqdm_hook(_no_bar)
        undo.append(lambda: transformers_logging.set_tqdm_hook(previous))
    elif transformers_logging.is_progress_bar_enabled():  # a transformers without the hook: its switch, which
        transformers_logging.disable_progress_bar()        # hides download bars too
        undo.append(transformers_logging.enable_progress_bar)
    if diffusers_logging.is_progress_bar_enabled():
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components...", checkpoint shards
        undo.append(diffusers_logging.enable_progress_bar)
    name, text = EMPTY_FLOAT32_NOTE
    logger, drop = logging.getLogger(name), _DropMessage(text)
    logger.addFilter(drop)
    undo.append(lambda: logger.removeFilter(drop))

    def restore() -> None:
        while undo:
            undo.pop()()

    return restore
