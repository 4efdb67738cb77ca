"""The watermark checkpoint: the weights of a watermarking module and the record that rebuilds it.

configs/train.json saves ``{"model": <state dict>, "watermark": <record>}`` through MONAI's ``CheckpointSaver``. The
record names the method, the module as a MONAI-style config (``_target_`` and constructor arguments: generator,
budget, key, surrogate architecture and input size, EigenCAM layer, resolution), the target label and the label order,
so :func:`load_watermark` rebuilds the module from the file alone. It is the ``network_def`` of every config that uses
a trained watermark (inference, watermark, verify, evaluate, ``ckpt_export``); no config repeats the architecture.

A checkpoint is data, never code: the record is not parsed by MONAI's ``ConfigParser`` but built by
:func:`~xmark_bundle.networks.record_builder.build_from_record` (the bundle's own classes by exact name, plain
arguments, nothing evaluated or imported). The record carries ``sha256``, a hash over its settings and the weights
(:func:`record_digest`), checked on every read: a changed setting or a flipped byte in the weights fails with the file's
name. Records of format 1 (written before the hash) are still read through the same safe builder, with a warning that
nothing checks their integrity; :func:`resave_watermark` adds the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from xmark_bundle.data.labels import LABELS
from xmark_bundle.errors import require_checkpoint
from xmark_bundle.fileio import atomic_path
from xmark_bundle.networks.record_builder import build_from_record

__all__ = [
    "RECORD_KEY",
    "WEIGHTS_KEY",
    "WatermarkRecord",
    "load_watermark",
    "read_watermark_checkpoint",
    "record_digest",
    "refuse_to_replace",
    "resave_watermark",
    "save_watermark",
    "strip_surrogate",
    "surrogate_digest",
    "watermark_record",
]

#: Checkpoint entries: the module's state dict and its record.
WEIGHTS_KEY, RECORD_KEY = "model", "watermark"
#: Version of the record's layout (2: with the ``sha256`` of settings and weights); 1 is read with a warning.
RECORD_FORMAT = 2
#: The record's entry holding :func:`record_digest`.
DIGEST_KEY = "sha256"
#: The record's entry of a checkpoint saved without its frozen surrogate (a family member that shares its owner's):
#: :func:`surrogate_digest` of the weights left out, which the loader must be given.
SURROGATE_DIGEST_KEY = "surrogate_sha256"
_SURROGATE_PREFIX = "surrogate."
#: Entries every record has, whatever its format.
_REQUIRED = ("format", "method", "network", "image_size", "epsilon", "target_label", "labels")


def record_digest(settings: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a record's settings (canonical JSON, without the digest) and every weight's name, type and bytes."""
    digest = hashlib.sha256()
    plain = {key: value for key, value in settings.items() if key != DIGEST_KEY}
    digest.update(json.dumps(plain, sort_keys=True, ensure_ascii=True).encode("ascii"))
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\n{name}|{weights[name].dtype}|{list(weights[name].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _split_surrogate(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A pipeline's state dict as its frozen surrogate's entries and the rest."""
    surrogate = {name: value for name, value in weights.items() if name.startswith(_SURROGATE_PREFIX)}
    return surrogate, {name: value for name, value in weights.items() if name not in surrogate}


def surrogate_digest(weights: Mapping[str, torch.Tensor]) -> str | None:
    """:func:`record_digest` of the frozen surrogate's entries of a pipeline's state dict; None when it has none."""
    surrogate = _split_surrogate(weights)[0]
    return record_digest({}, surrogate) if surrogate else None


class WatermarkRecord:
    """The ``watermark`` entry of a generator checkpoint, saved beside the weights by ``CheckpointSaver``.

    ``network`` is the watermarking module (it must offer ``config()``, ``method``, ``eps`` and ``image_size``, as
    :class:`~xmark_bundle.networks.pipeline.WatermarkPipeline` does). ``load_state_dict`` (used when a run resumes from
    a checkpoint) refuses a record of another module instead of loading mismatched weights.
    """

    def __init__(self, network: nn.Module, target_label: str, labels: Sequence[str]) -> None:
        if target_label not in labels:
            raise ValueError(f"target_label {target_label!r} is not one of the labels {list(labels)}")
        self.network = network
        self.target_label = target_label
        self.labels = [str(label) for label in labels]

    def state_dict(self) -> dict[str, Any]:
        """The record: plain JSON-like values (``torch.load(weights_only=True)`` reads it) and their hash with the
        network's current weights, which ``CheckpointSaver`` saves beside it."""
        record = {
            "format": RECORD_FORMAT,
            "method": self.network.method,
            "network": self.network.config(),
            "image_size": int(self.network.image_size),
            "epsilon": float(self.network.eps),
            "target_label": self.target_label,
            "labels": list(self.labels),
        }
        return record | {DIGEST_KEY: record_digest(record, self.network.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accept a stored record only when it describes this module."""
        if state.get("network") != self.network.config():
            raise ValueError("the checkpoint's watermark record describes another network than this run builds")


def _digest_of(record: Mapping[str, Any], weights: Mapping[str, torch.Tensor], path: str) -> str:
    """:func:`record_digest`, or a clear error naming ``path`` when the record holds values JSON cannot write."""
    try:
        return record_digest(record, weights)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the watermark record holds values that are not plain data ({err})") from err


def read_watermark_checkpoint(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The record and the state dict of a generator checkpoint; a clear error when the file is not one."""
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder; give the generator checkpoint file (model.pt)")
    require_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError ... for a file that is not one
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    record = state.get(RECORD_KEY) if isinstance(state, dict) else None
    if not isinstance(record, dict) or not isinstance(state.get(WEIGHTS_KEY), dict):
        raise ValueError(
            f"{path}: not a watermark checkpoint (no '{RECORD_KEY}' record beside the '{WEIGHTS_KEY}' weights); "
            "generators are trained by configs/train.json, which writes both"
        )
    missing = [key for key in _REQUIRED if key not in record]
    if missing or record["format"] not in (1, RECORD_FORMAT):
        raise ValueError(f"{path}: unsupported watermark record (format {record.get('format')}, missing {missing})")
    weights = state[WEIGHTS_KEY]
    odd = [name for name, value in weights.items() if not isinstance(value, torch.Tensor)][:5]
    if odd:
        raise ValueError(f"{path}: the '{WEIGHTS_KEY}' entry holds values that are not tensors: {odd}")
    if record["format"] == 1:
        warnings.warn(
            f"{path}: a watermark checkpoint of format 1 carries no hash, so nothing checks that its weights and "
            "settings are the ones trained; re-save it with xmark_bundle.networks.checkpoint.resave_watermark",
            stacklevel=2,
        )
    elif record.get(DIGEST_KEY) != _digest_of(record, weights, path):
        raise ValueError(
            f"{path}: the watermark record's {DIGEST_KEY} does not match its settings and weights: the file was "
            "changed or damaged after it was saved; use the owner's original checkpoint"
        )
    return record, weights


def load_watermark(
    checkpoint: str | os.PathLike,
    device: str | torch.device | None = None,
    surrogate: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The watermarking module of ``checkpoint``, rebuilt from its record with its weights, in eval mode.

    The record travels with the module as ``watermark_record`` (a config reads the target label from it instead of
    loading the file a second time). A checkpoint saved without its surrogate (:func:`strip_surrogate`) needs
    ``surrogate``: the ``surrogate.*`` entries of a state dict whose :func:`surrogate_digest` its record holds.
    """
    record, weights = read_watermark_checkpoint(checkpoint)
    path = os.fspath(checkpoint)
    if SURROGATE_DIGEST_KEY in record:
        if surrogate is None:
            raise ValueError(
                f"{path}: a family member saved without its frozen surrogate (its family's owner holds the same one); "
                "load it through its family (xmark_bundle.verification.family)"
            )
        given = _split_surrogate(surrogate)[0]
        if surrogate_digest(given) != record[SURROGATE_DIGEST_KEY]:
            raise ValueError(f"{path}: the surrogate given is not the one this family member was trained against")
        weights = {**weights, **given}
    network = build_from_record(record["network"], checkpoint)
    try:
        network.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the recorded network ({err})") from err
    network.watermark_record = record
    return (network if device is None else network.to(device)).eval()


def watermark_record(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The record of ``checkpoint`` (method, network config, ``image_size``, ``epsilon``, ``target_label``, labels)."""
    return read_watermark_checkpoint(checkpoint)[0]


def save_watermark(
    network: nn.Module,
    path: str | os.PathLike,
    target_label: str = "No Finding",
    labels: Sequence[str] = LABELS,
) -> None:
    """Write ``network``'s checkpoint (weights and record) atomically, as configs/train.json's CheckpointSaver does."""
    record = WatermarkRecord(network, target_label, labels)
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:  # a stream: no temporary name inside the archive
        torch.save({WEIGHTS_KEY: network.state_dict(), RECORD_KEY: record.state_dict()}, stream)


def resave_watermark(checkpoint: str | os.PathLike) -> None:
    """Rewrite a format-1 checkpoint (no hash) in the current format, atomically, after rebuilding it safely."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = load_watermark(checkpoint)
    record = network.watermark_record
    save_watermark(network, checkpoint, target_label=record["target_label"], labels=record["labels"])


def strip_surrogate(checkpoint: str | os.PathLike) -> str | None:
    """Rewrite ``checkpoint`` without its frozen surrogate's weights (43 of a member's 51 MB), atomically.

    For the other members of a generator family: every one was trained against the owner's surrogate, so the family
    loads them with the owner's (:func:`load_watermark` with ``surrogate``, checked against the digest kept in the
    record). Returns that digest; None when the checkpoint has no surrogate (a trigger). A stripped checkpoint is
    left as it is.
    """
    record, weights = read_watermark_checkpoint(checkpoint)
    if SURROGATE_DIGEST_KEY in record:
        return str(record[SURROGATE_DIGEST_KEY])
    if record["format"] != RECORD_FORMAT:
        raise ValueError(f"{os.fspath(checkpoint)}: re-save it first (resave_watermark): format 1 carries no hash")
    surrogate, kept = _split_surrogate(weights)
    if not surrogate:
        return None
    digest = record_digest({}, surrogate)
    settings = {key: value for key, value in record.items() if key != DIGEST_KEY} | {SURROGATE_DIGEST_KEY: digest}
    with atomic_path(checkpoint) as tmp, open(tmp, "wb") as stream:
        torch.save({WEIGHTS_KEY: kept, RECORD_KEY: settings | {DIGEST_KEY: record_digest(settings, kept)}}, stream)
    return digest


def refuse_to_replace(checkpoint: str | os.PathLike) -> None:
    """Stop a training run before it would overwrite an existing generator checkpoint.

    The generator that marked a release is what proves the release's use later (its weights, and for a keyed method
    its key): a fresh training run must not replace it, whatever started the run (a rerun, MONAI Label's train task
    pointed at the bundle's ``models/``). The error names the file, what it holds, and the way out.
    """
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
        return
    try:
        record = watermark_record(path)
        held = f"the trained {record['method']} watermark for '{record['target_label']}'"
        generator = record["network"].get("generator", {})
        held += f" (key seed {generator.get('key_seed')})" if generator.get("key_cells") else ""
    except (OSError, ValueError):
        held = "a file that is not a watermark checkpoint"
    raise FileExistsError(
        f"{path} already holds {held}; training would overwrite it, and the generator that marked a release is what "
        "verifies it. Train into another ckpt_dir, or move the file away first."
    )
