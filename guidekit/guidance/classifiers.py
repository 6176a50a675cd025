"""Image classifiers for classifier guidance (EluCD): adapters from decoded images to logits.

Every adapter is an ``nn.Module`` that takes images in [-1, 1], shape (B, 3, H, W) (what a diffusers VAE decodes
to), and returns logits of shape (B, K). The preprocessing the classifier was trained with (range, resize, crop,
mean/std normalisation) runs in torch, so gradients flow back to the image; an image processor from
``transformers`` converts to numpy/PIL and is not differentiable, so its *settings* are read and applied here.
``id2label`` (a dict ``{index: name}``, or ``None``) lets guidance hooks take label names.

* :class:`TransformersClassifier`: any ``AutoModelForImageClassification`` model (ResNet, ConvNeXt, ViT, ...),
  with the preprocessing of its ``preprocessor_config.json`` or values you pass.
* :class:`TorchClassifier`: any ``nn.Module`` returning logits, with a declared input range and size.
* :func:`as_classifier`: wraps whatever a hook receives (an adapter is returned as is).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from numbers import Integral, Real
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ImageClassifier",
    "TorchClassifier",
    "TransformersClassifier",
    "activation_types",
    "as_classifier",
    "read_preprocessor_config",
    "resolve_labels",
    "unsmoothed_warning",
]

Size = Union[int, Sequence[int], None]
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes used by transformers image processors
_MODES = ("bilinear", "bicubic")


def _channels(name: str, value) -> Optional[tuple[float, float, float]]:
    """`value` (a number or three numbers) as an RGB triple of finite floats, or None."""
    if value is None:
        return None
    if isinstance(value, Real) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: a finite number or three finite numbers (R, G, B)")
    return triple


def _hw(name: str, value: Size) -> Optional[tuple[int, int]]:
    """`value` (an int or (height, width)) as a (height, width) pair of positive ints, or None."""
    if value is None:
        return None
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = (value, value)
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, Integral) and not isinstance(v, bool) and v > 0 for v in value)
    )
    if not ok:
        raise ValueError(f"{name}: {value!r} is not accepted; accepted: a positive int or (height, width), or None")
    return int(value[0]), int(value[1])


def _id2label(mapping) -> Optional[dict[int, str]]:
    if mapping is None:
        return None
    try:
        return {int(k): str(v) for k, v in dict(mapping).items()}
    except (TypeError, ValueError):
        raise ValueError(f"id2label: {mapping!r} is not accepted; accepted: a dict {{index: name}} or None") from None


class ImageClassifier(nn.Module):
    """Base class of the adapters: images in [-1, 1] (B, 3, H, W) → logits (B, K), with `id2label`.

    The preprocessing is: map [-1, 1] to the model's `input_range`, resize (``resize``: None, ``(h, w)``,
    ``("shortest_edge", n)`` or ``("shortest_edge", n, longest_edge)`` keeping the aspect ratio, or
    ``("max_height_width", h, w)``; output sizes as transformers computes them), centre-crop to `crop` (one
    ``(h, w)`` or a list applied in turn; zero-padded where the image is smaller, as transformers does), subtract
    `mean` and divide by `std` (per channel, in the model's range). Everything is differentiable.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_range: tuple[float, float] = (-1.0, 1.0),
        resize: Any = None,
        crop: Union[tuple[int, int], Sequence[tuple[int, int]], None] = None,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        resample: str = "bilinear",
        id2label: Optional[dict[int, str]] = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: {type(model).__name__} is not accepted; accepted: a torch.nn.Module returning logits")
        if resample not in _MODES:
            raise ValueError(f"resample: {resample!r} is not accepted; accepted: {', '.join(map(repr, _MODES))}")
        if std is not None and any(s == 0 for s in std):
            raise ValueError(f"std: {std!r} is not accepted; accepted: three non-zero numbers")
        self.model = model
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.resize = resize
        self.crop = crop
        self.resample = resample
        self.id2label = id2label
        # Non-persistent buffers: they follow .to(device) and are not part of any state dict.
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def num_labels(self) -> Optional[int]:
        return None if self.id2label is None else len(self.id2label)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → the model's input (range, size, normalisation), differentiably."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: {shape} is not accepted; accepted: a floating-point tensor (batch, 3, height, width) in [-1, 1]")
        x = images.to(self._dtype(images))
        low, high = self.input_range
        if (low, high) != (-1.0, 1.0):
            x = (x + 1.0) * ((high - low) / 2.0) + low
        x = self._resize(x)
        for crop in _crops(self.crop):
            x = _center_crop(x, crop)
        if self.mean is not None:
            x = x - self.mean.to(device=x.device, dtype=x.dtype)
        if self.std is not None:
            x = x / self.std.to(device=x.device, dtype=x.dtype)
        return x

    def _dtype(self, images: torch.Tensor) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return images.dtype

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is None:
            return x
        h, w = x.shape[-2:]
        size = _output_size((h, w), self.resize)
        if size == (h, w):
            return x
        return F.interpolate(x, size=size, mode=self.resample, align_corners=False, antialias=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(self.preprocess(images))
        logits = getattr(out, "logits", out)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"classifier: {type(self.model).__name__} returned {shape} for {images.shape[0]} images; "
                "accepted: logits of shape (batch, classes)"
            )
        return logits

    def extra_repr(self) -> str:
        return (
            f"input_range={self.input_range}, resize={self.resize}, crop={self.crop}, resample={self.resample!r}, "
            f"mean={None if self.mean is None else tuple(self.mean.flatten().tolist())}, "
            f"std={None if self.std is None else tuple(self.std.flatten().tolist())}, labels={self.num_labels}"
        )


def _output_size(image_size: tuple[int, int], resize) -> tuple[int, int]:
    """The (height, width) a resize gives an image of `image_size`, computed by transformers' own helpers."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    kind = resize[0]
    if kind == "shortest_edge":
        if len(resize) > 2 and resize[2] is not None:
            return tuple(get_size_with_aspect_ratio(image_size, resize[1], resize[2]))
        # Only the shape of the array is read: a zero-stride view of one value.
        shape_only = np.broadcast_to(np.zeros((), dtype=np.float32), (3, *image_size))
        return tuple(get_resize_output_image_size(shape_only, resize[1], default_to_square=False, input_data_format="channels_first"))
    if kind == "max_height_width":
        return tuple(get_image_size_for_max_height_width(image_size, resize[1], resize[2]))
    return int(resize[0]), int(resize[1])


def _crops(crop) -> list[tuple[int, int]]:
    if crop is None:
        return []
    if len(crop) == 2 and all(isinstance(v, Integral) for v in crop):
        return [(int(crop[0]), int(crop[1]))]
    return [tuple(c) for c in crop]


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    ch, cw = size
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        # Pad with zeros (black, in the model's range before mean/std) to at least the crop; like transformers'
        # center_crop, the image sits ceil(padding / 2) from the top/left.
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw - pw // 2, pw // 2, ph - ph // 2, ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]


class TorchClassifier(ImageClassifier):
    """Any ``nn.Module`` that returns logits (a tensor, or an output with ``.logits``), as a guidance classifier.

    Args:
        model (`nn.Module`): the classifier. It is not modified (guidance hooks work on their own copy).
        input_range (`tuple`, defaults to `(-1, 1)`): the value range the model expects, ``(-1, 1)`` or ``(0, 1)``.
            The default passes decoded images as they are, as the official EluCD code feeds its ResNets.
        size (`int` or `(height, width)`, *optional*): resize images to this size first (bilinear, antialiased);
            `None` keeps the pipeline's size (fine for models with global pooling).
        mean (`float` or three floats, *optional*), std (`float` or three floats, *optional*): per-channel
            normalisation applied after the range mapping, e.g. ImageNet's (0.485, 0.456, 0.406) /
            (0.229, 0.224, 0.225) with ``input_range=(0, 1)``. `None`: none.
        id2label (`dict`, *optional*): ``{index: name}`` for label names; default: the model's own ``id2label``
            attribute or ``config.id2label``, if any.
        resample (`str`, defaults to `"bilinear"`): ``"bilinear"`` or ``"bicubic"``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_range: tuple = (-1, 1),
        size: Size = None,
        mean=None,
        std=None,
        id2label: Optional[dict] = None,
        resample: str = "bilinear",
    ):
        try:
            bounds = (float(input_range[0]), float(input_range[1])) if len(input_range) == 2 else None
        except (TypeError, ValueError):
            bounds = None
        if bounds not in ((-1.0, 1.0), (0.0, 1.0)):
            raise ValueError(f"input_range: {input_range!r} is not accepted; accepted: (-1, 1) or (0, 1)")
        if id2label is None:
            id2label = getattr(model, "id2label", None) or getattr(getattr(model, "config", None), "id2label", None)
        size = _hw("size", size)
        super().__init__(
            model,
            input_range=bounds,
            resize=size,
            mean=_channels("mean", mean),
            std=_channels("std", std),
            resample=resample,
            id2label=_id2label(id2label),
        )


def read_preprocessor_config(name_or_path: Union[str, os.PathLike, None]) -> Optional[dict]:
    """The ``preprocessor_config.json`` of a transformers checkpoint as a dict, or None when there is none.

    A local folder is read directly. A hub id is looked up through transformers' cache (and downloaded when
    the hub is reachable and allowed); any failure gives None.
    """
    if not name_or_path:
        return None
    name_or_path = os.fspath(name_or_path)
    path = os.path.join(name_or_path, "preprocessor_config.json")
    if not os.path.isdir(name_or_path):
        try:
            from transformers.utils import cached_file

            path = cached_file(
                name_or_path,
                "preprocessor_config.json",
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except Exception:
            return None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _processor_config(model: nn.Module, preprocessor_config) -> dict:
    """The preprocessor config dict: `preprocessor_config` (a dict, a file or a folder), else the file next to
    the model, else {}."""
    if preprocessor_config is None:
        config_obj = model.config
        name = getattr(model, "name_or_path", None) or getattr(config_obj, "_name_or_path", None)
        return read_preprocessor_config(name) or {}
    if isinstance(preprocessor_config, dict):
        return dict(preprocessor_config)
    path = os.fspath(preprocessor_config)
    if os.path.isdir(path):
        path = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"preprocessor_config: {preprocessor_config!r} is not a file or a folder with preprocessor_config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


#: The steps of transformers' image processors (methods) that the adapter reproduces in torch, per class that
#: defines them. ``PilBackend``'s own steps are the generic ones: resize, centre crop, rescale, normalise, in order.
_REPRODUCED_STEPS = {
    "ConvNextImageProcessorPil": {"resize", "_preprocess"},  # the crop_pct rule, then the generic order
    "BeitImageProcessorPil": {"_preprocess"},  # the generic order (label reduction is for segmentation maps)
}
_STEPS = ("resize", "center_crop", "rescale", "normalize", "_preprocess")


def _image_processor(config: dict, model_config: Any):
    """transformers' own image processor for `config` (PIL backend; only its settings are read, never run).

    The class is the one ``AutoImageProcessor`` picks: the config's ``image_processor_type`` (or the legacy
    ``feature_extractor_type``), else the one registered for the model's ``model_type``. Its attributes are then
    transformers' own reading of the config: ``size`` as a size dict (an int is a square or a shortest edge
    depending on the class's ``default_to_square``, through transformers' ``get_size_dict``), ``crop_size``,
    ``crop_pct`` and the class defaults for keys the config leaves out.
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(None, processor_config=dict(config), config=model_config, backend="pil")
    except ValueError as error:  # no class known for this config or model type: transformers' base rules
        from transformers.image_processing_backends import PilBackend

        warnings.warn(
            f"preprocessor_config: transformers has no image processor class for it or for model type "
            f"{getattr(model_config, 'model_type', None)!r} ({str(error).splitlines()[0][:120]}); it is read with "
            "transformers' base rules (an int size is a square)",
            stacklevel=3,
        )
        # The base class sets no do_* flags; the image processors' usual defaults: resize, rescale, normalise.
        return PilBackend.from_dict({"do_resize": True, "do_rescale": True, "do_normalize": True, **config})


def _resize_rule(size) -> Any:
    """A transformers size dict as the adapter's resize rule, in the priority of transformers' ``resize``."""
    if size.shortest_edge and size.longest_edge:
        return ("shortest_edge", int(size.shortest_edge), int(size.longest_edge))
    if size.shortest_edge:
        return ("shortest_edge", int(size.shortest_edge))
    if size.max_height and size.max_width:
        return ("max_height_width", int(size.max_height), int(size.max_width))
    if size.height and size.width:
        return (int(size.height), int(size.width))
    raise ValueError(
        f"preprocessor_config: size {dict(size)!r} is not accepted; accepted: {{'height', 'width'}}, "
        "{'shortest_edge'} (with 'longest_edge' or not) or {'max_height', 'max_width'}, or pass size="
    )


def _convnext_rule(size, crop_pct: float) -> tuple[Any, list[tuple[int, int]]]:
    """ConvNeXt's resize: below 384 px, short side to int(size / crop_pct) then a centre crop to size × size;
    from 384 px on, a warp to size × size."""
    if not size.shortest_edge:
        raise ValueError(
            f"preprocessor_config: size {dict(size)!r} is not accepted by ConvNextImageProcessor; accepted: "
            "{'shortest_edge': n} (or an int), or pass size="
        )
    n = int(size.shortest_edge)
    if n < 384:
        return ("shortest_edge", int(n / crop_pct)), [(n, n)]
    return (n, n), []


def _unreproduced_steps(processor) -> list[str]:
    """The steps `processor`'s class customises in a way the adapter does not reproduce."""
    from transformers.image_processing_backends import PilBackend

    steps = []
    for name in _STEPS:
        owner = next((c for c in type(processor).__mro__ if name in vars(c)), PilBackend)
        if owner is not PilBackend and name not in _REPRODUCED_STEPS.get(owner.__name__, ()):
            steps.append(f"{owner.__name__}.{name}")
    return steps


def _processor_steps(processor) -> dict:
    """resize, crops, resample code, and the map of [0, 1] images to the model input (mean, std), as
    `processor` (a transformers image processor) would apply them."""
    resize, crops = None, []
    if processor.do_resize:
        if processor.size is None:
            raise ValueError("preprocessor_config: do_resize is true but no size is given; accepted: a size, or pass size=")
        if _is_convnext(processor):  # its crop_pct (class default 224/256) is always set
            resize, crops = _convnext_rule(processor.size, float(processor.crop_pct))
        else:
            resize = _resize_rule(processor.size)
    if processor.do_center_crop:
        crop = processor.crop_size
        if crop is None or not (crop.height and crop.width):
            raise ValueError(f"preprocessor_config: crop_size {crop!r} is not accepted; accepted: an int or {{'height', 'width'}}")
        crops.append((int(crop.height), int(crop.width)))
    # transformers: x = rescale_factor·(255·x01) when do_rescale, then (x − mean)/std; folded into a mean and std
    # of x01, the adapter's [0, 1] images.
    k = 255.0 * float(processor.rescale_factor) if processor.do_rescale else 255.0
    if processor.do_normalize:
        mean = _channels("image_mean", processor.image_mean)
        std = _channels("image_std", processor.image_std)
        mean, std = tuple(m / k for m in mean), tuple(s / k for s in std)
    else:
        mean, std = (None, None) if k == 1.0 else ((0.0, 0.0, 0.0), (1.0 / k,) * 3)
    resample = processor.resample
    return dict(resize=resize, crops=crops, mean=mean, std=std, resample=None if resample is None else int(resample))


def _is_convnext(processor) -> bool:
    return any(c.__name__ == "ConvNextImageProcessorPil" for c in type(processor).__mro__)


class TransformersClassifier(ImageClassifier):
    """A transformers image classifier (``AutoModelForImageClassification``) with its preprocessing in torch.

    The settings come from the arguments you pass, else from the ``preprocessor_config.json`` next to the model
    (its ``name_or_path``: a local folder, or a hub id through transformers' cache), read by transformers itself:
    the image processor class ``AutoImageProcessor`` would build for it (``image_processor_type``, else the
    model type) is instantiated from the config, and its settings are applied in torch, in transformers' order:

    * ``size``: ``{"height", "width"}`` (a warp), ``{"shortest_edge"}`` (aspect kept; with ``"longest_edge"``, capped),
      ``{"max_height", "max_width"}``; an int means what the class says (a square for ViT/DeiT/BEiT, a shortest
      edge for CLIP/ConvNeXt/ResNet/BiT, through transformers' ``get_size_dict``). ConvNeXt-family processors
      (ResNet, RegNet, CvT, ConvNeXt) apply their ``crop_pct`` rule: below 384 px the short side goes to
      size / crop_pct, then a centre crop to size × size; from 384 px a warp to size × size;
    * a centre crop to ``crop_size`` when ``do_center_crop`` (zero-padded where the image is smaller);
    * ``do_rescale`` / ``rescale_factor`` and ``do_normalize`` / ``image_mean`` / ``image_std``, class defaults
      included.

    Images go from [-1, 1] to [0, 1] first. Resizing is antialiased bilinear, or bicubic when the config's
    ``resample`` is 3 (PIL's bicubic; other filters warn and use bilinear). The sizes are exactly transformers';
    the values differ slightly from the PIL processor (torch's bicubic kernel is not PIL's, and PIL rounds to
    8 bits), which is the price of a differentiable path. A processor class that customises other steps
    (EfficientNet, LeViT, MobileViT, PoolFormer, Perceiver, ...) gets a warning naming them.

    Args:
        model: a transformers model whose output has ``.logits`` (e.g. ``ResNetForImageClassification``). Not
            modified.
        image_mean (`float` or three floats, *optional*), image_std (`float` or three floats, *optional*):
            normalisation of [0, 1] images; default from the preprocessor config.
        size (`int` or `(height, width)`, *optional*): resize to this exact size (an int: a square; then no crop
            unless `crop_size`); default from the preprocessor config, else no resize.
        crop_size (`int` or `(height, width)`, *optional*): centre crop after resizing.
        preprocessor_config (`dict` or path, *optional*): the processor settings to use instead of the file next
            to the model (a dict, a ``preprocessor_config.json`` file or the folder holding one).
        resample (`str`, *optional*): ``"bilinear"`` or ``"bicubic"``; default from the config.

    Raises:
        ValueError: when neither the arguments nor a preprocessor config give the normalisation; pass
            ``image_mean`` and ``image_std`` (e.g. ``0.5`` and ``0.5`` for a model trained on [-1, 1] inputs).
    """

    def __init__(
        self,
        model: nn.Module,
        image_mean=None,
        image_std=None,
        size: Size = None,
        crop_size: Size = None,
        preprocessor_config: Union[dict, str, os.PathLike, None] = None,
        resample: Optional[str] = None,
    ):
        config_obj = getattr(model, "config", None)
        if not isinstance(model, nn.Module) or config_obj is None:
            raise ValueError(
                f"model: {type(model).__name__} is not accepted; accepted: a transformers image classification model "
                "(use TorchClassifier for other modules)"
            )
        processor = _processor_config(model, preprocessor_config)
        steps = dict(resize=None, crops=[], mean=None, std=None, resample=None)
        if processor:
            image_processor = _image_processor(processor, config_obj)
            steps = _processor_steps(image_processor)
            skipped = _unreproduced_steps(image_processor)
            if skipped and (size is None or image_mean is None or image_std is None):
                warnings.warn(
                    f"preprocessor_config: {type(image_processor).__name__} customises {', '.join(skipped)}, which "
                    "TransformersClassifier does not reproduce (it applies resize, centre crop, rescale and "
                    "normalisation in transformers' generic order); pass size=, crop_size=, image_mean= and "
                    "image_std= to set the preprocessing yourself",
                    stacklevel=2,
                )
        mean = _channels("image_mean", image_mean) if image_mean is not None else steps["mean"]
        std = _channels("image_std", image_std) if image_std is not None else steps["std"]
        if not processor and (mean is None or std is None):
            raise ValueError(
                f"image_mean/image_std: no normalisation known for {type(model).__name__} (no preprocessor_config.json "
                "next to it); accepted: pass image_mean and image_std (and size), e.g. 0.5 and 0.5 for a model "
                "trained on inputs in [-1, 1], or preprocessor_config="
            )
        if size is not None:
            resize, crops = _hw("size", size), []
        else:
            resize, crops = steps["resize"], steps["crops"]
        if crop_size is not None:
            crops = [_hw("crop_size", crop_size)]
        if resample is None:
            code = steps["resample"]
            resample = _RESAMPLE.get(code, "bilinear")
            if code is not None and code not in _RESAMPLE:
                warnings.warn(
                    f"preprocessor_config: resample {code} (a PIL filter other than bilinear 2 / bicubic 3) is not "
                    "available as a differentiable resize; bilinear is used (pass resample= to choose)",
                    stacklevel=2,
                )
        super().__init__(
            model,
            input_range=(0.0, 1.0),
            resize=resize,
            crop=crops[0] if len(crops) == 1 else (crops or None),
            mean=mean,
            std=std,
            resample=resample,
            id2label=_id2label(getattr(config_obj, "id2label", None)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocess(images))
        return out.logits

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], **kwargs) -> "TransformersClassifier":
        """Load with ``AutoModelForImageClassification.from_pretrained`` and read the preprocessing next to it.

        Keyword arguments named in `__init__` (``image_mean``, ``image_std``, ``size``, ``crop_size``,
        ``preprocessor_config``, ``resample``) go to the adapter, the others to ``from_pretrained``.
        """
        from transformers import AutoModelForImageClassification

        mine = {"image_mean", "image_std", "size", "crop_size", "preprocessor_config", "resample"}
        adapter = {k: kwargs.pop(k) for k in list(kwargs) if k in mine}
        model = AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
        if adapter.get("preprocessor_config") is None:
            adapter["preprocessor_config"] = read_preprocessor_config(name_or_path)
        return cls(model, **adapter)


def as_classifier(classifier: Any) -> ImageClassifier:
    """`classifier` as an adapter: adapters as they are, transformers models through
    :class:`TransformersClassifier`, other modules through :class:`TorchClassifier` with its defaults (images in
    [-1, 1] at the pipeline's size, no normalisation: EluCD's own setting)."""
    if isinstance(classifier, ImageClassifier):
        return classifier
    if isinstance(classifier, nn.Module):
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            PreTrainedModel = ()
        if isinstance(classifier, PreTrainedModel):
            return TransformersClassifier(classifier)
        return TorchClassifier(classifier)
    raise ValueError(
        f"classifier: {type(classifier).__name__} is not accepted; accepted: a torch.nn.Module returning logits, a "
        "transformers image classification model, or a guidekit.guidance.TorchClassifier / TransformersClassifier"
    )


def resolve_labels(labels: Any, id2label: Optional[dict[int, str]], name: str = "labels") -> Union[int, tuple[int, ...]]:
    """Label indices from an int, a label name, an integer tensor or array, or a list of them.

    Names are matched case-insensitively in `id2label` as DiT's ``get_label_ids`` does, plus the full label: an
    ImageNet-style label ``"tabby, tabby cat"`` is reached by ``"tabby"``, ``"tabby cat"`` or the whole string.
    The full label wins over a synonym of another class (``"maillot"`` is class 638, though it is also a synonym
    of 639 ``"maillot, tank suit"``). A name that still names several classes (ImageNet's two ``"crane"``) raises
    a ValueError naming their ids. A 0-d integer tensor is one label, a 1-d one a label per image.

    Returns an int for a single label, a tuple of ints for a list. Raises ValueError naming the unknown label and
    listing accepted ones.
    """
    labels = _from_array(labels, id2label, name)
    index = _name_index(id2label) if id2label else None
    if isinstance(labels, (list, tuple)):
        if not labels:
            raise ValueError(f"{name}: an empty list is not accepted; accepted: a label, or one label per image")
        return tuple(_one_label(v, id2label, name, index) for v in labels)
    return _one_label(labels, id2label, name, index)


def _from_array(labels: Any, id2label: Optional[dict[int, str]], name: str) -> Any:
    """An integer torch tensor or numpy array as an int (0-d) or a list of ints (1-d); anything else as it is."""
    if isinstance(labels, torch.Tensor):
        ok = labels.dim() <= 1 and not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
        what = f"a {labels.dim()}-d tensor of {labels.dtype}"
    elif isinstance(labels, np.ndarray):
        ok = labels.ndim <= 1 and labels.dtype.kind in "iu"
        what = f"a {labels.ndim}-d array of {labels.dtype}"
    else:
        return labels
    if not ok:
        raise ValueError(
            f"{name}: {what} is not accepted; accepted: an integer tensor or array with 0 dimensions (one label) "
            "or 1 (one label per image)"
        )
    return labels.tolist()


def _name_index(id2label: dict[int, str]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(full labels, comma-separated synonyms), casefolded, each to the ids it names."""
    full: dict[str, list[int]] = {}
    synonyms: dict[str, list[int]] = {}
    for k in sorted(id2label):
        label = id2label[k]
        full.setdefault(label.strip().casefold(), []).append(k)
        for synonym in label.split(","):  # as DiT's id2label: every comma-separated part, stripped
            ids = synonyms.setdefault(synonym.strip().casefold(), [])
            if k not in ids:
                ids.append(k)
    return full, synonyms


def _accepted(id2label: Optional[dict[int, str]], limit: int = 12) -> str:
    if not id2label:
        return "an int class index (this classifier has no id2label, so names are not known)"
    ids = sorted(id2label)
    if ids == list(range(len(ids))):
        id_text = f"an int in [0, {len(ids)})"
    elif len(ids) <= limit:
        id_text = f"one of the ids {', '.join(map(str, ids))}"
    else:
        id_text = f"one of {len(ids)} ids from {ids[0]} to {ids[-1]} ({', '.join(map(str, ids[:5]))}, ...)"
    names = [id2label[k] for k in ids]
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names)} labels)" if len(names) > limit else ""
    return f"{id_text}, or a name (a label or one of its comma-separated synonyms): {shown}{more}"


def _one_label(value: Any, id2label: Optional[dict[int, str]], name: str, index=None) -> int:
    if isinstance(value, Integral) and not isinstance(value, bool):
        k = int(value)
        if k < 0 or (id2label is not None and k not in id2label):
            raise ValueError(f"{name}: {value!r} is not a class of this classifier; accepted: {_accepted(id2label)}")
        return k
    if isinstance(value, str):
        if not id2label:
            raise ValueError(f"{name}: {value!r} is a name, but this classifier has no id2label; accepted: {_accepted(id2label)}")
        full, synonyms = index if index is not None else _name_index(id2label)
        wanted = value.strip().casefold()
        found = full.get(wanted) or synonyms.get(wanted, [])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            named = ", ".join(f"{k} ({id2label[k]!r})" for k in found)
            raise ValueError(f"{name}: {value!r} is ambiguous: it names the classes {named}; accepted: one of these ids")
        candidates = sorted({s.strip() for label in id2label.values() for s in [label, *label.split(",")]})
        close = difflib.get_close_matches(value.strip(), candidates, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"{name}: {value!r} is not a label of this classifier{hint}; accepted: {_accepted(id2label)}")
    raise ValueError(f"{name}: {value!r} is not accepted; accepted: {_accepted(id2label)}, or a list with one per image")


# ---------------------------------------------------------------------------------------------------- smoothing

# Activations that are smooth already: EluCD's smoothing (ReLU → Softplus) has nothing to do on them.
_SMOOTH_ACTIVATIONS = ("GELU", "SiLU", "Swish", "Mish", "Softplus", "Tanh", "Sigmoid", "ELU", "SELU", "CELU")
# Modules of torch.nn.modules.activation that are not pointwise activations.
_NOT_ACTIVATIONS = ("MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d")


def activation_types(model: nn.Module) -> dict[str, int]:
    """The activation modules of `model` by class name, with how many distinct instances of each."""
    seen: dict[str, set] = {}
    for module in model.modules():
        cls = type(module)
        name = cls.__name__
        is_activation = cls.__module__ in ("torch.nn.modules.activation", "transformers.activations") or any(
            key in name for key in ("Activation", "ReLU", "GELU", "SiLU", "Swish")
        )
        if is_activation and name not in _NOT_ACTIVATIONS:
            seen.setdefault(name, set()).add(id(module))
    return {name: len(ids) for name, ids in sorted(seen.items())}


def unsmoothed_warning(model: nn.Module, beta: Optional[float]) -> Optional[str]:
    """Why ReLU → Softplus(β) smoothing would change nothing in `model` (no ``nn.ReLU`` module), or None when it
    has ReLU modules to replace or `beta` is None (no smoothing asked)."""
    if beta is None or any(isinstance(m, nn.ReLU) for m in model.modules()):
        return None
    found = activation_types(model)
    smooth = {k: n for k, n in found.items() if any(s in k for s in _SMOOTH_ACTIVATIONS)}
    other = {k: n for k, n in found.items() if k not in smooth}

    def listed(types: dict[str, int]) -> str:
        return ", ".join(f"{k} ×{n}" for k, n in types.items())

    parts = [
        f"softplus_beta: {beta} smooths nothing in {type(model).__name__}: EluCD replaces nn.ReLU modules with "
        "Softplus, and it has none."
    ]
    if smooth:
        parts.append(f"Its activations {listed(smooth)} are smooth already, so there is nothing to replace.")
    if other:
        parts.append(f"{listed(other)} {'is' if len(other) == 1 else 'are'} not ReLU and kept unchanged.")
    if not found:
        parts.append(
            "It has no activation module at all: it is linear, or it applies its activations functionally "
            "(F.relu, torch.relu), which swapping modules cannot replace."
        )
    elif other:
        parts.append("ReLUs applied functionally (F.relu, torch.relu) cannot be replaced by swapping modules either.")
    parts.append("Pass softplus_beta=None to use the classifier as it is without this warning.")
    return " ".join(parts)
