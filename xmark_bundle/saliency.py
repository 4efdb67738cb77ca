"""Batched EigenCAM in torch: the generator's saliency condition, computed on any device without per-sample NumPy SVDs.

Same math as ``pytorch_grad_cam.EigenCAM`` (grad-cam 1.5.7, one target layer, ``targets=None``): centre the
(h*w) x C activation matrix over positions, project it onto its first right singular vector, ReLU, resize bilinearly to
the input size and min-max normalise. Unlike grad-cam, the sign of the principal component is fixed (see
:func:`principal_projection`), so the map never flips to the inverse region. Everything after the layer
(:func:`eigencam_saliency`) is TorchScript-compatible: a scripted
:class:`~xmark_bundle.networks.pipeline.WatermarkPipeline` computes the same maps from its surrogate's ``cam_features``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["EigenCAM", "eigencam_saliency", "principal_projection", "projection_to_saliency"]


def principal_projection(activations: torch.Tensor) -> torch.Tensor:
    """Project each sample's centred activations (B x C x h x w) onto their first principal component -> B x h x w.

    Sign convention: the component ``v`` is chosen with a non-negative sum of loadings, ``sum_c v_c >= 0``. Since
    ``cov(A v, A 1) = s_1^2 * sum_c v_c`` for the centred matrix ``A``, this is the same as requiring that the
    projection correlates non-negatively with the channel-mean activation, i.e. the map highlights where the layer
    is active. NaNs are set to 0 (as grad-cam does); the SVD runs in float32 (or float64 for float64 input).
    TorchScript-compatible; eagerly the SVD and projection also stay in full precision under AMP (TorchScript cannot
    switch autocast off for a device known only at run time, so scripted models should run without autocast).
    """
    if activations.dim() != 4:
        raise ValueError(f"EigenCAM needs B x C x h x w activations, got shape {list(activations.shape)}")
    acts = activations if activations.dtype == torch.float64 else activations.float()
    acts = acts.masked_fill(acts.isnan(), 0.0)
    if torch.jit.is_scripting():
        return _project_on_first_component(acts)
    with torch.autocast(acts.device.type, enabled=False):  # SVD and projection stay in full precision under AMP
        return _project_on_first_component(acts)


def _project_on_first_component(acts: torch.Tensor) -> torch.Tensor:
    """:func:`principal_projection` of float activations without the checks and the autocast guard."""
    batch, height, width = acts.shape[0], acts.shape[2], acts.shape[3]
    flat = acts.flatten(2).transpose(1, 2)  # B x (h*w) x C
    flat = flat - flat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    component = vh[:, 0, :]
    component = torch.where(component.sum(dim=1, keepdim=True) < 0, -component, component)
    return (flat @ component.unsqueeze(-1)).reshape(batch, height, width)


def projection_to_saliency(projection: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, bilinear resize to ``size`` and per-sample min-max normalisation: B x h x w -> B x 1 x H x W in [0, 1]."""
    cam = F.interpolate(projection.clamp(min=0).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    cam = cam - cam.amin(dim=(2, 3), keepdim=True)
    return cam / (cam.amax(dim=(2, 3), keepdim=True) + 1e-7)


def eigencam_saliency(activations: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """EigenCAM maps (B x 1 x H x W in [0, 1], ``size`` = (H, W)) from a layer's activations (B x C x h x w).

    The whole computation after the layer, as plain (TorchScript-compatible) torch: :func:`principal_projection`, then
    :func:`projection_to_saliency`.
    """
    return projection_to_saliency(principal_projection(activations), size)


class EigenCAM:
    """EigenCAM saliency of ``model`` at the submodule named ``target_layer`` (e.g. ``"layer4"`` of a ResNet).

    Calling it runs the model once in eval mode (each module's train/eval flag is restored afterwards) and gives
    B x 1 x H x W maps in [0, 1] on the input's device; gradients are off unless ``enable_grad=True``. The layer's
    output is read without hooks when ``model`` computes it itself, i.e. when it has a ``cam_features(images)``
    method and its ``cam_layer`` attribute names ``target_layer`` (as
    :class:`~xmark_bundle.networks.classifier.ResizedClassifier` does): only the layers up to the target run, with the
    same numbers. Otherwise the full model runs and a forward hook, removed before returning, captures the output.
    """

    def __init__(self, model: nn.Module, target_layer: str) -> None:
        try:
            self.layer = model.get_submodule(target_layer)
        except AttributeError as err:
            raise ValueError(f"EigenCAM target layer {target_layer!r} not found in {type(model).__name__}") from err
        self.model = model
        self.target_layer = target_layer
        #: Whether ``model.cam_features`` computes the target layer's output (no hook needed).
        names_layer = getattr(model, "cam_layer", None) == target_layer
        self.hook_free = names_layer and callable(getattr(model, "cam_features", None))

    def activations(self, images: torch.Tensor, enable_grad: bool = False) -> torch.Tensor:
        """Output of the target layer for ``images`` (B x C x h x w), from one eval-mode forward pass."""
        captured: list[torch.Tensor] = []
        handle = None
        if not self.hook_free:
            handle = self.layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
        modes = [(module, module.training) for module in self.model.modules()]
        try:
            self.model.eval()
            with torch.set_grad_enabled(enable_grad):
                if self.hook_free:
                    captured.append(self.model.cam_features(images))
                else:
                    self.model(images)
        finally:
            if handle is not None:
                handle.remove()
            for module, training in modes:
                module.training = training
        if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
            raise ValueError(
                f"EigenCAM target layer {self.target_layer!r} must produce one tensor per forward pass, "
                f"got {len(captured)} outputs of type {type(captured[0]).__name__ if captured else None}"
            )
        return captured[0]

    def __call__(self, images: torch.Tensor, enable_grad: bool = False) -> torch.Tensor:
        """Saliency maps (B x 1 x H x W in [0, 1]) for ``images`` (B x C_in x H x W)."""
        with torch.set_grad_enabled(enable_grad):
            activations = self.activations(images, enable_grad)
            return eigencam_saliency(activations, (images.shape[-2], images.shape[-1]))
