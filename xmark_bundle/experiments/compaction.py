"""Free the disk an experiment's releases hold without changing a byte: an unmarked release file is a byte copy of its
source phantom, so once nothing measures its file-system entry it can be a hard link to that source.

A release copies every unmarked file (0.7 GB a method and owner in a report comparison). The detectability stage
reads file-system tells of the release (inode numbers and times:
:func:`~xmark_bundle.experiments.detectability.file_level_tells`), which a link changes, so the release it measures
(the first owner's) is linked only once ``detectability.json`` lies beside its manifest. Pixels, hashes and every
recorded number stay as they are.
"""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from typing import Any

from xmark_bundle.release import read_manifest

__all__ = ["compact_releases", "link_unmarked"]


def link_unmarked(manifest_file: str | os.PathLike, dry_run: bool = False) -> tuple[int, int]:
    """Replace each file of a finished release that is byte-identical to its source by a hard link to the source
    (atomically: a link under a temporary name, then renamed over the copy). Returns (files linked, bytes freed);
    ``dry_run`` counts them and changes nothing. A :class:`~xmark_bundle.release.ReleaseError` for an unfinished or
    unreadable manifest."""
    manifest = read_manifest(manifest_file)
    source_root, release_root = Path(manifest["dataset_dir"]), Path(manifest["release_dir"])
    linked = freed = 0
    for target in sorted(release_root.rglob("*")):
        source = source_root / target.relative_to(release_root)
        if target.is_symlink() or not target.is_file() or not source.is_file():
            continue
        ours, theirs = target.stat(), source.stat()
        if ours.st_dev != theirs.st_dev or ours.st_ino == theirs.st_ino or ours.st_size != theirs.st_size:
            continue  # another file system, linked already, or changed
        if not filecmp.cmp(source, target, shallow=False):
            continue  # marked, re-encoded or relabelled
        linked += 1
        freed += ours.st_size if ours.st_nlink == 1 else 0
        if not dry_run:
            tmp = target.with_name(f".{target.name}.link.tmp")
            tmp.unlink(missing_ok=True)
            os.link(source, tmp)
            os.replace(tmp, target)
    return linked, freed


def compact_releases(
    out: str | os.PathLike, first_owner: int, with_detectability: bool = True, dry_run: bool = False
) -> list[dict[str, Any]]:
    """:func:`link_unmarked` for every finished release under the experiment folder ``out``, one row per release
    (``release``, ``linked``, ``freed`` or ``skipped``: why). The first owner's release (a legacy declaration's
    only one), whose detectability a declaration may measure, waits for its ``detectability.json`` unless
    ``with_detectability`` is False (no declaration run in ``out`` measures detectability)."""
    rows = []
    for manifest in sorted(Path(out).glob("models/**/release_manifest.json")):
        folder = manifest.parent
        row: dict[str, Any] = {"release": str(folder.relative_to(out))}
        try:
            complete = json.loads(manifest.read_text(encoding="utf-8")).get("complete")
        except (OSError, ValueError) as err:
            rows.append(row | {"skipped": f"unreadable manifest ({err})"})
            continue
        measured = folder.name == f"owner{first_owner}" or not folder.name.startswith("owner")
        if not complete:
            row["skipped"] = "the release is unfinished"
        elif with_detectability and measured and not (folder / "detectability.json").is_file():
            row["skipped"] = "its detectability (which reads inode numbers and times) is not measured yet"
        else:
            row["linked"], row["freed"] = link_unmarked(manifest, dry_run)
        rows.append(row)
    return rows
