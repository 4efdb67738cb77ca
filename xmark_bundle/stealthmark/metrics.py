"""Harmlessness metrics of a segmentation model, per image, with MONAI's metric functions where they exist.

All functions take B x 1 x H x W tensors: probabilities in [0, 1] for ``prob``, binary masks for ``mask``/``target``.
Dice is computed over the whole image (MONAI's ``compute_dice``); the authors' code sums over channel and height only,
which gives one Dice per image column, empty columns scoring 1 and thin edge columns low (:func:`column_dice`, kept to
show how far it is from the Dice, in either direction).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_roc_auc

__all__ = [
    "column_dice",
    "dice_per_image",
    "flip_share",
    "harmlessness",
    "hd95_per_image",
    "pixel_auc_per_image",
    "volumetric_similarity",
]


def _binary(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``x > threshold`` as float, after checking the B x 1 x H x W layout."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected a B x 1 x H x W tensor, got {tuple(x.shape)}")
    return (x > threshold).float()


def dice_per_image(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of each image's whole mask (B values); 1.0 when both are empty, 0.0 when only one is."""
    pred, ref = _binary(mask), _binary(target)
    dice = compute_dice(pred, ref, include_background=True, ignore_empty=False)[:, 0]
    both_empty = (pred.sum((1, 2, 3)) == 0) & (ref.sum((1, 2, 3)) == 0)
    return torch.where(both_empty, torch.ones_like(dice), dice)


def column_dice(mask: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """The authors' Dice: sums over (channel, height), so one score per column, empty columns 1; B x W values."""
    pred, ref = _binary(mask), _binary(target)
    inter = (pred * ref).sum((1, 2))
    return (2 * inter + smooth) / (pred.sum((1, 2)) + ref.sum((1, 2)) + smooth)


def volumetric_similarity(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Volumetric similarity ``1 - |V_pred - V_ref| / (V_pred + V_ref)`` per image (1.0 when both are empty)."""
    pred, ref = _binary(mask).sum((1, 2, 3)), _binary(target).sum((1, 2, 3))
    total = pred + ref
    return torch.where(total > 0, 1 - (pred - ref).abs() / total.clamp(min=1), torch.ones_like(total))


def hd95_per_image(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance in pixels per image (MONAI); NaN where a mask is empty."""
    pred, ref = _binary(mask), _binary(target)
    return compute_hausdorff_distance(pred, ref, include_background=True, percentile=95)[:, 0].float()


def pixel_auc_per_image(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ROC AUC of the pixel probabilities against the reference mask, per image (MONAI; NaN for a one-class image)."""
    ref = _binary(target)
    values = []
    for p, y in zip(prob.flatten(1), ref.flatten(1), strict=True):
        values.append(float(compute_roc_auc(p, y)) if 0 < y.sum() < y.numel() else float("nan"))
    return torch.tensor(values)


def flip_share(prob_clean: torch.Tensor, prob_triggered: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Share of pixels whose mask at ``threshold`` changes when the trigger is added, per image."""
    return (_binary(prob_clean, threshold) != _binary(prob_triggered, threshold)).float().mean((1, 2, 3))


def _summary(values: torch.Tensor) -> dict[str, float]:
    """Mean and standard deviation over the finite values, and how many were finite."""
    finite = values[torch.isfinite(values)].double()
    n = int(finite.numel())
    return {
        "mean": float(finite.mean()) if n else float("nan"),
        "sd": float(finite.std()) if n > 1 else float("nan"),
        "n": n,
    }


def harmlessness(prob_clean: torch.Tensor, prob_triggered: torch.Tensor, target: torch.Tensor) -> dict[str, object]:
    """Dice, column Dice (the authors'), pixel AUC, volumetric similarity and HD95 on clean and triggered inputs
    against ``target``, the flip share between the two, and the clean-vs-triggered Dice of the masks themselves."""
    report: dict[str, object] = {}
    for name, prob in (("clean", prob_clean), ("triggered", prob_triggered)):
        report[name] = {
            "dice": _summary(dice_per_image(prob, target)),
            "column_dice_authors": _summary(column_dice(prob, target).mean(1)),
            "pixel_auc": _summary(pixel_auc_per_image(prob, target)),
            "volumetric_similarity": _summary(volumetric_similarity(prob, target)),
            "hd95_px": _summary(hd95_per_image(prob, target)),
        }
    report["flip_share"] = _summary(flip_share(prob_clean, prob_triggered))
    report["dice_clean_vs_triggered"] = _summary(dice_per_image(prob_triggered, prob_clean))
    report["images"] = int(prob_clean.shape[0])
    return report


def as_numpy(values: torch.Tensor) -> np.ndarray:
    """Float64 NumPy copy (for JSON and SciPy)."""
    return values.detach().cpu().double().numpy()
