"""Letterboxing of 2-D X-rays onto the square model grid, and the exact way back to the stored grid.

Shapes, padding and the image affine follow MONAI ``Resize(size_mode="longest")`` + ``SpatialPad(method="symmetric")``
exactly, but pixels are resampled with ``torch.nn.functional.interpolate(antialias=True)`` when shrinking: MONAI's
Gaussian pre-filter (``anti_aliasing=True``) zero-pads, darkening the outer rim of the image by up to ~25 %, and takes
~1 s for a 2500 x 2048 radiograph on one CPU core against ~20 ms here. The transform is traced like any MONAI
invertible transform (``inverse``, ``Invertd``), and the geometry is kept as a plain, collate-friendly dict under
``meta["xmark_geometry"]`` so that a watermark residual made at model resolution maps back with :func:`unletterbox`.
"""

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor, get_track_meta
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.utils import create_translate, scale_affine
from monai.utils import TraceKeys, convert_to_dst_type, convert_to_tensor

__all__ = ["GEOMETRY_KEY", "ResizeLongestPadd", "letterbox", "letterbox_geometry", "unletterbox"]

GEOMETRY_KEY = "xmark_geometry"


def letterbox_geometry(shape: Sequence[int], size: int) -> dict[str, Any]:
    """Return the letterbox geometry of an ``H x W`` image on an ``S x S`` grid, as a JSON-able dict.

    Rounding is MONAI ``Resize(size_mode="longest")``'s: ``h = int(round(H * (S / max(H, W))))`` (Python's
    round-half-to-even), likewise ``w``; the padding ``S - h`` splits as ``top = (S - h) // 2``, ``bottom`` the rest
    (MONAI ``SpatialPad(method="symmetric")``), and the same for ``left``/``right``.
    """
    if len(shape) != 2 or min(shape) < 1 or size < 1:
        raise ValueError(f"letterbox_geometry needs a positive 2-D shape and size, got shape={shape}, size={size}.")
    height, width = (int(s) for s in shape)
    scale = size / max(height, width)
    resized = [int(round(s * scale)) for s in (height, width)]
    if min(resized) < 1:
        raise ValueError(f"Image of shape {height}x{width} is too elongated to letterbox onto {size}x{size}.")
    top, left = ((size - r) // 2 for r in resized)
    return {
        "original_shape": [height, width],
        "resized_shape": resized,
        "pad": [top, size - resized[0] - top, left, size - resized[1] - left],
        "spatial_size": size,
    }


def letterbox(img: torch.Tensor, geometry: Mapping[str, Any], mode: str = "bilinear") -> torch.Tensor:
    """Resize a ``(B x) C x H x W`` tensor to the geometry's resized shape and zero-pad it to ``S x S``."""
    top, bottom, left, right = (int(p) for p in geometry["pad"])
    return F.pad(_interpolate(img, geometry["resized_shape"], mode), (left, right, top, bottom))


def unletterbox(t: torch.Tensor, geometry: Mapping[str, Any], mode: str = "bilinear") -> torch.Tensor:
    """Crop the padding from a ``(B x) C x S x S`` tensor and resize it to the original ``H x W`` grid.

    Used to map a residual made at model resolution back to full resolution. Takes the geometry of one image, with
    plain ints or 0-d tensors (as after ``decollate_batch``); returns a plain tensor.
    """
    size = int(geometry["spatial_size"])
    top, bottom, left, right = (int(p) for p in geometry["pad"])
    if t.ndim not in (3, 4) or tuple(t.shape[-2:]) != (size, size):
        raise ValueError(f"unletterbox expects a (B x) C x {size} x {size} tensor, got shape {tuple(t.shape)}.")
    cropped = convert_to_tensor(t, track_meta=False)[..., top : size - bottom, left : size - right]
    return _interpolate(cropped, geometry["original_shape"], mode)


def _interpolate(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """Resize a ``(B x) C x H x W`` tensor with ``interpolate``; linear modes are antialiased when shrinking."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x.clone()
    linear = mode in ("bilinear", "bicubic")
    out = F.interpolate(
        x if x.ndim == 4 else x.unsqueeze(0),
        size=size,
        mode=mode,
        align_corners=False if linear else None,
        antialias=linear and any(o < i for o, i in zip(size, x.shape[-2:], strict=True)),
    )
    return out if x.ndim == 4 else out.squeeze(0)


def _letterbox_affine(geometry: Mapping[str, Any]) -> np.ndarray:
    """Index-space affine of the letterbox, as MONAI's Resize (centred scaling) followed by SpatialPad compose it."""
    top, _, left, _ = geometry["pad"]
    return scale_affine(geometry["original_shape"], geometry["resized_shape"]) @ create_translate(2, [-top, -left])


class ResizeLongestPadd(MapTransform, InvertibleTransform):
    """Resize the longest side of channel-first 2-D images to ``spatial_size``, then zero-pad symmetrically to a square.

    ``mode`` is a ``torch.nn.functional.interpolate`` mode (antialiased when shrinking, plain when enlarging). The
    geometry from :func:`letterbox_geometry` goes to ``meta["xmark_geometry"]``; ``inverse`` restores shape and affine.
    """

    def __init__(
        self, keys: KeysCollection, spatial_size: int, mode: str = "bilinear", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = spatial_size
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], dtype=torch.float32, track_meta=get_track_meta())
            if img.ndim != 3:
                raise ValueError(f"ResizeLongestPadd expects channel-first C x H x W for '{key}', got {img.shape}.")
            geometry = letterbox_geometry(img.shape[1:], self.spatial_size)
            meta_info = self.track_transform_meta(
                img,
                sp_size=(self.spatial_size, self.spatial_size),
                affine=_letterbox_affine(geometry),
                extra_info={"geometry": geometry, "mode": self.mode},
                orig_size=tuple(geometry["original_shape"]),
                transform_info=self.get_transform_info(),
            )
            out = convert_to_dst_type(letterbox(convert_to_tensor(img, track_meta=False), geometry, self.mode), img)[0]
            if isinstance(out, MetaTensor):
                out.copy_meta_from(meta_info)
                out.meta[GEOMETRY_KEY] = geometry
            d[key] = out
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            transform = self.pop_transform(img)
            geometry, mode = transform[TraceKeys.EXTRA_INFO]["geometry"], transform[TraceKeys.EXTRA_INFO]["mode"]
            with self.trace_transform(False):
                meta_info = self.track_transform_meta(
                    img, affine=np.linalg.inv(_letterbox_affine(geometry)), transform_info=self.get_transform_info()
                )
            out = convert_to_dst_type(unletterbox(img, geometry, mode), img)[0].copy_meta_from(meta_info)
            out.meta.pop(GEOMETRY_KEY, None)
            d[key] = out
        return d


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square B x C x S x S images resized to ``size`` (bilinear, antialiased): a classifier's own input resize."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
