"""Processors that wrap a layer's own processor and must look like it to diffusers.

diffusers' `Attention.forward` passes a processor only the `cross_attention_kwargs` its `__call__` names
(it reads ``inspect.signature(processor.__call__)``; anything else is dropped, with a warning for most
keys and silently for ``ip_adapter_masks``). A wrapper whose `__call__` were ``(*args, **kwargs)`` would
name none of them, so e.g. an IP-Adapter processor would lose its ``ip_adapter_masks`` even while the
wrapper only passes the call through. `WrappingProcessor.__call__` therefore presents the signature of
the wrapped processor's `__call__`: diffusers passes the wrapper exactly what it would pass the wrapped one.
"""

from __future__ import annotations

import inspect

__all__ = ["WrappingProcessor"]


class _CallWithWrappedSignature:
    """Descriptor for `WrappingProcessor.__call__`: the instance's `_call`, bound, with the signature of
    ``instance.original.__call__`` (read the way `Attention.forward` reads it)."""

    def __get__(self, instance, owner=None):
        if instance is None:
            return owner._call
        call = instance._call

        def __call__(*args, **kwargs):
            return call(*args, **kwargs)

        __call__.__signature__ = instance._wrapped_signature()
        __call__.__doc__ = call.__doc__
        return __call__


class WrappingProcessor:
    """Base of guidekit's attention processors that wrap the layer's original processor.

    Subclasses implement ``_call(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
    temb=None, *args, **kwargs)`` and pass `args` and `kwargs` on to `self.original` unchanged when they
    defer to it.

    Args:
        original: the processor this one wraps (restored by whoever installed this one).
    """

    __call__ = _CallWithWrappedSignature()

    def __init__(self, original):
        self.original = original
        self._signature_of = None  # (processor, its signature): computed once per wrapped processor

    def _wrapped_signature(self) -> inspect.Signature:
        cached = self._signature_of
        if cached is None or cached[0] is not self.original:
            cached = (self.original, inspect.signature(self.original.__call__))
            self._signature_of = cached
        return cached[1]

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        raise NotImplementedError
