"""Installing attention processors for one call and restoring the user's own afterwards.

Clone-then-patch: nothing installed here outlives the `with` block (or the hook's `end`), also when the
call raises; the processors the user had — the same objects — are put back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Union

from ..checks import check_window
from ..hooks import SamplerHook, SamplerState
from .uniform import SwitchedUniformProcessor, UniformControl

__all__ = ["attention_layers", "replaced_processors", "UniformAttention"]

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def attention_layers(unet, kind: str = "cross") -> List[str]:
    """Processor names (keys of ``unet.attn_processors``) of the `kind` attention layers, in call order.

    Call order is down blocks, mid block, up blocks — the order MasaCtrl's `start_layer` counts in.

    Args:
        unet: a diffusers UNet (any model with `attn_processors`).
        kind (`str`, defaults to ``"cross"``): ``"cross"`` or ``"self"``.
    """
    if kind not in ("cross", "self"):
        raise ValueError(f"kind: {kind!r} is not accepted; accepted: 'cross', 'self'")
    known = set(unet.attn_processors)
    names = []
    for name, module in unet.named_modules():
        key = f"{name}.processor"
        if key in known and hasattr(module, "is_cross_attention"):
            if bool(module.is_cross_attention) == (kind == "cross"):
                names.append(key)
    return sorted(names, key=lambda n: _BLOCK_ORDER.get(n.split(".")[0], 3))  # stable: keeps in-block order


@contextmanager
def replaced_processors(unet, replacements: Dict[str, object]) -> Iterator[Dict[str, object]]:
    """Install `replacements` (name → processor) for the duration of a `with` block, then restore.

    Yields the dict of the original processors (name → processor) of all layers.
    """
    original = dict(unet.attn_processors)
    unknown = sorted(set(replacements) - set(original))
    if unknown:
        raise ValueError(f"replacements: unknown attention layers {unknown[:3]}; accepted: keys of unet.attn_processors")
    unet.set_attn_processor({**original, **replacements})
    try:
        yield original
    finally:
        unet.set_attn_processor(original)


class UniformAttention(SamplerHook):
    """Sampler hook: uniform cross-attention maps (UAM) in chosen layers and steps of a hooked pipeline.

    Works with any guidekit pipeline that runs hooks, e.g.
    ``GuidedStableDiffusionPipeline(...)(prompt, hooks=[UniformAttention()])``; the UAM pipelines use the
    same processors for inversion, reconstruction and editing.

    Args:
        layers (`str` or `list[str]`, defaults to ``"cross"``): ``"cross"`` for every cross-attention layer
            (the paper's setting), or a list of processor names from `attention_layers(unet, "cross")`.
        start (`float`, defaults to `0.0`): fraction of the steps at which uniform maps start.
        stop (`float`, defaults to `1.0`): fraction of the steps at which they stop (the paper: all steps).
    """

    def __init__(self, layers: Union[str, Sequence[str]] = "cross", start: float = 0.0, stop: float = 1.0):
        if isinstance(layers, str):
            if layers != "cross":
                raise ValueError(f"layers: {layers!r} is not accepted; accepted: 'cross' or a list of processor names")
            self.layers: Optional[tuple] = None
            self.attention_layers = frozenset({"<all cross-attention layers>"})
        else:
            self.layers = tuple(layers)
            if not self.layers:
                raise ValueError("layers: an empty list; accepted: 'cross' or a non-empty list of processor names")
            self.attention_layers = frozenset(self.layers)
        self.start, self.stop = check_window(start, stop)

    def _target(self, state: SamplerState):
        pipe = state.extras.get("pipeline")
        unet = state.extras.get("unet", getattr(pipe, "unet", None))
        if unet is None:
            raise ValueError("state: no UNet in state.extras ('unet' or 'pipeline'); accepted: a guidekit pipeline")
        return unet

    def validate(self, state: SamplerState) -> None:
        unet = self._target(state)
        cross = attention_layers(unet, "cross")
        if self.layers is not None:
            bad = [n for n in self.layers if n not in cross]
            if bad:
                raise ValueError(f"layers: {bad[:3]} are not cross-attention layers of this UNet; accepted: {cross[:3]} ...")

    def begin(self, state: SamplerState) -> None:
        # The switch and the user's processors belong to this call (state.memory), not to the hook object.
        unet = self._target(state)
        names = list(self.layers) if self.layers is not None else attention_layers(unet, "cross")
        control = UniformControl(enabled=False)
        original = dict(unet.attn_processors)
        unet.set_attn_processor({**original, **{n: SwitchedUniformProcessor(original[n], control) for n in names}})
        state.memory(self).update(control=control, unet=unet, original=original)

    def step_begin(self, state: SamplerState) -> None:
        state.memory(self)["control"].set(enabled=self.start <= state.progress < self.stop)

    def end(self, state: SamplerState) -> None:
        memory = state.memory(self)
        if memory.get("unet") is not None:
            unet, original = memory.pop("unet"), memory.pop("original")
            unet.set_attn_processor(original)

    def __repr__(self) -> str:
        layers = "'cross'" if self.layers is None else f"[{len(self.layers)} layers]"
        return f"UniformAttention(layers={layers}, start={self.start}, stop={self.stop})"
