"""MasaCtrl mutual self-attention (Cao et al., ICCV 2023), the edit control UAM's editing builds on.

In the selected self-attention layers and steps, the target image's queries read the keys and values of
the source image, so the target keeps the source's content and layout while its cross-attention follows
the target prompt::

    out_tgt = softmax(Q_tgt K_srcᵀ / √d) V_src,        out_src = ordinary self-attention

As in the official MasaCtrl/UAM code, this is done separately within the unconditional and the
conditional half of a CFG batch. Here each batch row names the row whose keys/values it reads
(`MutualControl.kv_rows`), which also covers batches of several source/target pairs.
"""

from __future__ import annotations

from typing import Optional

import torch
from .core import attention_input, attention_output, multihead_attention
from .wrapping import WrappingProcessor

__all__ = ["mutual_self_attention", "MutualControl", "MutualSelfAttnProcessor", "pair_kv_rows"]


def mutual_self_attention(attn, hidden_states: torch.Tensor, kv_rows: torch.Tensor, temb=None) -> torch.Tensor:
    """Self-attention where row b uses the keys and values computed from row ``kv_rows[b]``.

    Args:
        attn: the diffusers `Attention` module (a self-attention layer).
        hidden_states (`torch.Tensor`): (B, L, C) or (B, C, H, W).
        kv_rows (`torch.LongTensor`): (B,) row indices; ``arange(B)`` is ordinary self-attention.
        temb (`torch.Tensor`, *optional*): for layers with a spatial norm.
    """
    hidden_states, residual, shape = attention_input(attn, hidden_states, temb)
    source = hidden_states[kv_rows.to(hidden_states.device)]
    out = multihead_attention(attn, attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source))
    return attention_output(attn, out, residual, shape)


def pair_kv_rows(num_pairs: int, num_groups: int) -> torch.Tensor:
    """`kv_rows` for a batch laid out as `num_groups` × [src_1..src_P, tgt_1..tgt_P] (P = `num_pairs`).

    Groups are the CFG halves (uncond, cond). Sources read themselves; target p reads source p of its group.
    """
    rows = []
    for g in range(num_groups):
        base = g * 2 * num_pairs
        src = list(range(base, base + num_pairs))
        rows += src + src
    return torch.tensor(rows, dtype=torch.long)


class MutualControl:
    """Shared switch of the `MutualSelfAttnProcessor`s of one installation.

    Attributes:
        enabled (`bool`): False: the layers run their original processors.
        kv_rows (`torch.LongTensor`, *optional*): see `mutual_self_attention`.
    """

    def __init__(self, enabled: bool = False, kv_rows: Optional[torch.Tensor] = None):
        self.enabled = enabled
        self.kv_rows = kv_rows

    def set(self, enabled: bool, kv_rows: Optional[torch.Tensor] = None) -> None:
        if enabled and kv_rows is None:
            raise ValueError("kv_rows: None while enabling mutual self-attention; accepted: a LongTensor of row indices")
        self.enabled, self.kv_rows = enabled, kv_rows


class MutualSelfAttnProcessor(WrappingProcessor):
    """MasaCtrl mutual self-attention when its `MutualControl` is enabled, the original processor otherwise.

    Its `__call__` has the original processor's signature, so diffusers passes it the same
    `cross_attention_kwargs`; they reach the original unchanged.

    Args:
        original: the processor this one replaces (restored by whoever installed this one).
        control (`MutualControl`): the shared switch.
    """

    def __init__(self, original, control: MutualControl):
        super().__init__(original)
        self.control = control

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        control = self.control
        if not control.enabled or encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if control.kv_rows.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"kv_rows: {control.kv_rows.shape[0]} entries for a batch of {hidden_states.shape[0]}; accepted: one per row"
            )
        return mutual_self_attention(attn, hidden_states, control.kv_rows, temb)
