"""Offline lookup of torchvision ImageNet weights: an explicit file or torchvision's own cache, never a download."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torchvision.models import get_model_weights


def torchvision_cache_path(arch: str) -> Path:
    """Where torchvision would cache the default ImageNet weights of ``arch`` (``$TORCH_HOME/hub/checkpoints/...``)."""
    url = get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def locate_imagenet_weights(arch: str, weights_path: str | os.PathLike | None = None) -> Path | None:
    """Return the local ImageNet weights file for ``arch``, or ``None`` (with a warning) when there is none.

    An explicit ``weights_path`` must exist; otherwise torchvision's cache is consulted. Nothing is downloaded.
    """
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights file for {arch!r} not found: {path}")
        return path
    cached = torchvision_cache_path(arch)
    if cached.is_file():
        return cached
    warnings.warn(
        f"No local ImageNet weights for {arch!r} (looked for {cached}); the network starts untrained. "
        "Nothing is downloaded: pass a weights file to use pretrained weights.",
        stacklevel=2,
    )
    return None


def weights_status(path: Path | None) -> str:
    """The string recorded in metrics files: ``imagenet:<file>`` or ``untrained``."""
    return f"imagenet:{path}" if path is not None else "untrained"
