"""xmark_bundle.filters: the shared 5x5 binomial low-pass."""

from __future__ import annotations

import torch

from xmark_bundle.filters import binomial_blur


def test_binomial_blur_keeps_constants_and_removes_checkerboards():
    flat = torch.full((1, 2, 16, 16), 0.3)
    assert torch.allclose(binomial_blur(flat), flat, atol=1e-6)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float()[None, None]
    blurred = binomial_blur(checker)
    assert torch.allclose(blurred, torch.full_like(blurred, 0.5), atol=1e-6)  # reflect padding keeps even borders
    ramp = torch.arange(16.0)[None, None, None].expand(1, 1, 16, 16)
    assert torch.allclose(binomial_blur(ramp)[..., 2:-2], ramp[..., 2:-2], atol=1e-5)  # linear inside the border
    assert torch.allclose(binomial_blur(flat, gain=4.0), 4 * flat, atol=1e-5)
