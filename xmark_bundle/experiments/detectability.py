"""Can a data user find the marked files of a release without the key? Three views, as AUROC (0.5: chance).

The candidates are the released training files that carry the target label as the data user sees it (the released
datalist): for a clean-label method the marked target images among the unmarked ones, for a poison-label method
the relabelled non-target images among the genuine targets. When every target image is marked (gamma 1), all
training files are the candidates, and a detector may then find the class rather than the mark. The release
manifest (the owner's secret) says which are marked; the analyses may use it as labelled examples, so (b) is an
upper bound on what an analyst could learn.

(a) container: each file's container signature (format, codec, bit depth, photometric interpretation, PNG
    chunks / JPEG tables) compared between marked and unmarked files, and the AUROC of bytes per pixel and of
    :func:`compressibility` (the mark adds fine structure, so marked pixels compress less well: an intrinsic tell);
    :func:`file_level_tells` adds per kind of file the time stamps and inode numbers;
(b) pixels: the AUROC of high-pass energy (mean |Laplacian| of the image at 256 px), of a logistic regression on
    Laplacian-pyramid statistics and of a small CNN on the high-pass image at 128 px, both cross-validated
    (stratified folds: each file is scored by a model that never saw it);
(c) the suspect's view: the malicious model's penultimate features of the candidates; the spectral signature (Tran
    et al. 2018: squared projection on the top singular vector of the centred features; the 1.5 x n_marked highest
    are flagged) and activation clustering (Chen et al. 2018: 2-means on 10 principal components; the smaller
    cluster is flagged): AUROC of the score and the share of marked files among those flagged (recall).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from PIL import Image
from scipy import ndimage, stats
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from xmark_bundle.data.selection import target_index
from xmark_bundle.data.xray_io import XRayMeta, load_xray, to_stored
from xmark_bundle.networks.classifier import load_classifier, penultimate_features
from xmark_bundle.transforms.geometry import letterbox, letterbox_geometry

__all__ = ["candidates", "compressibility", "container_signature", "detectability", "file_level_tells"]

PIXEL_SIZE, CNN_SIZE, FOLDS, LEVELS = 256, 128, 5, 4


def candidates(release_dir: Path, manifest: Mapping[str, Any], target_label: str) -> tuple[list[str], np.ndarray, str]:
    """The released training files to tell apart (relative paths), whether each is marked, and which pool they are.

    The files labelled ``target_label`` when they hold marked and unmarked files; otherwise (every target image
    marked, as with gamma 1) every training file, where the mark and the class go together."""
    datalist = json.loads((release_dir / "datalist.json").read_text())
    k = target_index(datalist, target_label)
    marked = {f["path"] for f in manifest["marked"] + manifest.get("decoys", [])}
    paths = [row["image"] for row in datalist["training"] if row["label"][k] == 1]
    flags = np.array([p in marked for p in paths], dtype=bool)
    if flags.any() and not flags.all():
        return paths, flags, "target class"
    paths = [row["image"] for row in datalist["training"]]
    return paths, np.array([p in marked for p in paths], dtype=bool), "all training files (mark and class confounded)"


def container_signature(path: Path) -> str:
    """What a file's container says apart from its pixel values (a short, comparable string)."""
    if path.suffix.lower() == ".dcm":
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        keys = ("BitsAllocated", "BitsStored", "PhotometricInterpretation", "PixelRepresentation", "RescaleSlope")
        return f"dicom {ds.file_meta.TransferSyntaxUID} " + " ".join(str(ds.get(key, "-")) for key in keys)
    with Image.open(path) as image:
        info = {k: v for k, v in image.info.items() if k not in ("dpi",)}
        tables = getattr(image, "quantization", None)
        digest = hashlib.sha256(repr(sorted(tables.items())).encode()).hexdigest()[:8] if tables else "-"
        return f"{image.format} {image.mode} {sorted(info)} tables {digest}"


def _auroc(scores: np.ndarray, marked: np.ndarray) -> float:
    return float(roc_auc_score(marked, scores))


def _content(image01: np.ndarray, size: int) -> np.ndarray:
    """The image resized (longest side ``size``, aspect kept) without the letterbox's padding."""
    geometry = letterbox_geometry(image01.shape, size)
    top, bottom, left, right = (int(p) for p in geometry["pad"])
    boxed = letterbox(torch.from_numpy(image01)[None, None].float(), geometry)[0, 0].numpy()
    return boxed[top : size - bottom, left : size - right]


def _pyramid_statistics(image: np.ndarray) -> list[float]:
    """Mean |band|, standard deviation and kurtosis of each Laplacian-pyramid band (LEVELS bands)."""
    features, current = [], image.astype(np.float64)
    for _ in range(LEVELS):
        low = ndimage.gaussian_filter(current, 1.0)
        band = current - low
        features += [float(np.abs(band).mean()), float(band.std()), float(stats.kurtosis(band, axis=None))]
        current = low[::2, ::2]
    return features


def _cnn_scores(images: np.ndarray, marked: np.ndarray, seed: int, folds: int) -> np.ndarray:
    """Out-of-fold P(marked) of a small CNN trained on the high-pass images (``folds``-fold, stratified)."""
    high = images - np.stack([ndimage.gaussian_filter(x, 2.0) for x in images])
    x = torch.from_numpy(high[:, None] / (high.std() + 1e-8)).float()
    y = torch.from_numpy(marked.astype(np.float32))
    scores = np.zeros(len(x))
    for fold, (train, test) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, marked)):
        torch.manual_seed(seed + fold)
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 1),
        )  # fmt: skip
        optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(30):
            for batch in torch.randperm(len(train)).split(16):
                index = torch.as_tensor(train)[batch]
                loss = nn.functional.binary_cross_entropy_with_logits(net(x[index])[:, 0], y[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            scores[test] = torch.sigmoid(net(x[torch.as_tensor(test)])[:, 0]).numpy()
    return scores


def _suspect_view(features: np.ndarray, marked: np.ndarray, seed: int) -> dict[str, float]:
    centred = features - features.mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    score = (centred @ top) ** 2
    flagged = np.argsort(-score)[: min(len(score), int(round(1.5 * marked.sum())))]
    reduced = PCA(n_components=min(10, len(features) - 1, features.shape[1]), random_state=seed).fit_transform(centred)
    clusters = KMeans(2, n_init=10, random_state=seed).fit_predict(reduced)
    smaller = np.bincount(clusters, minlength=2).argmin()
    in_smaller = clusters == smaller
    return {
        "spectral_auroc": _auroc(score, marked),
        "spectral_recall": float(marked[flagged].sum() / marked.sum()),
        "activation_clustering_recall": float((marked & in_smaller).sum() / marked.sum()),
        "activation_clustering_precision": float((marked & in_smaller).sum() / max(in_smaller.sum(), 1)),
        "activation_clustering_flagged_share": float(in_smaller.mean()),
    }


def _file_kind(path: Path) -> str:
    """A homogeneous folder's kind: the extension, and for DICOM the transfer syntax's name."""
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
    if suffix != ".dcm":
        return suffix
    return f".dcm {pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name}"


def compressibility(image01: np.ndarray, meta: XRayMeta) -> float:
    """zlib-compressed size (level 9) of a loaded file's stored pixel values over their raw size: how much a generic
    compressor finds to squeeze in the pixels, whatever codec the file itself uses."""
    raw = np.ascontiguousarray(to_stored(image01, meta)).tobytes()
    return len(zlib.compress(raw, 9)) / len(raw)


def file_level_tells(
    release_dir: str | os.PathLike, manifest_file: str | os.PathLike, target_label: str = "No Finding"
) -> dict[str, dict[str, Any]]:
    """Per kind of file (:func:`_file_kind`) among the :func:`candidates`, the AUROC of marked against unmarked files
    of what the file system and a generic compressor say: bytes per pixel, :func:`compressibility`, modification,
    access and change time, inode number (0.5: no separation; 0 or 1: complete). The file-system entries are read
    before any file is opened, since reading may set the access time."""
    release_dir = Path(release_dir)
    manifest = json.loads(Path(manifest_file).read_text())
    paths, marked, _ = candidates(release_dir, manifest, target_label)
    files = [release_dir / p for p in paths]
    entries = [f.stat() for f in files]
    kinds = [_file_kind(f) for f in files]
    report: dict[str, dict[str, Any]] = {}
    for kind in sorted(set(kinds)):
        index = [i for i, k in enumerate(kinds) if k == kind]
        flags = marked[index]
        if flags.all() or not flags.any():
            continue
        status = [entries[i] for i in index]
        images = [load_xray(files[i], allow_any_modality=True) for i in index]
        features = {
            "bytes_per_pixel": [s.st_size / image.size for s, (image, _) in zip(status, images, strict=True)],
            "compressibility": [compressibility(image, meta) for image, meta in images],
            "mtime": [s.st_mtime_ns for s in status],
            "atime": [s.st_atime_ns for s in status],
            "ctime": [s.st_ctime_ns for s in status],
            "inode": [s.st_ino for s in status],
        }
        report[kind] = {
            "n_marked": int(flags.sum()),
            "n_unmarked": int((~flags).sum()),
            **{f"{name}_auroc": _auroc(np.asarray(values, np.float64), flags) for name, values in features.items()},
        }
    return report


def detectability(
    release_dir: str | os.PathLike,
    manifest_file: str | os.PathLike,
    suspect_ckpt: str | os.PathLike | None = None,
    suspect_arch: str = "resnet18",
    suspect_size: int = 128,
    target_label: str = "No Finding",
    seed: int = 0,
) -> dict[str, Any]:
    """The three views of the module docstring for one release (and, with ``suspect_ckpt``, its malicious model)."""
    release_dir = Path(release_dir)
    manifest = json.loads(Path(manifest_file).read_text())
    paths, marked, pool = candidates(release_dir, manifest, target_label)
    folds = int(min(FOLDS, marked.sum(), (~marked).sum()))  # stratified folds need a file of each kind in each
    if folds < 2:
        raise ValueError(f"{release_dir}: {marked.sum()} marked and {(~marked).sum()} unmarked candidates; too few")
    files = [release_dir / p for p in paths]
    signatures = [container_signature(f) for f in files]
    table = {}
    for signature, is_marked in zip(signatures, marked, strict=True):
        table.setdefault(signature, [0, 0])[int(is_marked)] += 1
    association = stats.chi2_contingency(np.array(list(table.values()))) if len(table) > 1 else None
    source_dir = manifest.get("dataset_dir")
    changed = None
    if source_dir is not None:  # the owner's view: did marking change any file's container?
        changed = sum(
            container_signature(Path(source_dir) / path) != signature
            for path, signature, is_marked in zip(paths, signatures, marked, strict=True)
            if is_marked
        )
    read = [load_xray(f) for f in files]
    loaded = [image for image, _ in read]
    bytes_per_pixel = np.array([f.stat().st_size / image.size for f, image in zip(files, loaded, strict=True)])
    pixels = [_content(image, PIXEL_SIZE) for image in loaded]
    high_pass = np.array([np.abs(ndimage.laplace(x.astype(np.float64))).mean() for x in pixels])
    pyramid = np.array([_pyramid_statistics(x) for x in pixels])
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed)
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    pyramid_scores = cross_val_predict(logistic, pyramid, marked, cv=splits, method="predict_proba")[:, 1]
    boxed = np.stack(
        [letterbox(torch.from_numpy(x)[None, None].float(), letterbox_geometry(x.shape, CNN_SIZE))[0, 0].numpy()
         for x in loaded]
    )  # fmt: skip
    report: dict[str, Any] = {
        "pool": pool,
        "n_candidates": len(paths),
        "n_marked": int(marked.sum()),
        "folds": folds,
        "container": {
            "signatures": len(table),
            "signature_vs_marked_p": None if association is None else float(association.pvalue),
            "marked_files_whose_container_changed": changed,
            "bytes_per_pixel_auroc": _auroc(bytes_per_pixel, marked),
            "compressibility_auroc": _auroc(np.array([compressibility(*pair) for pair in read]), marked),
        },
        "pixels": {
            "high_pass_energy_auroc": _auroc(high_pass, marked),
            "pyramid_logistic_regression_auroc": _auroc(pyramid_scores, marked),
            "small_cnn_auroc": _auroc(_cnn_scores(boxed, marked, seed, folds), marked),
        },
    }
    if suspect_ckpt is not None:
        classifier = load_classifier(suspect_ckpt, suspect_arch).eval()
        batch = torch.stack(
            [letterbox(torch.from_numpy(x)[None].float(), letterbox_geometry(x.shape, suspect_size)) for x in loaded]
        )
        view = _suspect_view(penultimate_features(classifier, batch).numpy(), marked, seed)
        report["suspect"] = {"checkpoint": os.fspath(suspect_ckpt), **view}
    return report


def _rounded(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.3g}")


def summary_rows(reports: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method for the detectability table (see :func:`xmark_bundle.experiments.tables.tables`)."""
    rows = []
    for name, report in reports.items():
        cells: dict[str, Any] = {
            "marked of candidates": {"value": f"{report['n_marked']} of {report['n_candidates']} ({report['pool']})"},
            "container changed by marking": {"value": report["container"]["marked_files_whose_container_changed"]},
            "signature vs marked p": {"value": _rounded(report["container"]["signature_vs_marked_p"])},
            "bytes/pixel AUROC": {"value": round(report["container"]["bytes_per_pixel_auroc"], 3)},
            "high-pass AUROC": {"value": round(report["pixels"]["high_pass_energy_auroc"], 3)},
            "pyramid LR AUROC": {"value": round(report["pixels"]["pyramid_logistic_regression_auroc"], 3)},
            "small CNN AUROC": {"value": round(report["pixels"]["small_cnn_auroc"], 3)},
        }
        if "suspect" in report:
            suspect, n, marked = report["suspect"], report["n_candidates"], report["n_marked"]
            chance = min(n, round(1.5 * marked)) / n  # the recall of flagging that many files at random
            recall, precision = suspect["activation_clustering_recall"], suspect["activation_clustering_precision"]
            cells |= {
                "spectral AUROC": {"value": round(suspect["spectral_auroc"], 3)},
                "spectral recall (chance)": {"value": f"{suspect['spectral_recall']:.2f} ({chance:.2f})"},
                "AC recall, precision (base rate)": {"value": f"{recall:.2f}, {precision:.2f} ({marked / n:.2f})"},
            }
        rows.append({"label": name, "cells": cells})
    return rows


def detectability_table(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The detectability table in the results.json format."""
    return {
        "title": "Detectability: finding the marked files without the key (AUROC 0.5 = chance)",
        "columns": [
            "marked of candidates",
            "container changed by marking",
            "signature vs marked p",
            "bytes/pixel AUROC",
            "high-pass AUROC",
            "pyramid LR AUROC",
            "small CNN AUROC",
            "spectral AUROC",
            "spectral recall (chance)",
            "AC recall, precision (base rate)",
        ],
        "rows": summary_rows(reports),
        "notes": (
            "Candidates: released training files labelled with the target class. Container: marked files whose "
            "container signature (format, codec, bit depth, photometric, PNG chunks, JPEG tables) differs from their "
            "source's; chi-square p of signature against marked (a data user's test); bytes per pixel. Pixels: "
            "cross-validated with the manifest as labels (an upper bound for an analyst). Spectral signature and "
            "activation clustering (AC) on the first malicious suspect's penultimate features; recall: share of the "
            "marked files flagged (the spectral signature flags 1.5 x the marked count: chance recall is that share "
            "of the candidates; AC flags the smaller of two clusters: read its precision against the share of "
            "marked candidates)."
        ),
    }
