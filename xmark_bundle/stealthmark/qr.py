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

**Model-dependent explanation** (:func:`random_mask_explanation`, this bundle's design, not the authors'): the
QR symbol's modules are cells of the image. For each of many samples the verifier draws a random keep/occlude mask
over the cells (LIME's random masks) and dims the occluded cells of a query image, probes one module with a random
bit, and adds the owner's trigger only when the bit equals the owner's module (1 = dark). The model's answer is read
as its floor score (the mean background probability); a least-squares fit of the floor on the probe bits (one column
per module), the masks and one intercept per query image gives a weight per module, about +rise/2 on dark and
-rise/2 on light modules, where rise is how much the trigger lifts the floor. The verification binarises it at half
the floor test's margin (``margin_fraction * epsilon / 2``): a model whose floor rises by more than the margin shows
the owner's code; one that does not react has weights that are noise around 0 (the floor's response to the
occlusions and images, which knows nothing of the code) and shows light modules where the noise stays below the
threshold. It is the floor test's evidence written as a picture: the code appears when the rise exceeds the margin
and is large against the floor's variation over the occlusions. Binarised by the sign instead (threshold 0), a model
with a tiny but consistent rise (any model's background moves a little) reveals the code as soon as the fit's noise
is smaller than the rise: a noiseless planted suspect whose floor follows the image's mean brightness does
(``tests/test_stealthmark_qr_model.py``). The module agreement, its binomial p and OpenCV's exact decode are
reported, and the runner's ``false_accusations`` option compares them with benign and other-key models.

Needs ``segno`` (QR encoding) and OpenCV (``cv2.QRCodeDetector``, decoding), both in requirements.txt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.linear_model import Ridge

__all__ = [
    "QR_MODES",
    "data_modules",
    "decode_qr",
    "grid_occlusion_explanation",
    "owner_qr",
    "qr_image",
    "qr_report",
    "random_mask_explanation",
]

#: QR explanation modes of the verification: none, the authors' grid occlusion (not model-dependent: it returns the
#: verifier's own pattern for any model whose output moves) and the model-dependent random-mask explanation.
QR_MODES = ("none", "authors_grid", "random_mask")


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


def data_modules(modules: np.ndarray) -> np.ndarray:
    """Bool mask of the data and error-correction modules of a QR symbol of ``modules``' size: everything but the
    finder patterns and separators, timing patterns, alignment patterns, format and version information."""
    from segno import encoder

    size = int(np.asarray(modules).shape[0])
    matrix = encoder.make_matrix(size, size)
    encoder.add_finder_patterns(matrix, size, size)
    encoder.add_alignment_patterns(matrix, size, size)
    return np.array([[value == 0x2 for value in row] for row in matrix], dtype=bool)


def _even_cells(shape: tuple[int, int], grid: int) -> list[tuple[slice, slice]]:
    """Row-major cell slices of a ``grid`` x ``grid`` partition covering the whole image (cells differ by <= 1 px)."""
    if shape[0] < grid or shape[1] < grid:
        raise ValueError(f"an image of {shape} cannot hold a {grid} x {grid} grid")
    rows = np.linspace(0, shape[0], grid + 1).round().astype(int)
    cols = np.linspace(0, shape[1], grid + 1).round().astype(int)
    return [(slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1])) for i in range(grid) for j in range(grid)]


def _floor(maps: torch.Tensor) -> np.ndarray:
    """Mean probability over the predicted background (< 0.5) of each B x 1 x H x W map; NaN where there is none."""
    flat = maps.flatten(1).double()
    background = flat < 0.5
    total = torch.where(background, flat, torch.zeros_like(flat)).sum(1)
    count = background.sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan"))).cpu().numpy()


def random_mask_explanation(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    pattern: np.ndarray,
    add_trigger: Callable[[torch.Tensor], torch.Tensor],
    n_samples: int = 4096,
    seed: int = 0,
    occlusion: float = 0.5,
    batch_size: int = 64,
    threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The model-dependent explanation of ``predict`` (B x 1 x H x W -> probability maps) on query ``images``
    (N x 1 x H x W) for the owner's ``pattern`` (grid x grid, True = dark module).

    Sample ``k`` (all draws from ``seed``) keeps each cell of image ``k mod N`` with probability 1/2 and multiplies
    the others by ``occlusion`` (LIME's random masks), probes one module ``c_k`` (every module equally often) with a
    random bit ``b_k``, and adds the owner's trigger (``add_trigger``) when ``b_k`` equals the owner's module
    (1 = dark). The floor score of each answer is fitted by least squares on the probe features (``2 b_k - 1`` in
    column ``c_k``), the centred masks and one intercept per image; a module's weight is its probe coefficient, about
    +rise/2 on dark and -rise/2 on light modules for a model whose floor rises with the trigger, and noise around 0
    for one that does not react. Returns (binarised grid: True where the weight exceeds ``threshold``, the weights),
    both grid x grid. With ``threshold`` 0 (the sign) any consistent rise, however small, reveals the code once the
    fit's noise is smaller still; the verification passes half its margin (``margin_fraction * epsilon / 2``), so
    that a model whose floor rises by less than the floor test's margin shows only light modules. Samples whose
    answer has no background are dropped."""
    pattern = np.asarray(pattern, dtype=bool)
    grid = pattern.shape[0]
    if pattern.shape != (grid, grid):
        raise ValueError(f"the pattern must be square, got {pattern.shape}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected N x 1 x H x W query images, got {tuple(images.shape)}")
    modules = grid * grid
    unknowns = 2 * modules + len(images)
    if n_samples < 2 * unknowns:
        raise ValueError(f"need at least {2 * unknowns} samples ({modules} modules, {len(images)} images)")
    cell_of = torch.zeros(images.shape[-2:], dtype=torch.long)  # which cell each pixel is in
    for index, (rows, cols) in enumerate(_even_cells(tuple(images.shape[-2:]), grid)):
        cell_of[rows, cols] = index
    rng = np.random.default_rng(seed)
    masks = rng.random((n_samples, modules)) < 0.5
    probed = np.concatenate([rng.permutation(modules) for _ in range(-(-n_samples // modules))])[:n_samples]
    bits = rng.random(n_samples) < 0.5
    gate = bits == pattern.ravel()[probed]
    which = np.arange(n_samples) % len(images)
    scores = np.empty(n_samples)
    for start in range(0, n_samples, batch_size):
        stop = min(start + batch_size, n_samples)
        kept = torch.from_numpy(masks[start:stop])[:, cell_of]  # B x H x W
        dim = torch.where(kept, 1.0, float(occlusion)).to(images.dtype)
        batch = images[which[start:stop]] * dim[:, None]
        on = torch.from_numpy(gate[start:stop])
        if on.any():
            batch[on] = add_trigger(batch[on])
        with torch.no_grad():
            scores[start:stop] = _floor(predict(batch))
    keep = np.isfinite(scores)
    if keep.sum() < unknowns + 1:
        raise ValueError(f"only {int(keep.sum())} of {n_samples} answers have background: too few for the fit")
    probes = np.zeros((n_samples, modules))
    probes[np.arange(n_samples), probed] = np.where(bits, 1.0, -1.0)
    z = masks.astype(np.float64)
    z -= z.mean(0)
    intercepts = (which[:, None] == np.arange(len(images))[None, :]).astype(np.float64)
    design = np.concatenate([probes, z, intercepts], axis=1)[keep]
    solution, *_ = np.linalg.lstsq(design, scores[keep], rcond=None)
    weights = solution[:modules].reshape(grid, grid)
    return weights > threshold, weights


def qr_report(explanation: np.ndarray, owner: np.ndarray, owner_id: str, mode: str) -> dict[str, Any]:
    """Agreement of a binarised ``explanation`` with the owner's QR ``owner`` (all modules and data modules), the
    one-sided binomial p of the data-module agreement against 1/2 (assumes independent modules, which neighbouring
    cells are not quite), and what OpenCV decodes from the explanation."""
    explanation, owner = np.asarray(explanation, dtype=bool), np.asarray(owner, dtype=bool)
    data = data_modules(owner)
    agree = explanation == owner
    k, n = int(agree[data].sum()), int(data.sum())
    decoded = decode_qr(explanation)
    return {
        "mode": mode,
        "model_dependent": mode == "random_mask",
        "owner_id": owner_id,
        "modules": int(owner.size),
        "data_modules": n,
        "agreement": float(agree.mean()),
        "agreement_data": k / n,
        "p_binomial_data": float(stats.binomtest(k, n, 0.5, alternative="greater").pvalue),
        "decoded": decoded,
        "decodes_owner": decoded == owner_id,
    }
