"""Tiny random image classifiers for tests of classifier guidance (EluCD): a torch module and a transformers
ResNet saved with its preprocessor config, so the real `from_pretrained` path is exercised."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

__all__ = ["TinyReLUClassifier", "CONVNEXT_PROCESSOR", "PLAIN_PROCESSOR", "tiny_resnet_classifier", "make_tiny_classifier"]

#: Three label names shared by the tiny classifiers.
LABELS = {0: "red", 1: "green", 2: "blue"}

#: A ConvNeXt-style preprocessor config (shortest edge, crop_pct, ImageNet statistics).
CONVNEXT_PROCESSOR = {
    "image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": 24},
    "crop_pct": 0.875, "resample": 2, "do_rescale": True, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}
#: A plain preprocessor config: resize to 24x24, normalise to [-1, 1] (ViT's processor; without a type,
#: transformers would pick the ResNet's ConvNeXt processor, which needs a shortest edge).
PLAIN_PROCESSOR = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 24, "width": 24},
                   "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


class TinyReLUClassifier(nn.Module):
    """A ReLU classifier on images in [-1, 1]: conv 3->4, ReLU, mean pool, linear 4->3 (seeded weights)."""

    id2label = dict(LABELS)

    def __init__(self, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_resnet_classifier(seed: int = 0):
    """A tiny random transformers `ResNetForImageClassification` (ReLU, labels red/green/blue)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", hidden_act="relu",
        num_labels=3, id2label=dict(LABELS), label2id={v: k for k, v in LABELS.items()},
    )
    torch.manual_seed(seed)
    return ResNetForImageClassification(config)


def make_tiny_classifier(folder: Union[str, os.PathLike], processor: dict = CONVNEXT_PROCESSOR, seed: int = 0) -> Path:
    """Write :func:`tiny_resnet_classifier` and its `preprocessor_config.json` to `folder`; returns the folder."""
    folder = Path(folder)
    tiny_resnet_classifier(seed).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder
