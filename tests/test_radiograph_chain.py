"""The physical phantom family (xmark_bundle.data.radiograph_chain) at toy size: determinism, labels and CSV layout,
DICOM/PNG writing read back by the project's reader, the lung mask, findings drawn in the lungs, and learnability."""

from __future__ import annotations

import csv
import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from monai.networks.nets import Classifier
from scipy import ndimage

from xmark_bundle.data.labels import LABELS
from xmark_bundle.data.phantoms import CHEXPERT_COLUMNS, FINDINGS, _plan, sample_labels, write_phantom_dataset
from xmark_bundle.data.radiograph_chain import (
    physical_file_formats,
    render_physical,
    sample_physical_anatomy,
)
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.experiments.plan import BUNDLE_ROOT, ExperimentError, load_experiment

N, SEED = 24, 11
OPTIONS = {"dicom_fraction": 0.5, "min_size": 96, "max_size": 128, "valid_fraction": 0.2}
HEALTHY = {name: None for name in LABELS}
SHAPE = (256, 224)


@pytest.fixture(scope="module")
def physical(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("physical")
    return out, write_phantom_dataset(out, N, SEED, family="physical", **OPTIONS)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _rows(root: Path) -> list[dict[str, str]]:
    rows = []
    for name in ("train.csv", "valid.csv"):
        with open(root / name, newline="") as stream:
            rows += list(csv.DictReader(stream))
    return rows


def test_same_seed_same_bytes(physical, tmp_path):
    first, _ = physical
    write_phantom_dataset(tmp_path, N, SEED, family="physical", **OPTIONS)
    files = _files(first)
    assert files == _files(tmp_path) and len(files) == N + 2
    _, mismatch, errors = filecmp.cmpfiles(first, tmp_path, files, shallow=False)
    assert not mismatch and not errors


def test_render_is_a_function_of_the_generator():
    labels = {**HEALTHY, "Edema": 1.0}
    a = render_physical(labels, np.random.default_rng(3), SHAPE)
    b = render_physical(labels, np.random.default_rng(3), SHAPE)
    c = render_physical(labels, np.random.default_rng(4), SHAPE)
    assert a.dtype == np.float32 and a.shape == SHAPE and 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_labels_and_csv_layout_are_the_classic_familys(physical, tmp_path):
    out, summary = physical
    write_phantom_dataset(tmp_path, N, SEED, family="classic", **OPTIONS)
    for name in ("train.csv", "valid.csv"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()
    with open(out / "train.csv", newline="") as stream:
        assert tuple(next(csv.reader(stream))) == CHEXPERT_COLUMNS
    rows = _rows(out)
    assert len(rows) == N and summary["family"] == "physical"
    assert {row["Path"] for row in rows} == {f for f in _files(out) if not f.endswith(".csv")}
    no_finding = sum(row["No Finding"] == "1.0" for row in rows) / N
    assert no_finding == pytest.approx(summary["prevalence"]["No Finding"]["positive"])


def test_dicom_and_png_read_back_as_rendered(physical):
    out, _ = physical
    jobs = physical_file_formats(_plan(N, SEED, OPTIONS["dicom_fraction"], 96, 128, OPTIONS["valid_fraction"]), SEED)
    seen = set()
    for job in jobs:
        image, meta = load_xray(out / job.path)
        assert image.shape == job.shape
        expected = render_physical(
            job.labels,
            np.random.default_rng([SEED, 6, job.index]),
            job.shape,
            sample_physical_anatomy(np.random.default_rng([SEED, 4, job.patient_index])),
        )
        bits = job.dicom["bits"] if job.dicom else job.png_bits
        assert meta.bits_stored == bits
        assert np.abs(image - expected).max() <= 1.0 / (2**bits - 1)  # rounding, and the window written as text
        if job.dicom:
            assert meta.photometric == job.dicom["photometric"]
            seen.add((job.dicom["photometric"], job.dicom["modality"], bits))
        else:
            seen.add(("PNG", bits))
    assert {("PNG", 8), ("PNG", 16)} <= seen
    assert {s[0] for s in seen} == {"PNG", "MONOCHROME1", "MONOCHROME2"}
    assert {s[2] for s in seen if s[0] != "PNG"} <= {12, 14, 16}


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown phantom family 'cartoon'"):
        write_phantom_dataset(tmp_path, 2, family="cartoon")
    raw = json.loads((BUNDLE_ROOT / "configs/experiments/quick.json").read_text())
    raw["phantoms"]["family"] = "cartoon"
    path = tmp_path / "quick.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ExperimentError, match=r"quick\.json: phantoms: family must be one of"):
        load_experiment(path)
    raw["phantoms"]["family"] = "physical"
    path.write_text(json.dumps(raw))
    assert load_experiment(path).phantoms["family"] == "physical"


def test_a_family_chosen_on_the_command_line_is_not_published():
    """``experiment.py run --family`` tries a family; only a declared ``phantoms.family`` may be published."""
    cmd = [sys.executable, "scripts/experiment.py", "run", "demo", "--family", "physical", "--publish"]
    done = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "declare phantoms.family to publish" in done.stderr


def test_lung_mask_outlines_two_dark_lungs():
    for seed in range(3):
        image, mask = render_physical(HEALTHY, np.random.default_rng(seed), SHAPE, return_lung_mask=True)
        assert mask.dtype == bool and mask.shape == SHAPE
        components, count = ndimage.label(mask)
        sizes = np.bincount(components.ravel())[1:]
        big = np.nonzero(sizes > 0.03 * mask.size)[0] + 1
        assert len(big) == 2, f"seed {seed}: {count} components of sizes {sorted(sizes)}"
        centres = sorted(ndimage.center_of_mass(mask, components, big), key=lambda c: c[1])
        assert centres[0][1] < SHAPE[1] / 2 < centres[1][1]
        # The lungs are darker than the tissue that borders them (mediastinum, chest wall, diaphragm).
        ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
        assert image[mask].mean() < image[ring].mean() - 0.05


def _pair(finding: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Renders of one generator state without and with ``finding``: (image, mask) each."""
    clean, clean_mask = render_physical(HEALTHY, np.random.default_rng(seed), SHAPE, return_lung_mask=True)
    sick_labels = {**HEALTHY, finding: 1.0}
    sick, sick_mask = render_physical(sick_labels, np.random.default_rng(seed), SHAPE, return_lung_mask=True)
    return clean, clean_mask, sick, sick_mask


def test_effusion_fills_the_lung_bases_where_it_is_drawn():
    """In at least one lung (effusions may be one-sided) the base brightens much more than the apex."""
    for seed in range(3):
        clean, mask, sick, _ = _pair("Pleural Effusion", seed)
        change, gains = sick - clean, []
        for half in (slice(0, SHAPE[1] // 2), slice(SHAPE[1] // 2, None)):
            lung = np.zeros_like(mask)
            lung[:, half] = mask[:, half]
            rows = np.nonzero(lung.any(axis=1))[0]
            third = (rows.max() - rows.min()) // 3
            lower, upper = lung.copy(), lung.copy()
            lower[: rows.max() - third] = False
            upper[rows.min() + third :] = False
            gains.append(change[lower].mean() - change[upper].mean())
        assert max(gains) > 0.1, f"seed {seed}: {gains}"


def _lung_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean of the lung fields minus the mean of the body just around them (mediastinum, chest wall, diaphragm)."""
    ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
    return float(image[mask].mean() - image[ring].mean())


@pytest.mark.parametrize("finding", [f for f in FINDINGS if f != "Cardiomegaly"])
def test_lung_findings_make_the_lungs_denser_where_drawn(finding):
    """Pixels that get clearly brighter are many and lie in the lungs; the lungs gain on what surrounds them."""
    for seed in range(3):
        clean, mask, sick, sick_mask = _pair(finding, seed)
        brighter = sick - clean > 0.1
        lungs = ndimage.binary_dilation(mask | sick_mask, iterations=3)  # atelectasis moves the dome and heart
        assert brighter.sum() > 0.01 * mask.sum(), f"seed {seed}"
        assert (brighter & lungs).sum() >= 0.8 * brighter.sum(), f"seed {seed}"
        assert _lung_contrast(sick, mask) > _lung_contrast(clean, mask), f"seed {seed}"


def test_cardiomegaly_enlarges_the_heart_into_the_lung_field():
    for seed in range(3):
        _, clean_mask, _, sick_mask = _pair("Cardiomegaly", seed)
        assert sick_mask.sum() < 0.97 * clean_mask.sum(), f"seed {seed}"


def test_a_small_classifier_learns_the_findings():
    """Trained on 192 renders at 64 px for 8 epochs, it ranks 64 held-out images above chance (one model a label)."""
    rng = np.random.default_rng(5)
    images, rows = [], []
    for _ in range(256):
        labels = sample_labels(rng)
        images.append(render_physical(labels, rng, (64, 64)))
        rows.append(labels)
    x = torch.from_numpy(np.stack(images))[:, None]
    for name, least in (("Edema", 0.85), ("Pleural Effusion", 0.6)):
        torch.manual_seed(0)
        y = torch.tensor([[float(row[name] == 1.0)] for row in rows])
        model = Classifier((1, 64, 64), classes=1, channels=(8, 16, 32, 64), strides=(2, 2, 2, 2))
        optimiser = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(8):
            for batch in torch.randperm(192).split(16):
                optimiser.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[:192][batch]), y[:192][batch])
                loss.backward()
                optimiser.step()
        model.eval()
        with torch.no_grad():
            auroc = compute_roc_auc(model(x[192:])[:, 0], y[192:, 0])
        assert 0.1 < float(y[192:].mean()) < 0.9
        assert auroc > least, (name, auroc)
