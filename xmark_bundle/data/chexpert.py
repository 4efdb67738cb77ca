"""CheXpert CSV -> MONAI datalist: the six X-Mark labels under an uncertainty policy, split by patient.

CheXpert codes each finding as 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned, read as 0).
The uncertainty policy maps -1 to 1 (``u-ones``), to 0 (``u-zeros``) or keeps it (``ignore``: losses and metrics
mask targets < 0). Splits are drawn over patients (the ``patientNNNNN`` path component), never over images.
"""

import csv
import gzip
import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TextIO

from xmark_bundle.fileio import write_json

from .labels import LABELS

__all__ = [
    "POLICIES",
    "CheXpertCSVError",
    "build_datalist",
    "label_prevalence",
    "prepare_datalist",
    "read_chexpert_csv",
    "split_by_patient",
]

POLICIES: tuple[str, ...] = ("u-ones", "u-zeros", "ignore")
_UNCERTAIN_TO = {"u-ones": 1.0, "u-zeros": 0.0, "ignore": -1.0}
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")
_VIEW_COLUMN = "Frontal/Lateral"


class CheXpertCSVError(ValueError):
    """A CheXpert CSV that cannot be turned into a datalist; the message names the file, line and problem."""


def _check_relative(image: str, where: str) -> None:
    """Refuse an image path that is absolute or climbs out of the data set folder (``..``), naming where it is."""
    posix = PurePosixPath(image.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(image).drive or ".." in posix.parts:
        raise CheXpertCSVError(
            f"{where}: image path {image!r} is absolute or leaves the data set folder; a datalist holds paths "
            "relative to the data set (remove a leading folder with path_prefix_strip)"
        )


def read_chexpert_csv(
    path: str | os.PathLike, policy: str = "u-ones", frontal_only: bool = False, path_prefix_strip: str = ""
) -> list[dict[str, Any]]:
    """Read a CheXpert ``.csv`` or ``.csv.gz`` into datalist items ``{"image", "label", "patient"}``.

    ``label`` holds the six :data:`LABELS` as floats after the uncertainty ``policy``; ``image`` is the CSV ``Path``
    with ``path_prefix_strip`` removed from its start; ``frontal_only`` keeps rows whose view is ``Frontal``.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown uncertainty policy {policy!r}; choose one of {POLICIES}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CheXpert CSV not found: {path}")
    value_map = {1.0: 1.0, 0.0: 0.0, -1.0: _UNCERTAIN_TO[policy]}
    items = []
    try:
        with _open_text(path) as stream:
            reader = csv.reader(stream)
            header = [name.strip() for name in next(reader, [])]
            required = ["Path", *LABELS] + ([_VIEW_COLUMN] if frontal_only else [])
            missing = [name for name in required if name not in header]
            if missing:
                raise CheXpertCSVError(f"{path}: missing column(s) {missing}; header is {header}.")
            columns = {name: header.index(name) for name in required}
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise CheXpertCSVError(
                        f"{path}, line {reader.line_num}: {len(row)} fields where the header has {len(header)}."
                    )
                item = _row_to_item(row, columns, value_map, frontal_only, f"{path}, line {reader.line_num}")
                if item is not None:
                    item["image"] = item["image"].removeprefix(path_prefix_strip)
                    _check_relative(item["image"], f"{path}, line {reader.line_num}")
                    items.append(item)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise CheXpertCSVError(f"{path}: cannot be read as a CSV ({exc}).") from exc
    if not items:
        raise CheXpertCSVError(f"{path}: no images left" + (" after keeping frontal views." if frontal_only else "."))
    return items


def _open_text(path: Path) -> TextIO:
    """Open a plain or gzip-compressed CSV as text (BOM-tolerant UTF-8, universal newlines left to csv)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _row_to_item(
    row: Sequence[str], columns: Mapping[str, int], value_map: Mapping[float, float], frontal_only: bool, where: str
) -> dict[str, Any] | None:
    """Turn one CSV row into a datalist item; ``None`` for a lateral view when only frontal views are kept."""
    if frontal_only:
        view = row[columns[_VIEW_COLUMN]].strip()
        if view not in ("Frontal", "Lateral"):
            raise CheXpertCSVError(f"{where}: {_VIEW_COLUMN} is {view!r}, not 'Frontal' or 'Lateral'.")
        if view == "Lateral":
            return None
    image = row[columns["Path"]].strip()
    match = _PATIENT.search(image)
    if match is None:
        raise CheXpertCSVError(f"{where}: no 'patientNNNNN' folder in {image!r}.")
    labels = [_parse_label(row[columns[name]], value_map, where, name) for name in LABELS]
    return {"image": image, "label": labels, "patient": match[1]}


def _parse_label(text: str, value_map: Mapping[float, float], where: str, column: str) -> float:
    """Parse one finding cell (1 / 0 / -1 / blank) and apply the uncertainty policy."""
    text = text.strip()
    if not text:
        return 0.0
    try:
        return value_map[float(text)]
    except (ValueError, KeyError):
        raise CheXpertCSVError(f"{where}: column {column!r} holds {text!r}; expected 1, 0, -1 or blank.") from None


def split_by_patient(
    items: Sequence[Mapping[str, Any]], fractions: Sequence[float], seed: int
) -> list[list[Mapping[str, Any]]]:
    """Split items into ``len(fractions) + 1`` patient-disjoint parts; the last part takes the remaining patients.

    The sorted patient ids are shuffled with ``random.Random(seed)``; part ``i`` gets ``round(fractions[i] * n)``
    of the ``n`` patients (fractions count patients, not images). Items keep their input order within a part.
    """
    if any(not 0.0 <= f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
        raise ValueError(f"Split fractions must each lie in [0, 1) and sum to less than 1, got {list(fractions)}.")
    patients = sorted({item["patient"] for item in items})
    random.Random(seed).shuffle(patients)
    part_of, start = {}, 0
    for part, fraction in enumerate(fractions):
        stop = start + round(fraction * len(patients))
        part_of.update(dict.fromkeys(patients[start:stop], part))
        start = stop
    part_of.update(dict.fromkeys(patients[start:], len(fractions)))
    parts: list[list[Mapping[str, Any]]] = [[] for _ in range(len(fractions) + 1)]
    for item in items:
        parts[part_of[item["patient"]]].append(item)
    return parts


def label_prevalence(items: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Share of items whose label equals 1 for each of :data:`LABELS` (uncertain -1 counts as not positive)."""
    counts, total = [0] * len(LABELS), 0
    for item in items:
        total += 1
        for i, value in enumerate(item["label"]):
            counts[i] += value == 1.0
    return {name: (count / total if total else 0.0) for name, count in zip(LABELS, counts, strict=True)}


def build_datalist(
    train_items: Sequence[Mapping[str, Any]],
    test_items: Sequence[Mapping[str, Any]] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Make the MONAI datalist ``{"labels", "metadata", "training", "validation", "test"}`` with patient splits.

    Without ``test_items`` the test split is drawn from ``train_items`` (``test_fraction`` of the patients);
    with them, ``train_items`` only yields training and validation. ``info`` is merged into the metadata.
    """
    if test_items is None:
        validation, test, training = split_by_patient(train_items, (val_fraction, test_fraction), seed)
    else:
        validation, training = split_by_patient(train_items, (val_fraction,), seed)
        test = list(test_items)
        shared = {item["patient"] for item in train_items} & {item["patient"] for item in test}
        if shared:
            raise ValueError(
                f"{len(shared)} patient(s) appear in both the training and the test CSV (e.g. {min(shared)}); "
                "splits must be disjoint by patient."
            )
    if not training:
        raise ValueError("The training split is empty; lower the validation/test fractions or add data.")
    splits = {"training": training, "validation": validation, "test": test}
    metadata = {
        **(info or {}),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction if test_items is None else None,
        "counts": {
            name: {"images": len(split), "patients": len({item["patient"] for item in split})}
            for name, split in splits.items()
        },
        "prevalence": {name: label_prevalence(split) for name, split in splits.items()},
    }
    return {"labels": list(LABELS), "metadata": metadata, **splits}


def _refuse_overwriting_inputs(out_path: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> None:
    """Raise ValueError when ``out_path`` is the same file as an input (same resolved path, or a hard link to it), or
    an existing file that is not a datalist (the data set's own ``valid.csv``, say): only a datalist is replaced."""
    out = Path(out_path)
    for source in map(Path, inputs):
        same = out.resolve() == source.resolve() or (out.exists() and source.exists() and os.path.samefile(out, source))
        if same:
            raise ValueError(f"output {out} is the input CSV {source}: refusing to overwrite it")
    if out.exists():
        try:
            earlier = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "training" in earlier):
            raise ValueError(f"output {out} exists and is not a datalist: refusing to overwrite it (choose a new file)")


def prepare_datalist(
    csv_path: str | os.PathLike,
    out_path: str | os.PathLike,
    test_csv: str | os.PathLike | None = None,
    policy: str = "u-ones",
    frontal_only: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    path_prefix_strip: str = "",
) -> dict[str, Any]:
    """Read CheXpert CSV(s), split by patient and write the datalist JSON; returns the datalist.

    Refuses an ``out_path`` that is (or resolves to) one of the input CSVs, which it would overwrite.
    """
    _refuse_overwriting_inputs(out_path, [csv_path] if test_csv is None else [csv_path, test_csv])
    options = {"policy": policy, "frontal_only": frontal_only, "path_prefix_strip": path_prefix_strip}
    train_items = read_chexpert_csv(csv_path, **options)
    test_items = None if test_csv is None else read_chexpert_csv(test_csv, **options)
    info = {
        **options,
        "source_csv": Path(csv_path).name,
        "test_csv": None if test_csv is None else Path(test_csv).name,
    }
    datalist = build_datalist(train_items, test_items, val_fraction, test_fraction, seed, info)
    write_json(out_path, datalist)
    return datalist
