"""Attention processors: uniform cross-attention maps (UAM), MasaCtrl mutual self-attention, StyleID style
injection, install/restore."""

from .install import UniformAttention, attention_layers, replaced_processors
from .masactrl import MutualControl, MutualSelfAttnProcessor, mutual_self_attention, pair_kv_rows
from .styleid import (
    LAYER_PRESETS as STYLEID_LAYER_PRESETS,
    StyleIDAttnProcessor,
    StyleIDControl,
    resolve_styleid_layers,
    styleid_attention,
    styleid_layers,
)
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
    "STYLEID_LAYER_PRESETS",
    "StyleIDAttnProcessor",
    "StyleIDControl",
    "SwitchedUniformProcessor",
    "UniformAttention",
    "UniformControl",
    "UniformCrossAttnProcessor",
    "WrappingProcessor",
    "attention_layers",
    "mutual_self_attention",
    "pair_kv_rows",
    "replaced_processors",
    "resolve_styleid_layers",
    "styleid_attention",
    "styleid_layers",
    "uniform_attention",
    "uniform_ip_adapter_attention",
]
