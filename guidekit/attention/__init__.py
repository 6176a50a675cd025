"""Attention processors: uniform cross-attention maps (UAM), MasaCtrl mutual self-attention, install/restore."""

from .install import UniformAttention, attention_layers, replaced_processors
from .masactrl import MutualControl, MutualSelfAttnProcessor, mutual_self_attention, pair_kv_rows
from .uniform import (
    SwitchedUniformProcessor,
    UniformControl,
    UniformCrossAttnProcessor,
    uniform_attention,
    uniform_ip_adapter_attention,
)
from .wrapping import WrappingProcessor

__all__ = [
    "MutualControl",
    "MutualSelfAttnProcessor",
    "SwitchedUniformProcessor",
    "UniformAttention",
    "UniformControl",
    "UniformCrossAttnProcessor",
    "WrappingProcessor",
    "attention_layers",
    "mutual_self_attention",
    "pair_kv_rows",
    "replaced_processors",
    "uniform_attention",
    "uniform_ip_adapter_attention",
]
