"""Multi-label AUROC that ignores uncertain targets (< 0), as a MONAI cumulative metric for Ignite handlers."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, compute_roc_auc


def per_label_auroc(y_pred: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """AUROC of each column of ``y_pred`` (N x K probabilities) against ``y``; targets < 0 are left out.

    A label whose kept targets are all of one class gets NaN.
    """
    scores = np.full(y.shape[1], np.nan)
    for k in range(y.shape[1]):
        keep = y[:, k] >= 0
        target, pred = y[keep, k], y_pred[keep, k]
        if target.numel() and 0 < target.sum() < target.numel():
            scores[k] = compute_roc_auc(pred, target)
    return scores


class MultiLabelAUROC(CumulativeIterationMetric):
    """Mean over labels of the per-label AUROC; buffers predictions so reports can reuse them (``get_buffer``)."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return y_pred.float(), y.float()

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        y_pred, y = self.get_buffer()
        scores = per_label_auroc(y_pred.detach().cpu(), y.detach().cpu())
        if np.isnan(scores).all():
            warnings.warn("AUROC undefined for every label (each has a single class); returning 0.5.", stacklevel=2)
            return torch.tensor(0.5)
        return torch.tensor(float(np.nanmean(scores)))


class SampleStatistic(CumulativeIterationMetric):
    """Mean (or max) of a per-sample figure from the engine output (LPIPS, max |x_hat - x|, ...); ``y`` is unused.

    Not ignite's ``Average``: that counts a 1-D batch of per-sample values as one example and returns a 1-element
    tensor (which TensorBoardStatsHandler skips), and configs/evaluate.json reads this metric's buffer.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "max"):
            raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return y_pred.float().reshape(-1)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        values = self.get_buffer()
        return values.max() if self.reduction == "max" else values.mean()


class WatermarkSuccessRate(CumulativeIterationMetric):
    """WSR: share of NON-target samples whose watermarked version is predicted positive for the target label.

    ``y_pred`` is the target-label probability of each watermarked sample, ``y`` is 1 for target samples, which are
    never counted (unlike BackdoorBox-style ASR).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return y_pred.float().reshape(-1), y.float().reshape(-1)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        prob, is_target = self.get_buffer()
        non_target = is_target < 0.5
        if not non_target.any():
            raise ValueError("WSR needs non-target samples; the evaluated set has none")
        return (prob[non_target] >= self.threshold).float().mean()
