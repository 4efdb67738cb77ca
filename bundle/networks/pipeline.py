"""The watermarking function G as one module: surrogate EigenCAM saliency plus generator, taking only the image.

Its state dict holds both the generator and the frozen surrogate (``generator.*``, ``surrogate.*``), and
:meth:`WatermarkPipeline.config` the arguments that rebuild it, so one checkpoint (``models/model.pt``, written by
configs/train.json and read by :func:`bundle.networks.checkpoint.load_watermark`) fully determines the watermark:
the owner's secret key. Every config that uses a trained watermark builds it from that checkpoint alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bundle.saliency import EigenCAM


def module_target(module: nn.Module) -> str:
    """The ``_target_`` of ``module``'s class in a MONAI config."""
    return f"{type(module).__module__}.{type(module).__name__}"


class WatermarkPipeline(nn.Module):
    """``x -> generator(x, EigenCAM(surrogate)(x))``; saliency is skipped for generators without conditioning.

    ``image_size`` is the side S of the letterboxed square the generator was trained at: every caller (release,
    verification, inference) letterboxes its images to it.
    """

    #: Python-side descriptions that TorchScript need not compile.
    __jit_unused_properties__ = ["eps", "method"]

    def __init__(self, generator: nn.Module, surrogate: nn.Module, cam_layer: str, image_size: int = 1024) -> None:
        super().__init__()
        self.generator = generator
        self.surrogate = surrogate
        self.cam_layer = cam_layer
        self.image_size = int(image_size)
        self.saliency = EigenCAM(self.surrogate, cam_layer)
        self.conditioning = bool(getattr(generator, "conditioning", False))

    @property
    def eps(self) -> float:
        """The L-infinity budget in [0, 1] intensity."""
        return float(self.generator.eps)

    @property
    def method(self) -> str:
        """The method's name in configs and results (``xmark``, ``sscl_bw``, ``keyed_grating``)."""
        return str(self.generator.method)

    def config(self) -> dict[str, Any]:
        """The MONAI-config dict that rebuilds this pipeline (weights aside)."""
        return {
            "_target_": module_target(self),
            "generator": self.generator.config(),
            "surrogate": self.surrogate.config(),
            "cam_layer": self.cam_layer,
            "image_size": self.image_size,
        }

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Watermarked image (B x 1 x S x S in [0, 1]) for ``image`` of the same shape."""
        cam = self.saliency(image) if self.conditioning else None
        return self.generator(image, cam)


def watermark_generator(module: nn.Module) -> nn.Module:
    """The generator G itself: ``module``'s ``generator`` for a :class:`WatermarkPipeline`, else ``module``."""
    return getattr(module, "generator", module)


def is_keyed(module: nn.Module) -> bool:
    """Whether ``module``'s watermark (a pipeline or a bare generator) follows a secret key."""
    return bool(getattr(watermark_generator(module), "keyed", False))
