"""Uniform cross-attention maps (UAM, Mo et al., WACV 2025, §3 / METHODS.md §2.2).

In a cross-attention layer the map softmax(QKᵀ/√d) is replaced by the constant 1/N over the N text
tokens, so every spatial position receives the same vector::

    out_i = to_out( (1/N) Σ_j V_j )  = to_out( to_v( (1/N) Σ_j e_j ) )

The second form holds because `to_v` is affine; it is what `uniform_attention` computes. No query, no key,
no QKᵀ and no softmax are formed, so the layer is cheaper than the one it replaces.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["uniform_attention", "UniformCrossAttnProcessor", "UniformControl", "SwitchedUniformProcessor"]


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


class SwitchedUniformProcessor:
    """Uniform maps when its `UniformControl` says so, the layer's original processor otherwise.

    Args:
        original: the processor this one replaces (restored by whoever installed this one).
        control (`UniformControl`): the shared switch.
    """

    def __init__(self, original, control: UniformControl):
        self.original = original
        self.control = control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        control = self.control
        if not control.enabled or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if control.rows is None or bool(control.rows.all()):
            return uniform_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        rows = control.rows.to(hidden_states.device)
        if rows.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"rows: {rows.shape[0]} flags for a batch of {hidden_states.shape[0]}; accepted: one per row")
        out = torch.empty_like(hidden_states)
        out[rows] = uniform_attention(attn, hidden_states[rows], encoder_hidden_states[rows], attention_mask)
        keep = ~rows
        if bool(keep.any()):
            out[keep] = self.original(attn, hidden_states[keep], encoder_hidden_states[keep], attention_mask, temb, *args, **kwargs)
        return out
