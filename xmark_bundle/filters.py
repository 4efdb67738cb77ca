"""Small fixed image filters shared by the networks and the losses (TorchScript-compatible)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BinomialBlur", "binomial_blur", "binomial_kernel"]


def binomial_kernel(gain: float = 1.0) -> torch.Tensor:
    """The 5x5 kernel [1,4,6,4,1]^T [1,4,6,4,1] / 256 times ``gain``, shaped 1 x 1 x 5 x 5.

    Burt and Adelson's pyramid kernel: it sums to ``gain`` and has zero response at the Nyquist frequency.
    """
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    return (torch.outer(taps, taps) * gain)[None, None]


def _depthwise_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(padded, kernel.to(x.dtype).expand(channels, 1, 5, 5), groups=channels)


def binomial_blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Filter every channel of ``x`` (B x C x H x W, H and W >= 3) with :func:`binomial_kernel`, reflect padding."""
    return _depthwise_blur(x, binomial_kernel(gain).to(x.device))


class BinomialBlur(nn.Module):
    """:func:`binomial_blur` as a module.

    The kernel is a persistent buffer on purpose: a checkpoint then records how many blur passes its network had, and
    strict loading into a network configured with another number fails instead of silently changing the output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kernel", binomial_kernel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depthwise_blur(x, self.kernel)
