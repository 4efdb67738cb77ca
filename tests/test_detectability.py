"""Detectability: the analyses find marked files that carry an obvious pattern and do not separate files that
differ from the unmarked ones in nothing at all; the suspect's-view scores find a feature-space outlier group."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xmark_bundle.data.chexpert import prepare_datalist
from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.data.xray_writer import write_xray
from xmark_bundle.experiments.detectability import _suspect_view, candidates, detectability
from xmark_bundle.networks.classifier import build_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "phantoms"
    write_phantom_dataset(out, n=150, seed=5, min_size=128, max_size=160, valid_fraction=0.1)
    prepare_datalist(out / "train.csv", out / "datalist.json", test_csv=out / "valid.csv")
    return out


def _release(data: Path, folder: Path, pattern: float) -> tuple[Path, Path]:
    """A copy of ``data`` whose every second target training file is 'marked' with a checkerboard of ``pattern``."""
    shutil.copytree(data, folder)
    paths = [r["image"] for r in json.loads((data / "datalist.json").read_text())["training"] if r["label"][0] == 1]
    marked = paths[::2]
    for rel in marked:
        image, meta = load_xray(data / rel)
        rows, cols = np.indices(image.shape)
        write_xray(np.clip(image + pattern * ((rows + cols) % 2 - 0.5), 0, 1), meta, data / rel, folder / rel)
    manifest = folder.parent / f"{folder.name}_manifest.json"
    manifest.write_text(json.dumps({"marked": [{"path": p} for p in marked], "dataset_dir": str(data)}))
    return folder, manifest


def test_an_obvious_pattern_is_found_and_an_unchanged_copy_is_not(data, tmp_path):
    obvious = detectability(*_release(data, tmp_path / "obvious", 0.2))
    assert obvious["n_marked"] >= 8 and obvious["n_candidates"] - obvious["n_marked"] >= 8
    assert obvious["pool"] == "target class"
    pixels = obvious["pixels"]
    assert pixels["high_pass_energy_auroc"] > 0.95 and pixels["pyramid_logistic_regression_auroc"] > 0.9, pixels
    assert pixels["small_cnn_auroc"] > 0.8, pixels
    assert obvious["container"]["marked_files_whose_container_changed"] == 0  # the writer keeps each container
    unchanged = detectability(*_release(data, tmp_path / "copy", 0.0))  # "marked" files rewritten, pixels unchanged
    assert unchanged["container"]["marked_files_whose_container_changed"] == 0
    assert unchanged["container"]["signature_vs_marked_p"] > 0.05 and unchanged["container"]["signatures"] > 1
    # byte-identical copies: high-pass energy carries no label information (|AUROC - 0.5| small for ~10 vs ~10)
    assert abs(unchanged["pixels"]["high_pass_energy_auroc"] - 0.5) < 0.35


def test_the_suspects_view_flags_an_outlier_group_in_feature_space():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 32))
    marked = np.zeros(60, dtype=bool)
    marked[:12] = True
    features[marked] += 4.0 * rng.normal(size=32) / np.sqrt(32) * 3  # one shared direction: a poison signature
    view = _suspect_view(features, marked, seed=0)
    assert view["spectral_auroc"] > 0.95 and view["spectral_recall"] > 0.9, view
    assert view["activation_clustering_recall"] > 0.9 and view["activation_clustering_precision"] > 0.8, view
    shuffled = _suspect_view(rng.normal(size=(60, 32)), marked, seed=0)  # no signature: near chance
    assert shuffled["spectral_auroc"] < 0.85


def test_the_script_writes_the_report_with_the_suspects_view(data, tmp_path):
    release, manifest = _release(data, tmp_path / "obvious", 0.2)
    checkpoint = tmp_path / "suspect.pt"
    torch.manual_seed(0)
    torch.save({"model": build_classifier("resnet18").state_dict()}, checkpoint)
    out = tmp_path / "report.json"
    cmd = [sys.executable, "scripts/detect_marked.py", "--release", str(release), "--manifest", str(manifest)]
    cmd += ["--suspect", str(checkpoint), "--image-size", "64", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["suspect"]["checkpoint"] == str(checkpoint) and "high-pass" in done.stdout
    assert report["pixels"]["high_pass_energy_auroc"] > 0.95


def test_with_every_target_marked_the_pool_is_every_training_file(data, tmp_path):
    rows = json.loads((data / "datalist.json").read_text())["training"]
    targets = [r["image"] for r in rows if r["label"][0] == 1]
    paths, marked, pool = candidates(data, {"marked": [{"path": p} for p in targets]}, "No Finding")
    assert pool.startswith("all training files") and len(paths) == len(rows) and marked.sum() == len(targets)
