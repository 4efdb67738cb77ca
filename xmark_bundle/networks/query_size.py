"""A watermark applied at a suspect's own input size, as a release applies it to a full-resolution file.

A watermark works on the letterboxed square it was trained at (``image_size``, e.g. 128 px). Verifying a suspect
trained at another size (e.g. 224 px) by upsampling 128 px queries measures blur as much as the watermark. Wrapped
here, the watermark takes images letterboxed from the original files at the suspect's size: it marks their
downsampled copy at its own size and adds its residual, resized bilinearly to the query size and kept within the
budget, to the query-size image itself, the way a release adds it to the stored file
(:func:`~xmark_bundle.transforms.watermark.full_resolution_residual`). configs/verify_own_size.json makes it the
``network_def`` of configs/verify.json, so benign and marked queries are loaded from the files at ``query_size``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from xmark_bundle.networks.checkpoint import load_watermark
from xmark_bundle.networks.pipeline import watermark_generator
from xmark_bundle.transforms.geometry import resize_square

__all__ = ["WatermarkAtSize", "load_watermark_at_size"]


class WatermarkAtSize(nn.Module):
    """``watermark`` (a module with ``image_size``, ``eps`` and ``method``) applied to ``size`` x ``size`` images."""

    def __init__(self, watermark: nn.Module, size: int) -> None:
        super().__init__()
        if int(size) < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        self.watermark = watermark
        self.image_size = int(size)
        #: the checkpoint's record travels with the wrapper (configs read the target label from it)
        self.watermark_record: Any = getattr(watermark, "watermark_record", None)

    @property
    def generator(self) -> nn.Module:
        """The wrapped watermark's generator, so that keyed controls swap its key (:func:`watermark_generator`)."""
        return watermark_generator(self.watermark)

    @property
    def eps(self) -> float:
        """The wrapped watermark's L-infinity budget in [0, 1] intensity."""
        return float(self.watermark.eps)

    @property
    def method(self) -> str:
        """The wrapped watermark's method name."""
        return str(self.watermark.method)

    @property
    def own_size(self) -> int:
        """The size the wrapped watermark works at."""
        return int(self.watermark.image_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Watermarked ``image`` (B x 1 x S x S in [0, 1], S = :attr:`image_size`): the residual made at the
        watermark's own size, resized to S, clamped to the budget, added to ``image``."""
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expects B x 1 x {self.image_size} x {self.image_size} images, got {tuple(image.shape)}")
        if self.own_size == self.image_size:
            return self.watermark(image)
        small = resize_square(image, self.own_size)
        residual = resize_square(self.watermark(small) - small, self.image_size).clamp(-self.eps, self.eps)
        return (image + residual).clamp(0.0, 1.0)


def load_watermark_at_size(
    checkpoint: str | os.PathLike, size: int, device: str | torch.device | None = None
) -> WatermarkAtSize:
    """The watermark of ``checkpoint`` (:func:`load_watermark`) applied at ``size`` px, in eval mode."""
    wrapped = WatermarkAtSize(load_watermark(checkpoint), size)
    return (wrapped if device is None else wrapped.to(device)).eval()
