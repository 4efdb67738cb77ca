"""Secret keys of the keyed watermark variant (``keyed_grating``): the key fields and the keyed output head.

A keyed generator chooses only the watermark's per-pixel magnitude; its signs follow the owner's key field ``K``,
drawn from a seed. This is a research variant (a fixed keyed periodic pattern, SIG-like), not the paper's X-Mark.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "GRATING_CYCLES",
    "KEY_PATTERNS",
    "flat_keyed_watermark",
    "key_pattern_of",
    "keyed_perturbation",
    "secret_key",
]

#: Key patterns: ``"cells"`` (random signs per grid cell) or ``"grating"`` (one oriented sinusoid).
KEY_PATTERNS = ("cells", "grating")
#: Grating frequencies, in cycles per image side: periods of 4-8 px at 256 px, 3.5-7 px for a 224 px classifier.
GRATING_CYCLES = (32.0, 64.0)


def secret_key(cells: int, seed: int, pattern: str = "cells") -> torch.Tensor:
    """The owner's key: a 1 x 1 x cells x cells field in [-1, 1] drawn from ``seed``.

    ``"cells"``: independent random signs per grid cell. ``"grating"``: ``cos(2 pi f (u cos t + v sin t) + phase)``
    sampled on the grid (u, v in [0, 1)), with orientation ``t`` in [0, pi), ``f`` in :data:`GRATING_CYCLES` cycles
    per side and the phase drawn from the seed; ``cells`` must then resolve it (>= 2 * 64). A texture classifier sees
    local statistics, which two random sign grids share but two gratings of different orientation do not.
    ``cells == 0`` gives the empty 1 x 1 x 0 x 0 tensor of an unkeyed generator. The field is stretched over the
    image (bilinear), so it covers the same share of the image at any resolution.
    """
    if cells < 0:
        raise ValueError(f"key_cells must be >= 0 (0: no key), got {cells}")
    if pattern not in KEY_PATTERNS:
        raise ValueError(f"key_pattern must be one of {KEY_PATTERNS}, got {pattern!r}")
    if cells == 0:
        return torch.zeros(1, 1, 0, 0)
    rng = torch.Generator().manual_seed(int(seed))
    if pattern == "cells":
        return torch.randint(0, 2, (1, 1, cells, cells), generator=rng).float() * 2 - 1
    if cells < 2 * GRATING_CYCLES[1]:
        raise ValueError(f"a grating key needs key_cells >= {2 * GRATING_CYCLES[1]:g} to resolve it, got {cells}")
    angle, cycles, phase = torch.rand(3, generator=rng, dtype=torch.float64)
    angle, phase = angle * torch.pi, phase * 2 * torch.pi
    cycles = GRATING_CYCLES[0] + cycles * (GRATING_CYCLES[1] - GRATING_CYCLES[0])
    v, u = torch.meshgrid(*(2 * (torch.arange(cells, dtype=torch.float64) + 0.5) / cells,) * 2, indexing="ij")
    field = torch.cos(torch.pi * cycles * (u * torch.cos(angle) + v * torch.sin(angle)) + phase)
    return field.float()[None, None]


def key_pattern_of(key: torch.Tensor) -> str:
    """The :data:`KEY_PATTERNS` entry that drew ``key``: only sign grids hold nothing but +-1."""
    return "cells" if bool(key.abs().eq(1).all()) else "grating"


def keyed_perturbation(image: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, eps: float) -> torch.Tensor:
    """Watermarked image ``clamp(image + eps * sigmoid(residual) * K * [image > 0], 0, 1)`` for a key grid ``key``.

    ``K`` is ``key`` resized bilinearly to the image, so ``|K| <= 1`` and the budget holds as for
    :func:`bounded_perturbation`. The perturbation's sign pattern is the key's, whatever the weights: two owners'
    generators with independent keys produce uncorrelated residuals, even when trained on the same data against
    the same surrogate (where unkeyed generators learn the same edit, docs/research_log.md).
    """
    field = F.interpolate(key.to(image.dtype), size=image.shape[-2:], mode="bilinear", align_corners=False)
    return torch.clamp(image + eps * torch.sigmoid(residual) * field * (image > 0).to(image.dtype), 0.0, 1.0)


def flat_keyed_watermark(image: torch.Tensor, key: torch.Tensor, eps: float, magnitude: float) -> torch.Tensor:
    """``image`` watermarked by the keyed head at residual 0: ``clamp(x + eps * magnitude * K * [x > 0], 0, 1)``."""
    offset = torch.logit(torch.tensor(float(magnitude), dtype=image.dtype))
    return keyed_perturbation(image, torch.full_like(image, float(offset)), key, eps)
