"""Synthetic chest radiographs with CheXpert-style labels: the bundle's offline demo data set.

Each phantom is a frontal (PA/AP convention: the patient's left on the image's right) radiograph built from an
attenuation model: body soft tissue, air-filled lungs, mediastinum and heart, diaphragm domes, ribs, clavicles,
spine, humeral heads and bronchovascular markings. The five findings replace lung air by fluid or tissue in
clinically shaped patterns. Bright means attenuation in the returned ``[0, 1]`` image (bone, heart, fluid bright;
lungs dark). Anatomy is drawn at a reduced resolution, upsampled smoothly, then full-resolution quantum noise is
added. Everything is a pure function of the random generator, so a seed reproduces every byte.

Label prevalences follow CheXpert's frontal training images (``chexpert_train.csv`` in torchxrayvision, 191,027
rows): see :data:`TARGET_PREVALENCE`. ``No Finding`` is derived (1 when none of the five is positive or uncertain);
in CheXpert that holds for 23 % of frontal images, of which only 38 % are marked ``No Finding`` because other
findings (devices, opacities) exclude it, so the phantoms carry ``No Finding`` about 2.5 times as often (~0.22).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage, optimize, special

from ..fileio import atomic_path
from .labels import LABELS

__all__ = [
    "CHEXPERT_COLUMNS",
    "FAMILIES",
    "FINDINGS",
    "MASK_DIR",
    "SEG_DATALIST",
    "TARGET_PREVALENCE",
    "Anatomy",
    "label_prevalence",
    "mask_path",
    "render_phantom",
    "sample_anatomy",
    "sample_labels",
    "write_phantom_dataset",
]

#: CheXpert's CSV header, in its order.
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: Phantom families: this module's renderer and :mod:`xmark_bundle.data.radiograph_chain`'s imaging chain.
FAMILIES: tuple[str, ...] = ("classic", "physical")

#: The five rendered findings; ``No Finding`` is derived from them.
FINDINGS: tuple[str, ...] = LABELS[1:]

#: (positive, uncertain) share per finding, measured on CheXpert's frontal training images.
TARGET_PREVALENCE: dict[str, tuple[float, float]] = {
    "Atelectasis": (0.156, 0.156),
    "Cardiomegaly": (0.122, 0.035),
    "Consolidation": (0.068, 0.128),
    "Edema": (0.260, 0.062),
    "Pleural Effusion": (0.403, 0.050),
}

#: Share of absent findings written as 0.0 rather than blank (CheXpert frontal train).
_EXPLICIT_NEGATIVE: dict[str, float] = {
    "Atelectasis": 0.007,
    "Cardiomegaly": 0.049,
    "Consolidation": 0.128,
    "Edema": 0.122,
    "Pleural Effusion": 0.241,
}

# Loadings of each finding's score on two latent factors (general illness, cardiac/fluid overload); they give
# CheXpert-like positive correlations, strongest for Edema with Cardiomegaly and Pleural Effusion.
_LOADINGS: dict[str, tuple[float, float]] = {
    "Atelectasis": (0.7, 0.0),
    "Cardiomegaly": (0.0, 1.1),
    "Consolidation": (0.6, 0.0),
    "Edema": (0.4, 1.0),
    "Pleural Effusion": (0.8, 0.6),
}
_STUDY_CORRELATION = 0.8  # correlation of the latent factors between studies of one patient
_IMAGES_PER_PATIENT = (0.6, 0.25, 0.15)  # P(1, 2, 3 frontal images); CheXpert: 0.51, 0.18, 0.09, 0.22 for >= 4
_AP_SHARE = 0.846
_MALE_SHARE = 0.587
_GH_NODES, _GH_WEIGHTS = special.roots_hermitenorm(64)
_GH_WEIGHTS = _GH_WEIGHTS / _GH_WEIGHTS.sum()

#: Folder (under a phantom data set) of the lung masks, apart from the images.
MASK_DIR = "masks"
#: Name of the lung-segmentation datalist that :func:`write_phantom_dataset` writes with ``masks``.
SEG_DATALIST = "seg_datalist.json"

_SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def _logistic_mean(sigma: float, threshold: float) -> float:
    """E[sigmoid(sigma * z - threshold)] for z ~ N(0, 1): the share of scores above ``threshold``."""
    return float(np.dot(_GH_WEIGHTS, special.expit(sigma * _GH_NODES - threshold)))


def _calibrate_thresholds() -> dict[str, tuple[float, float]]:
    """Score thresholds (positive, uncertain) per finding that reproduce :data:`TARGET_PREVALENCE`."""
    thresholds = {}
    for name, (pos, unc) in TARGET_PREVALENCE.items():
        sigma = float(np.hypot(*_LOADINGS[name]))
        t_pos = optimize.brentq(lambda t, s=sigma, p=pos: _logistic_mean(s, t) - p, -20, 20)
        t_unc = optimize.brentq(lambda t, s=sigma, p=pos + unc: _logistic_mean(s, t) - p, -20, 20)
        thresholds[name] = (t_pos, t_unc)
    return thresholds


_THRESHOLDS = _calibrate_thresholds()


def sample_labels(rng: np.random.Generator, patient_latent: np.ndarray | None = None) -> dict[str, float | None]:
    """One study's CheXpert values for :data:`LABELS`: 1.0, 0.0, -1.0 or None (blank).

    Each finding's score is a loading-weighted sum of two latent factors plus logistic noise, cut at thresholds
    calibrated to :data:`TARGET_PREVALENCE`. ``patient_latent`` (two values) correlates studies of one patient.
    """
    latent = rng.standard_normal(2)
    if patient_latent is not None:
        latent = _STUDY_CORRELATION * np.asarray(patient_latent) + np.sqrt(1 - _STUDY_CORRELATION**2) * latent
    values: dict[str, float | None] = {}
    for name in FINDINGS:
        score = float(np.dot(_LOADINGS[name], latent)) + rng.logistic()
        explicit_negative = rng.random() < _EXPLICIT_NEGATIVE[name]
        t_pos, t_unc = _THRESHOLDS[name]
        values[name] = 1.0 if score > t_pos else -1.0 if score > t_unc else 0.0 if explicit_negative else None
    healthy = all(v is None or v == 0.0 for v in values.values())
    return {"No Finding": 1.0 if healthy else None, **values}


def label_prevalence(label_rows: list[Mapping[str, float | None]]) -> dict[str, dict[str, float]]:
    """Share of positive (1.0) and uncertain (-1.0) values per label over ``label_rows``."""
    count = max(len(label_rows), 1)
    return {
        name: {
            "positive": sum(row[name] == 1.0 for row in label_rows) / count,
            "uncertain": sum(row[name] == -1.0 for row in label_rows) / count,
        }
        for name in LABELS
    }


@dataclass(frozen=True)
class Anatomy:
    """A patient's habitus, shared by all of their studies.

    Lengths are frame units (1 = image height at pose scale 1; Y grows downwards from mid-thorax); ``dome_right``
    and ``dome_left`` are the patient's sides (image left and right); ``heart_ctr`` is the cardiothoracic ratio.
    """

    thorax_half_width: float
    apex: float
    apex_offset: float
    dome_right: float
    dome_left: float
    dome_depth: float
    heart_ctr: float
    heart_height: float
    heart_shear: float
    mediastinum_half_width: float
    aortic_knob: float
    fat: float
    rib_spacing: float
    rib_curvature: float
    gastric_bubble: float
    vessel_seed: int


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a plausible adult habitus (normal cardiothoracic ratio 0.38-0.46, right dome higher than the left)."""
    dome_right = rng.uniform(0.17, 0.23)
    return Anatomy(
        thorax_half_width=rng.uniform(0.31, 0.36),
        apex=rng.uniform(-0.36, -0.31),
        apex_offset=rng.uniform(0.11, 0.14),
        dome_right=dome_right,
        dome_left=dome_right + rng.uniform(0.0, 0.035),
        dome_depth=rng.uniform(0.06, 0.09),
        heart_ctr=rng.uniform(0.38, 0.46),
        heart_height=rng.uniform(0.2, 0.24),
        heart_shear=rng.uniform(0.08, 0.22),
        mediastinum_half_width=rng.uniform(0.045, 0.06),
        aortic_knob=rng.uniform(0.015, 0.03),
        fat=rng.uniform(0.03, 0.09),
        rib_spacing=rng.uniform(0.05, 0.058),
        rib_curvature=rng.uniform(1.2, 1.8),
        gastric_bubble=rng.uniform(0.0, 0.9),
        vessel_seed=int(rng.integers(2**31)),
    )


def _ramp(value: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 (value << 0) to 1 (value >> 0) over ``width``: anti-aliased masks."""
    return np.clip(0.5 + value / width, 0.0, 1.0)


def _severity(value: float | None, rng: np.random.Generator) -> float:
    """How strongly to draw a finding: positives fully, uncertain ones mildly, absent (0 or blank) not at all."""
    if value == 1.0:
        return rng.uniform(0.75, 1.0)
    if value == -1.0:
        return rng.uniform(0.3, 0.45)
    return 0.0


class _Frame:
    """Low-resolution sampling grid in frame coordinates: X to the image right, Y down, origin mid-thorax."""

    def __init__(self, shape: tuple[int, int], pose: dict[str, float]) -> None:
        self.shape, self.pose = shape, pose
        rows, cols = shape
        y = (np.arange(rows, dtype=np.float32) + 0.5) / rows
        x = (np.arange(cols, dtype=np.float32) + 0.5 - cols / 2) / rows
        dx, dy = x[None, :] - pose["cx"], y[:, None] - pose["cy"]
        cos, sin, scale = np.cos(pose["tilt"]), np.sin(pose["tilt"]), pose["scale"]
        self.X = ((cos * dx + sin * dy) / scale).astype(np.float32)
        self.Y = ((-sin * dx + cos * dy) / scale).astype(np.float32)
        self.pixel = 1.0 / (rows * scale)  # one grid pixel in frame units

    def to_index(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid (row, col) of frame points: the inverse of the mapping in ``__init__``."""
        rows, cols = self.shape
        pose = self.pose
        cos, sin, scale = np.cos(pose["tilt"]), np.sin(pose["tilt"]), pose["scale"]
        dx = scale * (cos * X - sin * Y)
        dy = scale * (sin * X + cos * Y)
        return (dy + pose["cy"]) * rows - 0.5, (dx + pose["cx"] + cols / (2 * rows)) * rows - 0.5


def _splat_paths(frame: _Frame, points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Accumulate weighted frame points (N, 2: X, Y) into the grid with bilinear weights."""
    rows, cols = frame.shape
    r, c = frame.to_index(points[:, 0], points[:, 1])
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    fr, fc = r - r0, c - c0
    grid = np.zeros(rows * cols, dtype=np.float32)
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        np.add.at(grid, rr[ok] * cols + cc[ok], (weights * w)[ok])
    return grid.reshape(rows, cols)


def _branches(
    rng: np.random.Generator, start: tuple[float, float], angles: np.ndarray, length: float, steps: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """Gently curving random paths from ``start`` along ``angles`` (radians, 0 = +X, pi/2 = +Y).

    Returns (points (N, 2), fraction along the path in [0, 1]) for splatting tapering vessel- or bronchus-like lines.
    """
    n = len(angles)
    turn = np.cumsum(rng.normal(0, 0.06, (n, steps)), axis=1) + angles[:, None]
    lengths = length * rng.uniform(0.6, 1.0, (n, 1))
    step = lengths / steps
    X = start[0] + np.cumsum(step * np.cos(turn), axis=1)
    Y = start[1] + np.cumsum(step * np.sin(turn), axis=1)
    frac = np.broadcast_to(np.linspace(0, 1, steps, dtype=np.float32), (n, steps))
    return np.stack([X.ravel(), Y.ravel()], axis=1), frac.ravel()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise: blotchy texture with blobs about ``sigma`` pixels wide."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    return field / (field.std() + 1e-6)


@dataclass(frozen=True)
class _Geometry:
    """Per-image geometry after findings that move anatomy: dome heights, mediastinal shift and the heart ellipse."""

    domes: dict[float, float]
    shift: float
    atelectasis_side: float
    heart: tuple[float, float, float, float, float]  # centre X, centre Y, half-width, half-height, shear


def _geometry(a: Anatomy, sev: dict[str, float], rngs: dict[str, np.random.Generator]) -> _Geometry:
    """Move the anatomy for the findings that change it: atelectatic volume loss and cardiomegaly."""
    rng = rngs["Atelectasis"]
    side = 1.0 if rng.random() < 0.5 else -1.0
    domes = {-1.0: a.dome_right, 1.0: a.dome_left}
    domes[side] -= sev["Atelectasis"] * rng.uniform(0.05, 0.09)  # raised hemidiaphragm
    shift = side * sev["Atelectasis"] * rng.uniform(0.01, 0.025)  # mediastinum pulled towards the collapse
    enlarged = sev["Cardiomegaly"] * rngs["Cardiomegaly"].uniform(0.17, 0.24)
    # A sheared ellipse centred on the domes (its lower half hidden by the abdomen), apex towards the image right.
    # Its widest horizontal extent, sqrt(width^2 + (shear * height)^2), is the cardiothoracic ratio times W.
    half_extent = (a.heart_ctr + enlarged) * a.thorax_half_width
    height = a.heart_height * (1.0 + 0.5 * enlarged)
    half_width = np.sqrt(max(half_extent**2 - (a.heart_shear * height) ** 2, 1e-4))
    centre_y = 0.5 * (domes[-1.0] + domes[1.0]) + 0.01
    return _Geometry(domes, shift, side, (0.3 * half_extent + shift, centre_y, half_width, height, a.heart_shear))


def _dome(Xs: np.ndarray, W: float, top: float, depth: float) -> np.ndarray:
    """Diaphragm height (frame Y) along the hemithorax: peak at 45 % of its width, costophrenic angle at ``W``."""
    peak = 0.45 * W
    Xs = np.minimum(Xs, W)
    lateral = depth * ((Xs - peak) / (W - peak)) ** 2
    medial = 0.2 * depth * ((peak - Xs) / peak) ** 2
    return top + np.where(Xs > peak, lateral, medial)


def _lungs(
    frame: _Frame, a: Anatomy, g: _Geometry
) -> tuple[np.ndarray, dict[float, np.ndarray], np.ndarray, np.ndarray]:
    """Soft masks of the lungs, each hemithorax (lung space without the diaphragm cut), the abdomen and the heart."""
    X, Y, px, W = frame.X, frame.Y, frame.pixel, a.thorax_half_width
    hx, hy, hw, hh, shear = g.heart
    u, v = (X - hx - shear * (Y - hy)) / hw, (Y - hy) / hh
    heart = _ramp(1.0 - np.sqrt(u * u + v * v), 1.5 * px / hw)
    lung = np.zeros(frame.shape, np.float32)
    abdomen = np.zeros(frame.shape, np.float32)
    hemithorax = {}
    for side in (-1.0, 1.0):
        Xs = side * (X - g.shift)
        # Lateral wall: an egg-shaped arc from the apex (at a.apex_offset from the midline) to the costophrenic angle.
        cp = g.domes[side] + a.dome_depth
        sx = np.where(Xs > a.apex_offset, W - a.apex_offset, a.apex_offset)
        sy = cp - a.apex
        shape_ = np.abs((Xs - a.apex_offset) / sx) ** 2.3 + (np.minimum(Y - cp, 0) / sy) ** 2
        outer = _ramp(1.0 - shape_, 3 * px / W)
        knob = a.aortic_knob * np.exp(-(((Y + 0.14) / 0.04) ** 2)) if side > 0 else 0.0
        medial = _ramp(Xs - a.mediastinum_half_width - knob, 1.5 * px)
        dome = _dome(Xs, W, g.domes[side], a.dome_depth)
        hemithorax[side] = outer * medial
        lung += hemithorax[side] * _ramp(dome - Y, 1.5 * px)
        abdomen += (Xs >= 0) * _ramp(Y - dome, 2 * px) * _ramp(W + 0.01 - Xs, 0.04)
    # Gastric air bubble under the left hemidiaphragm (image right).
    bubble_y = _dome(np.float32(0.55 * W), W, g.domes[1.0], a.dome_depth) + 0.045
    bubble = np.exp(-(((((X - g.shift) - 0.55 * W) / 0.06) ** 2 + ((Y - bubble_y) / 0.03) ** 2) ** 2))
    abdomen = np.clip(abdomen, 0, 1) * (1.0 - a.gastric_bubble * bubble)
    return np.clip(lung, 0, 1), hemithorax, abdomen, heart


def _markings(frame: _Frame, a: Anatomy, g: _Geometry) -> np.ndarray:
    """Bronchovascular markings: tapering branches fanning out from each hilum, plus the hilar shadows."""
    X, Y, px, W = frame.X, frame.Y, frame.pixel, a.thorax_half_width
    rng = np.random.default_rng(a.vessel_seed)
    points, weights = [], []
    for side in (-1.0, 1.0):
        # Trunks from the hilum, then side branches starting part-way along them, all thinning outwards.
        hilum = (side * 0.26 * W + g.shift, -0.03)
        angles = np.where(side > 0, 0.0, np.pi) + side * rng.uniform(-1.3, 1.5, 14)
        pts, frac = _branches(rng, hilum, angles, length=0.85 * W)
        # Spread the trunks' origins over the hilum (points are stored path by path, 48 steps each).
        pts = pts + rng.normal(0, [0.015, 0.03], (14, 1, 2)).repeat(len(pts) // 14, axis=1).reshape(-1, 2)
        points.append(pts)
        weights.append(2.0 * (1 - frac) ** 1.5)
        starts = pts[rng.integers(len(pts), size=60)]
        for start in starts:
            fan = np.arctan2(start[1] - hilum[1], start[0] - hilum[0]) + rng.uniform(-0.6, 0.6, 1)
            sub, sub_frac = _branches(rng, (start[0], start[1]), fan, length=0.3 * W, steps=16)
            points.append(sub)
            weights.append(1.0 * (1 - sub_frac))
    vessels = _splat_paths(frame, np.concatenate(points), np.concatenate(weights))
    width = 0.0025 / px
    vessels = ndimage.gaussian_filter(vessels, max(width, 0.7)) * max(width, 0.7) * 0.35
    for side in (-1.0, 1.0):
        hilar = np.exp(-(((X - side * 0.25 * W - g.shift) / 0.045) ** 2 + ((Y + 0.03) / 0.08) ** 2))
        vessels += 0.25 * hilar
    return vessels


def _soft_tissue(frame: _Frame, a: Anatomy, abdomen: np.ndarray) -> np.ndarray:
    """Soft-tissue path length: elliptic torso (wider at the shoulders) under sloping shoulders, neck, abdomen."""
    X, Y, px, W = frame.X, frame.Y, frame.pixel, a.thorax_half_width
    half_body = W + a.fat + 0.03 + 0.05 * np.exp(-(((Y - a.apex) / 0.12) ** 2))
    shoulder = a.apex - 0.11 + 0.35 * np.clip(np.abs(X) - 0.07, 0, None) ** 1.2
    torso = _ramp(Y - shoulder, 3 * px) * np.clip(1 - (X / half_body) ** 2, 0, 1) ** 0.7
    flare = 0.3 * np.clip(Y - a.apex + 0.2, 0, 0.2) ** 2
    neck = np.sqrt(np.clip(1 - (X / (0.085 + flare)) ** 2, 0, 1)) * _ramp(a.apex - Y, 0.05)
    return np.maximum(torso, 0.75 * neck) * (1.0 + 0.3 * abdomen)


def _rib_cage_edge(Y: np.ndarray, a: Anatomy, g: _Geometry, side: float) -> np.ndarray:
    """Lateral edge of a hemithorax (|X| from the midline) at height ``Y``: the egg-shaped arc of the lung."""
    W, offset = a.thorax_half_width, a.apex_offset
    cp = g.domes[side] + a.dome_depth
    t = np.clip(1 - (np.minimum(Y - cp, 0) / (cp - a.apex)) ** 2, 0, 1)
    return offset + (W - offset) * t ** (1 / 2.3)


def _bones(frame: _Frame, a: Anatomy, g: _Geometry) -> np.ndarray:
    """Attenuation of ribs, clavicles, spine and humeral heads."""
    X, Y, px, W = frame.X, frame.Y, frame.pixel, a.thorax_half_width
    bone = np.zeros(frame.shape, np.float32)
    for side in (-1.0, 1.0):
        Xs = side * X
        edge = _rib_cage_edge(Y - 0.02, a, g, side) + 0.022
        within = _ramp(Xs - 0.05, 2 * px) * _ramp(edge - Xs, 3 * px)
        # Posterior ribs: integer level sets of a phase field are rib lower edges; the upper ribs curve more.
        y0 = a.apex - 0.05
        curvature = a.rib_curvature * (1.0 + 1.2 * np.clip(1 - (Y - y0) / 0.2, 0, 1))
        phase = (Y - y0 - curvature * ((Xs - 0.09) ** 2 - 0.0081)) / a.rib_spacing
        index, frac = np.divmod(phase, 1.0)
        soft_edge = 1.5 * px / a.rib_spacing
        inside = np.minimum(frac, 0.42 - frac)
        cortex = 1.0 + 0.6 * _ramp(1.5 * soft_edge - inside, soft_edge)
        bone += 0.075 * _ramp(inside, soft_edge) * cortex * ((index >= 0) & (index < 11)) * within
        # Anterior ribs: fainter bands descending from the lateral wall towards the sternum.
        aphase = (Y - a.apex - 0.01 - 0.55 * (edge - Xs) - 0.8 * (edge - Xs) ** 2) / (1.15 * a.rib_spacing)
        aindex, afrac = np.divmod(aphase, 1.0)
        aband = _ramp(np.minimum(afrac, 0.38 - afrac), 1.5 * px / a.rib_spacing)
        bone += 0.04 * aband * ((aindex >= 0) & (aindex < 6)) * within * _ramp(Xs - 0.13, 0.04)
        # Clavicle: an S-shaped bar from the sternal end up to the acromion.
        t = (Xs - 0.035) / (W + 0.02)
        cy = a.apex + 0.07 - 0.08 * t + 0.015 * np.sin(2 * np.pi * t)
        dist = np.abs(Y - cy)
        clavicle = _ramp(0.016 - dist, 1.5 * px) * _ramp(t, 0.03) * _ramp(1 - t, 0.03)
        bone += 0.3 * clavicle * (1 + 0.4 * _ramp(dist - 0.01, 2 * px))
        # Humeral head at the shoulder.
        head = np.clip(1 - np.hypot(Xs - (W + 0.075), Y - a.apex - 0.01) / 0.05, 0, 1)
        bone += 0.3 * np.sqrt(head)
    # Spine: vertebral bodies with darker disc spaces, seen through the mediastinum.
    sx = X - 0.3 * g.shift
    column = _ramp(0.042 - np.abs(sx), 2 * px)
    level = (Y - a.apex) / 0.058
    discs = 0.8 + 0.2 * np.clip(3 * np.cos(2 * np.pi * level), -1, 1)
    pedicle = np.hypot((np.abs(sx) - 0.03) / 0.009, (level - np.round(level) - 0.15) / 0.14)
    bone += column * 0.13 * discs + 0.04 * _ramp(1 - pedicle, 0.4)
    return bone


def _findings(
    frame: _Frame,
    a: Anatomy,
    g: _Geometry,
    sev: dict[str, float],
    rngs: dict[str, np.random.Generator],
    hemithorax: dict[float, np.ndarray],
) -> np.ndarray:
    """Share of lung air replaced by fluid or tissue (0 = aerated, 1 = soft-tissue dense) by the five findings."""
    X, Y, px, W = frame.X, frame.Y, frame.pixel, a.thorax_half_width
    keep = np.ones(frame.shape, np.float32)  # product of (1 - fill) over the findings

    if sev["Pleural Effusion"]:
        rng, s = rngs["Pleural Effusion"], sev["Pleural Effusion"]
        sides = (-1.0, 1.0) if rng.random() < 0.45 else (float(rng.choice([-1.0, 1.0])),)
        for side in sides:
            Xs = side * (X - g.shift)
            level = g.domes[side] + a.dome_depth - s * rng.uniform(0.15, 0.35)
            # Meniscus: concave upwards, climbing along the lateral chest wall; fluid densest at the bottom.
            surface = level - s * rng.uniform(0.07, 0.12) * np.clip((Xs - 0.3 * W) / (0.7 * W), 0, 1.1) ** 2
            fluid = _ramp(Y - surface, 0.015) * np.clip(0.75 + 4 * (Y - surface), 0, 1)
            keep *= 1.0 - fluid * hemithorax[side]

    if sev["Edema"]:
        rng, s = rngs["Edema"], sev["Edema"]
        patchy = 0.8 + 0.2 * _smooth_noise(rng, frame.shape, 0.015 / px)
        wings = np.zeros(frame.shape, np.float32)
        for side in (-1.0, 1.0):
            cx = side * rng.uniform(0.38, 0.5) * W + g.shift
            cy = rng.uniform(-0.04, 0.03)
            rx, ry = rng.uniform(0.45, 0.6) * W, rng.uniform(0.14, 0.19)
            wings = np.maximum(wings, np.exp(-((((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2) ** 1.5)))
        edema = s * (rng.uniform(0.55, 0.85) * wings + 0.15 * _ramp(Y + 0.1, 0.4)) * patchy
        # Kerley B lines: short horizontal septal lines reaching the pleura at the lung bases.
        for side in (-1.0, 1.0):
            Xs = side * (X - g.shift)
            for ly in rng.uniform(g.domes[side] - 0.14, g.domes[side] + 0.02, int(8 * s)):
                length = rng.uniform(0.02, 0.04)
                line = _ramp(Xs - (W - length), px) * _ramp(0.0035 - np.abs(Y - ly), px)
                edema += 0.5 * s * line
        keep *= 1.0 - np.clip(edema, 0, 0.95)

    if sev["Consolidation"]:
        rng, s = rngs["Consolidation"], sev["Consolidation"]
        side = float(rng.choice([-1.0, 1.0]))
        zone = int(rng.choice(3, p=[0.4, 0.35, 0.25]))  # upper, middle, lower zone
        cy = (a.apex + 0.14, -0.03, g.domes[side] - 0.08)[zone] + rng.uniform(-0.02, 0.02)
        cx = side * rng.uniform(0.5, 0.72) * W + g.shift
        r = (0.05 + 0.09 * s) * rng.uniform(0.9, 1.2)
        rx, ry = r * rng.uniform(1.0, 1.3), r * rng.uniform(0.75, 1.0)
        blob = np.exp(-(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2))
        # Blotchy margins around a confluent core.
        edge = _ramp(blob * (1.0 + 0.3 * _smooth_noise(rng, frame.shape, 0.015 / px)) - 0.3, 0.3)
        dense = np.maximum(edge, _ramp(blob - 0.45, 0.2))
        if zone == 0 and side < 0:  # right upper lobe: sharp lower border along the horizontal fissure
            dense *= _ramp(cy + 0.6 * ry - Y, 1.5 * px)
        # Air bronchograms: aerated, tapering bronchi running through the opacity away from the hilum.
        hilum = (side * 0.27 * W + g.shift, -0.03)
        tubes = np.zeros(frame.shape, np.float32)
        for angle in np.arctan2(cy - hilum[1], cx - hilum[0]) + rng.uniform(-0.35, 0.35, 3):
            dx, dy = X - hilum[0], Y - hilum[1]
            t = (dx * np.cos(angle) + dy * np.sin(angle)) / (np.hypot(cx - hilum[0], cy - hilum[1]) + r)
            across = np.abs(-dx * np.sin(angle) + dy * np.cos(angle))
            radius = 0.003 * (1.2 - t)
            tubes = np.maximum(tubes, _ramp(radius - across, 1.2 * px) * _ramp(t, 0.05) * _ramp(1 - t, 0.05))
        keep *= 1.0 - s * 0.97 * dense * (1.0 - 0.3 * tubes * _ramp(blob - 0.5, 0.2))

    if sev["Atelectasis"]:
        rng, s, side = rngs["Atelectasis"], sev["Atelectasis"], g.atelectasis_side
        # Plate-like (discoid) atelectasis: thin, nearly horizontal bands above the raised hemidiaphragm.
        for _ in range(1 + int(rng.random() < s) + int(rng.random() < 0.3 * s)):
            ly = g.domes[side] - rng.uniform(0.05, 0.14)
            cx = side * rng.uniform(0.55, 0.72) * W + g.shift
            half_length = rng.uniform(0.09, 0.14) * (0.6 + 0.4 * s)
            half_thick = rng.uniform(0.009, 0.016) * (0.6 + 0.4 * s)
            ang = rng.uniform(-0.25, 0.25)
            along = ((X - cx) * np.cos(ang) + (Y - ly) * np.sin(ang)) / half_length
            across = -(X - cx) * np.sin(ang) + (Y - ly) * np.cos(ang)
            band = _ramp(half_thick - np.abs(across), 1.5 * px) * np.clip(1 - along**4, 0, 1)
            keep *= 1.0 - 0.95 * s * band
        # Lobar collapse in half of the cases: a dense wedge against the mediastinum with a sharp, displaced fissure.
        if rng.random() < 0.5:
            Xs = side * (X - g.shift) - a.mediastinum_half_width
            if rng.random() < 0.5:  # lower lobe: a "sail" widening from the hilum down to the medial dome
                t = np.clip((Y + 0.03) / (g.domes[side] + 0.03), 0, 1)
                wedge = _ramp(rng.uniform(0.25, 0.4) * W * t - Xs, 1.5 * px) * _ramp(Y + 0.03, 2 * px)
            else:  # upper lobe: a triangle above the elevated fissure, which climbs from the hilum to the apex
                wedge = _ramp(-0.04 - rng.uniform(0.7, 1.1) * Xs - Y, 1.5 * px)
            keep *= 1.0 - 0.9 * s * wedge * (Xs > -a.mediastinum_half_width)

    return 1.0 - keep


def _attenuation(
    labels: Mapping[str, float | None],
    anatomy: Anatomy,
    pose: dict[str, float],
    finding_rngs: dict[str, np.random.Generator],
    shape: tuple[int, int],
    texture_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation map (>= 0, central soft tissue ~1) of one phantom on a low-resolution grid of ``shape``, and its
    soft lung field (the aerated lung space outside the heart's silhouette, in [0, 1]) on the same grid."""
    frame = _Frame(shape, pose)
    sev = {name: _severity(labels.get(name), finding_rngs[name]) for name in FINDINGS}
    geometry = _geometry(anatomy, sev, finding_rngs)
    lung, hemithorax, abdomen, heart = _lungs(frame, anatomy, geometry)
    # Lung depth grows from the pleura inwards; the heart displaces most of the air in front of and behind it.
    depth = ndimage.distance_transform_edt(lung > 0.5).astype(np.float32) * frame.pixel
    air = (1.0 - np.exp(-depth / 0.03)) * lung * (1.0 - 0.92 * heart)
    fill = _findings(frame, anatomy, geometry, sev, finding_rngs, hemithorax)
    markings = _markings(frame, anatomy, geometry)
    soft = _soft_tissue(frame, anatomy, abdomen)
    texture = _smooth_noise(texture_rng, shape, 0.004 / frame.pixel)
    trachea = _ramp(0.011 - np.abs(frame.X - 0.4 * geometry.shift), 1.5 * frame.pixel) * _ramp(-0.1 - frame.Y, 0.02)
    aerated = air * (1.0 - fill)
    attenuation = np.clip(
        soft * (1.0 + 0.02 * texture)
        - pose["lung_contrast"] * aerated
        + markings * aerated
        + _bones(frame, anatomy, geometry)
        - 0.3 * trachea * soft,
        0.0,
        None,
    )
    return attenuation, lung * (1.0 - heart)


def _pose(rng: np.random.Generator, shape: tuple[int, int]) -> dict[str, float]:
    """Patient position and exposure of one image: centre, scale (fitting the thorax), tilt, lung contrast, gamma."""
    height, width = shape
    half_width = width / (2 * height)
    scale = min(rng.uniform(0.9, 1.08), (half_width - 0.01) / 0.4)
    return {
        "cx": rng.uniform(-0.03, 0.03) * half_width,
        "cy": rng.uniform(0.42, 0.48),
        "scale": scale,
        "tilt": rng.uniform(-0.04, 0.04),
        "lung_contrast": rng.uniform(0.7, 0.85),
        "exposure": rng.uniform(1.3, 1.8),
        "gamma": rng.uniform(0.85, 1.15),
        "noise": rng.uniform(0.0015, 0.004),
    }


def render_phantom(
    labels: Mapping[str, float | None],
    rng: np.random.Generator,
    shape: tuple[int, int],
    anatomy: Anatomy | None = None,
    render_size: int = 512,
    return_lung_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A synthetic frontal chest radiograph (H, W) float32 in [0, 1], bright = attenuation, with ``labels`` drawn.

    The draw order from ``rng`` does not depend on ``labels``: the same generator state renders the same patient,
    pose and noise with and without a finding. ``anatomy`` (default: drawn from ``rng``) fixes the patient's
    habitus across studies; anatomy is rendered with its long side at ``render_size`` px, then upsampled.
    ``return_lung_mask`` also returns the lung field drawn (lungs without the heart's silhouette; fluid-filled lung
    stays lung) as a (H, W) uint8 mask of 0/1 on the image's grid; it draws nothing more from ``rng``.
    """
    height, width = (int(v) for v in shape)
    if height < 16 or width < 16:
        raise ValueError(f"Phantom shape {shape} is too small; both sides must be >= 16 px.")
    anatomy = sample_anatomy(rng) if anatomy is None else anatomy
    pose = _pose(rng, (height, width))
    finding_rngs = {name: np.random.default_rng(rng.integers(2**63)) for name in FINDINGS}
    texture_rng, noise_rng = (np.random.default_rng(s) for s in rng.integers(2**63, size=2))

    factor = min(render_size, max(height, width)) / max(height, width)
    small = (max(16, round(height * factor)), max(16, round(width * factor)))
    att, lung = _attenuation(labels, anatomy, pose, finding_rngs, small, texture_rng)
    image = ((1.0 - np.exp(-pose["exposure"] * att)) ** pose["gamma"]).astype(np.float32)
    big = F.interpolate(
        torch.from_numpy(image)[None, None], size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )[0, 0].numpy()
    # Quantum noise: fewer photons reach the detector behind dense tissue, so bright areas are noisier.
    noise = noise_rng.standard_normal((height, width), dtype=np.float32)
    noise *= np.float32(pose["noise"]) * (0.4 + big)
    big += noise
    lo, hi = float(big.min()), float(big.max())
    big -= lo
    big *= np.float32(1.0 / max(hi - lo, 1e-6))
    if not return_lung_mask:
        return big
    return big, _upsampled_mask(lung, (height, width))


def _upsampled_mask(soft: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A soft low-resolution mask resized bilinearly onto ``shape`` and cut at 0.5: uint8 0/1."""
    grid = F.interpolate(torch.from_numpy(soft.astype(np.float32))[None, None], size=shape, mode="bilinear")
    return (grid[0, 0].numpy() >= 0.5).astype(np.uint8)


@dataclass(frozen=True)
class _Job:
    """Everything needed to render and write one image; planned up front so that results do not depend on workers."""

    index: int
    path: str
    patient: str
    patient_index: int
    study: int
    sex: str
    age: int
    view: str
    shape: tuple[int, int]
    labels: dict[str, float | None]
    dicom: dict[str, Any] | None
    family: str = "classic"
    png_bits: int = 16


def _image_shape(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """Height in [min_size, max_size] and a non-square width from an aspect ratio in [0.8, 1.25], kept in bounds."""
    height = int(rng.integers(min_size, max_size + 1))
    width = int(np.clip(round(height * rng.uniform(0.8, 1.25)), min_size, max_size))
    if width == height:
        width = width + 1 if width < max_size else width - 1
    return height, width


def _plan(n: int, seed: int, dicom_fraction: float, min_size: int, max_size: int, valid_fraction: float) -> list[_Job]:
    """Patients (1-3 studies each), their split, labels, views, sizes and file formats for ``n`` images."""
    plan_rng = np.random.default_rng([seed, 0])
    counts: list[int] = []
    while sum(counts) < n:
        counts.append(min(int(plan_rng.choice([1, 2, 3], p=_IMAGES_PER_PATIENT)), n - sum(counts)))
    n_valid = round(valid_fraction * len(counts))
    if valid_fraction > 0 and len(counts) > 1:
        n_valid = min(max(n_valid, 1), len(counts) - 1)
    valid = set(np.random.default_rng([seed, 1]).permutation(len(counts))[:n_valid].tolist())
    dicom_order = np.random.default_rng([seed, 2]).permutation(n)[: round(dicom_fraction * n)]
    photometric = {int(i): ("MONOCHROME2", "MONOCHROME1")[k % 2] for k, i in enumerate(sorted(dicom_order))}

    jobs, index = [], 0
    for p, count in enumerate(counts):
        patient_rng = np.random.default_rng([seed, 3, p])
        sex = "Male" if patient_rng.random() < _MALE_SHARE else "Female"
        age = int(np.clip(round(patient_rng.normal(61, 18)), 18, 90))
        latent = patient_rng.standard_normal(2)
        patient = f"patient{p + 1:05d}"
        split = "valid" if p in valid else "train"
        for study in range(1, count + 1):
            rng = np.random.default_rng([seed, 5, index])
            labels = sample_labels(rng, latent)
            view = "AP" if rng.random() < _AP_SHARE else "PA"
            shape = _image_shape(rng, min_size, max_size)
            dicom = None
            if index in photometric:
                bits = int(rng.choice([12, 14, 15, 16]))
                slope, intercept = ((1.0, 0.0), (1.0, -1024.0), (0.5, 0.0))[int(rng.integers(3))]
                modality = "CR" if rng.random() < 0.5 else "DX"
                dicom = {
                    "photometric": photometric[index],
                    "bits": bits,
                    "slope": slope,
                    "intercept": intercept,
                    "modality": modality,
                }
            ext = "dcm" if dicom else "png"
            path = f"{split}/{patient}/study{study}/view1_frontal.{ext}"
            jobs.append(_Job(index, path, patient, p, study, sex, age + study - 1, view, shape, labels, dicom))
            index += 1
    return jobs


def _write_png(path: Path, image: np.ndarray, bits: int = 16) -> None:
    """8- or 16-bit grayscale PNG over the full range (bright = attenuation), written atomically."""
    pixels = np.round(image * (2**bits - 1)).astype(np.uint16 if bits == 16 else np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=0)


def _write_dicom(path: Path, image: np.ndarray, job: _Job, seed: int) -> None:
    """Uncompressed CR/DX DICOM (Explicit VR Little Endian) whose window maps the stored data onto exactly [0, 1].

    MONOCHROME1 stores inverted values, so a reader that inverts it shows bone bright. UIDs derive from the seed.
    """
    spec = job.dicom
    top = 2 ** spec["bits"] - 1
    stored = np.round(image * top).astype(np.uint16)
    if spec["photometric"] == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    lo, hi = (spec["intercept"] + spec["slope"] * float(v) for v in (stored.min(), stored.max()))

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["x-mark-phantom", str(seed), *map(str, parts)])

    sop_class = _SOP_CLASS[spec["modality"]]
    sop_instance = uid("image", job.index)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID = uid("study", job.patient_index, job.study)
    ds.SeriesInstanceUID = uid("series", job.index)
    ds.Modality = spec["modality"]
    ds.Manufacturer = "X-Mark synthetic phantom"
    ds.ImageComments = "Synthetic chest radiograph phantom; not patient data."
    ds.PatientName = f"Phantom^{job.patient}"
    ds.PatientID = job.patient
    ds.PatientSex = job.sex[0]
    ds.PatientAge = f"{job.age:03d}Y"
    ds.StudyID = str(job.study)
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = job.view
    if spec["modality"] == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    spacing = f"{430.0 / max(job.shape):.6f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec["photometric"]
    ds.Rows, ds.Columns = job.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, spec["bits"], spec["bits"] - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{spec['slope']:g}", f"{spec['intercept']:g}", "US"
    # PS3.3 C.11.2.1.2.1: LINEAR maps [c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2] onto the output range.
    ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2 + 0.5:g}", f"{hi - lo + 1:g}"
    ds.PixelData = stored.astype("<u2").tobytes()
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def mask_path(image_path: str) -> str:
    """Where :func:`write_phantom_dataset` writes the lung mask of the image at ``image_path`` (relative POSIX)."""
    return f"{MASK_DIR}/{Path(image_path).with_suffix('.png').as_posix()}"


def _family(name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The anatomy sampler and the renderer of phantom family ``name`` (one of :data:`FAMILIES`)."""
    if name == "physical":
        from .radiograph_chain import render_physical, sample_physical_anatomy  # it imports this module

        return sample_physical_anatomy, render_physical
    return sample_anatomy, render_phantom


def _render_and_write(args: tuple[_Job, int, str, bool]) -> None:
    """Worker: render one planned image from its (seed, index) generator with its family's renderer and write it
    (and its lung mask) under ``out_dir``."""
    job, seed, out_dir, masks = args
    sample, render = _family(job.family)
    anatomy = sample(np.random.default_rng([seed, 4, job.patient_index]))
    rng = np.random.default_rng([seed, 6, job.index])
    image = render(job.labels, rng, job.shape, anatomy, return_lung_mask=masks)
    if masks:
        image, mask = image
        target = Path(out_dir) / mask_path(job.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(tmp, format="PNG")  # 0/1, whatever the family
    path = Path(out_dir) / job.path
    path.parent.mkdir(parents=True, exist_ok=True)
    if job.dicom:
        _write_dicom(path, image, job, seed)
    else:
        _write_png(path, image, job.png_bits)


def _csv_value(value: float | None) -> str:
    """CheXpert's spelling of a label value: '1.0', '0.0', '-1.0', or blank."""
    return "" if value is None else f"{value:.1f}"


def _write_csv(path: Path, jobs: list[_Job]) -> None:
    """CheXpert-layout CSV for ``jobs`` (findings other than :data:`LABELS` blank), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CHEXPERT_COLUMNS)
    for job in jobs:
        row = {"Path": job.path, "Sex": job.sex, "Age": str(job.age), "Frontal/Lateral": "Frontal", "AP/PA": job.view}
        row.update({name: _csv_value(value) for name, value in job.labels.items()})
        writer.writerow([row.get(column, "") for column in CHEXPERT_COLUMNS])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def _write_seg_datalist(path: Path, train: list[_Job], valid: list[_Job], seed: int) -> None:
    """The lung-segmentation datalist (MONAI decathlon layout, paths relative to its folder), written atomically."""
    items = {
        name: [{"image": job.path, "label": mask_path(job.path)} for job in jobs]
        for name, jobs in (("training", train), ("validation", valid))
    }
    content = {"labels": {"0": "background", "1": "lung"}, "metadata": {"phantom_seed": seed}, **items}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


def _progress(iterable: Iterator[None], total: int, enabled: bool) -> Iterator[None]:
    """Wrap ``iterable`` in a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit="img", desc="phantoms")


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    dicom_fraction: float = 0.3,
    min_size: int = 1024,
    max_size: int = 3000,
    valid_fraction: float = 0.1,
    workers: int = 1,
    progress: bool = False,
    masks: bool = False,
    family: str = "classic",
) -> dict[str, Any]:
    """Write ``n`` phantoms in CheXpert layout under ``out_dir`` (images, then ``train.csv``, then ``valid.csv``).

    Same arguments, same bytes: every image comes from generators seeded by ``(seed, index)``, whatever ``workers``.
    The CSVs are written last, so a run that stops early leaves no ``valid.csv``. Returns a summary with the
    achieved label prevalences. ``masks`` also writes each image's lung field (:func:`render_phantom`) as an 8-bit
    PNG of 0/1 under ``masks/`` (:func:`mask_path`, a tree apart from the images, which the CSVs never list), and the
    segmentation datalist ``seg_datalist.json`` (``{"image", "label"}`` relative to ``out_dir``; ``training`` and
    ``validation`` are the CSVs' patient split); the images' bytes are the same with and without it. ``family``
    (:data:`FAMILIES`) picks the renderer; patients, labels and splits are the same for both families at the same seed.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown phantom family {family!r}; choose one of {FAMILIES}.")
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n}).")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"Need 16 <= min_size <= max_size (got min_size={min_size}, max_size={max_size}).")
    for name, value in (("dicom_fraction", dicom_fraction), ("valid_fraction", valid_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1] (got {value}).")
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (got {workers}).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = _plan(n, seed, dicom_fraction, min_size, max_size, valid_fraction)
    if family == "physical":
        from .radiograph_chain import physical_file_formats

        jobs = physical_file_formats(jobs, seed)
    tasks = [(job, seed, str(out), masks) for job in jobs]
    if workers == 1:
        for _ in _progress(map(_render_and_write, tasks), len(tasks), progress):
            pass
    else:
        with multiprocessing.get_context("spawn").Pool(
            workers, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            for _ in _progress(pool.imap_unordered(_render_and_write, tasks), len(tasks), progress):
                pass
    train = [job for job in jobs if job.path.startswith("train/")]
    valid = [job for job in jobs if job.path.startswith("valid/")]
    _write_csv(out / "train.csv", train)
    _write_csv(out / "valid.csv", valid)
    if masks:
        _write_seg_datalist(out / SEG_DATALIST, train, valid, seed)
    return {
        "out_dir": str(out),
        "images": len(jobs),
        "patients": len({job.patient for job in jobs}),
        "train_images": len(train),
        "valid_images": len(valid),
        "dicom_images": sum(job.dicom is not None for job in jobs),
        "family": family,
        "prevalence": label_prevalence([job.labels for job in jobs]),
    }
