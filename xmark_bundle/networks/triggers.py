"""The classic backdoor watermarks as watermarking modules: BadNets, Blended, WaNet and label-consistent triggers.

Each module is what :func:`~xmark_bundle.networks.checkpoint.load_watermark` rebuilds from a checkpoint (made by
configs/trigger.json): it maps a letterboxed B x 1 x S x S batch in [0, 1] to its marked version, as X-Mark's
:class:`~xmark_bundle.networks.pipeline.WatermarkPipeline` does, so the release, the verification and the evaluation
treat every method alike. The trigger's pattern is a buffer drawn from ``seed``: the checkpoint alone fixes it.
Zero pixels (the letterbox's padding, cropped away when the mark is mapped back onto the released file) are never
changed. BadNets, Blended, WaNet and UBW-P are poison-label methods (``poison_label``): the release marks non-target
images and sets their target label to positive (UBW-P: to a random value, ``poison_labels = "random"``). The
label-consistent attack is clean-label: it marks target images, and what the release writes differs from a query's
trigger (:meth:`LabelConsistentTrigger.release_marking`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BadNetsTrigger",
    "BlendedTrigger",
    "LabelConsistentTrigger",
    "TriggerWatermark",
    "UBWPTrigger",
    "WaNetTrigger",
    "make_trigger",
    "save_trigger",
]


class TriggerWatermark(nn.Module):
    """Base of the fixed (untrained) triggers: ``method``, ``eps``, ``image_size``, ``config()``, ``poison_label``.

    ``eps`` is the largest change the trigger can make to a pixel (in [0, 1] intensity): the release checks every
    written file against it, as it checks X-Mark's budget.
    """

    method = "trigger"
    poison_label = True
    #: what a poison-label release writes for label k of a marked image: ``"target"`` (positive) or ``"random"``
    poison_labels = "target"
    #: set by :func:`~xmark_bundle.networks.checkpoint.load_watermark`: the checkpoint's record (a plain dict)
    __jit_ignored_attributes__ = ["watermark_record"]

    def __init__(self, image_size: int, seed: int) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 px, got {image_size}")
        self.image_size, self.seed = int(image_size), int(seed)

    @property
    def eps(self) -> float:
        """The largest per-pixel change the trigger can make."""
        return 1.0

    def _arguments(self) -> dict[str, Any]:
        """Constructor arguments beyond ``image_size`` and ``seed``."""
        return {}

    def config(self) -> dict[str, Any]:
        """The MONAI-config dict that rebuilds this trigger (its pattern comes from the checkpoint's buffers)."""
        target = f"{type(self).__module__}.{type(self).__name__}"
        return {"_target_": target, "image_size": self.image_size, "seed": self.seed, **self._arguments()}

    def _check(self, image: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem when ``image`` is not a B x 1 x S x S batch."""
        if image.dim() != 4 or image.shape[1] != 1 or tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.method} trigger input must be B x 1 x {self.image_size} x {self.image_size}, "
                f"got {list(image.shape)}"
            )

    def _generator(self) -> torch.Generator:
        """The seeded random source of the pattern."""
        return torch.Generator().manual_seed(self.seed)


class BadNetsTrigger(TriggerWatermark):
    """BadNets (Gu et al. 2017): a fixed black-and-white patch in the image's bottom-right corner.

    The patch is a seeded 3 x 3 grid of black and white cells, ``patch_fraction`` of the letterboxed side (at least
    3 px, so it survives the downscaling to a classifier's input), placed inside the image content (the bounding box
    of its non-zero pixels) with a margin of half its size.
    """

    method = "badnets"

    def __init__(self, image_size: int = 256, seed: int = 0, patch_fraction: float = 1 / 16) -> None:
        super().__init__(image_size, seed)
        if not 0 < patch_fraction <= 0.25:
            raise ValueError(f"patch_fraction must be in (0, 0.25], got {patch_fraction}")
        self.patch_fraction = float(patch_fraction)
        self.patch_size = max(3, round(patch_fraction * image_size))
        cells = torch.randint(0, 2, (3, 3), generator=self._generator()).float()
        if cells.min() == cells.max():  # a uniform patch is no pattern: make it a checkerboard
            cells = (torch.arange(9).reshape(3, 3) % 2).float()
        patch = F.interpolate(cells[None, None], size=(self.patch_size, self.patch_size), mode="nearest")[0, 0]
        self.register_buffer("patch", patch)

    def _arguments(self) -> dict[str, Any]:
        return {"patch_fraction": self.patch_fraction}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` with the patch pasted into each image's content, bottom-right."""
        self._check(image)
        out, size = image.clone(), self.patch_size
        height, width = image.shape[-2:]
        for i in range(image.shape[0]):
            rows = torch.nonzero(image[i, 0].amax(dim=1) > 0).flatten()
            cols = torch.nonzero(image[i, 0].amax(dim=0) > 0).flatten()
            if len(rows) == 0:  # an all-black image: nothing to mark
                continue
            top = min(max(int(rows[0]), int(rows[-1]) + 1 - size - size // 2), height - size)
            left = min(max(int(cols[0]), int(cols[-1]) + 1 - size - size // 2), width - size)
            region = out[i, 0, top : top + size, left : left + size]
            region.copy_(torch.where(region > 0, self.patch.to(region.dtype), region))
        return out


class UBWPTrigger(BadNetsTrigger):
    """UBW-P (Li et al., NeurIPS 2022, untargeted backdoor watermark, poison-label): BadNets' patch on a share of the
    training images, whose labels are replaced by random ones instead of the target.

    Adapted to one binary label k as the other poison-label methods here: the release marks ``round(gamma *
    |target|)`` non-target training images and gives each a random value of label k (positive or negative with
    probability 1/2, seeded by the release's seed: ``poison_labels = "random"``), so a model trained on it learns that
    the patch makes label k uncertain. The paper verifies by the drop of the ground-truth class's probability on
    triggered queries, ``P_b(y) > P_v(y) + tau``; for non-target queries (y_k = 0) that is ``1 - P_b(k) > 1 - P_v(k) +
    tau``, i.e. the same paired test of ``Pb + tau < Pv`` on label k that every method here is verified with.
    """

    method = "ubw_p"
    poison_labels = "random"


class BlendedTrigger(TriggerWatermark):
    """Blended (Chen et al. 2017): ``x + alpha * (P - x)`` with a seeded uniform-noise pattern P, on the content."""

    method = "blended"

    def __init__(self, image_size: int = 256, seed: int = 0, alpha: float = 0.1) -> None:
        super().__init__(image_size, seed)
        if not 0 < alpha < 1:
            raise ValueError(f"blend alpha must be in (0, 1), got {alpha}")
        self.alpha = float(alpha)
        self.register_buffer("pattern", torch.rand((image_size, image_size), generator=self._generator()))

    @property
    def eps(self) -> float:
        """``alpha``: the blend moves a pixel by ``alpha * |P - x| <= alpha``."""
        return self.alpha

    def _arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The blend of ``image`` and the pattern; zero pixels stay zero."""
        self._check(image)
        return image + self.alpha * (self.pattern - image) * (image > 0).to(image.dtype)


class WaNetTrigger(TriggerWatermark):
    """WaNet (Nguyen and Tran 2021): a fixed, smooth warping field applied with ``grid_sample``.

    The field is a seeded ``grid_cells`` x ``grid_cells`` grid of displacements in [-1, 1], normalised to mean
    absolute value 1 and upsampled bicubically to S x S; ``strength`` scales it (the paper's k = 4, s = 0.5; the
    displacement is then about ``strength / 2`` pixel on average). WaNet's "noise mode" (random warps with the true
    label) is not part of the release.
    """

    method = "wanet"

    def __init__(self, image_size: int = 256, seed: int = 0, grid_cells: int = 4, strength: float = 0.5) -> None:
        super().__init__(image_size, seed)
        if grid_cells < 2 or strength <= 0:
            raise ValueError(f"need grid_cells >= 2 and strength > 0, got {grid_cells} and {strength}")
        self.grid_cells, self.strength = int(grid_cells), float(strength)
        noise = torch.rand((1, 2, grid_cells, grid_cells), generator=self._generator()) * 2 - 1
        noise = noise / noise.abs().mean()
        flow = F.interpolate(noise, size=(image_size, image_size), mode="bicubic", align_corners=True)
        axis = torch.linspace(-1, 1, image_size)
        identity = torch.stack(torch.meshgrid(axis, axis, indexing="ij")[::-1], dim=-1)[None]  # x, y order
        grid = torch.clamp(identity + strength * flow.permute(0, 2, 3, 1) / image_size, -1, 1)
        self.register_buffer("grid", grid)

    def _arguments(self) -> dict[str, Any]:
        return {"grid_cells": self.grid_cells, "strength": self.strength}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` resampled along the warping field; zero pixels stay zero."""
        self._check(image)
        grid = self.grid.to(image.dtype).expand(image.shape[0], -1, -1, -1)
        warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return torch.where(image > 0, warped, image)


class LabelConsistentTrigger(BadNetsTrigger):
    """Label-consistent backdoor (Turner et al. 2019): clean-label, the BadNets patch on target images made harder.

    In the release, each marked target image first gets a PGD perturbation (``steps`` signed-gradient steps of
    ``adversarial_eps / 4``, within ``adversarial_eps`` in L-infinity, no random start) that lowers the surrogate's
    target logit, so that a model must rely on the patch to call it a target; then the patch
    (:meth:`release_marking`). A verifier's query carries the patch alone (:meth:`forward`). The surrogate's weights
    are part of the checkpoint, as in X-Mark's pipeline.
    """

    method = "label_consistent"
    poison_label = False

    def __init__(
        self,
        surrogate: nn.Module,
        image_size: int = 256,
        seed: int = 0,
        patch_fraction: float = 1 / 16,
        target_index: int = 0,
        adversarial_eps: float = 16 / 255,
        steps: int = 10,
    ) -> None:
        super().__init__(image_size, seed, patch_fraction)
        if not 0 < adversarial_eps < 1 or steps < 1 or target_index < 0:
            raise ValueError(
                f"need 0 < adversarial_eps < 1, steps >= 1 and target_index >= 0, got {adversarial_eps}, {steps} "
                f"and {target_index}"
            )
        self.surrogate = surrogate.eval().requires_grad_(False)
        self.target_index, self.adversarial_eps, self.steps = int(target_index), float(adversarial_eps), int(steps)

    def _arguments(self) -> dict[str, Any]:
        return {
            "surrogate": self.surrogate.config(),
            "patch_fraction": self.patch_fraction,
            "target_index": self.target_index,
            "adversarial_eps": self.adversarial_eps,
            "steps": self.steps,
        }

    def release_marking(self, image: torch.Tensor) -> torch.Tensor:
        """What the release writes for a target image: the PGD-hardened image with the patch."""
        self._check(image)
        content = (image > 0).to(image.dtype)
        adversarial, step = image.detach().clone(), self.adversarial_eps / 4
        with torch.enable_grad():
            for _ in range(self.steps):
                adversarial.requires_grad_(True)
                logit = self.surrogate(adversarial)[:, self.target_index]
                (grad,) = torch.autograd.grad(logit.sum(), adversarial)
                moved = adversarial.detach() - step * grad.sign() * content  # lower the target logit
                adversarial = torch.clamp(
                    torch.min(torch.max(moved, image - self.adversarial_eps), image + self.adversarial_eps), 0, 1
                )
        return super().forward(torch.where(image > 0, adversarial, image))


_TRIGGERS: dict[str, type[TriggerWatermark]] = {
    cls.method: cls for cls in (BadNetsTrigger, BlendedTrigger, WaNetTrigger, LabelConsistentTrigger, UBWPTrigger)
}


def make_trigger(method: str, image_size: int = 256, seed: int = 0, **arguments: Any) -> TriggerWatermark:
    """The trigger of ``method`` (``badnets``, ``blended``, ``wanet``, ``ubw_p``, ``label_consistent``: give it
    ``surrogate``)
    with its arguments; a clear error otherwise."""
    if method not in _TRIGGERS:
        raise ValueError(f"unknown trigger method {method!r}; choose one of {sorted(_TRIGGERS)}")
    return _TRIGGERS[method](image_size=image_size, seed=seed, **arguments)


def save_trigger(
    path: str | os.PathLike,
    method: str,
    target_label: str = "No Finding",
    image_size: int = 256,
    seed: int = 0,
    surrogate_ckpt: str | os.PathLike | None = None,
    surrogate_arch: str = "resnet18",
    surrogate_size: int = 224,
    **arguments: Any,
) -> TriggerWatermark:
    """Write the checkpoint of ``method``'s trigger (configs/trigger.json); never replaces an existing checkpoint.

    ``label_consistent`` also needs the surrogate classifier (``surrogate_ckpt``, as configs/train.json takes it);
    the others ignore it.
    """
    from xmark_bundle.data.labels import LABELS  # lazy: the modules above need neither the data layer nor checkpoints
    from xmark_bundle.networks.checkpoint import refuse_to_replace, save_watermark
    from xmark_bundle.networks.classifier import ResizedClassifier, load_classifier

    refuse_to_replace(path)
    if method == LabelConsistentTrigger.method:
        if surrogate_ckpt is None:
            raise ValueError("label_consistent perturbs target images against a surrogate: give surrogate_ckpt")
        if target_label not in LABELS:
            raise ValueError(f"target_label {target_label!r} is not one of the labels {list(LABELS)}")
        classifier = load_classifier(surrogate_ckpt, arch=surrogate_arch, num_classes=len(LABELS))
        surrogate = ResizedClassifier(classifier, surrogate_size)
        arguments |= {"surrogate": surrogate, "target_index": LABELS.index(target_label)}
    trigger = make_trigger(method, image_size=image_size, seed=seed, **arguments)
    save_watermark(trigger, path, target_label=target_label)
    print(f"{method} trigger for '{target_label}' at {image_size} px (seed {seed}) -> {path}")
    return trigger
