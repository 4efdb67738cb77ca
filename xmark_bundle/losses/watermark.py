"""X-Mark's generator objective: L = lt*Lt + lnt*Lnt + llpips*LPIPS(x_hat, x) + llap*LLap(x_hat, x) (paper eq. 3-7)."""

from __future__ import annotations

import os
import warnings

import torch
from lpips import LPIPS
from monai.utils import LossReduction
from torch import nn
from torch.nn import functional as F
from torchvision.models import get_model

from xmark_bundle.filters import binomial_blur
from xmark_bundle.networks.pretrained import locate_imagenet_weights, weights_status

__all__ = [
    "laplacian_pyramid",
    "collapse_laplacian_pyramid",
    "LaplacianPyramidLoss",
    "LPIPSLoss",
    "target_label_bce",
    "XMarkLoss",
]

#: lpips trunk name -> torchvision architecture whose ``.features`` lpips slices.
_LPIPS_TRUNKS: dict[str, str] = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def _expand(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Burt-Adelson expand: put ``x`` on the even pixels of a zero grid of ``size`` and blur with 4x the kernel."""
    up = x.new_zeros(x.shape[:2] + size)
    up[..., ::2, ::2] = x
    return binomial_blur(up, gain=4.0)


def _reduce(per_sample: torch.Tensor, reduction: LossReduction) -> torch.Tensor:
    """Apply a MONAI ``LossReduction`` to a vector of per-sample losses."""
    if reduction == LossReduction.NONE:
        return per_sample
    return per_sample.sum() if reduction == LossReduction.SUM else per_sample.mean()


def laplacian_pyramid(x: torch.Tensor, levels: int = 3) -> list[torch.Tensor]:
    """Laplacian pyramid of ``x`` (B x C x H x W) as ``levels`` tensors, finest first.

    With Gaussian levels ``G_0 = x`` and ``G_{l+1} = blur(G_l)[::2, ::2]`` (5x5 binomial kernel, reflect padding),
    entry ``l`` for ``l = 0 .. levels-2`` is the band-pass ``G_l - expand(G_{l+1})`` at 1/2**l resolution, and the
    last entry is the low-pass residual ``G_{levels-1}``. So ``levels=3`` means two band-pass levels plus the residual,
    the convention of Denton et al. (2015); :func:`collapse_laplacian_pyramid` inverts it exactly.
    """
    if levels < 1:
        raise ValueError(f"a Laplacian pyramid needs at least one level, got levels={levels}")
    if x.dim() != 4 or min(x.shape[-2:]) // 2 ** (levels - 1) < 3:
        raise ValueError(
            f"laplacian_pyramid needs B x C x H x W input whose coarsest level ({levels} levels) is at least 3 px, "
            f"got shape {list(x.shape)}"
        )
    pyramid = []
    current = x
    for _ in range(levels - 1):
        down = binomial_blur(current)[..., ::2, ::2]
        pyramid.append(current - _expand(down, (current.shape[-2], current.shape[-1])))
        current = down
    pyramid.append(current)
    return pyramid


def collapse_laplacian_pyramid(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """Reconstruct the image from :func:`laplacian_pyramid`'s output (exact up to float rounding)."""
    image = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        image = band + _expand(image, (band.shape[-2], band.shape[-1]))
    return image


class LaplacianPyramidLoss(nn.Module):
    """LLap: sum over the pyramid's ``levels`` (see :func:`laplacian_pyramid`) of mean |Lap_l(x_hat) - Lap_l(x)|.

    The means run over each sample's pixels, then ``reduction`` (``"mean"``, ``"sum"`` or ``"none"`` for a B-vector)
    over the batch. The pyramid is linear, so it is taken once of ``x_hat - x``.
    """

    def __init__(self, levels: int = 3, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__()
        self.levels = levels
        self.reduction = LossReduction(reduction)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Loss for B x C x H x W images, reduced over the batch as configured."""
        bands = laplacian_pyramid(x_hat - x, self.levels)
        return _reduce(sum(band.abs().mean(dim=(1, 2, 3)) for band in bands), self.reduction)


class LPIPSLoss(nn.Module):
    """LPIPS distance between one-channel images in [0, 1], with the trunk loaded offline only.

    lpips' linear calibration layers ship inside the pip package. The ImageNet trunk (AlexNet/VGG16/SqueezeNet) is
    taken from ``weights_path`` or torchvision's cache (``$TORCH_HOME/hub/checkpoints/<torchvision file name>``);
    without either the trunk stays untrained, a warning says so and ``backbone_status`` is ``"untrained"``
    (else ``"imagenet:<file>"``). Nothing is downloaded. The metric is frozen and always in eval mode; ``reduction``
    (``"mean"``, ``"sum"`` or ``"none"`` for a B-vector) applies over the batch.
    """

    def __init__(
        self,
        net: str = "alex",
        weights_path: str | os.PathLike | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__()
        self.reduction = LossReduction(reduction)
        if net not in _LPIPS_TRUNKS:
            raise ValueError(f"LPIPS trunk {net!r} is not supported; choose one of {sorted(_LPIPS_TRUNKS)}")
        arch = _LPIPS_TRUNKS[net]
        path = locate_imagenet_weights(arch, weights_path)
        with warnings.catch_warnings():  # lpips builds its trunk with torchvision's deprecated ``pretrained=False``
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.metric = LPIPS(net=net, pnet_rand=True, verbose=False)
        if path is not None:
            trunk = get_model(arch, weights=None)
            try:
                trunk.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"{path}: not torchvision {arch} ImageNet weights ({err})") from err
            for piece in self.metric.net.children():  # lpips slices keep torchvision's feature indices as names
                for index, module in piece.named_children():
                    module.load_state_dict(trunk.features[int(index)].state_dict())
        else:
            warnings.warn(
                f"LPIPS runs on an untrained {arch} trunk: its values are not the calibrated perceptual metric.",
                stacklevel=2,
            )
        self.backbone_status = weights_status(path)
        self.metric.requires_grad_(False)
        self.metric.eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        """Keep the metric in eval mode (its dropout must never be active)."""
        super().train(mode)
        self.metric.eval()
        return self

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """LPIPS(x_hat, x) for B x 1 x H x W images in [0, 1], reduced over the batch as configured."""
        if x_hat.dim() != 4 or x_hat.shape[1] != 1 or x_hat.shape != x.shape:
            raise ValueError(f"LPIPSLoss needs two B x 1 x H x W images, got {list(x_hat.shape)} and {list(x.shape)}")
        rgb = (-1, 3, -1, -1)
        return _reduce(self.metric(x_hat.expand(rgb), x.expand(rgb), normalize=True).flatten(), self.reduction)


def target_label_bce(logits: torch.Tensor, target_index: int, mask: torch.Tensor, target: float) -> torch.Tensor:
    """Mean BCE-with-logits of logit ``target_index`` against the constant ``target`` over samples where ``mask``.

    Lt is ``target=0`` on target-class samples, Lnt is ``target=1`` on non-target samples; 0 when ``mask`` is empty.
    """
    selected = logits[mask, target_index]
    if selected.numel() == 0:
        return logits.new_zeros(())
    return F.binary_cross_entropy_with_logits(selected, torch.full_like(selected, target))


class XMarkLoss(nn.Module):
    """X-Mark's generator loss; returns every term (for logging) and their weighted sum under ``"loss"``.

    Terms: ``loss_t`` (Lt over target-class samples), ``loss_nt`` (Lnt over non-target samples), ``lpips`` and
    ``laplacian`` (LLap over ``laplacian_levels``). With ``use_laplacian=False`` LLap is still reported but not added
    (the paper's ablation logs it either way). ``lpips`` defaults to :class:`LPIPSLoss` ``("alex")``; its output is
    averaged, so an instance with ``reduction="none"`` can be shared with a per-sample evaluator.
    """

    def __init__(
        self,
        target_index: int,
        lpips: nn.Module | None = None,
        lambda_t: float = 1.0,
        lambda_nt: float = 1.0,
        lambda_lpips: float = 10.0,
        lambda_lap: float = 3.0,
        laplacian_levels: int = 3,
        use_laplacian: bool = True,
    ) -> None:
        super().__init__()
        self.target_index = int(target_index)
        self.lpips = lpips if lpips is not None else LPIPSLoss()
        self.laplacian = LaplacianPyramidLoss(laplacian_levels)
        self.lambda_t, self.lambda_nt = float(lambda_t), float(lambda_nt)
        self.lambda_lpips, self.lambda_lap = float(lambda_lpips), float(lambda_lap)
        self.use_laplacian = use_laplacian

    def forward(
        self, x: torch.Tensor, x_hat: torch.Tensor, logits: torch.Tensor, is_target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss terms for clean ``x``, watermarked ``x_hat`` (B x 1 x H x W), surrogate ``logits`` on ``x_hat``
        (B x num_classes) and ``is_target`` (B booleans: label ``target_index`` present)."""
        if logits.dim() != 2 or not 0 <= self.target_index < logits.shape[1]:
            raise ValueError(
                f"logits must be B x num_classes with column {self.target_index}, got {list(logits.shape)}"
            )
        if is_target.shape != (logits.shape[0],) or is_target.dtype != torch.bool:
            raise ValueError(
                f"is_target must be {logits.shape[0]} booleans, got {is_target.dtype} {list(is_target.shape)}"
            )
        terms = {
            "loss_t": target_label_bce(logits, self.target_index, is_target, 0.0),
            "loss_nt": target_label_bce(logits, self.target_index, ~is_target, 1.0),
            "lpips": self.lpips(x_hat, x).mean(),
            "laplacian": self.laplacian(x_hat, x),
        }
        loss = self.lambda_t * terms["loss_t"] + self.lambda_nt * terms["loss_nt"] + self.lambda_lpips * terms["lpips"]
        if self.use_laplacian:
            loss = loss + self.lambda_lap * terms["laplacian"]
        return {**terms, "loss": loss}
