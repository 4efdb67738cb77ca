"""MONAI transforms for X-Mark.

Intensity: images leave the loader already in [0, 1] in a fixed per-file mapping of stored values, and the watermark
residual must map back onto those stored values, so there is no per-image normalisation (no min/max or z-scoring).
The only intensity step the configs need is MONAI's clip to [0, 1]:
``ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)`` (identity on [0, 1]).
"""

from .geometry import GEOMETRY_KEY, ResizeLongestPadd, letterbox, letterbox_geometry, unletterbox
from .watermark import (
    KeptInstanceUIDWarning,
    RestoreWatermarkedd,
    SaveWatermarkedd,
    apply_watermark,
    budget_scale,
    full_resolution_residual,
    watermark_source,
    watermarked_path,
)

__all__ = [
    "GEOMETRY_KEY",
    "KeptInstanceUIDWarning",
    "ResizeLongestPadd",
    "RestoreWatermarkedd",
    "SaveWatermarkedd",
    "apply_watermark",
    "budget_scale",
    "full_resolution_residual",
    "letterbox",
    "letterbox_geometry",
    "unletterbox",
    "watermark_source",
    "watermarked_path",
]
