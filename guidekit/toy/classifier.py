"""The embedded image classifier: a tiny transformers ``ResNetForImageClassification`` that reads a clean
toy-world image as ``"{colour} {shape}"`` (18 classes), trained on clean images only.

It is the off-the-shelf classifier of the EluCD evaluation (`guidekit eval-elucd`): plain ReLUs, trained
without noise, so it is exactly the kind of classifier EluCD's calibration is meant for.

Seeded and resumable, as the image model's training: image ``i`` of step ``k`` is
``world.generate(TRAIN_BASE + k * batch + i, version=MODEL_WORLD_VERSION)`` (the world version the shipped
image model was trained on, so that the classifier reads that model's images), the weights start from
``torch.manual_seed(seed)``, and a checkpoint (weights, optimiser, step) is written every
``checkpoint_every`` steps and picked up by the next run with the same folder. Accuracy is measured on seeds
below :data:`~guidekit.toy.train.HELD_OUT_LIMIT`, which training never uses.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .train import HELD_OUT_LIMIT

__all__ = [
    "LABELS",
    "TRAIN_BASE",
    "EVAL_BASE",
    "ClassifierConfig",
    "label_of",
    "build_classifier",
    "preprocessor_config",
    "world_batch",
    "accuracy",
    "train_classifier",
]

#: The classes, in index order: every colour with every shape ("red circle", "red square", ...).
LABELS = tuple(f"{c} {s}" for c in world.COLOURS for s in world.SHAPES)
#: First training seed (training seeds are TRAIN_BASE + k * batch + i; never below HELD_OUT_LIMIT).
TRAIN_BASE = 10**7
#: First held-out seed of the accuracy measurement.
EVAL_BASE = 500_000


@dataclass
class ClassifierConfig:
    seed: int = 0
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 20
    embedding_size: int = 16
    hidden_sizes: tuple = (16, 32, 64)
    depths: tuple = (1, 1, 1)
    checkpoint_every: int = 200
    eval_images: int = 1800

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in cls.__dataclass_fields__})


def label_of(scene_or_caption) -> int:
    """Class index of a scene (or a caption): ``LABELS.index("{colour} {shape}")``."""
    if isinstance(scene_or_caption, str):
        parsed = world.parse_caption(scene_or_caption)
        colour, shape = parsed["colour"], parsed["shape"]
    else:
        colour, shape = scene_or_caption.colour, scene_or_caption.shape
    return LABELS.index(f"{colour} {shape}")


def build_classifier(config: Optional[ClassifierConfig] = None):
    """A fresh (randomly initialised from the global torch seed) ``ResNetForImageClassification``."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = config or ClassifierConfig()
    rc = ResNetConfig(
        num_channels=3,
        embedding_size=config.embedding_size,
        hidden_sizes=list(config.hidden_sizes),
        depths=list(config.depths),
        layer_type="basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
        num_labels=len(LABELS),
        id2label={i: name for i, name in enumerate(LABELS)},
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    return ResNetForImageClassification(rc)


def preprocessor_config() -> dict:
    """The image-processor settings the classifier was trained with: 64 px, [0, 1] → [-1, 1].

    ``TransformersClassifier`` reads ``size`` / ``crop_pct`` (shortest edge 64, no extra crop), ``resample`` and
    ``image_mean`` / ``image_std``; ``AutoImageProcessor`` builds a ``ConvNextImageProcessor`` from it.
    """
    return {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": world.SIZE},
        "crop_pct": 1.0,
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def world_batch(seeds: Sequence[int], version: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values float (N, 3, 64, 64) in [-1, 1], labels long (N,))`` of world images ``seeds``."""
    from . import MODEL_WORLD_VERSION

    version = MODEL_WORLD_VERSION if version is None else version
    samples = [world.generate(int(s), version=version) for s in seeds]
    images = np.stack([s.image for s in samples])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    y = torch.tensor([label_of(s.scene) for s in samples], dtype=torch.long)
    return x, y


@torch.no_grad()
def accuracy(model, n: int = 1800, base: int = EVAL_BASE, batch: int = 200, version: Optional[int] = None) -> float:
    """Fraction of the held-out clean world images ``base .. base + n - 1`` classified correctly."""
    if base + n > HELD_OUT_LIMIT:
        raise ValueError(f"n: held-out seeds must stay below {HELD_OUT_LIMIT}; got base {base} + n {n}")
    was_training = model.training
    model.eval()
    hits = 0
    for lo in range(base, base + n, batch):
        x, y = world_batch(range(lo, min(lo + batch, base + n)), version)
        hits += int((model(pixel_values=x).logits.argmax(-1) == y).sum())
    model.train(was_training)
    return hits / n


def _lr(step: int, config: ClassifierConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_classifier(out, config: Optional[ClassifierConfig] = None, ckpt_dir=None,
                     log: Callable[[str], None] = print, log_every: int = 50) -> dict:
    """Train the classifier and write it (``model.safetensors``, ``config.json``, ``preprocessor_config.json``)
    to `out`. Returns a summary with the held-out clean accuracy and the wall time.

    With `ckpt_dir`, a checkpoint there (written every ``config.checkpoint_every`` steps) is resumed; the result
    equals an uninterrupted run. ``config.eval_images = 0`` skips the accuracy.
    """
    config = config or ClassifierConfig()
    out = Path(out)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_classifier(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, elapsed_before = 0, 0.0
    ckpt = Path(ckpt_dir) / "checkpoint.pt" if ckpt_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"] != asdict(ClassifierConfig.from_dict(asdict(config))):
            raise ValueError(f"ckpt_dir: {ckpt} was written with other settings; use another folder or the same options")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state["elapsed"]
        log(f"resumed at step {start}")
    running = None
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config)
        x, y = world_batch(range(TRAIN_BASE + step * config.batch, TRAIN_BASE + (step + 1) * config.batch))
        loss = F.cross_entropy(model(pixel_values=x).logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            log(f"step {step + 1}/{config.steps} loss {running:.4f} lr {_lr(step, config):.2e}")
        if ckpt is not None and ((step + 1) % config.checkpoint_every == 0) and step + 1 < config.steps:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"config": asdict(ClassifierConfig.from_dict(asdict(config))), "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step + 1,
                        "elapsed": elapsed_before + time.perf_counter() - t0}, ckpt)
    model.eval()
    train_s = elapsed_before + time.perf_counter() - t0
    acc = accuracy(model, config.eval_images) if config.eval_images else float("nan")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    summary = {
        "config": asdict(config),
        "heldout_accuracy": acc,
        "heldout_images": config.eval_images,
        "heldout_seeds": [EVAL_BASE, EVAL_BASE + config.eval_images - 1] if config.eval_images else None,
        "world_version": _version(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_s": round(train_s, 1),
        "final_loss": running,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _version() -> int:
    from . import MODEL_WORLD_VERSION

    return MODEL_WORLD_VERSION
