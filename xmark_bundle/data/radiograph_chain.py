"""The "physical" phantom family: chest radiographs formed as projections and passed through an X-ray imaging chain.

An independently written second family beside :mod:`xmark_bundle.data.phantoms` (the "classic" family), so that a
conclusion can be checked on two renderers. It shares the classic family's label model, CheXpert layout and writers
and differs in how an image is formed:

1. **Anatomy in centimetres, projected.** Each structure contributes its attenuation line integral ``mu * t`` along
   the beam (effective energy about 60 keV): an elliptic torso of soft tissue whose lungs *remove* tissue by their
   air thickness (a sqrt profile at the pleura, a posterior recess behind the diaphragm domes), a heart ellipsoid
   whose width is the cardiothoracic ratio times the thoracic width and which displaces the lung behind it, a
   trachea and main bronchi of air, ribs as elliptic tubes of cortical shell and marrow along cubic-spline centre
   lines (posterior arcs from the spine to the lateral wall, anterior arcs down to the costal cartilage), clavicles,
   scapulae, humeral heads, vertebral bodies with pedicles and discs, branching vessel trees from each hilum, a
   power-law lung texture, breasts on some patients, a gastric air bubble. The patient's habitus
   (:class:`PhysicalAnatomy`) is shared by their studies; position, inspiration, exposure and processing vary per
   study.
2. **Findings replace lung air where they are drawn** (fluid or tissue where there was air): pleural effusion (a
   meniscus climbing the lateral wall, filling the posterior recess), pulmonary edema (perihilar bat wings, Kerley B
   lines, upper-zone vessel distension), consolidation (a lobar or segmental opacity with air bronchograms),
   atelectasis (plate-like bands, a raised hemidiaphragm, a pulled mediastinum, sometimes a lobar collapse) and
   cardiomegaly (a larger cardiothoracic ratio).
3. **Imaging chain** on the output grid: collimation (a rotated field with penumbra), a lead "L"/"R" marker,
   exposure controlled like an automatic exposure chamber in the lung fields at a stated detector dose
   (:data:`PHOTONS_PER_MM2_PER_UGY` quanta per mm^2 per uGy, times a detector quantum efficiency), scatter (a broad
   low-pass of the primary), Poisson quantum noise, detector blur (a Gaussian MTF in millimetres), log conversion,
   then CR/DX processing: dynamic-range compression, unsharp masking, a window from the histogram of the exposed
   field, a film-like sigmoid LUT, electronic shutters (white outside the field) and sometimes burned-in text.

The returned image is float32 in [0, 1], bright = attenuation, as in the classic family. Everything is a pure
function of the random generator (numpy, scipy, torch on CPU), so a seed reproduces every byte, and the draws from
the generator do not depend on the labels (the same state renders the same patient with and without a finding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import interpolate, ndimage

from .phantoms import FINDINGS, _Job, _severity

__all__ = [
    "FAMILY",
    "PHOTONS_PER_MM2_PER_UGY",
    "PhysicalAnatomy",
    "physical_file_formats",
    "render_physical",
    "sample_physical_anatomy",
]

#: This family's name in ``write_phantom_dataset(..., family=...)`` and experiment declarations.
FAMILY = "physical"

#: X-ray quanta per mm^2 per uGy of detector air kerma for a chest beam (70-80 kVp behind the patient), approximate.
PHOTONS_PER_MM2_PER_UGY = 2.5e4

# Linear attenuation coefficients (1/cm) at an effective energy of about 60 keV.
_MU_SOFT = 0.205
_MU_CORTEX = 0.48
_MU_MARROW = 0.26
_MU_LEAD_LINE = 5.0  # line integral of a lead marker letter (mm of lead: opaque)
_PARENCHYMA = 0.2  # tissue share of aerated lung (the rest is air)


@dataclass(frozen=True)
class PhysicalAnatomy:
    """A patient's habitus in centimetres (X to the image right = patient's left, Y down, origin at the carina).

    ``dome_right``/``dome_left`` are the patient's sides (image left/right); ``ctr`` is the cardiothoracic ratio.
    """

    thorax_half_width: float
    apex: float
    apex_offset: float
    dome_right: float
    dome_left: float
    dome_depth: float
    lung_depth: float
    body_half_width: float
    body_half_depth: float
    ctr: float
    heart_aspect: float
    heart_angle: float
    heart_depth: float
    mediastinum_half_width: float
    aortic_knob: float
    rib_spacing: float
    rib_height: float
    rib_rise: float
    clavicle_lift: float
    scapula_offset: float
    breast: float
    gastric_bubble: float
    spine_curve: float
    detail_seed: int


def sample_physical_anatomy(rng: np.random.Generator) -> PhysicalAnatomy:
    """Draw an adult habitus: thorax 25-31 cm wide, lungs 22-27 cm high, cardiothoracic ratio 0.38-0.48."""
    dome_right = rng.uniform(11.0, 14.0)
    half_width = rng.uniform(12.5, 15.5)
    return PhysicalAnatomy(
        thorax_half_width=half_width,
        apex=rng.uniform(-12.5, -10.5),
        apex_offset=rng.uniform(4.0, 5.5),
        dome_right=dome_right,
        dome_left=dome_right + rng.uniform(0.0, 1.5),
        dome_depth=rng.uniform(2.5, 4.0),
        lung_depth=rng.uniform(12.0, 15.0),
        body_half_width=half_width + rng.uniform(2.5, 6.5),
        body_half_depth=rng.uniform(9.5, 12.5),
        ctr=rng.uniform(0.38, 0.48),
        heart_aspect=rng.uniform(0.7, 0.85),
        heart_angle=rng.uniform(0.45, 0.75),
        heart_depth=rng.uniform(5.5, 7.0),
        mediastinum_half_width=rng.uniform(2.8, 3.8),
        aortic_knob=rng.uniform(0.6, 1.4),
        rib_spacing=rng.uniform(0.095, 0.11),  # posterior rib pitch as a share of the apex-to-dome height
        rib_height=rng.uniform(0.9, 1.2),
        rib_rise=rng.uniform(0.6, 1.3),
        clavicle_lift=rng.uniform(-0.5, 1.5),
        scapula_offset=rng.uniform(-1.0, 3.0),
        breast=float(rng.uniform(2.0, 6.0)) if rng.random() < 0.4 else 0.0,
        gastric_bubble=rng.uniform(0.0, 1.0),
        spine_curve=rng.normal(0.0, 0.5),
        detail_seed=int(rng.integers(2**31)),
    )


def _pose(rng: np.random.Generator) -> dict[str, float]:
    """Study-level position, exposure and processing; every value is drawn whatever is used later."""
    return {
        "cx": rng.uniform(-2.0, 2.0),
        "cy": rng.uniform(-4.5, -1.5),
        "tilt": rng.uniform(-0.05, 0.05),
        "fov": rng.uniform(40.0, 46.0),  # cm of patient (at the detector's magnification) along the image height
        "inspiration": rng.uniform(-1.0, 1.0),  # cm the domes sit lower (deeper breath) or higher
        "dose": rng.uniform(1.5, 4.0),  # uGy detector air kerma in the lung fields (AEC)
        "dqe": rng.uniform(0.3, 0.65),
        "scatter": rng.uniform(0.25, 0.9),  # scatter-to-primary ratio of the broad low-pass
        "blur_mm": rng.uniform(0.1, 0.22),
        "drc": rng.uniform(0.25, 0.55),
        "drc_cm": rng.uniform(3.0, 6.0),
        "usm": rng.uniform(0.3, 1.0),
        "usm_mm": rng.uniform(1.0, 3.0),
        "window_low": rng.uniform(0.2, 2.0),  # percentiles of the exposed field
        "window_high": rng.uniform(98.5, 99.8),
        "lut": rng.uniform(2.0, 4.5),
        "collimate_top": rng.uniform(0.0, 0.08),
        "collimate_bottom": rng.uniform(0.0, 0.08),
        "collimate_left": rng.uniform(0.0, 0.08),
        "collimate_right": rng.uniform(0.0, 0.08),
        "collimate_tilt": rng.uniform(-0.02, 0.02),
        "marker_side": float(rng.random() < 0.5),
        "marker_x": rng.uniform(0.06, 0.18),
        "marker_y": rng.uniform(0.07, 0.2),
        "marker_cm": rng.uniform(1.5, 2.5),
        "text": float(rng.integers(0, 6)),  # 0-2: no burned-in text; else an index into _TEXTS
        "text_x": rng.uniform(0.03, 0.5),
        "arm_offset": rng.uniform(1.0, 8.0),
    }


class _Grid:
    """Sampling grid in patient centimetres: pixel centres mapped through the pose (shift, tilt, field of view)."""

    def __init__(self, shape: tuple[int, int], pose: Mapping[str, float]) -> None:
        self.shape, self.pose = shape, pose
        rows, cols = shape
        self.pixel = pose["fov"] / rows  # cm per pixel
        y = ((np.arange(rows, dtype=np.float32) + 0.5) - rows / 2) * self.pixel
        x = ((np.arange(cols, dtype=np.float32) + 0.5) - cols / 2) * self.pixel
        dx, dy = x[None, :] - pose["cx"], y[:, None] - pose["cy"]
        cos, sin = np.cos(pose["tilt"]), np.sin(pose["tilt"])
        self.X = (cos * dx + sin * dy).astype(np.float32)
        self.Y = (-sin * dx + cos * dy).astype(np.float32)

    def to_index(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) of patient points: the inverse of the mapping in ``__init__``."""
        rows, cols = self.shape
        cos, sin = np.cos(self.pose["tilt"]), np.sin(self.pose["tilt"])
        dx, dy = cos * X - sin * Y, sin * X + cos * Y
        row = (dy + self.pose["cy"]) / self.pixel + rows / 2 - 0.5
        return row, (dx + self.pose["cx"]) / self.pixel + cols / 2 - 0.5


def _ramp(value: np.ndarray, width: float) -> np.ndarray:
    """Soft step from 0 (value << 0) to 1 (value >> 0) over ``width``: anti-aliased edges."""
    return np.clip(0.5 + value / width, 0.0, 1.0)


def _chord(distance: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Chord length of a unit-depth ellipse at ``distance`` from its axis: 2 sqrt(1 - (d/r)^2), 0 outside."""
    return 2.0 * np.sqrt(np.clip(1.0 - (distance / radius) ** 2, 0.0, None))


def _power_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float, cutoff_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise with a 1/f^beta power spectrum above ``cutoff_px`` wavelengths."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt(fx**2 + fy**2)
    amplitude = (np.maximum(f, 1.0 / cutoff_px)) ** (-beta / 2)
    amplitude[0, 0] = 0.0
    white = np.fft.rfft2(rng.standard_normal(shape))
    field = np.fft.irfft2(white * amplitude, s=shape).astype(np.float32)
    return field / (field.std() + 1e-6)


@dataclass(frozen=True)
class _Geometry:
    """Per-study geometry after inspiration and the findings that move anatomy."""

    domes: dict[float, float]
    shift: float
    atelectasis_side: float
    heart: tuple[float, float, float, float, float]  # centre X, centre Y, half-axes (a, b), angle


def _geometry(a: PhysicalAnatomy, pose: Mapping[str, float], sev: Mapping[str, float], rngs) -> _Geometry:
    """Dome heights, mediastinal shift and the heart ellipse whose widest extent is ctr times the thoracic width."""
    rng = rngs["Atelectasis"]
    side = 1.0 if rng.random() < 0.5 else -1.0
    raise_cm, pull_cm = rng.uniform(2.0, 4.0), rng.uniform(0.5, 1.5)
    domes = {-1.0: a.dome_right + pose["inspiration"], 1.0: a.dome_left + pose["inspiration"]}
    domes[side] -= sev["Atelectasis"] * raise_cm
    shift = side * sev["Atelectasis"] * pull_cm
    ctr = a.ctr + sev["Cardiomegaly"] * rngs["Cardiomegaly"].uniform(0.12, 0.2)
    extent = ctr * a.thorax_half_width  # half the heart's horizontal extent
    cos, sin = np.cos(a.heart_angle), np.sin(a.heart_angle)
    major = extent / np.sqrt(cos**2 + (a.heart_aspect * sin) ** 2)
    minor = a.heart_aspect * major
    centre_y = 0.5 * (domes[-1.0] + domes[1.0]) - 0.55 * minor
    # Two thirds of the heart lie left of the midline (image right); it grows leftwards and downwards.
    centre_x = extent / 3.0 + shift
    return _Geometry(domes, shift, side, (centre_x, centre_y, major, minor, a.heart_angle))


def _dome(Xs: np.ndarray, W: float, top: float, depth: float) -> np.ndarray:
    """Diaphragm height along a hemithorax: flat top at 40 % of its width, costophrenic angle at ``W``."""
    peak = 0.4 * W
    lateral = depth * np.clip((Xs - peak) / (W - peak), 0, None) ** 2
    medial = 0.25 * depth * np.clip((peak - Xs) / peak, 0, None) ** 2
    return top + lateral + medial


def _outer_width(Y: np.ndarray, a: PhysicalAnatomy, cp: float) -> np.ndarray:
    """Distance of the inner rib margin from the midline at height ``Y``: an egg from the apex to the angle."""
    u = np.clip((Y - a.apex) / (cp - a.apex), 0.0, 1.0)
    return a.apex_offset + (a.thorax_half_width - a.apex_offset) * (1.0 - (1.0 - u) ** 2.6) ** 0.5


def _lung_distance(grid: _Grid, a: PhysicalAnatomy, g: _Geometry) -> tuple[dict[float, np.ndarray], np.ndarray]:
    """Signed distance (cm, > 0 inside) to each lung's outline without the heart, and the dome depth below it."""
    X, Y = grid.X, grid.Y
    distance, below = {}, np.zeros(grid.shape, np.float32)
    for side in (-1.0, 1.0):
        Xs = side * (X - g.shift)
        cp = g.domes[side] + a.dome_depth
        dome = _dome(Xs, a.thorax_half_width, g.domes[side], a.dome_depth)
        slope = np.gradient(dome, axis=1) / grid.pixel
        d_bottom = (dome - Y) / np.sqrt(1.0 + slope**2)
        knob = a.aortic_knob * np.exp(-(((Y + 3.5) / 2.0) ** 2)) if side > 0 else 0.0
        d_medial = Xs - a.mediastinum_half_width - knob
        d_lateral = _outer_width(Y, a, cp) - Xs
        # Apex: a parabolic cap peaking at apex_offset from the midline.
        top = a.apex + 0.13 * (Xs - a.apex_offset) ** 2
        d_top = (Y - top) / np.sqrt(1.0 + (0.26 * (Xs - a.apex_offset)) ** 2)
        distance[side] = np.minimum.reduce([d_bottom, d_medial, d_lateral, d_top]).astype(np.float32)
        # Posterior costophrenic recess: lung behind the liver/spleen up to ~4 cm below the dome's silhouette.
        recess = (Y - dome) * (d_medial > 0) * (d_lateral > -0.5)
        below = np.maximum(below, np.where(recess > 0, np.clip(1.0 - recess / 4.5, 0, 1) * (d_lateral > 0), 0.0))
    return distance, below.astype(np.float32)


def _heart(grid: _Grid, g: _Geometry, depth: float) -> np.ndarray:
    """Heart thickness along the beam (cm): an ellipsoid seen as a tilted ellipse."""
    hx, hy, major, minor, angle = g.heart
    dx, dy = grid.X - hx, grid.Y - hy
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (cos * dx - sin * dy) / major, (sin * dx + cos * dy) / minor
    return depth * _chord(np.sqrt(u * u + v * v), 1.0)


def _rasterised_tubes(
    grid: _Grid, points: np.ndarray, radius: np.ndarray, depth: np.ndarray, marrow: float = 0.65
) -> np.ndarray:
    """Bone line integral (mu * t) of elliptic tubes along dense centre-line ``points`` (N, 2) in patient cm.

    Non-overlapping tubes only: each pixel takes its nearest centre-line point (an exact distance found through an
    EDT of the rasterised points), the tube's cortex (``_MU_CORTEX``) and marrow (inner ``marrow`` share).
    """
    rows, cols = grid.shape
    r, c = grid.to_index(points[:, 0], points[:, 1])
    ri, ci = np.round(r).astype(np.int64), np.round(c).astype(np.int64)
    ok = (ri >= 0) & (ri < rows) & (ci >= 0) & (ci < cols)
    if not ok.any():
        return np.zeros(grid.shape, np.float32)
    owner = np.full(grid.shape, -1, np.int64)
    owner[ri[ok], ci[ok]] = np.nonzero(ok)[0]
    _, (ir, ic) = ndimage.distance_transform_edt(owner < 0, return_indices=True)
    nearest = owner[ir, ic]
    rr, cc = np.indices(grid.shape, dtype=np.float32)
    dist = np.hypot(rr - r[nearest], cc - c[nearest]).astype(np.float32) * grid.pixel
    rad, dep = radius[nearest].astype(np.float32), depth[nearest].astype(np.float32)
    outer = dep * _chord(dist, rad)
    inner = marrow * dep * _chord(dist, marrow * rad)
    return (_MU_CORTEX - _MU_SOFT) * (outer - inner) + (_MU_MARROW - _MU_SOFT) * inner


def _spline(control: np.ndarray, n: int) -> np.ndarray:
    """``n`` points along a natural cubic spline through ``control`` (K, 2), parameterised by chord length."""
    steps = np.r_[0.0, np.cumsum(np.hypot(*np.diff(control, axis=0).T))]
    spline = interpolate.CubicSpline(steps / steps[-1], control, bc_type="natural")
    return spline(np.linspace(0.0, 1.0, n))


def _dense(control: np.ndarray, step: float) -> int:
    """Samples along a spline through ``control`` for a spacing of at most ``step`` (arc <= 1.5 x the polygon)."""
    return max(8, int(1.5 * np.hypot(*np.diff(control, axis=0).T).sum() / step) + 2)


def _ribs(grid: _Grid, a: PhysicalAnatomy, g: _Geometry, rng: np.random.Generator) -> np.ndarray:
    """Posterior and anterior rib arcs (12 pairs) plus clavicles, each a spline tube with cortex and marrow."""
    step = 0.4 * grid.pixel
    groups: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"posterior": [], "anterior": [], "clav": []}
    for side in (-1.0, 1.0):
        cp = g.domes[side] + a.dome_depth
        for k in range(12):
            jitter = rng.normal(0.0, 0.15, 6)
            pitch = a.rib_spacing * (g.domes[side] - a.apex)
            y0 = a.apex + 0.3 + (k + 0.3) * pitch + jitter[0]
            lateral_y = y0 + a.rib_rise + 0.9 + 0.25 * k
            wall = float(_outer_width(np.float32(lateral_y), a, cp)) + 0.6
            if k == 0:
                wall = a.apex_offset + 0.55 * (wall - a.apex_offset)
            posterior = np.array(
                [
                    [1.6, y0 + 0.6],
                    [0.35 * wall, y0 - a.rib_rise * (1.0 - 0.05 * k) + jitter[1]],
                    [0.75 * wall, y0 + 0.1 + jitter[2]],
                    [wall, lateral_y + jitter[3]],
                ]
            )
            curve = _spline(posterior, _dense(posterior, step))
            t = np.linspace(0.0, 1.0, len(curve))
            # Seen end-on near the lateral wall the rib is longer along the beam, so it projects denser there.
            depth = 0.55 * (1.0 + 0.6 * np.exp(-(((1.0 - t) / 0.2) ** 2)))
            height = 0.5 * a.rib_height * (0.75 + 0.35 * t) * (0.8 if k == 0 else 1.0)
            groups["posterior"].append((np.c_[side * curve[:, 0] + g.shift, curve[:, 1]], height, depth))
            if k < 8:  # anterior arcs from the lateral wall down to the costal cartilage (not radio-opaque)
                end_x = 2.5 + 0.35 * k + jitter[4]
                anterior = np.array(
                    [
                        [wall, lateral_y + jitter[3]],
                        [0.8 * wall, lateral_y + 1.0 + 0.45 * (wall - end_x) * 0.25],
                        [0.5 * (wall + end_x), lateral_y + 2.0 + 0.45 * (wall - end_x) * 0.45],
                        [end_x, y0 + 3.4 * pitch + jitter[5]],
                    ]
                )
                curve = _spline(anterior, _dense(anterior, step))
                t = np.linspace(0.0, 1.0, len(curve))
                depth = 0.35 * (1.0 + 0.8 * np.exp(-((t / 0.2) ** 2)))
                height = 0.5 * a.rib_height * (1.25 - 0.15 * t)
                groups["anterior"].append((np.c_[side * curve[:, 0] + g.shift, curve[:, 1]], height, depth))
        # Clavicle: an S from the sternal end, over the apex, to the acromion.
        y_sternal = a.apex + 2.8
        clavicle = np.array(
            [
                [1.8, y_sternal],
                [0.35 * a.thorax_half_width, y_sternal - 0.6 - 0.4 * a.clavicle_lift],
                [0.7 * a.thorax_half_width, y_sternal - 1.6 - a.clavicle_lift],
                [a.thorax_half_width + 2.5, y_sternal - 1.6 - 1.2 * a.clavicle_lift],
            ]
        )
        curve = _spline(clavicle, _dense(clavicle, step))
        t = np.linspace(0.0, 1.0, len(curve))
        height = 0.55 + 0.25 * np.abs(2 * t - 1) ** 2
        groups["clav"].append((np.c_[side * curve[:, 0] + g.shift, curve[:, 1]], height, 0.8 + 0.0 * t))
    total = np.zeros(grid.shape, np.float32)
    for tubes in groups.values():
        points = np.concatenate([p for p, _, _ in tubes])
        radius = np.concatenate([np.broadcast_to(h, len(p)) for p, h, _ in tubes])
        depth = np.concatenate([np.broadcast_to(d, len(p)) for p, _, d in tubes])
        total += _rasterised_tubes(grid, points, radius, depth)
    return total


def _triangle_distance(X: np.ndarray, Y: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Approximate signed distance (> 0 inside) to a triangle given counter-clockwise or clockwise ``corners``."""
    d = np.full(X.shape, np.inf, np.float32)
    orient = np.sign(np.cross(corners[1] - corners[0], corners[2] - corners[0]))
    for i in range(3):
        p, q = corners[i], corners[(i + 1) % 3]
        edge = q - p
        normal = orient * np.array([-edge[1], edge[0]]) / np.hypot(*edge)
        d = np.minimum(d, (X - p[0]) * normal[0] + (Y - p[1]) * normal[1])
    return d


def _other_bones(grid: _Grid, a: PhysicalAnatomy, g: _Geometry, pose: Mapping[str, float]) -> np.ndarray:
    """Scapulae, humeral heads and shafts, and the thoracic spine (vertebral bodies, discs, pedicles)."""
    X, Y = grid.X, grid.Y
    bone = np.zeros(grid.shape, np.float32)
    W = a.thorax_half_width
    for side in (-1.0, 1.0):
        Xs = side * (X - g.shift)
        # Scapula: a thin triangular plate with a thick lateral border, partly over the lung.
        o = a.scapula_offset
        corners = np.array([[W - 3.0 + o, a.apex + 1.5], [W + 3.5, a.apex + 3.0], [W - 1.0 + o, a.apex + 15.0]])
        inside = _triangle_distance(Xs, Y, corners)
        plate = 0.35 * np.clip(inside / 0.4, 0, 1)
        (x1, y1), (x2, y2) = corners[1], corners[2]
        lateral = np.abs((Xs - x1) * (y2 - y1) - (Y - y1) * (x2 - x1)) / np.hypot(x2 - x1, y2 - y1)
        ridge = 0.9 * _chord(lateral - 0.6, 0.6) * (inside > -0.6)  # the thick lateral border
        bone += (_MU_CORTEX - _MU_SOFT) * (plate + 0.5 * ridge)
        # Humeral head (a sphere with a cortical rim) and the shaft down the arm.
        hx, hy, radius = W + 4.0 + 0.4 * pose["arm_offset"], a.apex + 2.5, 2.6
        rho = np.hypot(Xs - hx, Y - hy)
        head = radius * _chord(rho, radius) - 0.8 * radius * _chord(rho, 0.8 * radius)
        bone += (_MU_CORTEX - _MU_SOFT) * head + (_MU_MARROW - _MU_SOFT) * 0.8 * radius * _chord(rho, 0.8 * radius)
        shaft = np.where(Y > hy, np.abs(Xs - hx - 0.6 - 0.05 * (Y - hy)), np.inf)
        bone += (_MU_CORTEX - _MU_SOFT) * (1.2 * _chord(shaft, 1.2) - 0.8 * _chord(shaft, 0.8)) * _ramp(Y - hy, 1.0)
    # Spine: vertebral bodies of growing size, separated by discs, with oval pedicles; slight scoliosis.
    sx = X - 0.3 * g.shift - a.spine_curve * np.sin((Y - a.apex) / 12.0)
    level_height = 2.1
    level = (Y - a.apex + 3.0) / level_height
    frac = level - np.floor(level)
    width = 1.5 + 0.04 * np.clip(Y - a.apex, 0, None)
    body = 1.6 * _chord(sx, width) * _ramp(np.minimum(frac - 0.12, 0.97 - frac), 0.05)
    cortex = body - 1.4 * _chord(sx, width - 0.25) * _ramp(np.minimum(frac - 0.17, 0.92 - frac), 0.05)
    bone += (_MU_MARROW - _MU_SOFT) * body + (_MU_CORTEX - _MU_MARROW) * cortex
    ped = np.hypot((np.abs(sx) - 0.65 * width) / 0.35, (frac - 0.45) / 0.2)
    bone += (_MU_CORTEX - _MU_SOFT) * (0.6 * _chord(ped, 1.0) - 0.4 * _chord(ped, 0.7))
    spinous = np.hypot(sx / 0.35, (frac - 0.85) / 0.15)
    bone += (_MU_CORTEX - _MU_SOFT) * 0.5 * _chord(spinous, 1.0)
    return bone * (Y > a.apex - 8.0)


def _vessels(
    grid: _Grid, a: PhysicalAnatomy, g: _Geometry, inside: np.ndarray, rng: np.random.Generator, upper: float
) -> np.ndarray:
    """Blood thickness (cm) of pulmonary vessel trees grown from each hilum, bifurcating until sub-pixel calibre.

    ``inside`` (signed lung distance, cm) prunes branches that leave the lungs; ``upper`` scales upper-zone calibres
    (vascular redistribution in edema).
    """
    rows, cols = grid.shape
    pixel_area = grid.pixel**2
    points, volumes, radii = [], [], []
    for side in (-1.0, 1.0):
        hilum = np.array([side * (a.mediastinum_half_width + 1.6) + g.shift, -0.5])
        n = 9
        angle = np.where(side > 0, 0.0, np.pi) + side * np.linspace(-1.35, 1.45, n) + rng.normal(0, 0.1, n)
        pos = np.repeat(hilum[None], n, axis=0) + rng.normal(0, 0.4, (n, 2))
        radius = rng.uniform(0.45, 0.65, n) * np.where(np.sin(angle) < 0, upper * 0.85, 1.0)
        for _ in range(10):
            if len(pos) == 0:
                break
            length = radius * rng.uniform(6.0, 10.0, len(pos))
            end = pos + length[:, None] * np.c_[np.cos(angle), np.sin(angle)]
            count = np.maximum(2, np.ceil(length / (0.5 * grid.pixel)).astype(np.int64))  # half-pixel steps
            owner = np.repeat(np.arange(len(pos)), count)
            t = (np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count) + 0.5) / count[owner]
            seg = pos[owner] + t[:, None] * (end - pos)[owner]
            r, c = grid.to_index(seg[:, 0], seg[:, 1])
            inside_seg = ndimage.map_coordinates(inside, [r, c], order=1, cval=-10.0) > -0.2
            points.append(seg)
            volumes.append(np.pi * radius[owner] ** 2 * (length / count)[owner] * inside_seg)
            radii.append(radius[owner])
            r, c = grid.to_index(end[:, 0], end[:, 1])
            end_depth = ndimage.map_coordinates(inside, [r, c], order=1, cval=-10.0)
            keep = (end_depth > 0.3) & (radius > 0.06)
            pos, angle, radius = end[keep], angle[keep], radius[keep]
            # Bifurcation: calibres by Murray's law (r^3 = r1^3 + r2^3), daughters turned apart.
            share = rng.uniform(0.3, 0.7, len(pos))
            r1, r2 = radius * share ** (1 / 3), radius * (1 - share) ** (1 / 3)
            spread = rng.uniform(0.35, 0.7, len(pos))
            pos = np.concatenate([pos, pos])
            turn = rng.normal(0, 0.15, 2 * len(share))
            angle = np.concatenate([angle + spread * (1 - share), angle - spread * share]) + turn
            radius = np.concatenate([r1, r2])
    pts, vol, rad = np.concatenate(points), np.concatenate(volumes), np.concatenate(radii)
    # End-on vessels: short segments along the beam, seen as dense dots.
    dots = rng.uniform([-a.thorax_half_width, a.apex + 2.0], [a.thorax_half_width, max(g.domes.values())], (250, 2))
    dot_r = rng.uniform(0.05, 0.15, 250)
    pts = np.concatenate([pts, dots])
    vol = np.concatenate([vol, np.pi * dot_r**2 * rng.uniform(0.5, 1.5, 250)])
    rad = np.concatenate([rad, dot_r])
    r, c = grid.to_index(pts[:, 0], pts[:, 1])
    blood = np.zeros(grid.shape, np.float32)
    # Splat by calibre band, each band blurred to its vessels' width: mass (cm^3 -> cm of thickness) is conserved.
    edges = np.array([0.0, 1.0, 2.0, 4.0, np.inf]) * grid.pixel
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        band = (rad >= low) & (rad < high)
        if not band.any():
            continue
        rb, cb = r[band], c[band]
        r0, c0 = np.floor(rb).astype(np.int64), np.floor(cb).astype(np.int64)
        fr, fc = rb - r0, cb - c0
        grid_band = np.zeros(rows * cols, np.float64)
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
            grid_band += np.bincount(rr[ok] * cols + cc[ok], (vol[band] * w)[ok] / pixel_area, rows * cols)
        sigma = 0.5 * float(np.median(rad[band])) / grid.pixel
        blood += ndimage.gaussian_filter(grid_band.reshape(rows, cols).astype(np.float32), max(sigma, 0.5))
    return blood


def _findings(
    grid: _Grid,
    a: PhysicalAnatomy,
    g: _Geometry,
    sev: Mapping[str, float],
    rngs: Mapping[str, np.random.Generator],
    distance: Mapping[float, np.ndarray],
) -> np.ndarray:
    """Share of lung air replaced by fluid or tissue (0 aerated, 1 airless) by the five findings."""
    X, Y, px, W = grid.X, grid.Y, grid.pixel, a.thorax_half_width
    keep = np.ones(grid.shape, np.float32)

    if sev["Pleural Effusion"]:
        rng, s = rngs["Pleural Effusion"], sev["Pleural Effusion"]
        sides = (-1.0, 1.0) if rng.random() < 0.45 else (float(rng.choice([-1.0, 1.0])),)
        for side in sides:
            Xs = side * (X - g.shift)
            bottom = g.domes[side] + a.dome_depth
            level = bottom - s * rng.uniform(5.0, 11.0)
            # Meniscus: concave upwards, climbing the lateral wall; thicker (denser) towards the base.
            surface = level - s * rng.uniform(1.5, 3.0) * np.clip((Xs - 0.3 * W) / (0.7 * W), 0, 1.1) ** 2
            # Airless below the meniscus; a haze above it where fluid layers behind the lung.
            fluid = np.maximum(_ramp(Y - surface, 0.6), 0.35 * s * np.exp(-np.clip(surface - Y, 0, None) / 3.0))
            keep *= 1.0 - fluid * (Xs > 0) * _ramp(distance[side] + 6.0, 1.0)

    if sev["Edema"]:
        rng, s = rngs["Edema"], sev["Edema"]
        patchy = np.clip(0.8 + 0.25 * _power_noise(rng, grid.shape, 2.5, 3.0 / px), 0, None)
        wings = np.zeros(grid.shape, np.float32)
        for side in (-1.0, 1.0):
            cx = side * rng.uniform(0.3, 0.45) * W + g.shift
            cy = rng.uniform(-1.0, 1.5)
            rx, ry = rng.uniform(0.45, 0.6) * W, rng.uniform(6.0, 8.0)
            wings = np.maximum(wings, np.exp(-((((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2) ** 1.5)))
        edema = s * (rng.uniform(0.5, 0.8) * wings + 0.15 * _ramp(Y + 3.0, 15.0)) * patchy
        for side in (-1.0, 1.0):  # Kerley B lines: short horizontal septa meeting the pleura at the bases
            Xs = side * (X - g.shift)
            for ly in rng.uniform(g.domes[side] - 6.0, g.domes[side] + 0.5, int(10 * s)):
                length = rng.uniform(0.8, 2.0)
                line = _ramp(length - distance[side], px) * _ramp(0.08 - np.abs(Y - ly), px) * (Xs > 0.5 * W)
                edema += 0.6 * s * line
        keep *= 1.0 - np.clip(edema, 0, 0.95)

    if sev["Consolidation"]:
        rng, s = rngs["Consolidation"], sev["Consolidation"]
        side = float(rng.choice([-1.0, 1.0]))
        zone = int(rng.choice(3, p=[0.4, 0.35, 0.25]))
        cy = (a.apex + 5.5, -1.0, g.domes[side] - 3.5)[zone] + rng.uniform(-1.0, 1.0)
        cx = side * rng.uniform(0.45, 0.7) * W + g.shift
        radius = (2.0 + 3.5 * s) * rng.uniform(0.9, 1.2)
        rx, ry = radius * rng.uniform(1.0, 1.3), radius * rng.uniform(0.75, 1.0)
        blob = np.exp(-(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2))
        rough = _power_noise(rng, grid.shape, 2.0, 2.0 / px)
        dense = np.maximum(_ramp(blob * (1.0 + 0.35 * rough) - 0.3, 0.3), _ramp(blob - 0.45, 0.2))
        if zone == 0 and side < 0:  # right upper lobe: sharp lower border along the horizontal fissure
            dense *= _ramp(-1.0 + rng.uniform(-0.5, 0.5) - Y, px)
        hilum = (side * (a.mediastinum_half_width + 1.6) + g.shift, -0.5)
        tubes = np.zeros(grid.shape, np.float32)
        for angle in np.arctan2(cy - hilum[1], cx - hilum[0]) + rng.uniform(-0.35, 0.35, 3):
            dx, dy = X - hilum[0], Y - hilum[1]
            t = (dx * np.cos(angle) + dy * np.sin(angle)) / (np.hypot(cx - hilum[0], cy - hilum[1]) + radius)
            across = np.abs(-dx * np.sin(angle) + dy * np.cos(angle))
            tubes = np.maximum(tubes, _ramp(0.15 * (1.3 - t) - across, px) * _ramp(t, 0.05) * _ramp(1 - t, 0.05))
        keep *= 1.0 - s * 0.97 * dense * (1.0 - 0.5 * tubes * _ramp(blob - 0.5, 0.2))

    if sev["Atelectasis"]:
        rng, s, side = rngs["Atelectasis"], sev["Atelectasis"], g.atelectasis_side
        Xs = side * (X - g.shift)
        for _ in range(1 + int(rng.random() < s) + int(rng.random() < 0.3 * s)):  # plate-like bands
            ly = g.domes[side] - rng.uniform(2.0, 5.5)
            cx = rng.uniform(0.5, 0.7) * W
            half_length = rng.uniform(3.5, 5.5) * (0.6 + 0.4 * s)
            half_thick = rng.uniform(0.35, 0.6) * (0.6 + 0.4 * s)
            ang = rng.uniform(-0.25, 0.25)
            along = ((Xs - cx) * np.cos(ang) + (Y - ly) * np.sin(ang)) / half_length
            across = -(Xs - cx) * np.sin(ang) + (Y - ly) * np.cos(ang)
            keep *= 1.0 - 0.95 * s * _ramp(half_thick - np.abs(across), px) * np.clip(1 - along**4, 0, 1)
        if rng.random() < 0.5:  # lobar collapse: a dense wedge against the mediastinum
            Xm = Xs - a.mediastinum_half_width
            if rng.random() < 0.5:
                t = np.clip((Y + 1.0) / (g.domes[side] + 1.0), 0, 1)
                wedge = _ramp(rng.uniform(0.25, 0.4) * W * t - Xm, px) * _ramp(Y + 1.0, 2 * px)
            else:
                wedge = _ramp(-1.5 - rng.uniform(0.7, 1.1) * Xm - Y, px)
            keep *= 1.0 - 0.9 * s * wedge * (Xm > 0)
    return 1.0 - keep


def _body(grid: _Grid, a: PhysicalAnatomy, g: _Geometry, pose: Mapping[str, float]) -> np.ndarray:
    """Soft-tissue thickness (cm): elliptic torso under sloping shoulders, neck, arms, breasts."""
    X, Y = grid.X, grid.Y
    half_width = a.body_half_width + 1.5 * np.exp(-(((Y - a.apex - 3.0) / 5.0) ** 2))
    shoulder = a.apex - 2.5 + 0.02 * np.clip(np.abs(X) - 5.0, 0, None) ** 2
    torso = 2.0 * a.body_half_depth * np.sqrt(np.clip(1 - (X / half_width) ** 2, 0, 1)) * _ramp(Y - shoulder, 1.0)
    neck = 2.0 * 6.0 * np.sqrt(np.clip(1 - (X / 6.0) ** 2, 0, 1)) * _ramp(shoulder - Y + 0.5, 1.0)
    thickness = np.maximum(torso, neck)
    arm_x = half_width + pose["arm_offset"] + 4.0
    for side in (-1.0, 1.0):
        arm = np.abs(side * X - arm_x)
        thickness += 2.0 * 4.5 * np.sqrt(np.clip(1 - (arm / 4.5) ** 2, 0, 1)) * _ramp(Y - shoulder - 2.0, 2.0)
    if a.breast > 0:
        for side in (-1.0, 1.0):
            cx, cy = side * 0.55 * a.thorax_half_width + g.shift, g.domes[side] - 1.5
            rho = np.hypot((X - cx) / 8.0, np.where(Y > cy, (Y - cy) / 5.0, (Y - cy) / 10.0))
            thickness += a.breast * np.sqrt(np.clip(1 - rho**2, 0, 1))
    return thickness.astype(np.float32)


def _line_integral(
    labels: Mapping[str, float | None],
    a: PhysicalAnatomy,
    pose: Mapping[str, float],
    finding_rngs: Mapping[str, np.random.Generator],
    detail_rng: np.random.Generator,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation line integral (dimensionless mu * t) on a grid of ``shape`` and the soft lung-field mask."""
    grid = _Grid(shape, pose)
    sev = {name: _severity(labels.get(name), finding_rngs[name]) for name in FINDINGS}
    g = _geometry(a, pose, sev, finding_rngs)
    distance, recess = _lung_distance(grid, a, g)
    inside = np.maximum(distance[-1.0], distance[1.0])
    heart = _heart(grid, g, a.heart_depth)
    # Lung thickness along the beam: a chord through the rounded pleura near the edge, the full depth inside.
    radius = 6.0
    d = np.clip(inside, 0, None)
    chord = 2.0 * np.sqrt(np.clip(2 * radius * np.minimum(d, radius) - np.minimum(d, radius) ** 2, 0, None))
    lung = np.minimum(a.lung_depth, chord)
    lung = np.maximum(lung, 0.3 * a.lung_depth * recess * (inside <= 0))
    lung = np.clip(lung - 0.85 * heart, 0, None)  # some lung lies behind the heart (posterior basal segments)
    field = _ramp(inside, grid.pixel) * (1.0 - _ramp(heart - 0.5, 1.0))  # lung field as outlined on the film
    # Vessel trees and the ribs' irregularities belong to the patient; lung texture is drawn per study.
    texture = _power_noise(detail_rng, shape, 3.0, 4.0 / grid.pixel)
    fine = _power_noise(detail_rng, shape, 1.5, 0.5 / grid.pixel)
    rib_rng, vessel_rng = (np.random.default_rng([a.detail_seed, k]) for k in (1, 2))  # the patient's own
    upper = 1.0 + 0.6 * sev["Edema"]
    blood = _vessels(grid, a, g, inside, vessel_rng, upper) * _ramp(lung - 0.5, 1.0)
    fill = _findings(grid, a, g, sev, finding_rngs, distance)
    air = lung * (1.0 - _PARENCHYMA * (1.0 + 0.25 * texture + 0.04 * fine)) * (1.0 - fill)
    air = np.clip(air - blood, 0, None)
    # Trachea and main bronchi (air), and the gastric bubble under the left dome.
    carina = -0.5
    tx = 0.4 * g.shift - 0.5
    trachea = 1.8 * _chord(np.abs(grid.X - tx), 0.9) * _ramp(carina - grid.Y, 0.5)
    for side, angle in ((-1.0, 0.45), (1.0, 0.75)):
        dx, dy = side * (grid.X - tx), grid.Y - carina
        along = dx * np.sin(angle) + dy * np.cos(angle)
        across = np.abs(dx * np.cos(angle) - dy * np.sin(angle))
        trachea += 1.3 * _chord(across, 0.65) * _ramp(along, 0.3) * _ramp(4.0 - along, 0.5)
    bubble_y = g.domes[1.0] + 2.5
    rho = np.hypot((grid.X - g.shift - 0.5 * a.thorax_half_width) / 2.5, (grid.Y - bubble_y) / 1.5)
    bubble = 1.5 * a.gastric_bubble * _chord(rho, 1.0) * (grid.Y > g.domes[1.0] + 0.5)
    body = _body(grid, a, g, pose)
    bones = _ribs(grid, a, g, rib_rng) + _other_bones(grid, a, g, pose)
    soft = np.clip(body - air - trachea - bubble, 0, None)
    mu_t = _MU_SOFT * soft + bones * (body > 1.0)
    return mu_t.astype(np.float32), field.astype(np.float32)


_GLYPHS = {
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "B": ("11110", "10001", "10001", "11110", "10001", "10001", "11110"),
    "C": ("01111", "10000", "10000", "10000", "10000", "10000", "01111"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "I": ("11111", "00100", "00100", "00100", "00100", "00100", "11111"),
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "N": ("10001", "11001", "10101", "10011", "10001", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "S": ("01111", "10000", "10000", "01110", "00001", "00001", "11110"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "U": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    " ": ("00000",) * 7,
}
_TEXTS = ("PORTABLE", "ERECT", "SUPINE")


def _text(text: str, height_px: int) -> np.ndarray:
    """A boolean bitmap of ``text`` in a 5x7 block font, ``height_px`` pixels high (whole multiples of 7)."""
    rows = [np.array([[c == "1" for c in line] for line in _GLYPHS[ch]]) for ch in text]
    spaced = [np.pad(r, ((0, 0), (0, 1))) for r in rows]
    bitmap = np.concatenate(spaced, axis=1)[:, :-1]
    scale = max(1, height_px // 7)
    return np.kron(bitmap, np.ones((scale, scale), bool))


def _stamp(image: np.ndarray, bitmap: np.ndarray, top: int, left: int, value: float, add: bool) -> None:
    """Write (or add) ``value`` into ``image`` where ``bitmap`` is set, clipped to the image."""
    h, w = bitmap.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, image.shape[0]), min(left + w, image.shape[1])
    if t1 <= t0 or l1 <= l0:
        return
    patch = bitmap[t0 - top : t1 - top, l0 - left : l1 - left]
    if add:
        image[t0:t1, l0:l1] += value * patch
    else:
        image[t0:t1, l0:l1][patch] = value


def _resize(image: np.ndarray, shape: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """Resize a 2-D float32 array with torch (antialiased when shrinking)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    shrinking = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    if mode in ("bilinear", "bicubic"):
        kwargs["antialias"] = shrinking
    return F.interpolate(tensor, size=shape, mode=mode, **kwargs)[0, 0].numpy()


def _lowpass(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian low-pass of width ``sigma_px``, computed on a coarse grid when the kernel is wide (for speed)."""
    factor = max(1, int(sigma_px // 4))
    if factor == 1:
        return ndimage.gaussian_filter(image, sigma_px, mode="nearest")
    small_shape = (max(4, image.shape[0] // factor), max(4, image.shape[1] // factor))
    small = _resize(image, small_shape, "area")
    small = ndimage.gaussian_filter(small, sigma_px * small_shape[0] / image.shape[0], mode="nearest")
    return _resize(small, image.shape, "bilinear")


def _collimation(shape: tuple[int, int], pose: Mapping[str, float], penumbra_px: float) -> np.ndarray:
    """Exposed field (1 inside, 0 under the collimator blades) with a soft penumbra, slightly rotated."""
    rows, cols = shape
    y = (np.arange(rows, dtype=np.float32) + 0.5)[:, None] / rows - 0.5
    x = (np.arange(cols, dtype=np.float32) + 0.5)[None, :] / cols - 0.5
    cos, sin = np.float32(np.cos(pose["collimate_tilt"])), np.float32(np.sin(pose["collimate_tilt"]))
    u, v = cos * x * cols + sin * y * rows, -sin * x * cols + cos * y * rows
    edges = (
        u + cols * (0.5 - pose["collimate_left"]),
        cols * (0.5 - pose["collimate_right"]) - u,
        v + rows * (0.5 - pose["collimate_top"]),
        rows * (0.5 - pose["collimate_bottom"]) - v,
    )
    return _ramp(np.minimum(np.minimum(edges[0], edges[1]), np.minimum(edges[2], edges[3])), penumbra_px)


def _sigmoid_lut(x: np.ndarray, k: float) -> np.ndarray:
    """Film-like S-shaped LUT mapping [0, 1] onto [0, 1] with slope ``k``/4 at mid-grey."""
    lo, hi = 1.0 / (1.0 + np.exp(k / 2)), 1.0 / (1.0 + np.exp(-k / 2))
    return (1.0 / (1.0 + np.exp(-k * (x - 0.5))) - lo) / (hi - lo)


def _chain(
    mu_t: np.ndarray, field: np.ndarray, pose: Mapping[str, float], noise_rng: np.random.Generator
) -> np.ndarray:
    """Detector and processing: exposure, scatter, Poisson noise, blur, log, DRC, unsharp mask, window, LUT."""
    rows, cols = mu_t.shape
    pixel_mm = 10.0 * pose["fov"] / rows
    collimated = _collimation(mu_t.shape, pose, 3.0 / pixel_mm)
    transmission = np.exp(-mu_t)
    # Lead marker letter: opaque, in an upper corner on the patient's side it names.
    letter = "L" if pose["marker_side"] else "R"
    bitmap = _text(letter, max(7, int(round(10.0 * pose["marker_cm"] / pixel_mm))))
    top = int(pose["marker_y"] * rows)
    left = int(pose["marker_x"] * cols)
    if pose["marker_side"]:
        left = cols - left - bitmap.shape[1]
    marker = np.zeros(mu_t.shape, np.float32)
    _stamp(marker, bitmap, top, left, _MU_LEAD_LINE, add=True)
    transmission *= np.exp(-marker)
    # Automatic exposure control: the dose is reached in two fixed chambers over the mid lung fields.
    chambers = np.zeros(mu_t.shape, bool)
    for left in (0.2, 0.62):
        chambers[int(0.3 * rows) : int(0.45 * rows), int(left * cols) : int((left + 0.18) * cols)] = True
    reference = float(np.median(transmission[chambers]))
    quanta = pose["dose"] * PHOTONS_PER_MM2_PER_UGY * pixel_mm**2 * pose["dqe"]
    primary = (quanta / reference) * transmission * collimated
    scatter = pose["scatter"] * _lowpass(primary, 60.0 / pixel_mm)
    counts = noise_rng.poisson(np.maximum(primary + scatter, 0.0).astype(np.float64)).astype(np.float32)
    detected = ndimage.gaussian_filter(counts, pose["blur_mm"] / pixel_mm, mode="nearest")
    raw = -np.log(np.maximum(detected, 0.5) / quanta)  # log conversion: proportional to attenuation
    exposed = collimated > 0.5
    sample = raw[exposed][::7] if exposed.sum() > 100 else raw.ravel()[::7]
    centre = float(np.median(sample))
    processed = raw - pose["drc"] * (_lowpass(raw, 10.0 * pose["drc_cm"] / pixel_mm) - centre)
    sharp_sigma = pose["usm_mm"] / pixel_mm
    processed += pose["usm"] * (processed - ndimage.gaussian_filter(processed, max(sharp_sigma, 0.5), mode="nearest"))
    values = processed[exposed][::7] if exposed.sum() > 100 else processed.ravel()[::7]
    low, high = np.percentile(values, [pose["window_low"], pose["window_high"]])
    image = _sigmoid_lut(np.clip((processed - low) / max(high - low, 1e-6), 0.0, 1.0), pose["lut"])
    image = np.maximum(image, 1.0 - collimated)  # electronic shutters: white outside the exposed field
    if pose["text"] >= 3:
        text = _text(_TEXTS[int(pose["text"]) - 3], max(7, int(round(0.025 * rows))))
        _stamp(image, text, rows - 2 * text.shape[0], int(pose["text_x"] * cols), 1.0, add=False)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def render_physical(
    labels: Mapping[str, float | None],
    rng: np.random.Generator,
    shape: tuple[int, int],
    anatomy: PhysicalAnatomy | None = None,
    return_lung_mask: bool = False,
    render_size: int = 512,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A projected, detected and processed chest radiograph (H, W) float32 in [0, 1], bright = attenuation.

    ``anatomy`` (default: drawn from ``rng``) fixes the patient across studies. The line integrals are computed with
    the long side at ``render_size`` px and upsampled; the chain (noise, blur, processing) runs at ``shape``. With
    ``return_lung_mask`` also the lung fields (bool, same grid; without the heart, above the domes).
    """
    height, width = (int(v) for v in shape)
    if height < 16 or width < 16:
        raise ValueError(f"Phantom shape {shape} is too small; both sides must be >= 16 px.")
    anatomy = sample_physical_anatomy(rng) if anatomy is None else anatomy
    pose = _pose(rng)
    finding_rngs = {name: np.random.default_rng(rng.integers(2**63)) for name in FINDINGS}
    noise_rng = np.random.default_rng(rng.integers(2**63))
    detail_rng = np.random.default_rng(rng.integers(2**63))
    factor = min(render_size, max(height, width)) / max(height, width)
    small = (max(16, round(height * factor)), max(16, round(width * factor)))
    mu_t, field = _line_integral(labels, anatomy, pose, finding_rngs, detail_rng, small)
    if small != (height, width):
        mu_t = _resize(mu_t, (height, width), "bicubic")
        field = _resize(field, (height, width), "bilinear")
    image = _chain(mu_t, field, pose, noise_rng)
    if return_lung_mask:
        return image, field > 0.5
    return image


def physical_file_formats(jobs: Sequence[_Job], seed: int) -> list[_Job]:
    """The planned jobs as this family writes them: 12/14/16-bit DICOM (CR and DX, MONOCHROME1 and 2 as planned)
    and 8- or 16-bit PNG, drawn from a stream of their own so that patients, labels and splits stay the plan's."""
    out = []
    for job in jobs:
        rng = np.random.default_rng([seed, 7, job.index])
        bits, png_bits = int(rng.choice([12, 14, 16])), int(rng.choice([8, 16]))
        dicom = {**job.dicom, "bits": bits} if job.dicom else None
        out.append(replace(job, family=FAMILY, dicom=dicom, png_bits=png_bits))
    return out
