"""Secret keys of the keyed watermark variants: the key fields and the keyed output head.

A keyed generator chooses only the watermark's per-pixel magnitude; its signs follow the owner's key field ``K``,
drawn from a seed. Research variants, not the paper's X-Mark: ``keyed_grating`` (one oriented sinusoid: a fixed
periodic pattern, SIG-like) and ``keyed_carrier``, the keyed X-Mark (a band-limited random carrier at mid
frequencies whose per-sample magnitude X-Mark's generator shapes: no period, no orientation to spot).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "CARRIER_CYCLES",
    "GRATING_CYCLES",
    "KEY_PATTERNS",
    "flat_keyed_watermark",
    "key_pattern_of",
    "keyed_perturbation",
    "secret_key",
]

#: Key patterns: ``"cells"`` (random signs per grid cell), ``"grating"`` (one oriented sinusoid) or ``"carrier"``
#: (band-limited random field).
KEY_PATTERNS = ("cells", "grating", "carrier")
#: Grating frequencies, in cycles per image side: periods of 4-8 px at 256 px, 3.5-7 px for a 224 px classifier.
GRATING_CYCLES = (32.0, 64.0)
#: The carrier's pass band, in cycles per image side: periods of 10-32 px at 256 px (mid frequencies: above the
#: anatomy's, below the pixel texture that resizing and JPEG remove).
CARRIER_CYCLES = (8.0, 24.0)
#: Share of a field's energy in its 8 strongest 2-D frequencies above which it is a grating (one sinusoid, with
#: leakage: > 0.5), below which a carrier (hundreds of frequencies: < 0.1).
_PEAKED = 0.3


def secret_key(cells: int, seed: int, pattern: str = "cells") -> torch.Tensor:
    """The owner's key: a 1 x 1 x cells x cells field in [-1, 1] drawn from ``seed``.

    ``"cells"``: independent random signs per grid cell. ``"grating"``: ``cos(2 pi f (u cos t + v sin t) + phase)``
    sampled on the grid (u, v in [0, 1)), with orientation ``t`` in [0, pi), ``f`` in :data:`GRATING_CYCLES` cycles
    per side and the phase drawn from the seed; ``cells`` must then resolve it (>= 2 * 64). A texture classifier sees
    local statistics, which two random sign grids share but two gratings of different orientation do not.
    ``"carrier"``: white Gaussian noise on the grid, kept in the :data:`CARRIER_CYCLES` band (ideal radial band-pass
    in the Fourier domain), scaled so that 99 % of ``|K|`` lies below 1 and clipped to [-1, 1] (``cells`` >= 2 * 24).
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
    if pattern == "carrier":
        return _carrier(cells, rng)
    if cells < 2 * GRATING_CYCLES[1]:
        raise ValueError(f"a grating key needs key_cells >= {2 * GRATING_CYCLES[1]:g} to resolve it, got {cells}")
    angle, cycles, phase = torch.rand(3, generator=rng, dtype=torch.float64)
    angle, phase = angle * torch.pi, phase * 2 * torch.pi
    cycles = GRATING_CYCLES[0] + cycles * (GRATING_CYCLES[1] - GRATING_CYCLES[0])
    v, u = torch.meshgrid(*(2 * (torch.arange(cells, dtype=torch.float64) + 0.5) / cells,) * 2, indexing="ij")
    field = torch.cos(torch.pi * cycles * (u * torch.cos(angle) + v * torch.sin(angle)) + phase)
    return field.float()[None, None]


def _carrier(cells: int, rng: torch.Generator) -> torch.Tensor:
    """Band-limited random field on a ``cells`` grid: :data:`CARRIER_CYCLES` band, its 99th percentile of ``|K|`` at 1
    and the top 1 % clipped there (:func:`secret_key`)."""
    if cells < 2 * CARRIER_CYCLES[1]:
        raise ValueError(f"a carrier key needs key_cells >= {2 * CARRIER_CYCLES[1]:g} to resolve it, got {cells}")
    noise = torch.randn(cells, cells, generator=rng, dtype=torch.float64)
    frequency = torch.fft.fftfreq(cells, d=1.0 / cells, dtype=torch.float64)  # cycles per side
    radius = torch.sqrt(frequency[:, None] ** 2 + frequency[None, :] ** 2)
    band = (radius >= CARRIER_CYCLES[0]) & (radius <= CARRIER_CYCLES[1])
    field = torch.fft.ifft2(torch.fft.fft2(noise) * band).real
    scale = torch.quantile(field.abs().flatten(), 0.99)  # 1 % clipped: RMS 0.39 instead of 0.27 at peak 1
    return (field / scale).clamp(-1.0, 1.0).float()[None, None]


def key_pattern_of(key: torch.Tensor) -> str:
    """The :data:`KEY_PATTERNS` entry that drew ``key``: only sign grids hold nothing but +-1; a grating's energy sits
    in a few frequencies, a carrier's is spread over its band."""
    if bool(key.abs().eq(1).all()):
        return "cells"
    power = torch.fft.fft2(key.double()[0, 0]).abs().flatten() ** 2
    return "grating" if float(power.topk(8).values.sum() / power.sum()) > _PEAKED else "carrier"


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
