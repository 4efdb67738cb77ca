"""2D segmentation networks for StealthMark: MONAI's BasicUNet, UNet, SegResNet, AttentionUnet, SwinUNETR, UNETR.

Every network takes B x 1 x H x W images in [0, 1] and returns B x 1 x H x W logits of the foreground (lung).
``width`` is the first stage's channel count (the others double from it); the paper's SAM ViT-B cannot be built here
because its SA-1B weights are not available offline.
"""

from __future__ import annotations

import math

from monai.networks.nets import UNETR, AttentionUnet, BasicUNet, SegResNet, SwinUNETR, UNet
from torch import nn

__all__ = ["SEGMENTATION_ARCHS", "build_segmentation_network"]

#: Architectures and the default ``width`` of each (MONAI's own defaults where they are sensible in 2D).
SEGMENTATION_ARCHS: dict[str, int] = {
    "basicunet": 32,
    "unet": 16,
    "segresnet": 16,
    "attentionunet": 16,
    "swinunetr": 24,
    "unetr": 16,
}
#: The side of the input must be a multiple of this per architecture (strides, patches, windows).
_SIZE_MULTIPLE = {"basicunet": 16, "unet": 16, "segresnet": 8, "attentionunet": 16, "swinunetr": 32, "unetr": 16}


def build_segmentation_network(arch: str, image_size: int = 256, width: int | None = None) -> nn.Module:
    """A 2D one-channel-in, one-logit-out segmentation network ``arch`` for square inputs of ``image_size``."""
    arch = arch.lower()
    if arch not in SEGMENTATION_ARCHS:
        raise ValueError(f"unknown segmentation architecture {arch!r}; choose one of {sorted(SEGMENTATION_ARCHS)}")
    if image_size % _SIZE_MULTIPLE[arch]:
        raise ValueError(f"{arch} needs an image_size that is a multiple of {_SIZE_MULTIPLE[arch]}, got {image_size}")
    w = SEGMENTATION_ARCHS[arch] if width is None else int(width)
    if w < 1:
        raise ValueError(f"width must be positive, got {width}")
    pyramid = (w, 2 * w, 4 * w, 8 * w, 16 * w)
    if arch == "basicunet":
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(*pyramid, w))
    if arch == "unet":
        return UNet(2, 1, 1, channels=pyramid, strides=(2, 2, 2, 2), num_res_units=2)
    if arch == "segresnet":
        norm = ("GROUP", {"num_groups": math.gcd(8, w)})
        return SegResNet(spatial_dims=2, init_filters=w, in_channels=1, out_channels=1, norm=norm)
    if arch == "attentionunet":
        return AttentionUnet(2, 1, 1, channels=pyramid, strides=(2, 2, 2, 2))
    if arch == "swinunetr":
        if w % 12:
            raise ValueError(f"swinunetr needs a width (feature_size) divisible by 12, got {w}")
        return SwinUNETR(in_channels=1, out_channels=1, feature_size=w, spatial_dims=2, use_v2=True)
    # A small UNETR: 16 x 16 patches, 192-wide transformer with 4 heads (ViT-Tiny-like) instead of ViT-B's 768.
    return UNETR(
        in_channels=1,
        out_channels=1,
        img_size=(image_size, image_size),
        feature_size=w,
        hidden_size=192,
        mlp_dim=768,
        num_heads=4,
        spatial_dims=2,
    )
