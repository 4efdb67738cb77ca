"""The watermarking function G as one module: surrogate EigenCAM saliency plus generator, taking only the image.

Its state dict holds both the generator and the frozen surrogate (``generator.*``, ``surrogate.*``), so one
checkpoint (``models/model.pt``) fully determines the watermark: the owner's secret key. This is the ``network_def``
of ``configs/inference.json`` and what ``monai.bundle ckpt_export`` turns into ``models/model.ts``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from bundle.saliency import EigenCAM


class WatermarkPipeline(nn.Module):
    """``x -> generator(x, EigenCAM(surrogate)(x))``; saliency is skipped for generators without conditioning."""

    def __init__(self, generator: nn.Module, surrogate: nn.Module, cam_layer: str) -> None:
        super().__init__()
        self.generator = generator
        self.surrogate = surrogate
        self.cam_layer = cam_layer
        self.saliency = EigenCAM(self.surrogate, cam_layer)
        self.conditioning = bool(getattr(generator, "conditioning", False))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Watermarked image (B x 1 x S x S in [0, 1]) for ``image`` of the same shape."""
        cam = self.saliency(image) if self.conditioning else None
        return self.generator(image, cam)


def watermark_generator(module: nn.Module) -> nn.Module:
    """The generator G itself: ``module``'s ``generator`` for a :class:`WatermarkPipeline`, else ``module``."""
    return getattr(module, "generator", module)


def load_pipeline(pipeline: WatermarkPipeline, checkpoint: str | os.PathLike) -> WatermarkPipeline:
    """Load a generator checkpoint (``models/model.pt`` from configs/train.json) into ``pipeline``, strictly."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"generator checkpoint not found: {checkpoint} (train it with configs/train.json)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    try:
        pipeline.load_state_dict(state.get("model", state))
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: does not match the configured generator ({err})") from err
    return pipeline.eval()
