"""Uniform cross-attention maps (UAM, Mo et al., WACV 2025, §3 / METHODS.md §2.2).

In a cross-attention layer the map softmax(QKᵀ/√d) is replaced by the constant 1/N over the N text
tokens, so every spatial position receives the same vector::

    out_i = to_out( (1/N) Σ_j V_j )  = to_out( to_v( (1/N) Σ_j e_j ) )

The second form holds because `to_v` is affine; it is what `uniform_attention` computes. No query, no key,
no QKᵀ and no softmax are formed, so the layer is cheaper than the one it replaces.

IP-Adapter layers (diffusers' `IPAdapterAttnProcessor`/`IPAdapterAttnProcessor2_0`) receive a
(text tokens, [image-prompt tokens]) tuple and compute to_out(attn(Q, text) + Σ_k s_k attn(Q, image_k)).
Uniform maps replace the text map only; the image-prompt branch, its scales and `ip_adapter_masks` are
left to the layer's own processor (`uniform_ip_adapter_attention`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .wrapping import WrappingProcessor

__all__ = [
    "uniform_attention",
    "uniform_ip_adapter_attention",
    "UniformCrossAttnProcessor",
    "UniformControl",
    "SwitchedUniformProcessor",
]


def _is_ip_adapter_layout(encoder_hidden_states) -> bool:
    """diffusers' UNet passes (text tokens, [image-prompt tokens per adapter]) to IP-Adapter layers."""
    return isinstance(encoder_hidden_states, tuple)


def _has_ip_adapter_weights(processor) -> bool:
    """Whether `processor` computes an IP-Adapter image branch (diffusers' IP-Adapter processors' attributes)."""
    return hasattr(processor, "to_k_ip") and hasattr(processor, "to_v_ip")


def uniform_attention(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Output of a diffusers `Attention` cross-attention layer whose attention map is uniform (1/N).

    Args:
        attn: the diffusers `Attention` module (its `to_v`, `to_out`, `norm_cross`, `residual_connection`
            and `rescale_output_factor` are used as the stock processor uses them).
        hidden_states (`torch.Tensor`): the image tokens, (B, L, C) or (B, C, H, W); only their shape and
            the residual path are used.
        encoder_hidden_states (`torch.Tensor`): the text tokens (B, N, D).
        attention_mask (`torch.Tensor`, *optional*): not supported (a uniform map over masked tokens is
            not what the paper defines); must be None.
    """
    if encoder_hidden_states is None:
        raise ValueError(
            "encoder_hidden_states: None, i.e. this is a self-attention layer; accepted: uniform maps "
            "replace cross-attention layers only"
        )
    if _is_ip_adapter_layout(encoder_hidden_states):
        raise ValueError(
            "encoder_hidden_states: a (text, image-prompt) tuple, the layout of an IP-Adapter layer, whose image "
            "branch needs the layer's IP-Adapter processor; accepted: a tensor of text tokens, or "
            "SwitchedUniformProcessor / UniformAttention wrapping the layer's IP-Adapter processor"
        )
    if attention_mask is not None:
        raise ValueError("attention_mask: a mask was passed; accepted: None (uniform maps average over all tokens)")
    residual = hidden_states
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        seq_len = height * width
    else:
        batch, seq_len, _ = hidden_states.shape
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

    # (1/N) Σ_j V_j = to_v((1/N) Σ_j e_j): one value vector per sample, shared by every query position
    mean_token = encoder_hidden_states.mean(dim=1, keepdim=True)
    value = attn.to_v(mean_token)
    out = attn.to_out[1](attn.to_out[0](value))  # linear projection, dropout
    out = out.expand(batch, seq_len, out.shape[-1])

    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def uniform_ip_adapter_attention(
    processor,
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: tuple,
    attention_mask: Optional[torch.Tensor] = None,
    temb: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    """Uniform maps over the text tokens of an IP-Adapter layer, its image-prompt branch unchanged.

    The layer's own IP-Adapter `processor` computes the result from the single text token (1/N) Σ_j e_j:
    a softmax over one key is 1, so its text term becomes to_v((1/N) Σ_j e_j) = (1/N) Σ_j V_j, the uniform
    map, while it computes the image-prompt terms exactly as without uniform maps (its scales, and
    `ip_adapter_masks` among `kwargs`), adds them before `to_out`, and applies the residual path.

    Args:
        processor: the layer's IP-Adapter processor (e.g. diffusers' `IPAdapterAttnProcessor2_0`).
        attn: the diffusers `Attention` module.
        hidden_states (`torch.Tensor`): the image tokens.
        encoder_hidden_states (`tuple`): (text tokens (B, N, D), list of image-prompt tokens).
        attention_mask (`torch.Tensor`, *optional*): not supported, as in `uniform_attention`; must be None.
        temb, kwargs: passed to `processor`.
    """
    if not _has_ip_adapter_weights(processor):
        raise ValueError(
            f"encoder_hidden_states: a (text, image-prompt) tuple, the IP-Adapter layout, but the layer's processor "
            f"{type(processor).__name__} has no IP-Adapter weights (to_k_ip, to_v_ip); accepted: a diffusers "
            "IP-Adapter processor (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0) on this layer"
        )
    if attention_mask is not None:
        raise ValueError("attention_mask: a mask was passed; accepted: None (uniform maps average over all tokens)")
    if attn.norm_cross:
        # the processor would normalise the mean token, not average the normalised tokens
        raise ValueError(
            "attn: a cross-attention layer with norm_cross on an IP-Adapter layer is not supported by uniform maps; "
            "accepted: layers without cross-attention norm (Stable Diffusion 1.x/2.x, SDXL)"
        )
    text, image = encoder_hidden_states
    mean_token = text.mean(dim=1, keepdim=True)
    return processor(attn, hidden_states, (mean_token, image), None, temb, **kwargs)


def _split_concatenated_ip_tokens(processor, encoder_hidden_states: torch.Tensor) -> tuple:
    """The older IP-Adapter layout, image-prompt tokens appended to the text tokens, as the tuple layout.

    Split as diffusers' IP-Adapter processors split it (the last ``num_tokens[0]`` tokens are the image
    prompt), so that uniform maps average the text tokens only.
    """
    end = encoder_hidden_states.shape[1] - processor.num_tokens[0]
    return encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]


def _rows_of(encoder_hidden_states, rows: torch.Tensor):
    """The batch rows `rows` of text tokens or of an IP-Adapter (text, [image-prompt tokens]) tuple."""
    if _is_ip_adapter_layout(encoder_hidden_states):
        text, image = encoder_hidden_states
        return text[rows], [tokens[rows] for tokens in image]
    return encoder_hidden_states[rows]


class UniformCrossAttnProcessor:
    """A diffusers attention processor for cross-attention layers with uniform maps.

    Install it with ``unet.set_attn_processor({name: UniformCrossAttnProcessor() ...})`` on cross-attention
    layers, or let `UniformAttention` (a sampler hook) or the UAM pipelines install and remove it.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return uniform_attention(attn, hidden_states, encoder_hidden_states, attention_mask)


class UniformControl:
    """Shared switch of the `SwitchedUniformProcessor`s of one installation.

    Attributes:
        enabled (`bool`): False: every layer runs its original processor.
        rows (`torch.Tensor`, *optional*): a bool per batch row; uniform maps for the True rows, the
            original processor for the others. None: all rows.
    """

    def __init__(self, enabled: bool = True, rows: Optional[torch.Tensor] = None):
        self.enabled = enabled
        self.rows = rows

    def set(self, enabled: bool, rows: Optional[torch.Tensor] = None) -> None:
        self.enabled, self.rows = enabled, rows


class SwitchedUniformProcessor(WrappingProcessor):
    """Uniform maps when its `UniformControl` says so, the layer's original processor otherwise.

    Its `__call__` has the original processor's signature, so diffusers passes it the same
    `cross_attention_kwargs` (e.g. `ip_adapter_masks`); they reach the original unchanged. On an IP-Adapter
    layer the uniform maps cover the text tokens and the original processor computes the image-prompt branch
    (`uniform_ip_adapter_attention`).

    Args:
        original: the processor this one replaces (restored by whoever installed this one).
        control (`UniformControl`): the shared switch.
    """

    def __init__(self, original, control: UniformControl):
        super().__init__(original)
        self.control = control

    def _uniform(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs):
        if _has_ip_adapter_weights(self.original) and not _is_ip_adapter_layout(encoder_hidden_states):
            encoder_hidden_states = _split_concatenated_ip_tokens(self.original, encoder_hidden_states)
        if _is_ip_adapter_layout(encoder_hidden_states):
            return uniform_ip_adapter_attention(
                self.original, attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs
            )
        return uniform_attention(attn, hidden_states, encoder_hidden_states, attention_mask)

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        control = self.control
        if not control.enabled or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if control.rows is None or bool(control.rows.all()):
            return self._uniform(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        rows = control.rows.to(hidden_states.device)
        if rows.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"rows: {rows.shape[0]} flags for a batch of {hidden_states.shape[0]}; accepted: one per row")
        out = torch.empty_like(hidden_states)
        out[rows] = self._uniform(
            attn, hidden_states[rows], _rows_of(encoder_hidden_states, rows), attention_mask, temb, **kwargs
        )
        keep = ~rows
        if bool(keep.any()):
            out[keep] = self.original(
                attn, hidden_states[keep], _rows_of(encoder_hidden_states, keep), attention_mask, temb, *args, **kwargs
            )
        return out
