"""torchvision classifiers adapted to one-channel radiographs and multi-label CheXpert outputs.

These are the paper's surrogate and suspect models (ResNet18/34, VGG16-BN/19-BN). Unlike MONAI's ``resnet18`` they keep
torchvision's stride-2 stem, so FLOPs match the paper. ImageNet weights come only from a local file (see
:mod:`xmark_bundle.networks.pretrained`); the three colour filters of the first convolution are summed into one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from torchvision.models import VGG, DenseNet, ResNet, get_model

from xmark_bundle.networks.pretrained import locate_imagenet_weights, weights_status
from xmark_bundle.transforms.geometry import resize_square

logger = logging.getLogger(__name__)

#: Layer whose activations EigenCAM reads for each supported architecture.
CAM_LAYERS: dict[str, str] = {
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "vgg16_bn": "features",
    "vgg19_bn": "features",
    "densenet121": "features",
}


def _first_conv_name(model: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def build_classifier(
    arch: str = "resnet18",
    num_classes: int = 6,
    in_channels: int = 1,
    pretrained: bool = False,
    weights_path: str | os.PathLike | None = None,
) -> nn.Module:
    """Build a torchvision ``arch`` with ``in_channels`` inputs and ``num_classes`` logits.

    With ``pretrained`` (or an explicit ``weights_path``) the ImageNet weights are loaded from disk when present;
    ``weights_path`` may also be a classifier checkpoint of this bundle (as configs/train_classifier.json writes it,
    or wrapped as ``{"model": ...}``), whose every layer, head included, is kept (a pre-trained start, or a
    fine-tuning of a trained model). ``model.weights_status`` records ``imagenet:<file>``, ``checkpoint:<file>`` or
    ``untrained`` for the metrics files.
    """
    if arch not in CAM_LAYERS:
        raise ValueError(f"Unsupported classifier architecture {arch!r}; choose one of {sorted(CAM_LAYERS)}.")
    model = get_model(arch, weights=None, num_classes=num_classes)
    conv_name = _first_conv_name(model)
    conv: nn.Conv2d = model.get_submodule(conv_name)
    if in_channels != conv.in_channels:
        model.set_submodule(
            conv_name,
            nn.Conv2d(
                in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                bias=conv.bias is not None,
            ),
        )
    path = locate_imagenet_weights(arch, weights_path) if (pretrained or weights_path) else None
    whole = False
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        whole = _load_imagenet(model, state.get("model", state), conv_name, path)
    model.weights_status = f"checkpoint:{path}" if whole else weights_status(path)
    model.architecture = {"arch": arch, "num_classes": int(num_classes), "in_channels": int(in_channels)}
    logger.info("classifier %s: %s", arch, model.weights_status)
    return model


def _load_imagenet(model: nn.Module, state: dict[str, torch.Tensor], conv_name: str, path: os.PathLike) -> bool:
    """Copy ImageNet weights into ``model``: adapt the stem to the input channels, skip the (resized) head. True when
    every weight, head included, came from the file (a classifier of this shape: a checkpoint, not ImageNet's)."""
    own = model.state_dict()
    stem_key = f"{conv_name}.weight"
    if stem_key in state and state[stem_key].shape[1] != own[stem_key].shape[1]:
        rgb = state[stem_key]
        state[stem_key] = rgb.sum(dim=1, keepdim=True).repeat(1, own[stem_key].shape[1], 1, 1) / own[stem_key].shape[1]
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = sorted(set(own) - set(kept))
    head = [k for k in missing if not k.endswith(("num_batches_tracked",))]
    if len(head) > 2:  # only the final Linear's weight and bias may differ
        raise ValueError(f"{path}: not weights for this architecture (missing {head[:5]} ...)")
    model.load_state_dict(kept, strict=False)
    return not head


def last_linear(model: nn.Module) -> nn.Linear:
    """``model``'s last linear layer (its classification head)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no linear layer")
    return linear[-1]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s last linear layer (its classification head), for fine-tuning the head only."""
    return list(last_linear(model).parameters())


def penultimate_features(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The input of ``model``'s last linear layer for ``images`` (N x units), in eval mode without gradients."""
    captured: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                model(batch)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured).flatten(1)


#: Which epoch a classifier training keeps as model.pt: the best on the validation split, or the last one.
KEPT_CHECKPOINTS = ("best", "last")


def keeps(kept_checkpoint: str, which: str) -> bool:
    """Whether ``kept_checkpoint`` (train_classifier.json's setting) is ``which``; a clear error for any other value,
    since then no checkpoint would be saved at all."""
    if kept_checkpoint not in KEPT_CHECKPOINTS:
        raise ValueError(f"kept_checkpoint must be one of {KEPT_CHECKPOINTS}, got {kept_checkpoint!r}")
    return kept_checkpoint == which


def load_classifier(
    checkpoint: str | os.PathLike, arch: str = "resnet18", num_classes: int = 6, in_channels: int = 1
) -> nn.Module:
    """A classifier built by :func:`build_classifier` with weights from a bundle checkpoint (CheckpointSaver output)."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(
            f"classifier checkpoint not found: {checkpoint} (train it with configs/train_classifier.json)"
        )
    model = build_classifier(arch, num_classes=num_classes, in_channels=in_channels)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: not a {arch} checkpoint with {num_classes} outputs ({err})") from err
    model.weights_status = f"checkpoint:{checkpoint}"
    return model


class ResizedClassifier(nn.Module):
    """Applies ``classifier`` at its own resolution: the square input is resized (bilinear, antialiased) to ``size``.

    Generators work at 256-1024 px while the surrogate was trained at 224 px; the resize is differentiable, so the
    watermark is optimised through the same downsampling a suspect model's pipeline applies.

    :meth:`cam_features` gives the activations EigenCAM reads (the :data:`CAM_LAYERS` layer: ``layer4`` of a ResNet,
    ``features`` of a VGG or DenseNet) without hooks, so that a pipeline using them can be scripted; ``cam_layer``
    names that layer relative to this module (``"classifier.layer4"``), or is ``""`` for a classifier of another kind.
    """

    def __init__(self, classifier: nn.Module, size: int = 224) -> None:
        super().__init__()
        self.classifier = classifier
        self.size = size
        self.cam_layer = _cam_layer_of(classifier)
        # torchvision's DenseNet applies ReLU in place to its `features` output: a hook's tensor ends up rectified.
        self.cam_relu = isinstance(classifier, DenseNet)

    def config(self) -> dict[str, Any]:
        """The MONAI-config dict that rebuilds this module (untrained: the weights come from a checkpoint)."""
        architecture = getattr(self.classifier, "architecture", None)
        if architecture is None:
            raise ValueError(f"cannot describe a {type(self.classifier).__name__} not made by build_classifier")
        return {
            "_target_": f"{__name__}.ResizedClassifier",
            "classifier": {"_target_": f"{__name__}.build_classifier", **architecture},
            "size": int(self.size),
        }

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(resize_square(image, self.size))

    @torch.jit.export
    def cam_features(self, image: torch.Tensor) -> torch.Tensor:
        """Output of the ``cam_layer`` for ``image`` (B x C x h x w): the classifier's forward up to that layer.

        The same modules in the same order as :meth:`forward`, so the numbers equal what a forward hook on that
        layer holds after the forward pass (for a DenseNet, whose forward rectifies ``features`` in place, the
        rectified map); the layers after it do not run. TorchScript-compatible (the architecture is told apart by
        its attributes).
        """
        x = resize_square(image, self.size)
        net = self.classifier
        if hasattr(net, "layer4"):  # torchvision ResNet: stem, then four stages
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            return net.layer4(net.layer3(net.layer2(net.layer1(x))))
        if hasattr(net, "features"):  # torchvision VGG and DenseNet: the convolutional trunk
            x = net.features(x)
            return torch.relu(x) if self.cam_relu else x
        raise ValueError("cam_features needs a torchvision ResNet, VGG or DenseNet classifier")


def _cam_layer_of(classifier: nn.Module) -> str:
    """The layer :meth:`ResizedClassifier.cam_features` computes, relative to the ``ResizedClassifier`` ("" if none)."""
    if isinstance(classifier, ResNet):
        return "classifier.layer4"
    if isinstance(classifier, (VGG, DenseNet)):
        return "classifier.features"
    return ""
