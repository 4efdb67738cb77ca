"""Watermark generators: X-Mark's saliency-conditioned residual U-Net and the SSCL-BW baseline (original U-Net).

Both map a one-channel image ``x`` in [0, 1] to ``x_hat = clamp(x + eps * tanh(r) * [x > 0], 0, 1)``, so that
``||x_hat - x||_inf <= eps`` holds by construction whatever the weights. With a secret key (``key_cells > 0``) the
head is ``clamp(x + eps * sigmoid(r + b) * K * [x > 0], 0, 1)`` instead: the network chooses only the per-pixel
magnitude, and the signs follow the owner's key field ``K`` (see :func:`xmark_bundle.keyed.keys.secret_key`); the offset
``b = logit(key_magnitude)`` sets the magnitude an untrained network starts from. The image side must be
divisible by 16 (four stride-2 stages; ``2 ** (len(channels) - 1)`` for other X-Mark depths); other sizes raise a
``ValueError``.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers import Act, Norm
from monai.networks.nets import BasicUNet
from torch import nn
from torch.nn import functional as F

from xmark_bundle.filters import BinomialBlur
from xmark_bundle.keyed.keys import key_pattern_of, keyed_perturbation, secret_key

__all__ = ["BudgetedGenerator", "XMarkGenerator", "SSCLBWGenerator", "bounded_perturbation"]

#: Default perturbation budget (L-infinity, in [0, 1] intensity): 16 grey levels of 8 bit.
DEFAULT_EPS = 16.0 / 255.0


def bounded_perturbation(image: torch.Tensor, residual: torch.Tensor, eps: float) -> torch.Tensor:
    """Watermarked image ``clamp(image + eps * tanh(residual), 0, 1)``: the output head shared by both generators.

    Pixels that are exactly 0 are left unchanged: the letterbox's zero padding is cropped away when the watermark is
    mapped back to the released file, so a perturbation there would fool the surrogate with a trigger that no
    release carries (true-black image pixels lose nothing: the clamp at 0 already removes half of their range).
    """
    return torch.clamp(image + eps * torch.tanh(residual) * (image > 0).to(image.dtype), 0.0, 1.0)


def _check_inputs(image: torch.Tensor, saliency: torch.Tensor | None, divisor: int) -> None:
    """Raise a ``ValueError`` that names the problem when the inputs do not fit the generator."""
    if image.dim() != 4 or image.shape[1] != 1:
        raise ValueError(f"generator input must be B x 1 x H x W, got shape {list(image.shape)}")
    if image.shape[2] % divisor != 0 or image.shape[3] % divisor != 0:
        raise ValueError(
            f"generator input H and W must be divisible by {divisor}, got {image.shape[2]}x{image.shape[3]}"
        )
    if saliency is not None and saliency.shape != image.shape:
        raise ValueError(f"saliency shape {list(saliency.shape)} must equal image shape {list(image.shape)}")


class BudgetedGenerator(nn.Module):
    """Base of both generators: the budget ``eps`` and the optional secret key, both stored in the state dict.

    The budget (buffer ``budget``) is part of the owner's key: loading weights trained with a different budget fails
    and names both values. The key (buffer ``key``, :func:`secret_key` of ``key_cells`` and ``key_seed``) and the
    keyed head's offset (buffer ``magnitude_offset`` = logit(``key_magnitude``)) come from the checkpoint whatever the
    constructor was given. :meth:`config` gives the arguments that rebuild the generator
    (:mod:`xmark_bundle.networks.checkpoint` stores them beside the weights).
    """

    def __init__(
        self,
        eps: float,
        key_cells: int = 0,
        key_seed: int | None = None,
        key_pattern: str = "cells",
        key_magnitude: float = 0.5,
    ) -> None:
        super().__init__()
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"perturbation budget eps must be in (0, 1], got {eps}")
        if not 0.0 < key_magnitude < 1.0:
            raise ValueError(
                f"key_magnitude (the keyed head's starting share of eps) must be in (0, 1), got {key_magnitude}"
            )
        self.eps = float(eps)
        if key_seed is None:  # never a guessable default: the key is the owner's secret
            key_seed = secrets.randbelow(2**31) if key_cells else 0
        self.key_settings = {
            "key_cells": int(key_cells),
            "key_seed": int(key_seed),
            "key_pattern": key_pattern,
            "key_magnitude": float(key_magnitude),
        }
        self.register_buffer("budget", torch.tensor(self.eps, dtype=torch.float32))
        self.register_buffer("key", secret_key(key_cells, key_seed, key_pattern))
        self.register_buffer("magnitude_offset", torch.logit(torch.tensor(float(key_magnitude))))

    @property
    def keyed(self) -> bool:
        """Whether the watermark's signs follow a secret key."""
        return self.key.numel() > 0

    @property
    def method(self) -> str:
        """The method's name in configs and results: ``keyed_grating`` or ``keyed_carrier`` (``keyed_cells``) with a
        key."""
        return f"keyed_{key_pattern_of(self.key)}" if self.keyed else self.unkeyed_method

    #: The method's name without a key (set by each generator class).
    unkeyed_method = ""
    #: Python-side descriptions that TorchScript need not compile.
    __jit_unused_properties__ = ["method"]

    def config(self) -> dict[str, Any]:
        """The MONAI-config dict (``_target_`` and constructor arguments) that rebuilds this generator."""
        target = f"{type(self).__module__}.{type(self).__name__}"
        return {"_target_": target, **self.architecture, "eps": self.eps, **self.key_settings}

    def other_key(self, seed: int) -> torch.Tensor:
        """A key of this generator's pattern and grid drawn from ``seed``: what another owner would hold.

        Never equal to this generator's own key (a colliding draw moves on to the next seed).
        """
        if not self.keyed:
            raise ValueError("this generator has no key, so there is no other key of its kind")
        cells, pattern = self.key.shape[-1], key_pattern_of(self.key)
        key = secret_key(cells, seed, pattern)
        while torch.equal(key, self.key.cpu()):
            seed += 1
            key = secret_key(cells, seed, pattern)
        return key.to(self.key.device)

    @contextmanager
    def using_key(self, key: torch.Tensor) -> Iterator[None]:
        """Watermark with ``key`` instead of the owner's inside the block (decoys of a release, the control)."""
        own = self.key
        self.key = key.to(own.device, own.dtype)
        try:
            yield
        finally:
            self.key = own

    def perturb(self, image: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The output head: :func:`keyed_perturbation` of ``r + magnitude_offset`` with a key, else
        :func:`bounded_perturbation`."""
        if self.keyed:
            return keyed_perturbation(image, residual + self.magnitude_offset, self.key, self.eps)
        return bounded_perturbation(image, residual, self.eps)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "budget"
        if key not in state_dict:
            warnings.warn(
                f"generator checkpoint has no stored budget ({key}); assuming the configured eps = {self.eps:.6f}",
                stacklevel=2,
            )
            state_dict[key] = self.budget.detach().clone()
        elif abs(float(state_dict[key]) - self.eps) > 1e-6:
            stored = float(state_dict[key])
            error_msgs.append(
                f"the checkpoint's generator was trained with eps = {stored:.6f} ({stored * 255:.3g}/255) but the "
                f"config builds eps = {self.eps:.6f} ({self.eps * 255:.3g}/255); set 'epsilon' to the training value"
            )
        # The checkpoint's key (checkpoints from before keys existed are unkeyed) replaces the constructed one.
        stored_key = state_dict.setdefault(prefix + "key", secret_key(0, 0))
        state_dict.setdefault(prefix + "magnitude_offset", torch.zeros(()))
        if isinstance(stored_key, torch.Tensor) and stored_key.shape != self.key.shape:
            self.key = torch.empty_like(stored_key, device=self.key.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class XMarkGenerator(BudgetedGenerator):
    """X-Mark's generator: MONAI's residual strided U-Net (``UNet(num_res_units=2)``) with EigenCAM conditioning.

    The encoder, bottleneck and decoder are the exact blocks ``monai.networks.nets.UNet`` builds for
    ``channels``, strides 2 and ``num_res_units`` (same parameters and MACs when ``conditioning`` is off). With
    ``conditioning`` the saliency map is area-resized to the bottleneck grid, projected by a 3x3 Conv + PReLU to the
    bottleneck channel count and *added* to the bottleneck features before the decoder. The image side must be
    divisible by ``2 ** (len(channels) - 1)`` (16 for the default five levels).

    Args:
        channels: feature channels per level, top first; the last entry is the bottleneck.
        eps: L-infinity perturbation budget in [0, 1] intensity.
        conditioning: use the saliency map; when False it is ignored and no projection module exists. Kept as the
            attribute ``conditioning`` so callers know whether to compute EigenCAM maps.
        num_res_units: convolutions per residual unit in the encoder (MONAI's ``num_res_units``).
        residual_blur: passes of a fixed 5x5 binomial low-pass over the decoder output ``r`` before ``tanh`` (0: off).
            A pass has zero response at the Nyquist frequency, so the watermark cannot be pixel-level texture
            (transposed-convolution checkerboards, sign noise) that any model learns as a generic "perturbed" cue.
            Each pass stores its fixed kernel in the state dict, so checkpoints only load with the same setting.
        key_cells: side of the secret key's sign grid (0: no key, the paper's head). See :func:`keyed_perturbation`.
        key_seed: seed that draws the key; ``None`` draws a random one (recorded by :meth:`config`, so the
            checkpoint rebuilds it). A loaded checkpoint brings its own key whatever this says.
        key_pattern: ``"cells"``, ``"grating"`` or ``"carrier"`` (see :func:`secret_key`).
        key_magnitude: share of ``eps`` that the keyed head gives at ``r = 0`` (``sigmoid(r + logit(m))``).
    """

    unkeyed_method = "xmark"

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        eps: float = DEFAULT_EPS,
        conditioning: bool = True,
        num_res_units: int = 2,
        residual_blur: int = 0,
        key_cells: int = 0,
        key_seed: int | None = None,
        key_pattern: str = "cells",
        key_magnitude: float = 0.5,
    ) -> None:
        super().__init__(eps, key_cells, key_seed, key_pattern, key_magnitude)
        channels = tuple(int(c) for c in channels)
        self.architecture = {
            "channels": list(channels),
            "conditioning": bool(conditioning),
            "num_res_units": int(num_res_units),
            "residual_blur": int(residual_blur),
        }
        if residual_blur < 0:
            raise ValueError(f"residual_blur must be >= 0 passes, got {residual_blur}")
        self.residual_blur = nn.Sequential(*(BinomialBlur() for _ in range(residual_blur)))
        if len(channels) < 2:
            raise ValueError(f"XMarkGenerator needs at least two channel levels, got {channels}")
        self.conditioning = conditioning
        self.divisor = 2 ** (len(channels) - 1)
        common = {"spatial_dims": 2, "act": Act.PRELU, "norm": Norm.INSTANCE, "dropout": 0.0, "bias": True}

        ins = (1,) + channels[:-2]
        self.encoder = nn.ModuleList(
            ResidualUnit(in_channels=i, out_channels=o, strides=2, subunits=num_res_units, **common)
            for i, o in zip(ins, channels[:-1], strict=True)
        )
        self.bottleneck = ResidualUnit(
            in_channels=channels[-2], out_channels=channels[-1], strides=1, subunits=num_res_units, **common
        )
        # Decoder, deepest first: cat(skip, deeper) -> transposed conv (x2) -> one-conv residual unit.
        skips = channels[:-1][::-1]
        outs = channels[:-2][::-1] + (1,)
        deeper = (channels[-1],) + outs[:-1]
        self.decoder = nn.ModuleList(
            nn.Sequential(
                Convolution(in_channels=s + d, out_channels=o, strides=2, kernel_size=3, is_transposed=True, **common),
                ResidualUnit(in_channels=o, out_channels=o, subunits=1, last_conv_only=i == len(outs) - 1, **common),
            )
            for i, (s, d, o) in enumerate(zip(skips, deeper, outs, strict=True))
        )
        self.saliency_projection = (
            Convolution(2, 1, channels[-1], kernel_size=3, act=Act.PRELU, norm=None, bias=True)
            if conditioning
            else None
        )

    def forward(self, image: torch.Tensor, saliency: torch.Tensor | None = None) -> torch.Tensor:
        """Watermarked image (B x 1 x H x W); ``saliency`` (B x 1 x H x W in [0, 1]) is required iff conditioning."""
        _check_inputs(image, saliency, self.divisor)
        skips: list[torch.Tensor] = []
        h = image
        for down in self.encoder:
            h = down(h)
            skips.append(h)
        h = self.bottleneck(h)
        if self.saliency_projection is not None:
            if saliency is None:
                raise ValueError("this generator is saliency-conditioned: pass a B x 1 x H x W saliency map")
            h = h + self.saliency_projection(F.adaptive_avg_pool2d(saliency.to(h.dtype), h.shape[-2:]))
        for up in self.decoder:
            h = up(torch.cat([skips.pop(), h], dim=1))
        return self.perturb(image, self.residual_blur(h))


class SSCLBWGenerator(BudgetedGenerator):
    """SSCL-BW's baseline generator: the original U-Net (MONAI ``BasicUNet``), same output head, no conditioning.

    ``features`` follows ``BasicUNet``: five encoder widths, then the width after the last upsampling.
    The image side must be divisible by 16; ``key_cells``, ``key_seed``, ``key_pattern`` and ``key_magnitude`` as for
    :class:`XMarkGenerator`. ``saliency`` is accepted for a common call signature and ignored (``conditioning`` is
    always False).
    """

    unkeyed_method = "sscl_bw"

    def __init__(
        self,
        features: Sequence[int] = (64, 128, 256, 512, 1024, 64),
        eps: float = DEFAULT_EPS,
        key_cells: int = 0,
        key_seed: int | None = None,
        key_pattern: str = "cells",
        key_magnitude: float = 0.5,
    ) -> None:
        super().__init__(eps, key_cells, key_seed, key_pattern, key_magnitude)
        self.architecture = {"features": [int(f) for f in features]}
        self.conditioning = False
        self.divisor = 16
        self.unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=tuple(features))

    def forward(self, image: torch.Tensor, saliency: torch.Tensor | None = None) -> torch.Tensor:
        """Watermarked image (B x 1 x H x W); ``saliency`` is ignored."""
        _check_inputs(image, None, self.divisor)
        return self.perturb(image, self.unet(image))
