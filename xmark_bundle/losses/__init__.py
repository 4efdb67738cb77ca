"""Losses of the X-Mark bundle: the classifier's masked BCE and the watermark generator's objective."""

from .classification import MaskedBCEWithLogitsLoss
from .watermark import (
    LaplacianPyramidLoss,
    LPIPSLoss,
    XMarkLoss,
    collapse_laplacian_pyramid,
    laplacian_pyramid,
    target_label_bce,
)

__all__ = [
    "LPIPSLoss",
    "LaplacianPyramidLoss",
    "MaskedBCEWithLogitsLoss",
    "XMarkLoss",
    "collapse_laplacian_pyramid",
    "laplacian_pyramid",
    "target_label_bce",
]
