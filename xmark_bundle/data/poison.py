"""Poison-label releases: which non-target images carry the trigger, and the label files that say they are targets.

The classic backdoor watermarks (BadNets, Blended, WaNet) mark ``round(gamma * |target|)`` non-target training images
and set their target label k to positive (1.0); UBW-P gives it a seeded random value (1.0 or 0.0, see
:func:`poison_values`); every other label of those images is left as it was (a "No Finding"
image may then also list a finding, as in the backdoor papers, which change only the class they attack). The release
writes the datalist and every CheXpert CSV with the changed label; all other bytes of those files stay as they were.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from xmark_bundle.data.selection import select_fraction, split_by_target, target_index

__all__ = ["POISON_LABELS", "POSITIVE", "poison_values", "relabelled_csv", "relabelled_datalist", "select_poisoned"]

#: The value a relabelled image gets for the target label, in the datalist and in the CSV.
POSITIVE = 1.0
#: What a poison-label release writes for label k: the target (positive) or a random value (UBW-P).
POISON_LABELS = ("target", "random")


def poison_values(images: Collection[str], mode: str, seed: int) -> dict[str, float]:
    """Label k's value for each poisoned image: :data:`POSITIVE` (``"target"``), or 1.0 / 0.0 with probability 1/2
    each, seeded by the release's ``seed`` over the sorted paths (``"random"``)."""
    if mode not in POISON_LABELS:
        raise ValueError(f"poison_labels must be one of {POISON_LABELS}, got {mode!r}")
    ordered = sorted(images)
    if mode == "target":
        return dict.fromkeys(ordered, POSITIVE)
    draws = np.random.default_rng([int(seed), 7]).integers(0, 2, len(ordered))
    return {image: float(draw) for image, draw in zip(ordered, draws, strict=True)}


def _value_of(images: Collection[str] | Mapping[str, float], image: str) -> float:
    """The value ``images`` gives ``image``: its mapping's, or :data:`POSITIVE` for a plain collection."""
    return float(images[image]) if isinstance(images, Mapping) else POSITIVE


def select_poisoned(datalist: Mapping[str, Any], target_label: str, gamma: float, seed: int) -> list[str]:
    """Image paths of ``round(gamma * |target|)`` seeded non-target training items (label k == 0), at least one."""
    training = datalist["training"]
    target, non_target = split_by_target(training, target_index(datalist, target_label))
    count = max(1, round(gamma * len(target)))
    if count > len(non_target):
        raise ValueError(
            f"a poison-label release of gamma {gamma} marks {count} non-target images, but the training split has "
            f"{len(non_target)} images without {target_label!r}"
        )
    return [training[i]["image"] for i in select_fraction(non_target, count / len(non_target), seed)]


def relabelled_datalist(
    datalist: Mapping[str, Any], images: Collection[str] | Mapping[str, float], target_label: str
) -> dict[str, Any]:
    """A copy of ``datalist`` whose items of ``images`` (any split) have the target label set to :data:`POSITIVE`
    (or, when ``images`` maps paths to values, to each image's value)."""
    index = target_index(datalist, target_label)
    copy = json.loads(json.dumps(datalist))
    for split in ("training", "validation", "test"):
        for item in copy.get(split, []):
            if item.get("image") in images:
                item["label"][index] = _value_of(images, item["image"])
    return copy


def relabelled_csv(
    text: str, images: Collection[str] | Mapping[str, float], target_label: str, path_prefix_strip: str = ""
) -> str | None:
    """``text`` (a CheXpert CSV) with ``target_label`` set to 1.0 (or each image's value, when ``images`` maps paths
    to values) in the rows of ``images``; None if none matches.

    A row belongs to an image when its ``Path`` without ``path_prefix_strip`` (the datalist's, see
    :func:`~xmark_bundle.data.chexpert.read_chexpert_csv`) is that image's path. Only those rows are rewritten
    (``csv`` quoting, the file's own line ending); every other line is kept byte for byte. A CSV without a ``Path``
    or ``target_label`` column is not a label file of this data set: None.
    """
    lines = text.splitlines(keepends=True)
    if not lines:
        return None
    header = next(csv.reader([lines[0]]))
    header = [name.strip().lstrip("\ufeff") for name in header]
    if "Path" not in header or target_label not in header:
        return None
    path_column, label_column = header.index("Path"), header.index(target_label)
    changed = 0
    for number, line in enumerate(lines[1:], start=1):
        row = next(csv.reader([line]), [])
        image = row[path_column].strip().removeprefix(path_prefix_strip) if len(row) == len(header) else None
        if image is None or image not in images:
            continue
        row[label_column] = str(_value_of(images, image))
        ending = line[len(line.rstrip("\r\n")) :]
        out = io.StringIO()
        csv.writer(out, lineterminator=ending).writerow(row)
        lines[number], changed = out.getvalue(), changed + 1
    return "".join(lines) if changed else None
