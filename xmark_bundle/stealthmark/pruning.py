"""Pruning of a trained segmenter, a removal attack a model thief may apply: global L1-magnitude unstructured pruning.

Every convolution (transposed ones included) and linear layer's weight takes part in one global ranking by absolute
value (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``); the ``rate`` share of them with the
smallest magnitude is set to zero and the pruning is made permanent (``prune.remove``), so the result is a plain
state dict of the same network: a StealthMark checkpoint folder (``model.pt`` + ``segmentation_info.json``) that
``verify.json``, ``evaluate.json`` and ``inference.json`` load like a trained one. Biases and normalisation
parameters are not pruned. One ranking works for every network of :mod:`xmark_bundle.stealthmark.networks`
(BasicUNet, UNet, SegResNet, AttentionUnet, SwinUNETR, UNETR): their weights are in exactly these layer types.

Bundle entry point (``stealthmark/configs/prune.json``, run id ``pruning``)::

    python -m monai.bundle run pruning --config_file stealthmark/configs/prune.json \\
        --source stealthmark/models --rate 0.3 --output_dir outputs/pruned30
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from xmark_bundle.fileio import atomic_path, write_json
from xmark_bundle.stealthmark.networks import build_segmentation_network
from xmark_bundle.verification.seg_blackbox import SEGMENTATION_INFO

__all__ = ["PRUNABLE", "PRUNING_REPORT", "prunable_weights", "prune_global_l1", "run_pruning", "zero_share"]

#: The layer types whose ``weight`` is pruned.
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
#: What :func:`run_pruning` writes last beside the pruned ``model.pt`` (its presence means the pruning is done).
PRUNING_REPORT = "pruning.json"


def prunable_weights(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every convolution and linear layer with a weight, in the network's order."""
    return [
        (name, module)
        for name, module in network.named_modules()
        if isinstance(module, PRUNABLE) and getattr(module, "weight", None) is not None
    ]


def zero_share(network: nn.Module) -> float:
    """The share of the prunable weights (:func:`prunable_weights`) that are exactly zero."""
    weights = [module.weight for _, module in prunable_weights(network)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def prune_global_l1(network: nn.Module, rate: float) -> dict[str, Any]:
    """Zero the ``rate`` share of all prunable weights with the smallest absolute value (one global ranking), made
    permanent; ``network`` is changed in place. Returns the rate, the counts and each layer's share of zeros."""
    rate = float(rate)
    if not 0 <= rate < 1:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    layers = prunable_weights(network)
    if not layers:
        raise ValueError(f"{type(network).__name__} has no convolution or linear weight to prune")
    parameters = [(module, "weight") for _, module in layers]
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=rate)
    for module, name in parameters:
        prune.remove(module, name)  # weight = weight_orig * mask, kept as a plain parameter
    n_weights = sum(module.weight.numel() for _, module in layers)
    n_zero = sum(int((module.weight == 0).sum()) for _, module in layers)
    return {
        "method": "global L1-magnitude unstructured (torch.nn.utils.prune.global_unstructured, L1Unstructured)",
        "rate": rate,
        "n_weights": n_weights,
        "n_zero": n_zero,
        "zero_share": n_zero / n_weights,
        "layers": {name: float((module.weight == 0).float().mean()) for name, module in layers},
    }


def run_pruning(source: str | os.PathLike, rate: float, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Prune the StealthMark checkpoint folder ``source`` (its ``model.pt`` and ``segmentation_info.json``; only
    read) at ``rate`` into ``output_dir``: ``model.pt``, ``segmentation_info.json`` and, last, ``pruning.json``.
    The owner's record is not copied: a pruned model is a suspect's."""
    source, out = Path(source), Path(output_dir)
    if source.is_file():
        source = source.parent
    if out.resolve() == source.resolve():
        raise ValueError(f"output_dir {out} holds the source checkpoint; write the pruned model elsewhere")
    info = json.loads((source / SEGMENTATION_INFO).read_text())
    network = build_segmentation_network(info["arch"], int(info["image_size"]), info.get("width"))
    state = torch.load(source / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("network", state.get("model", state)))
    report = {"source": str(source), **prune_global_l1(network, rate)}
    write_json(out / SEGMENTATION_INFO, info)
    with atomic_path(out / "model.pt") as tmp:  # a plain state dict, as training's CheckpointSaver writes it
        torch.save(network.state_dict(), tmp)
    write_json(out / PRUNING_REPORT, report, indent=4)
    print(f"pruned {report['n_zero']} of {report['n_weights']} weights ({report['zero_share']:.4f}) of {source}: {out}")
    return report
