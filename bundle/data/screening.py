"""Inputs of a watermarking run, checked before any work: folders that do not overlap, files that can be read.

An unreadable file is skipped with a one-line reason instead of stopping the run halfway; the run's summary
(:class:`bundle.engines.summary.InputSummary`) repeats the count and ends it with a non-zero exit status.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bundle.data.xray_io import find_xray_files, load_xray

__all__ = ["ScreenedInputs", "screen_inputs"]


@dataclass
class ScreenedInputs:
    """The readable X-ray files under ``dataset_dir`` and the skipped ones (relative path -> reason)."""

    dataset_dir: Path
    readable: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _overlap(a: Path, b: Path) -> bool:
    """Whether one of two resolved folders is, or lies inside, the other."""
    return a == b or a in b.parents or b in a.parents


def screen_inputs(
    dataset_dir: str | os.PathLike, output_dir: str | os.PathLike, progress: bool = True
) -> ScreenedInputs:
    """Check that ``output_dir`` and ``dataset_dir`` do not overlap, then read every X-ray file under ``dataset_dir``.

    Overlapping folders would write into the source, or watermark the run's own earlier output on a rerun: a
    ``ValueError`` names both. Each file that cannot be read is printed with its reason and skipped.
    """
    source, target = Path(dataset_dir).resolve(), Path(output_dir).resolve()
    if not source.is_dir():
        raise NotADirectoryError(f"{source}: dataset_dir is not a folder")
    if _overlap(source, target):
        raise ValueError(f"output_dir {target} and dataset_dir {source} overlap; choose an output folder outside it")
    screened = ScreenedInputs(source)
    for path in tqdm(find_xray_files(source), desc="check inputs", unit="file", disable=not progress):
        try:
            load_xray(path)
        except (ValueError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            screened.skipped[path.relative_to(source).as_posix()] = reason
            print(f"skipped: {reason}")
        else:
            screened.readable.append(path)
    return screened
