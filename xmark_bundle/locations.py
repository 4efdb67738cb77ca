"""Whether one path lies inside a folder, by name and by identity (device and inode), so bind mounts cannot hide it.

``Path.resolve`` sees through symbolic links but not through bind mounts: the same folder mounted at a second place
has an unrelated path there. Output written "outside" the source through such a mount would land in the source; the
checks that keep outputs out of a data set (release, inference) use :func:`is_inside`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["is_inside"]


def _identity(path: Path) -> tuple[int, int]:
    """(device, inode) of an existing path."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _existing_chain(path: Path) -> list[Path]:
    """``path`` (or, when it does not exist yet, its nearest existing folder) and every folder above it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return [path, *path.parents]


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies (or would lie, once created) inside it, also through bind mounts."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    if path.is_relative_to(folder):
        return True
    if not folder.exists():
        return False
    target = _identity(folder)
    try:
        return any(_identity(p) == target for p in _existing_chain(path))
    except OSError:  # a folder on the way that cannot be inspected: judged by the names alone
        return False
