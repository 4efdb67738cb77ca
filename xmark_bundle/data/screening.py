"""Inputs of a watermarking run over a folder, checked before any work, and its journal for resuming.

The run refuses overlapping input and output folders, skips unreadable files with a one-line reason instead of
stopping halfway, and leaves out files that an earlier run with the same checkpoint already wrote (its journal,
``.xmark-inference.jsonl`` in the output folder, records each written file's source and output SHA-256). The run's
summary (:class:`xmark_bundle.engines.summary.InferenceJournal`) repeats the counts and exits non-zero when files were
skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from xmark_bundle.data.xray_io import find_xray_files, load_xray
from xmark_bundle.errors import require_checkpoint
from xmark_bundle.fileio import sha256_file
from xmark_bundle.locations import is_inside

__all__ = ["JOURNAL_NAME", "ScreenedInputs", "read_journal", "screen_inputs"]

#: The journal of written files inside the output folder (hidden: a release never publishes it).
JOURNAL_NAME = ".xmark-inference.jsonl"


@dataclass
class ScreenedInputs:
    """The files to watermark, those skipped as unreadable (relative path -> reason) and those already written."""

    dataset_dir: Path
    output_dir: Path
    generator_sha256: str | None = None
    readable: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    #: SaveWatermarkedd's ``sop_instance_uid`` of this run, journalled with each file: a file written with the
    #: other choice is written again (journal records from before the choice was made kept the source's UID)
    sop_instance_uid: str | None = None


def read_journal(output_dir: Path) -> dict[str, dict[str, Any]]:
    """The journal's records by relative path (later lines win; a line torn by an interruption ends it)."""
    path, records = output_dir / JOURNAL_NAME, {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            records[record["path"]] = record
    return records


def _already_written(
    record: dict[str, Any] | None,
    source: Path,
    target: Path,
    generator_sha256: str | None,
    sop_instance_uid: str | None = None,
) -> bool:
    """Whether ``target`` is the journal's output of this ``source`` and this generator (and UID choice, if given)."""
    return (
        record is not None
        and record.get("generator_sha256") == generator_sha256
        and (sop_instance_uid is None or record.get("sop_instance_uid", "keep") == sop_instance_uid)
        and target.is_file()
        and sha256_file(target) == record["output_sha256"]
        and sha256_file(source) == record["source_sha256"]
    )


def screen_inputs(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    allow_modalities: Sequence[str] = (),
    allow_body_parts: Sequence[str] = (),
    sop_instance_uid: str | None = None,
) -> ScreenedInputs:
    """Check that ``output_dir`` and ``dataset_dir`` do not overlap, then sort every X-ray file under ``dataset_dir``
    into readable, skipped (printed with the reason) and unchanged (written earlier with the same ``checkpoint``).

    Overlapping folders would write into the source, or watermark the run's own earlier output on a rerun: a
    ``ValueError`` names both. ``allow_modalities`` / ``allow_body_parts`` widen the scope of
    :func:`~xmark_bundle.data.xray_io.load_xray` beyond chest radiographs. With ``sop_instance_uid`` (the run's
    choice for DICOM UIDs, journalled) a file written earlier with another choice is not unchanged: it is written again.
    A missing ``checkpoint`` is named (:func:`~xmark_bundle.errors.require_checkpoint`).
    """
    source, target = Path(dataset_dir).resolve(), Path(output_dir).resolve()
    if not source.is_dir():
        raise NotADirectoryError(f"{source}: dataset_dir is not a folder")
    if is_inside(source, target) or is_inside(target, source):  # one is, or lies inside, the other (bind mounts too)
        raise ValueError(f"output_dir {target} and dataset_dir {source} overlap; choose an output folder outside it")
    if checkpoint is not None:
        require_checkpoint(checkpoint)
    screened = ScreenedInputs(source, target, None if checkpoint is None else sha256_file(checkpoint))
    screened.sop_instance_uid = sop_instance_uid
    journal = read_journal(target)
    for path in tqdm(find_xray_files(source), desc="check inputs", unit="file", disable=not progress):
        relative = path.relative_to(source).as_posix()
        if _already_written(
            journal.get(relative), path, target / relative, screened.generator_sha256, sop_instance_uid
        ):
            screened.unchanged.append(relative)
            continue
        try:
            load_xray(path, allow_modalities=allow_modalities, allow_body_parts=allow_body_parts)
        except (ValueError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            screened.skipped[relative] = reason
            print(f"skipped: {reason}")
        else:
            screened.readable.append(path)
    return screened
