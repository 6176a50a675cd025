"""The parts of diffusers' `AttnProcessor2_0` that guidekit's attention processors share.

A processor that changes where queries, keys or values come from (MasaCtrl, StyleID) calls
`attention_input`, builds its projections, then `multihead_attention` and `attention_output`, so the
layer's norms, residual and rescaling behave exactly as in the stock processor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["attention_input", "multihead_attention", "attention_output"]


def attention_input(attn, hidden_states: torch.Tensor, temb=None):
    """The tokens (B, L, C) the layer's projections see, the residual, and the 4-D input shape (None for 3-D)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        batch, channel, height, width = shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape


def multihead_attention(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        scale: Optional[float] = None) -> torch.Tensor:
    """softmax(scale · Q Kᵀ) V per head of projected (B, L, heads·d) rows, then the layer's output projection.

    ``scale`` defaults to the layer's own (1/√d); StyleID multiplies it by its temperature.
    """
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False,
                                         scale=attn.scale if scale is None else scale)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def attention_output(attn, out: torch.Tensor, residual: torch.Tensor, shape) -> torch.Tensor:
    """Back to the input's layout, plus the layer's residual connection and output rescaling."""
    if shape is not None:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
