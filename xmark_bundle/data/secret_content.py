"""Recognise the owner's secrets by their content, whatever a file is called.

A checkpoint saved as ``notes.txt`` or ``backup.dat``, a manifest saved as ``.txt``, their gzip, zip or tar copies and
private keys all read as what they are: :func:`content_reason` looks at a file's first bytes (a few hundred for most
files, so an image costs one small read), opens zip, gzip and tar containers (nested up to :data:`MAX_DEPTH`) and
finds PyTorch archives (``data.pkl`` beside ``version``; the record key ``watermark`` names the owner's generator,
found with ``pickletools`` without unpickling anything), release manifests and key-vetting reports (JSON with their
keys) and PEM private keys.
"""

from __future__ import annotations

import gzip
import json
import pickletools
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO

__all__ = ["MAX_DEPTH", "content_reason", "is_private_record"]

#: Containers opened inside containers (a zip of a gzip of a checkpoint: 2).
MAX_DEPTH = 3
#: Bytes read from the start of every file to tell its kind.
_HEAD_BYTES = 512
#: Largest JSON document or pickle that is read whole to see what it holds.
_MAX_READ_BYTES = 16 << 20
#: Largest file searched for a PEM private key (keys are a few KB).
_MAX_KEY_BYTES = 64 << 10
#: Members of one archive looked at, at most.
_MAX_MEMBERS = 10_000
#: What a broken or foreign container raises while it is looked at: it is then simply not a secret of ours.
_UNREADABLE = (OSError, EOFError, ValueError, zipfile.BadZipFile, tarfile.TarError, zlib.error, IndexError, KeyError)


def is_private_record(content: object) -> bool:
    """Whether parsed JSON ``content`` is a release manifest or a key-vetting report."""
    return isinstance(content, dict) and (
        {"generator_checkpoint", "marked"} <= content.keys() or {"key_seed", "candidates"} <= content.keys()
    )


def _pickle_strings(data: bytes) -> set[str]:
    """The strings a pickle pushes, read op by op (nothing is unpickled or imported)."""
    found = set()
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if "UNICODE" in opcode.name and isinstance(argument, str):
                found.add(argument)
    except _UNREADABLE:
        pass
    return found


def _torch_reason(archive: zipfile.ZipFile) -> str | None:
    """Why a zip that is a PyTorch archive stays out, or None for any other zip."""
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles or not any(n.endswith("version") for n in names):
        return None
    info = archive.getinfo(pickles[0])
    if info.file_size <= _MAX_READ_BYTES and {"watermark", "model"} <= _pickle_strings(archive.read(info)):
        return "the owner's watermark checkpoint (found by its content)"
    return "PyTorch model weights (found by their content)"


def _zip_reason(stream: IO[bytes], depth: int) -> str | None:
    """A PyTorch archive, or the first secret among a zip's members."""
    with zipfile.ZipFile(stream) as archive:
        reason = _torch_reason(archive)
        if reason is not None or depth >= MAX_DEPTH:
            return reason
        for info in archive.infolist()[:_MAX_MEMBERS]:
            if not info.is_dir():
                with archive.open(info) as member:
                    inner = _stream_reason(member, info.file_size, depth + 1)
                if inner is not None:
                    return f"zip archive holding {info.filename}: {inner}"
    return None


def _tar_reason(stream: IO[bytes], depth: int) -> str | None:
    """The first secret among a tar archive's members."""
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        for count, member in enumerate(archive):
            if count >= _MAX_MEMBERS:
                break
            extracted = archive.extractfile(member) if member.isfile() else None
            if extracted is not None:
                inner = _stream_reason(extracted, member.size, depth + 1)
                if inner is not None:
                    return f"tar archive holding {member.name}: {inner}"
    return None


def _stream_reason(stream: IO[bytes], size: int | None, depth: int) -> str | None:
    """Why the content of ``stream`` (``size`` bytes, None: unknown) is a secret, or None."""
    try:
        head = stream.read(_HEAD_BYTES)
        stream.seek(0)
        if head.startswith(b"PK\x03\x04"):
            return _zip_reason(stream, depth)
        if depth >= MAX_DEPTH:
            return None
        if head.startswith(b"\x1f\x8b"):
            with gzip.GzipFile(fileobj=stream, mode="rb") as inner:
                reason = _stream_reason(inner, None, depth + 1)
            return None if reason is None else f"gzip copy of {reason}"
        if len(head) >= 262 and head[257:262] == b"ustar":
            return _tar_reason(stream, depth)
        if (size is None or size <= _MAX_KEY_BYTES) and b"PRIVATE KEY-----" in stream.read(_MAX_KEY_BYTES):
            return "a private key"
        stream.seek(0)
        if head.lstrip()[:1] == b"{" and (size is None or size <= _MAX_READ_BYTES):
            text = stream.read(_MAX_READ_BYTES + 1)
            if len(text) <= _MAX_READ_BYTES and is_private_record(json.loads(text.decode("utf-8"))):
                return "a private release manifest or key-vetting report (found by its content)"
    except (*_UNREADABLE, UnicodeDecodeError):
        return None
    return None


def content_reason(path: str | Path) -> str | None:
    """Why the file at ``path`` must stay out of a release judging by its content, or None when nothing was found."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            return _stream_reason(stream, path.stat().st_size, 0)
    except OSError:
        return None
