"""The owner's QR code and the authors' grid-occlusion "explanation" that is said to reveal it.

The authors' procedure (``LimeForSegmentation.perturb_image`` / ``explain`` in their code), reproduced faithfully:
the image is cut into a grid (theirs 16 x 16; here the QR symbol's own size, since a QR code needs >= 21 modules);
the owner's secret binary pattern decides, cell by cell, whether the cell is blacked out (pattern 0, a dark module) or
left alone (pattern 1); every cell gives one perturbed image and one design row (all ones but a 0 at that cell when
it was blacked out); a ridge regression (alpha 1) of the mean predicted probability on these rows gives a weight per
cell, and every nonzero weight is set to 1. A cell that is never blacked out is a constant column, whose weight is
exactly 0 after the intercept is removed, and every blacked-out cell gets a nonzero weight as soon as the model's
output moves at all. So the binarised "explanation" is the verifier's own pattern, whatever the model: an untrained or
a benign model "reveals" the owner's QR code as well as the watermarked one. ``tests/test_stealthmark_qr.py`` shows
it on an untrained network. This is what the method's QR step shows; it is no evidence of ownership.

Needs ``segno`` (QR encoding) and OpenCV (``cv2.QRCodeDetector``, decoding), both in requirements.txt.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.linear_model import Ridge

__all__ = ["decode_qr", "grid_occlusion_explanation", "owner_qr", "qr_image"]


def owner_qr(owner_id: str, error: str = "h") -> np.ndarray:
    """The owner's ID as a QR symbol: a square bool matrix, True = dark module (no quiet zone)."""
    import segno

    return np.asarray(segno.make(owner_id, error=error, micro=False).matrix, dtype=bool)


def qr_image(modules: np.ndarray, module_px: int = 8, quiet_zone: int = 4) -> np.ndarray:
    """A uint8 picture of ``modules`` (True = dark) with a quiet zone, for a QR decoder."""
    padded = np.pad(np.asarray(modules, dtype=bool), quiet_zone, constant_values=False)
    pixels = np.where(padded, 0, 255).astype(np.uint8)
    return np.kron(pixels, np.ones((module_px, module_px), dtype=np.uint8))


def decode_qr(modules: np.ndarray) -> str | None:
    """The text OpenCV's QR detector reads from ``modules`` (True = dark), or None when it reads nothing."""
    import cv2

    text, _, _ = cv2.QRCodeDetector().detectAndDecode(qr_image(modules))
    return text or None


def _cells(shape: tuple[int, int], grid: int) -> list[tuple[slice, slice]]:
    """Row-major cell slices of a ``grid`` x ``grid`` partition (cell size ``H // grid``, as the authors)."""
    ch, cw = shape[0] // grid, shape[1] // grid
    if ch < 1 or cw < 1:
        raise ValueError(f"an image of {shape} cannot hold a {grid} x {grid} grid")
    return [(slice(i * ch, (i + 1) * ch), slice(j * cw, (j + 1) * cw)) for i in range(grid) for j in range(grid)]


def grid_occlusion_explanation(
    predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, pattern: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' explanation of ``predict`` (B x 1 x H x W -> probability maps) on ``image`` (1 x H x W) with
    the secret ``pattern`` (grid x grid, True = dark module = the cell is blacked out).

    Returns (binarised grid: True where the ridge weight is nonzero, the raw weights), both grid x grid."""
    pattern = np.asarray(pattern, dtype=bool)
    grid = pattern.shape[0]
    if pattern.shape != (grid, grid):
        raise ValueError(f"the pattern must be square, got {pattern.shape}")
    keep = (~pattern).ravel().astype(np.float64)  # the authors' mask value: 0 blacks the cell out, 1 leaves it
    cells = _cells(tuple(image.shape[-2:]), grid)
    perturbed, design = [], []
    for index, (rows, cols) in enumerate(cells):
        copy = image.clone()
        copy[..., rows, cols] *= float(keep[index])
        perturbed.append(copy)
        row = np.ones(grid * grid)
        row[index] = keep[index]
        design.append(row)
    batch = torch.stack(perturbed)
    with torch.no_grad():
        scores = torch.cat(
            [predict(batch[i : i + batch_size]).flatten(1).mean(1) for i in range(0, len(batch), batch_size)]
        )
    ridge = Ridge(alpha=1.0).fit(np.asarray(design), scores.double().cpu().numpy())
    weights = ridge.coef_.reshape(grid, grid)
    return weights != 0, weights
