"""What a release must never publish: hidden files, the owner's checkpoints and manifests, or copies of them.

A data set folder can hold, by accident, a copy of the generator (the owner's secret key), an exported model, an old
private manifest, a private key or credentials, or the scratch of another tool. The release leaves such files out and
lists them with the reason: by name, by hash (a copy of the owner's files) and by content, whatever the file is called
(:func:`~xmark_bundle.data.secret_content.content_reason`: PyTorch archives, manifests, PEM keys, also inside gzip,
zip and tar copies); see docs/README.md, "Threat model".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from xmark_bundle.data.secret_content import content_reason
from xmark_bundle.fileio import sha256_file

__all__ = [
    "CREDENTIAL_NAMES",
    "CREDENTIAL_SUFFIXES",
    "SECRET_NAMES",
    "SECRET_SUFFIXES",
    "owner_file_hashes",
    "secret_reason",
]

#: File endings of model weights and exports (checkpoints, TorchScript, ONNX, TensorRT) and release journals.
SECRET_SUFFIXES = (".pt", ".pth", ".ts", ".ckpt", ".onnx", ".engine", ".safetensors", ".journal")
#: Names of the bundle's private records.
SECRET_NAMES = ("training_info.json", "key_vetting.json", "release_manifest.json")
#: Names of private keys and credential files (SSH keys, cloud and service credentials).
CREDENTIAL_NAMES = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "credentials.json", "client_secret.json", ".netrc")
#: File endings of private keys and certificate stores.
CREDENTIAL_SUFFIXES = (".key", ".pem", ".p12", ".pfx", ".jks", ".keystore", ".ppk")


def secret_reason(relative: str, path: Path, secret_hashes: Mapping[int, Iterable[str]] | None = None) -> str | None:
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
    if name in CREDENTIAL_NAMES or name.endswith(CREDENTIAL_SUFFIXES):
        return "named like a private key or credentials"
    size = path.stat().st_size
    if secret_hashes and size in secret_hashes and sha256_file(path) in set(secret_hashes[size]):
        return "byte-identical copy of the owner's checkpoint or manifest"
    return content_reason(path)


def owner_file_hashes(paths: Iterable[str | os.PathLike]) -> dict[int, list[str]]:
    """Sizes and SHA-256 of the owner's existing files (``secret_hashes`` of :func:`secret_reason`)."""
    hashes: dict[int, list[str]] = {}
    for path in paths:
        if os.path.isfile(path):
            hashes.setdefault(os.path.getsize(path), []).append(sha256_file(path))
    return hashes
