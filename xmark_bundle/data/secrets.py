"""What a release must never publish: hidden files, the owner's checkpoints and manifests, or copies of them.

A data set folder can hold, by accident, a copy of the generator (the owner's secret key), an exported model, an old
private manifest or the scratch of another tool. The release leaves such files out and lists them with the reason;
see docs/README.md, "Threat model".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from xmark_bundle.fileio import sha256_file

__all__ = ["SECRET_NAMES", "SECRET_SUFFIXES", "owner_file_hashes", "secret_reason"]

#: File endings of model weights and exports (checkpoints, TorchScript, ONNX, TensorRT) and release journals.
SECRET_SUFFIXES = (".pt", ".pth", ".ts", ".ckpt", ".onnx", ".engine", ".safetensors", ".journal")
#: Names of the bundle's private records.
SECRET_NAMES = ("training_info.json", "key_vetting.json", "release_manifest.json")
#: Largest JSON file that is read to see whether it is a private manifest.
_MAX_JSON_BYTES = 16 << 20


def _looks_like_manifest(path: Path) -> bool:
    """Whether ``path`` is a JSON release manifest or key-vetting report (whatever its name)."""
    if path.suffix.lower() != ".json" or path.stat().st_size > _MAX_JSON_BYTES:
        return False
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and (
        {"generator_checkpoint", "marked"} <= content.keys() or {"key_seed", "candidates"} <= content.keys()
    )


def secret_reason(
    relative: str, path: Path, secret_hashes: Mapping[int, Iterable[str]] | None = None
) -> str | None:
    """Why the file ``path`` (``relative`` to the data set) must stay out of a release, or ``None`` when it may go.

    ``secret_hashes`` maps file sizes to the SHA-256 of the owner's files of that size (generator checkpoint,
    manifest): a byte-identical copy under any name is left out. Only files of a listed size are hashed.
    """
    parts = Path(relative).parts
    if any(part.startswith(".") for part in parts):
        return "hidden file or folder"
    name = parts[-1].lower()
    if name.endswith(SECRET_SUFFIXES):
        return "model weights, export or journal"
    if name in SECRET_NAMES or ("manifest" in name and name.endswith(".json")):
        return "named like a private record of the owner"
    size = path.stat().st_size
    if secret_hashes and size in secret_hashes and sha256_file(path) in set(secret_hashes[size]):
        return "byte-identical copy of the owner's checkpoint or manifest"
    if _looks_like_manifest(path):
        return "a private release manifest or key-vetting report"
    return None


def owner_file_hashes(paths: Iterable[str | os.PathLike]) -> dict[int, list[str]]:
    """Sizes and SHA-256 of the owner's existing files (``secret_hashes`` of :func:`secret_reason`)."""
    hashes: dict[int, list[str]] = {}
    for path in paths:
        if os.path.isfile(path):
            hashes.setdefault(os.path.getsize(path), []).append(sha256_file(path))
    return hashes
