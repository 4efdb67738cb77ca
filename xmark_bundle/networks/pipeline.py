"""The watermarking function G as one module: surrogate EigenCAM saliency plus generator, taking only the image.

Its state dict holds both the generator and the frozen surrogate (``generator.*``, ``surrogate.*``), and
:meth:`WatermarkPipeline.config` the arguments that rebuild it, so one checkpoint (``models/model.pt``, written by
configs/train.json and read by :func:`xmark_bundle.networks.checkpoint.load_watermark`) fully determines the watermark:
the owner's secret key. Every config that uses a trained watermark builds it from that checkpoint alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from xmark_bundle.saliency import EigenCAM, eigencam_saliency


def module_target(module: nn.Module) -> str:
    """The ``_target_`` of ``module``'s class in a MONAI config."""
    return f"{type(module).__module__}.{type(module).__name__}"


class WatermarkPipeline(nn.Module):
    """``x -> generator(x, EigenCAM(surrogate)(x))``; saliency is skipped for generators without conditioning.

    ``image_size`` is the side S of the letterboxed square the generator was trained at: every caller (release,
    verification, inference) letterboxes its images to it. ``saliency`` is the :class:`~xmark_bundle.saliency.EigenCAM`
    over the surrogate at ``cam_layer`` (the training engines call it: eval mode, modes restored, gradients on
    request). The module can be scripted (``torch.jit.script``, MONAI's ``ckpt_export``) when ``cam_layer`` is the
    layer the surrogate's ``cam_features`` computes (a :class:`~xmark_bundle.networks.classifier.ResizedClassifier` at
    its ``CAM_LAYERS`` layer): the scripted forward reads the surrogate in its current mode (export it in eval mode).
    """

    #: Python-side descriptions that TorchScript need not compile.
    __jit_unused_properties__ = ["eps", "method"]
    #: set by :func:`~xmark_bundle.networks.checkpoint.load_watermark`: the checkpoint's record (a plain dict)
    __jit_ignored_attributes__ = ["watermark_record"]

    def __init__(self, generator: nn.Module, surrogate: nn.Module, cam_layer: str, image_size: int = 1024) -> None:
        super().__init__()
        self.generator = generator
        self.surrogate = surrogate
        self.cam_layer = cam_layer
        self.image_size = int(image_size)
        self.saliency = EigenCAM(self.surrogate, cam_layer)
        self.conditioning = bool(getattr(generator, "conditioning", False))
        #: Whether the scripted forward can compute :attr:`saliency`'s maps (from ``surrogate.cam_features``).
        self.scriptable = self.saliency.hook_free

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
        cam: torch.Tensor | None = None
        if self.conditioning:
            if torch.jit.is_scripting():
                if not self.scriptable:
                    raise RuntimeError("the surrogate's cam_features do not compute this pipeline's cam_layer")
                with torch.no_grad():
                    cam = eigencam_saliency(self.surrogate.cam_features(image), (image.shape[-2], image.shape[-1]))
            else:
                cam = self._eager_saliency(image)
        return self.generator(image, cam)

    @torch.jit.unused
    def _eager_saliency(self, image: torch.Tensor) -> torch.Tensor:
        """:attr:`saliency` of ``image``; TorchScript computes the same maps in :meth:`forward` without this object."""
        return self.saliency(image)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; also takes a whole watermark checkpoint (weights beside their record).

        MONAI's ``ckpt_export`` (as the model zoo's CI calls it, without ``key_in_ckpt``) hands the file's content
        to the network as it is; the record must then describe this pipeline (see
        :mod:`xmark_bundle.networks.checkpoint`).
        """
        from xmark_bundle.networks.checkpoint import RECORD_KEY, WEIGHTS_KEY  # lazy: checkpoint imports the data layer

        if isinstance(state_dict, Mapping) and set(state_dict) == {WEIGHTS_KEY, RECORD_KEY}:
            record = state_dict[RECORD_KEY]
            if not isinstance(record, Mapping) or record.get("network") != self.config():
                raise ValueError("the checkpoint's watermark record describes another network than this pipeline")
            state_dict = state_dict[WEIGHTS_KEY]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def watermark_generator(module: nn.Module) -> nn.Module:
    """The generator G itself: ``module``'s ``generator`` for a :class:`WatermarkPipeline`, else ``module``."""
    return getattr(module, "generator", module)


def is_keyed(module: nn.Module) -> bool:
    """Whether ``module``'s watermark (a pipeline or a bare generator) follows a secret key."""
    return bool(getattr(watermark_generator(module), "keyed", False))
