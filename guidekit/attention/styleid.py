"""StyleID style injection (Chung, Hyun, Heo, CVPR 2024): self-attention with the style's keys and values.

StyleID DDIM-inverts the content and the style image and records, in chosen decoder self-attention layers
and at every timestep t, the content's queries Q_c^t and the style's keys K_s^t and values V_s^t. While the
stylised latent is denoised, those layers attend with::

    Q̃   = γ · Q_c^t + (1 − γ) · Q_cs            (query preservation; Q_cs = to_q of the stylised latent)
    out = to_out( softmax( T · Q̃ K_sᵀ / √d ) · V_s )

so the style's keys and values replace the stylised latent's own, and the temperature T > 1 sharpens the
attention (the official LDM code multiplies the similarity matrix by T before the usual 1/√d; the official
diffusers port multiplies Q̃ by T, which is the same). γ = 0.75 and T = 1.5 are the official defaults.
Only self-attention (attn1) is touched; cross-attention, ResBlocks, the encoder and the mid block are not.

Layer choice (`styleid_layers`): the official code injects into the self-attention of the decoder's two
highest-resolution levels (LDM `output_blocks` 6–11 of SD 1.4: diffusers `up_blocks.2` and `up_blocks.3`,
i.e. every self-attention at 32² and 64² latent resolution for 512² images). The rule used here for any
diffusers UNet is "every self-attention layer of the last two up blocks" (the up blocks at 1/2 and 1/1 of
the latent resolution); see `styleid_layers` for its result on SD 1.x/2.x and on the tiny test UNet.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from .core import attention_input, attention_output, multihead_attention
from .install import attention_layers
from .wrapping import WrappingProcessor

__all__ = [
    "LAYER_PRESETS",
    "StyleIDAttnProcessor",
    "StyleIDControl",
    "resolve_styleid_layers",
    "styleid_attention",
    "styleid_layers",
]

#: Named layer sets: ``"paper"`` (the official LDM code, whose numbers the paper reports) and ``"diffusers"``
#: (the official diffusers port: the same without its first, lowest-resolution decoder layer, i.e. without
#: every self-attention of the first attention module).
LAYER_PRESETS = ("paper", "diffusers")

_FEATURES = ("q", "k", "v")


# ---------------------------------------------------------------------------- layers


def _up_block_index(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "up_blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def _attention_module(name: str) -> str:
    """The attention module (``up_blocks.i.attentions.j``) a self-attention processor name belongs to."""
    return name.split(".transformer_blocks.")[0]


def styleid_layers(unet, preset: str = "paper") -> Tuple[str, ...]:
    """The injection layers of StyleID for a diffusers UNet, as processor names in call order.

    Rule: every self-attention layer (attn1, all transformer blocks) of the **last two up blocks**, i.e. of
    the decoder levels at 1/2 and 1/1 of the latent resolution. ``"diffusers"`` drops the first decoder layer
    of them, i.e. the first attention module with all its transformer blocks: the official diffusers port
    counts decoder layers, ``up_blocks[i // 3].attentions[i % 3]``, and its default ``[7, ..., 11]`` leaves out
    layer 6, the whole module ``up_blocks.2.attentions.0`` (it hooks ``transformer_blocks[0]`` of each
    module, the only one on SD 1.x/2.x).

    * SD 1.x / 2.x (4 up blocks; ``up_blocks.0`` has no attention): ``"paper"`` gives the 6 layers
      ``up_blocks.{2,3}.attentions.{0,1,2}.transformer_blocks.0.attn1`` = LDM decoder layers 6–11 (0-based),
      the official LDM default ``--attn_layer 6,7,8,9,10,11``; ``"diffusers"`` gives 5, without
      ``up_blocks.2.attentions.0`` = the official diffusers port's ``[7, 8, 9, 10, 11]``.
    * The tiny test UNet (2 up blocks; ``up_blocks.0`` has no attention): ``"paper"`` gives
      ``up_blocks.1.attentions.{0,1}.transformer_blocks.0.attn1``; ``"diffusers"`` the second of them.
    * SDXL base (3 up blocks; ``up_blocks.2`` has no attention, 2 transformer blocks per module in
      ``up_blocks.1``): ``"paper"`` gives the 6 layers ``up_blocks.1.attentions.{0,1,2}.transformer_blocks.{0,1}``;
      ``"diffusers"`` the 4 of ``up_blocks.1.attentions.{1,2}``. Neither official port runs on SDXL (both
      index SD's four up blocks), so this is guidekit's extension of the port's rule.

    Args:
        unet: a diffusers `UNet2DConditionModel` (anything with `up_blocks` and `attn_processors`).
        preset (`str`, defaults to ``"paper"``): ``"paper"`` or ``"diffusers"``.
    """
    if preset not in LAYER_PRESETS:
        raise ValueError(f"layers: {preset!r} is not accepted; accepted: {', '.join(repr(p) for p in LAYER_PRESETS)}")
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None or len(up_blocks) == 0:
        raise ValueError(
            f"unet: {type(unet).__name__} has no up blocks, so StyleID's decoder layers are undefined; "
            "accepted: pass layers=[...] with self-attention processor names"
        )
    last_two = {len(up_blocks) - 2, len(up_blocks) - 1}
    picked = [n for n in attention_layers(unet, "self") if _up_block_index(n) in last_two]
    if preset == "diffusers" and picked:
        first = _attention_module(picked[0])
        picked = [n for n in picked if _attention_module(n) != first]
    if not picked:
        raise ValueError(
            f"layers: this UNet has no self-attention layer in its last two up blocks for preset {preset!r}; "
            "accepted: pass layers=[...] with self-attention processor names"
        )
    return tuple(picked)


def resolve_styleid_layers(unet, layers: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
    """`layers` as a tuple of self-attention processor names of `unet`, in call order.

    Args:
        layers: None (the ``"paper"`` rule), a preset name from `LAYER_PRESETS`, or a non-empty list of
            self-attention layer names, each a key of ``unet.attn_processors`` (``"...attn1.processor"``) or
            the attention module's name (``"...attn1"``).
    """
    if layers is None:
        return styleid_layers(unet, "paper")
    if isinstance(layers, str):
        if layers in LAYER_PRESETS:
            return styleid_layers(unet, layers)
        raise ValueError(
            f"layers: {layers!r} is not accepted; accepted: None, {', '.join(repr(p) for p in LAYER_PRESETS)} "
            "or a list of self-attention layer names"
        )
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(
            f"layers: {layers!r} is not accepted; accepted: None, {', '.join(repr(p) for p in LAYER_PRESETS)} "
            "or a non-empty list of self-attention layer names"
        )
    available = attention_layers(unet, "self")
    names = []
    for layer in layers:
        if not isinstance(layer, str):
            raise ValueError(f"layers: {layer!r} is not a layer name; accepted: strings such as {available[-1]!r}")
        name = layer if layer.endswith(".processor") else f"{layer}.processor"
        if name not in available:
            cross = set(attention_layers(unet, "cross"))
            why = "a cross-attention layer" if name in cross else "not an attention layer of this UNet"
            raise ValueError(
                f"layers: {layer!r} is {why}; accepted: self-attention layers such as {available[-1]!r} "
                f"(this UNet has {len(available)}; see guidekit.attention.attention_layers(unet, 'self'))"
            )
        if name in names:
            raise ValueError(f"layers: {layer!r} is listed twice; accepted: each layer once")
        names.append(name)
    return tuple(sorted(names, key=available.index))


# ---------------------------------------------------------------------------- attention


def _rows(feature: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if feature.shape[0] == batch:
        return feature
    if feature.shape[0] == 1:
        return feature.expand(batch, *feature.shape[1:])
    raise ValueError(f"{name}: {feature.shape[0]} rows for a batch of {batch}; accepted: 1 or {batch}")


def styleid_attention(
    attn,
    hidden_states: torch.Tensor,
    query_content: torch.Tensor,
    key_style: torch.Tensor,
    value_style: torch.Tensor,
    gamma: float = 0.75,
    temperature: float = 1.5,
    temb: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Output of a diffusers self-attention layer with StyleID's injection.

    ``to_out(softmax(T · Q̃ K_sᵀ · attn.scale) V_s)`` with ``Q̃ = γ·Q_c + (1 − γ)·to_q(x)`` per head
    (`attn.scale` is 1/√d for the stock layers); the residual connection and output rescaling of the
    layer are applied as its stock processor applies them.

    Args:
        attn: the diffusers `Attention` module (a self-attention layer).
        hidden_states (`torch.Tensor`): the stylised latent's tokens, (B, L, C) or (B, C, H, W).
        query_content (`torch.Tensor`): Q_c, ``to_q`` of the content at the same layer and timestep,
            (B or 1, L, inner_dim).
        key_style, value_style (`torch.Tensor`): K_s, V_s of the style, (B or 1, L_s, inner_dim); L_s may
            differ from L (a style image of another size).
        gamma (`float`, defaults to `0.75`): query preservation γ in [0, 1]; 1 keeps the content's query.
        temperature (`float`, defaults to `1.5`): T > 0, multiplies the attention logits.
        temb (`torch.Tensor`, *optional*): for layers with a spatial norm.
    """
    x, residual, shape = attention_input(attn, hidden_states, temb)
    batch = x.shape[0]
    query = attn.to_q(x)
    query_content = _rows(query_content, batch, "query_content").to(query.dtype)
    query = gamma * query_content + (1.0 - gamma) * query
    key = _rows(key_style, batch, "key_style").to(query.dtype)
    value = _rows(value_style, batch, "value_style").to(query.dtype)
    out = multihead_attention(attn, query, key, value, scale=float(temperature) * attn.scale)
    return attention_output(attn, out, residual, shape)


# ---------------------------------------------------------------------------- processor

#: Recorded features: (layer name, timestep) → {"q" | "k" | "v": tensor (B, L, inner_dim)}.
FeatureStore = Dict[Tuple[str, int], Dict[str, torch.Tensor]]


class StyleIDControl:
    """Shared state of the `StyleIDAttnProcessor`s of one installation.

    Modes:
        ``"off"``: the layers run their original processors.
        ``"record"``: they also store the requested projections (``"q"``, ``"k"``, ``"v"``) of their input
            under (layer, `timestep`) in `store`; their output is the original processor's.
        ``"inject"``: they compute `styleid_attention` with Q_c from `query_store` and K_s, V_s from
            `kv_store` at (layer, `timestep`).

    Attributes:
        timestep (`int`): the timestep of the UNet call about to run; the pipeline sets it before each call.
    """

    def __init__(self):
        self.mode = "off"
        self.timestep: Optional[int] = None
        self.store: Optional[FeatureStore] = None
        self.record_keys: Tuple[str, ...] = ()
        self.query_store: Optional[FeatureStore] = None
        self.kv_store: Optional[FeatureStore] = None
        self.gamma = 0.75
        self.temperature = 1.5

    def off(self) -> None:
        self.mode = "off"
        self.store = self.query_store = self.kv_store = None
        self.record_keys = ()

    def record(self, store: FeatureStore, keys: Sequence[str]) -> None:
        """Record `keys` (a subset of ``("q", "k", "v")``) into `store` on the following UNet calls."""
        keys = tuple(keys)
        bad = [k for k in keys if k not in _FEATURES]
        if bad or not keys:
            raise ValueError(f"keys: {keys!r} is not accepted; accepted: a non-empty subset of {_FEATURES}")
        self.off()
        self.mode, self.store, self.record_keys = "record", store, keys

    def inject(self, query_store: FeatureStore, kv_store: FeatureStore, gamma: float, temperature: float) -> None:
        """Inject the style's K/V from `kv_store`, blending the content's Q from `query_store`, on the
        following UNet calls."""
        self.off()
        self.mode, self.query_store, self.kv_store = "inject", query_store, kv_store
        self.gamma, self.temperature = float(gamma), float(temperature)


class StyleIDAttnProcessor(WrappingProcessor):
    """Records or injects StyleID's self-attention features in one layer (see `StyleIDControl`).

    Its `__call__` has the original processor's signature, so diffusers passes it the same
    `cross_attention_kwargs`; while off or recording, the output is the original processor's.

    Args:
        original: the processor this one replaces (restored by whoever installed this one).
        name (`str`): the layer's processor name, the key its features are stored under.
        control (`StyleIDControl`): the shared state.
    """

    def __init__(self, original, name: str, control: StyleIDControl):
        super().__init__(original)
        self.name = name
        self.control = control

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        control = self.control
        if control.mode == "off" or encoder_hidden_states is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        key = (self.name, int(control.timestep))
        if control.mode == "record":
            x, _, _ = attention_input(attn, hidden_states, temb)
            projections = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v}
            control.store.setdefault(key, {}).update({k: projections[k](x) for k in control.record_keys})
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(
                f"attention_mask: StyleID injection in {self.name} got an attention mask; accepted: none (self-attention "
                "over all image tokens)"
            )
        query, kv = control.query_store.get(key), control.kv_store.get(key)
        if query is None or kv is None or "q" not in query or "k" not in kv or "v" not in kv:
            raise ValueError(
                f"timestep: no recorded StyleID features for layer {self.name!r} at timestep {key[1]}; accepted: "
                "inject at the timesteps and layers the features were recorded with"
            )
        return styleid_attention(
            attn, hidden_states, query["q"], kv["k"], kv["v"], control.gamma, control.temperature, temb
        )
