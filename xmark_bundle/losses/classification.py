"""Multi-label classification loss for CheXpert labels with an 'ignore' uncertainty policy."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE-with-logits averaged over the targets that are >= 0; targets < 0 (uncertain, policy 'ignore') are skipped."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        mask = (target >= 0).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
        return (loss * mask).sum() / mask.sum().clamp(min=1)
