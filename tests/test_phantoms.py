"""Synthetic phantom data set: determinism, CheXpert layout, DICOM/PNG encoding, findings and label statistics."""

from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from xmark_bundle.data.labels import LABELS
from xmark_bundle.data.phantoms import (
    CHEXPERT_COLUMNS,
    FINDINGS,
    TARGET_PREVALENCE,
    label_prevalence,
    render_phantom,
    sample_labels,
    write_phantom_dataset,
)
from xmark_bundle.data.xray_io import load_xray

N, SEED, MIN_SIZE, MAX_SIZE = 16, 7, 256, 320
OPTIONS = {"dicom_fraction": 0.5, "min_size": MIN_SIZE, "max_size": MAX_SIZE, "valid_fraction": 0.2}
SHAPE = (320, 288)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantoms_a")
    return out, write_phantom_dataset(out, N, SEED, **OPTIONS)


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_workers_do_not_change_the_bytes(tmp_path):
    write_phantom_dataset(tmp_path / "one", 4, SEED, workers=1, **OPTIONS)
    write_phantom_dataset(tmp_path / "two", 4, SEED, workers=2, **OPTIONS)
    _assert_same_tree(tmp_path / "one", tmp_path / "two")


def _rows(root: Path) -> list[dict[str, str]]:
    rows = []
    for name in ("train.csv", "valid.csv"):
        with open(root / name, newline="") as stream:
            rows += list(csv.DictReader(stream))
    return rows


def _assert_same_tree(first: Path, second: Path) -> None:
    files = _files(first)
    assert files == _files(second) and len(files) > 2
    _, mismatch, errors = filecmp.cmpfiles(first, second, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    assert not any(p.name.startswith(".") for p in files)  # no temporary files left behind


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    write_phantom_dataset(tmp_path / "again", N, SEED, **OPTIONS)
    _assert_same_tree(root, tmp_path / "again")
    files = _files(root)

    other = tmp_path / "other"
    write_phantom_dataset(other, N, SEED + 1, **OPTIONS)
    assert (other / "train.csv").read_bytes() != (root / "train.csv").read_bytes()
    first_image = next(f for f in files if f.suffix in (".png", ".dcm"))
    twin = next((other / first_image.parent).glob("view1_frontal.*"), None)
    assert twin is None or twin.read_bytes() != (root / first_image).read_bytes()


def test_csv_layout_and_patient_split(dataset):
    root, summary = dataset
    for name in ("train.csv", "valid.csv"):
        with open(root / name, newline="") as stream:
            header = next(csv.reader(stream))
        assert tuple(header) == CHEXPERT_COLUMNS
    rows = _rows(root)
    assert len(rows) == N == summary["images"]
    assert summary["valid_images"] > 0 and summary["train_images"] > 0
    splits: dict[str, set[str]] = {}
    for row in rows:
        split, patient, study, view = row["Path"].split("/")
        splits.setdefault(patient, set()).add(split)
        assert (root / row["Path"]).is_file()
        assert study.startswith("study") and view in ("view1_frontal.png", "view1_frontal.dcm")
        assert row["Frontal/Lateral"] == "Frontal" and row["AP/PA"] in ("AP", "PA")
        assert row["Sex"] in ("Male", "Female") and 18 <= int(row["Age"]) <= 95
        assert all(row[name] in ("1.0", "0.0", "-1.0", "") for name in CHEXPERT_COLUMNS[5:])
        assert all(row[name] == "" for name in CHEXPERT_COLUMNS[5:] if name not in LABELS)
        sick = any(row[name] in ("1.0", "-1.0") for name in FINDINGS)
        assert row["No Finding"] == ("" if sick else "1.0")
    assert all(len(s) == 1 for s in splits.values())  # a patient never straddles train and valid
    assert len(splits) < N  # some patients have more than one study


def test_sizes_and_formats(dataset):
    root, summary = dataset
    rows = _rows(root)
    dicoms = [r["Path"] for r in rows if r["Path"].endswith(".dcm")]
    assert len(dicoms) == summary["dicom_images"] == round(0.5 * N)
    photometric = set()
    for row in rows:
        path = root / row["Path"]
        image, meta = load_xray(path)
        height, width = image.shape
        assert MIN_SIZE <= height <= MAX_SIZE and MIN_SIZE <= width <= MAX_SIZE and height != width
        # the window covers the data: the reader sees the full [0, 1] range
        assert image.min() == pytest.approx(0.0, abs=1e-5) and image.max() == pytest.approx(1.0, abs=1e-5)
        # bright = attenuation after the reader's MONOCHROME1 handling: the abdomen outshines the lung fields
        lungs = image[int(0.3 * height) : int(0.42 * height), int(0.22 * width) : int(0.38 * width)]
        abdomen = image[int(0.85 * height) :, int(0.4 * width) : int(0.6 * width)]
        assert abdomen.mean() > lungs.mean() + 0.2, path
        if path.suffix == ".png":
            with Image.open(path) as png:
                assert png.mode == "I;16" and png.format == "PNG"
            continue
        ds = pydicom.dcmread(path)
        photometric.add(ds.PhotometricInterpretation)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}[ds.Modality]
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.BitsAllocated == 16 and 12 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
        assert (ds.Rows, ds.Columns) == (height, width) and ds.pixel_array.max() < 2**ds.BitsStored
        assert ds.PatientID == path.parts[-3] and ds.ViewPosition == row["AP/PA"]
        assert "RescaleSlope" in ds and "RescaleIntercept" in ds
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def _render(name: str | None, value: float, seed: int = 3) -> np.ndarray:
    labels = dict.fromkeys(LABELS)
    if name is not None:
        labels[name] = value
    return render_phantom(labels, np.random.default_rng(seed), SHAPE)


def _positive_change(name: str, value: float = 1.0, seed: int = 3) -> np.ndarray:
    return np.clip(_render(name, value, seed) - _render(None, 0.0, seed), 0, None)


def _centroid(weights: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(weights.shape)
    return float((rows * weights).sum() / weights.sum()), float((cols * weights).sum() / weights.sum())


def test_render_is_deterministic_and_normalised():
    first, second = _render(None, 0.0), _render(None, 0.0)
    assert first.dtype == np.float32 and first.shape == SHAPE
    np.testing.assert_array_equal(first, second)
    assert first.min() == 0.0 and first.max() == 1.0
    assert not np.array_equal(first, _render(None, 0.0, seed=4))


@pytest.mark.parametrize("seed", [3, 11])
def test_findings_change_the_expected_region(seed):
    height, width = SHAPE
    # Cardiomegaly: a wider bright mass, mostly towards the image right (the patient's left), above the domes.
    heart = _positive_change("Cardiomegaly", seed=seed)
    row, col = _centroid(heart)
    assert heart.sum() > 0.003 * height * width and col > 0.5 * width and 0.4 * height < row < 0.75 * height
    # Pleural effusion: the lower zone brightens.
    fluid = _positive_change("Pleural Effusion", seed=seed)
    assert fluid.sum() > 0.003 * height * width and _centroid(fluid)[0] > 0.5 * height
    # Edema: perihilar opacity on both sides of the midline.
    edema = _positive_change("Edema", seed=seed)
    left, right = edema[:, : width // 2].sum(), edema[:, width // 2 :].sum()
    assert min(left, right) > 0.35 * max(left, right) and left + right > 0.01 * height * width
    assert 0.3 * height < _centroid(edema)[0] < 0.6 * height
    # Consolidation: a dense patch confined to part of one lung.
    patch = _positive_change("Consolidation", seed=seed)
    dense = patch > 0.1
    assert patch.max() > 0.3 and 0.005 < dense.mean() < 0.1
    left, right = patch[:, : width // 2].sum(), patch[:, width // 2 :].sum()
    assert max(left, right) > 4 * min(left, right)
    # Atelectasis: a plate-like opacity and a raised hemidiaphragm on one side.
    plate = _positive_change("Atelectasis", seed=seed)
    left, right = plate[:, : width // 2].sum(), plate[:, width // 2 :].sum()
    assert plate.max() > 0.3 and max(left, right) > 1.5 * min(left, right)


@pytest.mark.parametrize("name", FINDINGS)
def test_uncertain_findings_are_milder(name):
    assert 0 < _positive_change(name, -1.0).sum() < _positive_change(name, 1.0).sum()


def test_label_statistics_match_chexpert():
    rng = np.random.default_rng(0)
    rows = [sample_labels(rng, rng.standard_normal(2)) for _ in range(2000)]
    prevalence = label_prevalence(rows)
    for name, (positive, uncertain) in TARGET_PREVALENCE.items():
        assert prevalence[name]["positive"] == pytest.approx(positive, abs=0.03), name
        assert prevalence[name]["uncertain"] == pytest.approx(uncertain, abs=0.03), name
    none_present = np.mean([all(r[f] in (None, 0.0) for f in FINDINGS) for r in rows])
    assert prevalence["No Finding"]["positive"] == pytest.approx(none_present)
    positive = np.array([[r[f] == 1.0 for f in FINDINGS] for r in rows], dtype=float)
    corr = np.corrcoef(positive.T)
    edema = FINDINGS.index("Edema")
    assert corr[edema, FINDINGS.index("Cardiomegaly")] > 0.05 and corr[edema, FINDINGS.index("Pleural Effusion")] > 0.05


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"n": 2, "min_size": 300, "max_size": 200}, {"n": 2, "dicom_fraction": 1.5}]
)
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_phantom_dataset(tmp_path, seed=0, **kwargs)
