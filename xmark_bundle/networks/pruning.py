"""Fine-pruning (Liu et al. 2018) of a classifier: remove the penultimate units that clean data leaves dormant, then
fine-tune with them kept removed.

The units are the inputs of the classifier's last linear layer: for a ResNet or DenseNet these are the last
convolutional stage's channels, globally average-pooled (the paper's "last convolutional layer"); for a VGG they are
the last hidden fully connected units. A unit is removed by zeroing its column of the last linear layer, so the
pruned model is a plain checkpoint of the same architecture that every workflow loads; :func:`keep_pruned` masks
those columns' gradients so that fine-tuning (AdamW: zero gradient and decoupled decay keep a zero weight at zero)
cannot bring them back.
"""

from __future__ import annotations

import torch
from torch import nn

from xmark_bundle.networks.classifier import last_linear, penultimate_features

__all__ = ["keep_pruned", "prune_dormant", "pruned_units"]


def pruned_units(model: nn.Module) -> torch.Tensor:
    """Indices of the penultimate units whose column of the last linear layer is all zero (pruned)."""
    return torch.nonzero((last_linear(model).weight == 0).all(dim=0)).flatten()


def prune_dormant(model: nn.Module, images: torch.Tensor, rate: float) -> dict[str, object]:
    """Zero the head's columns of the ``rate`` share of penultimate units with the lowest mean activation on
    ``images`` (clean data); ``model`` is changed in place. Returns the units pruned and every unit's mean."""
    if not 0 <= rate < 1:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    mean = penultimate_features(model, images).mean(dim=0)
    order = torch.argsort(mean, stable=True)
    units = order[: int(round(rate * mean.numel()))]
    with torch.no_grad():
        last_linear(model).weight[:, units] = 0
    return {"rate": rate, "units": sorted(units.tolist()), "n_units": mean.numel(), "mean_activation": mean.tolist()}


def keep_pruned(model: nn.Module) -> nn.Module:
    """``model`` with the gradient of its pruned head columns (:func:`pruned_units`) masked to zero, so that
    fine-tuning keeps them pruned; for configs (configs/finetune_pruned.json)."""
    weight = last_linear(model).weight
    mask = torch.ones_like(weight)
    mask[:, pruned_units(model)] = 0
    weight.register_hook(lambda grad: grad * mask)
    return model
