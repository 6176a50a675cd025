"""Image measurements shared by the evaluations, the demo and the benchmarks.

Images are float arrays or tensors in [0, 1], shaped (..., H, W, 3) for numpy ("np" pipeline output)
unless a function says otherwise.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["mean_saturation", "clipped_fraction", "fidelity", "masked_psnr", "lpips_note"]


def _as_np(images) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images, dtype=np.float64)
    if arr.shape[-1] != 3:
        raise ValueError(f"images: expected channels-last RGB (..., H, W, 3), got shape {arr.shape}")
    return arr


def mean_saturation(images) -> float:
    """Mean HSV saturation, (max - min) / max per pixel (0 where max is 0), over all pixels."""
    arr = _as_np(images)
    hi = arr.max(axis=-1)
    lo = arr.min(axis=-1)
    sat = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1.0), 0.0)
    return float(sat.mean())


def clipped_fraction(images) -> float:
    """Fraction of channel values that hit 0 or 255 once quantised to 8 bits."""
    arr = np.round(np.clip(_as_np(images), 0.0, 1.0) * 255.0)
    return float(((arr == 0) | (arr == 255)).mean())


# ---------------------------------------------------------------------------- reconstruction fidelity (UAM)
# Images here are torch tensors (B, 3, H, W) in [0, 1] (or anything `_as_nchw` converts).


def _as_nchw(images) -> "torch.Tensor":
    import torch

    if isinstance(images, torch.Tensor):
        t = images.detach().to("cpu", torch.float64)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim == 4 and t.shape[1] != 3 and t.shape[-1] == 3:
            t = t.permute(0, 3, 1, 2)
    else:
        arr = np.asarray(images, dtype=np.float64) if not isinstance(images, list) else np.stack(
            [np.asarray(im, dtype=np.float64) / (255.0 if hasattr(im, "mode") else 1.0) for im in images]
        )
        if arr.ndim == 3:
            arr = arr[None]
        t = torch.from_numpy(arr).permute(0, 3, 1, 2)
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"images: expected RGB images (B, 3, H, W) or (B, H, W, 3), got shape {tuple(t.shape)}")
    return t


def lpips_note() -> str | None:
    """None when LPIPS can be computed offline here, else why it is skipped."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return "LPIPS skipped: torchmetrics' LPIPS needs torchvision and its pretrained backbone weights, not available offline here"
    import torch

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
    if not os.path.exists(cached):
        return f"LPIPS skipped: the AlexNet weights are not cached at {cached} (no download is attempted)"
    return None


def _lpips(pred, target):
    import torch
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity

    with torch.no_grad():
        return [
            float(learned_perceptual_image_patch_similarity(p[None].float(), t[None].float(), net_type="alex", normalize=True))
            for p, t in zip(pred, target)
        ]


def fidelity(images, references, with_lpips: bool = True) -> list[dict]:
    """Per-image fidelity of `images` against `references`: PSNR (dB), SSIM and MSE on [0, 1] RGB.

    PSNR and SSIM are torchmetrics' (data range 1, SSIM with its default 11×11 Gaussian window). LPIPS
    (AlexNet, torchmetrics) is added under "lpips" only when its weights are available offline; see
    `lpips_note`.

    Args:
        images: reconstructions, (B, 3, H, W) tensor in [0, 1], (B, H, W, 3) array in [0, 1] or PIL list.
        references: the inputs, same forms and sizes.
        with_lpips (`bool`, defaults to `True`): try LPIPS.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    pred, target = _as_nchw(images), _as_nchw(references)
    if pred.shape != target.shape:
        raise ValueError(f"images: shape {tuple(pred.shape)} differs from references {tuple(target.shape)}; accepted: equal shapes")
    pred, target = pred.float(), target.float()
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    mse = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    rows = [{"psnr": float(p), "ssim": float(s), "mse": float(m)} for p, s, m in zip(psnr, ssim, mse)]
    if with_lpips and lpips_note() is None:
        for row, value in zip(rows, _lpips(pred, target)):
            row["lpips"] = value
    return rows


def masked_psnr(images, references, mask) -> list[float]:
    """PSNR (dB, data range 1) over the pixels where `mask` (B, H, W) is true, one value per image.

    This is the "unedited part" PSNR of PIE-Bench style evaluations, computed on the region only (not on
    an image whose other pixels are zeroed).
    """
    import torch

    pred, target = _as_nchw(images), _as_nchw(references)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    if m.ndim == 2:
        m = m[None]
    if m.shape != (pred.shape[0], pred.shape[2], pred.shape[3]):
        raise ValueError(f"mask: shape {tuple(m.shape)} does not match images {tuple(pred.shape)}; accepted: (B, H, W)")
    out = []
    for p, t, mm in zip(pred, target, m):
        if not bool(mm.any()):
            out.append(float("nan"))
            continue
        mse = ((p - t) ** 2)[:, mm].mean()
        out.append(float("inf") if mse == 0 else float(10 * torch.log10(1.0 / mse)))
    return out
