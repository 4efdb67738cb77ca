"""Black-box access to a suspect *segmentation* model, on top of :mod:`.blackbox` (same files, bundles and HTTP).

A segmentation suspect answers a B x 1 x H x W batch with one foreground probability per pixel. Locally (TorchScript
file, MONAI bundle folder, or a StealthMark checkpoint: ``model.pt`` with ``segmentation_info.json`` beside it) the
network's B x 1 x H x W logits are flattened to the B x (H * W) rows that :class:`~.blackbox.SuspectModel` checks.
Over HTTP the wire format of :mod:`.blackbox` is used unchanged: ``"probabilities"`` holds B rows of H * W values in
C (row-major) order and ``"labels"`` names the one segmented class (e.g. ``["lung"]``). A suspect that answers only
labels (every value 0 or 1) cannot be verified by the floor test; :class:`LabelOnlyError` says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xmark_bundle.fileio import sha256_file
from xmark_bundle.verification.blackbox import (
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_REQUEST_DEADLINE_S,
    HTTPSuspect,
    SuspectModel,
    SuspectModelError,
    TorchSuspect,
    open_suspect,
)

__all__ = ["SEGMENTATION_INFO", "LabelOnlyError", "SegmentationSuspect", "open_segmentation_suspect"]

#: The public description of a StealthMark checkpoint (architecture, input size, width), beside its ``model.pt``.
SEGMENTATION_INFO = "segmentation_info.json"


class LabelOnlyError(SuspectModelError):
    """A suspect whose answers are hard labels (0/1 only): the probability floor cannot be read from it."""


class _FlatMaps(nn.Module):
    """Wraps a segmentation network so that it answers B x (H * W) logits, as the black-box adapters expect."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.network(images)
        if isinstance(out, (list, tuple)):  # deep-supervision networks: the first output is the full-size map
            out = out[0]
        return out.flatten(1)


class _SegmentationHTTPSuspect(HTTPSuspect):
    """An HTTP suspect whose ``labels`` name one segmented class rather than one score per column."""

    def _query(self, images: torch.Tensor) -> np.ndarray:
        probs = super()._query(images)
        if self.labels is not None and len(self.labels) != 1:
            raise SuspectModelError(
                f"segmentation endpoint {self.url} names {len(self.labels)} labels; expected one segmented class"
            )
        self.segmented_class = self.labels[0] if self.labels else None
        self.labels = None  # the row holds pixels, not labels
        return probs


class SegmentationSuspect:
    """A black-box segmentation model: B x 1 x H x W probability maps for B x 1 x H x W images in [0, 1]."""

    def __init__(self, suspect: SuspectModel) -> None:
        self.suspect = suspect

    @property
    def location(self) -> str:
        """Where the model is (path or URL)."""
        return self.suspect.location

    def probability_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities (float64, B x 1 x H x W) for ``images``; checked for shape and range."""
        flat = self.suspect.predict_proba(images)
        batch, _, height, width = images.shape
        if flat.shape[1] != height * width:
            raise SuspectModelError(
                f"segmentation suspect {self.location} answered {flat.shape[1]} values per image for "
                f"{height} x {width} inputs; expected one probability per pixel ({height * width})"
            )
        return torch.from_numpy(flat.reshape(batch, 1, height, width))

    def describe(self) -> dict[str, Any]:
        """The underlying adapter's description (kind, location, SHA-256 of the model file)."""
        return self.suspect.describe()


def label_only(maps: torch.Tensor) -> bool:
    """Whether every value of ``maps`` is 0 or 1: a model that answers hard masks, not probabilities."""
    return bool(((maps == 0) | (maps == 1)).all())


def _open_checkpoint(checkpoint: Path, outputs: str, device: str | torch.device) -> TorchSuspect:
    """A StealthMark checkpoint: ``segmentation_info.json`` beside it names the network."""
    from xmark_bundle.stealthmark.networks import build_segmentation_network  # a light import, kept local

    info_file = checkpoint.parent / SEGMENTATION_INFO
    try:
        info = json.loads(info_file.read_text())
        network = build_segmentation_network(info["arch"], int(info["image_size"]), info.get("width"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SuspectModelError(
            f"{info_file}: cannot read the network description ({type(err).__name__}: {err})"
        ) from err
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        network.load_state_dict(state.get("network", state.get("model", state)))
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise SuspectModelError(f"{checkpoint}: weights do not load into {info['arch']} ({err})") from err
    suspect = TorchSuspect(
        _FlatMaps(network), str(checkpoint), "segmentation-checkpoint", sha256_file(checkpoint), outputs, device
    )
    suspect.input_size = int(info["image_size"])
    return suspect


def open_segmentation_suspect(
    spec: str | os.PathLike,
    outputs: str = "logits",
    device: str | torch.device = "cpu",
    config_file: str | os.PathLike | None = None,
    timeout: float = 30.0,
    retries: int = 1,
    request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S,
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
) -> SegmentationSuspect:
    """The black-box segmentation adapter for ``spec``: a URL, a TorchScript file, a MONAI bundle folder, or a
    StealthMark checkpoint (``model.pt`` file or its folder, with ``segmentation_info.json``)."""
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        http = _SegmentationHTTPSuspect(text, timeout, retries, request_deadline_s, max_reply_bytes)
        return SegmentationSuspect(http)
    path = Path(text)
    if path.is_dir() and (path / SEGMENTATION_INFO).is_file():
        return SegmentationSuspect(_open_checkpoint(path / "model.pt", outputs, device))
    if path.is_file() and (path.parent / SEGMENTATION_INFO).is_file() and path.suffix != ".ts":
        return SegmentationSuspect(_open_checkpoint(path, outputs, device))
    suspect = open_suspect(text, outputs, device, config_file)
    if isinstance(suspect, TorchSuspect):
        suspect.module = _FlatMaps(suspect.module).eval()
    return SegmentationSuspect(suspect)
