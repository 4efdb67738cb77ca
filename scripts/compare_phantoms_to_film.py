"""Compare both phantom families with a real CR chest film on statistics a reader can check; write the doc and figure.

The film is pydicom-data's ``RG1_UNCR.dcm`` (Philips CR, PA chest, MONOCHROME1, 15 bit, 1955 x 1841; its Pixel
Spacing reads 0.000, so 0.2 mm is assumed), read by the bundle's reader (its own window, bright = attenuation). Its
lung fields and the places of a rib edge and of the right hemidiaphragm are hand-placed polygons and windows (in
image fractions, drawn on the figure); the phantoms' come from their lung masks. Each image is measured at full
resolution and at model resolution (the bundle's letterbox resize, long side 128 and 224 px, padding cropped):

- noise power spectrum (NPS): radially averaged |FFT|^2 of plane-detrended square ROIs (side 12 % of the image
  height) inside each lung; summarised by its log-log slope over 0.02-0.25 cycles/px and its share of power above
  0.25 cycles/px;
- high-pass energy in the lung field: RMS of ``image - gaussian(image, 1 px)`` over the (eroded) lung mask;
- histogram of the processed image: 5/25/50/75/95 % quantiles and entropy (256 bins, bits);
- edge sharpness: 10-90 % rise distance of the mean aligned vertical profile (5 mm, resp. 12 mm, either side; at
  least 3 px) across a rib's lower edge and across the right hemidiaphragm (px, and mm at full resolution).

Example: ``python scripts/compare_phantoms_to_film.py --n 8 --seed 0`` (``--time-600`` also times 600 images of
512-1024 px per family with 2 workers, as the demo makes them).
"""

from __future__ import annotations

import argparse
import inspect
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib.path import Path as Polygon
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

from pydicom.data import get_testdata_file  # noqa: E402

from xmark_bundle.data import phantoms  # noqa: E402
from xmark_bundle.data.labels import LABELS  # noqa: E402
from xmark_bundle.data.radiograph_chain import render_physical  # noqa: E402
from xmark_bundle.data.xray_io import load_xray  # noqa: E402
from xmark_bundle.fileio import atomic_path  # noqa: E402
from xmark_bundle.transforms import letterbox, letterbox_geometry  # noqa: E402

FILM = "RG1_UNCR.dcm"
FILM_PIXEL_MM = 0.2
#: Hand-placed on the film (row, column fractions): its two lung fields, and windows holding a rib's lower edge
#: (lateral right lung) and the right hemidiaphragm.
FILM_LUNGS = (
    ((0.12, 0.27), (0.16, 0.36), (0.35, 0.39), (0.55, 0.37), (0.66, 0.33), (0.68, 0.16), (0.55, 0.12), (0.30, 0.13)),
    ((0.13, 0.62), (0.14, 0.72), (0.30, 0.82), (0.55, 0.86), (0.68, 0.84), (0.68, 0.72), (0.55, 0.66), (0.40, 0.60)),
)
FILM_RIB = (0.25, 0.50, 0.15, 0.22)  # rows, columns
FILM_DOME = (0.62, 0.80, 0.18, 0.28)
MODEL_SIZES = (128, 224)
ROI_FRACTION = 0.12
RIB_HALF_MM, DOME_HALF_MM = 5.0, 12.0  # profile length either side of the edge


def _film() -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    """The film in [0, 1], its hand-placed lung mask, rib window and dome window."""
    path = get_testdata_file(FILM)
    if path is None:
        raise SystemExit(f"pydicom-data's {FILM} is not installed (pip install pydicom-data); nothing is downloaded.")
    image, _ = load_xray(path)
    rows, cols = image.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    points = np.c_[yy.ravel() / rows, xx.ravel() / cols]
    mask = np.zeros(rows * cols, bool)
    for polygon in FILM_LUNGS:
        mask |= Polygon(polygon).contains_points(points)
    return image, mask.reshape(rows, cols), FILM_RIB, FILM_DOME


def _classic_mask(labels: Mapping[str, float | None], seed: int, shape: tuple[int, int]) -> np.ndarray:
    """The classic phantom's lung fields (lungs without the heart), from its renderer or by replaying its draws."""
    if "return_lung_mask" in inspect.signature(phantoms.render_phantom).parameters:
        return phantoms.render_phantom(labels, np.random.default_rng(seed), shape, return_lung_mask=True)[1]
    rng = np.random.default_rng(seed)  # the draws of render_phantom, in its order
    anatomy = phantoms.sample_anatomy(rng)
    pose = phantoms._pose(rng, shape)
    finding_rngs = {name: np.random.default_rng(rng.integers(2**63)) for name in phantoms.FINDINGS}
    factor = min(512, max(shape)) / max(shape)
    small = (max(16, round(shape[0] * factor)), max(16, round(shape[1] * factor)))
    frame = phantoms._Frame(small, pose)
    sev = {name: phantoms._severity(labels.get(name), finding_rngs[name]) for name in phantoms.FINDINGS}
    lung, _, _, heart = phantoms._lungs(frame, anatomy, phantoms._geometry(anatomy, sev, finding_rngs))
    return _resize(lung * (1.0 - heart), shape) > 0.5


def _windows(mask: np.ndarray) -> tuple[tuple, tuple]:
    """Rib and dome windows (row, column fractions) from the right lung (image left) of a phantom's mask."""
    rows, cols = mask.shape
    right = mask.copy()
    right[:, cols // 2 :] = False
    r = np.nonzero(right.any(axis=1))[0]
    c = np.nonzero(right.any(axis=0))[0]
    r0, r1, c0, c1 = r.min() / rows, r.max() / rows, c.min() / cols, c.max() / cols
    height, width = r1 - r0, c1 - c0
    rib = (r0 + 0.3 * height, r0 + 0.6 * height, c0 + 0.1 * width, c0 + 0.3 * width)
    columns = range(int((c0 + 0.35 * width) * cols), int((c0 + 0.6 * width) * cols))
    dome_row = float(np.median([np.nonzero(right[:, k])[0].max() / rows for k in columns if right[:, k].any()]))
    dome = (dome_row - 0.08, dome_row + 0.08, c0 + 0.35 * width, c0 + 0.6 * width)
    return rib, dome


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a 2-D array."""
    tensor = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    out = torch.nn.functional.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def _model_resolution(image: np.ndarray, size: int) -> np.ndarray:
    """The bundle's letterbox to ``size`` px with the padding cropped away again."""
    geometry = letterbox_geometry(image.shape, size)
    boxed = letterbox(torch.from_numpy(image)[None, None], geometry)[0, 0].numpy()
    top, bottom, left, right = geometry["pad"]
    return boxed[top : size - bottom, left : size - right]


def _rois(mask: np.ndarray, side: int) -> list[tuple[int, int]]:
    """Top-left corners of one square ROI of ``side`` px per lung, fully inside it, nearest the lung's centroid."""
    fits = ndimage.distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1] > side // 2 + 1
    labelled, count = ndimage.label(mask)
    corners = []
    for lung in range(1, count + 1):
        candidates = np.argwhere(fits & (labelled == lung))  # square centres
        if len(candidates):
            centre = np.array(ndimage.center_of_mass(labelled == lung))
            best = candidates[np.argmin(((candidates - centre) ** 2).sum(axis=1))]
            corners.append((int(best[0]) - side // 2, int(best[1]) - side // 2))
    return corners


def _nps(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged NPS (value^2 px^2) of plane-detrended lung ROIs against frequency (cycles/px)."""
    side = max(8, int(round(ROI_FRACTION * image.shape[0])))
    yy, xx = np.mgrid[0:side, 0:side]
    design = np.c_[np.ones(side * side), yy.ravel(), xx.ravel()]
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij"))
    edges = np.linspace(0, 0.5, side // 2 + 1)
    spectra = []
    for r, c in _rois(mask, side):
        roi = image[r : r + side, c : c + side].astype(np.float64).ravel()
        roi = roi - design @ np.linalg.lstsq(design, roi, rcond=None)[0]
        power = np.abs(np.fft.fft2(roi.reshape(side, side))) ** 2 / (side * side)
        index = np.digitize(freq.ravel(), edges) - 1
        ok = index < len(edges) - 1
        sums = np.bincount(index[ok], power.ravel()[ok], len(edges) - 1)
        spectra.append(sums / np.maximum(np.bincount(index[ok], minlength=len(edges) - 1), 1))
    centres = 0.5 * (edges[1:] + edges[:-1])
    return centres, np.mean(spectra, axis=0) if spectra else np.full(len(centres), np.nan)


def _nps_summary(freq: np.ndarray, power: np.ndarray) -> tuple[float, float]:
    """Log-log slope over 0.02-0.25 cycles/px and the share of power above 0.25 cycles/px (of that above 0.02)."""
    band = (freq >= 0.02) & (freq <= 0.25) & (power > 0)
    slope = float(np.polyfit(np.log(freq[band]), np.log(power[band]), 1)[0]) if band.sum() >= 3 else float("nan")
    weights = freq * power  # radial integration
    high = weights[freq > 0.25].sum() / max(weights[freq >= 0.02].sum(), 1e-30)
    return slope, float(high)


def _rise(image: np.ndarray, window: tuple, rising: bool, half: int) -> float:
    """10-90 % distance (px) of the mean vertical profile across the strongest edge in ``window``, columns aligned.

    ``rising``: dark above and bright below (the diaphragm); otherwise bright above (a rib's lower edge). Profiles
    run ``half`` px either side of each column's steepest point; the plateaus are their outer thirds.
    """
    rows, cols = image.shape
    r0, r1 = int(window[0] * rows), int(np.ceil(window[1] * rows))
    c0, c1 = int(window[2] * cols), max(int(np.ceil(window[3] * cols)), int(window[2] * cols) + 1)
    block = image[r0:r1, c0:c1].astype(np.float64)
    if block.shape[0] < 2 * half + 3:
        return float("nan")
    slope = ndimage.gaussian_filter1d(block, 1.0, axis=0, order=1) * (1 if rising else -1)
    profiles = []
    for k in range(block.shape[1]):
        centre = int(np.argmax(slope[half:-half, k])) + half
        profiles.append(block[centre - half : centre + half + 1, k])
    profile = np.mean(profiles, axis=0) * (1 if rising else -1)
    plateau = max(1, (half + 1) // 3)
    low, high = np.median(profile[:plateau]), np.median(profile[-plateau:])
    if high - low <= 0:
        return float("nan")
    level = (profile - low) / (high - low)
    centre = half
    x10 = _crossing(level, 0.1, centre)
    x90 = _crossing(level, 0.9, centre)
    return float(x90 - x10)


def _crossing(level: np.ndarray, value: float, centre: int) -> float:
    """Position (linear interpolation) where ``level`` crosses ``value``, searched outwards from ``centre``."""
    if level[centre] >= value:
        k = centre
        while k > 0 and level[k - 1] >= value:
            k -= 1
        if k == 0:
            return 0.0
        return k - 1 + (value - level[k - 1]) / max(level[k] - level[k - 1], 1e-12)
    k = centre
    while k < len(level) - 1 and level[k + 1] < value:
        k += 1
    if k == len(level) - 1:
        return float(k)
    return k + (value - level[k]) / max(level[k + 1] - level[k], 1e-12)


def _statistics(image: np.ndarray, mask: np.ndarray, rib: tuple, dome: tuple, pixel_mm: float) -> dict:
    """Every statistic of one image at full resolution and at each model resolution."""
    out: dict[str, dict] = {}
    for size in (None, *MODEL_SIZES):
        img = image if size is None else _model_resolution(image, size)
        msk = mask if size is None else _model_resolution(mask.astype(np.float32), size) > 0.5
        scale = pixel_mm * (image.shape[0] / img.shape[0])
        freq, power = _nps(img, msk)
        slope, high = _nps_summary(freq, power)
        lungs = ndimage.binary_erosion(msk, iterations=2)
        highpass = img - ndimage.gaussian_filter(img, 1.0)
        hist, _ = np.histogram(img, 256, (0.0, 1.0))
        p = hist[hist > 0] / hist.sum()
        rib_px = _rise(img, rib, False, max(3, round(RIB_HALF_MM / scale)))
        dome_px = _rise(img, dome, True, max(3, round(DOME_HALF_MM / scale)))
        out["full" if size is None else str(size)] = {
            "nps_freq": freq,
            "nps": power,
            "nps_slope": slope,
            "nps_high_share": high,
            "highpass_rms": float(np.sqrt(np.mean(highpass[lungs] ** 2))),
            "quantiles": np.quantile(img, [0.05, 0.25, 0.5, 0.75, 0.95]),
            "entropy": float(-(p * np.log2(p)).sum()),
            "rib_rise_px": rib_px,
            "dome_rise_px": dome_px,
            "rib_rise_mm": rib_px * scale,
            "dome_rise_mm": dome_px * scale,
            "pixel_mm": scale,
        }
    return out


def _phantom_set(family: str, n: int, seed: int, shape: tuple[int, int]) -> list[dict]:
    """Render ``n`` phantoms of ``family`` (labels drawn by the shared label model) and measure them."""
    results, examples = [], []
    for k in range(n):
        labels = phantoms.sample_labels(np.random.default_rng([seed, 100, k]))
        render_seed = seed * 1000 + k
        if family == "physical":
            image, mask = render_physical(labels, np.random.default_rng(render_seed), shape, return_lung_mask=True)
        else:
            image = phantoms.render_phantom(labels, np.random.default_rng(render_seed), shape)
            mask = _classic_mask(labels, render_seed, shape)
        rib, dome = _windows(mask)
        results.append(_statistics(image, mask, rib, dome, 430.0 / max(shape)))
        examples.append((image, mask, rib, dome))
    results[0]["example"] = examples[0]
    return results


def _time_600(seed: int) -> dict[str, float]:
    """Wall seconds to write 600 phantoms of 512-1024 px with 2 workers, per family (the demo's data set)."""
    times = {}
    for family in phantoms.FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            phantoms.write_phantom_dataset(tmp, 600, seed, min_size=512, max_size=1024, workers=2, family=family)
            times[family] = time.perf_counter() - start
    return times


def _fmt(values: list[float], digits: int = 3) -> str:
    """Mean +- sd of finite values (or the single value)."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if len(v) == 0:
        return "n/a"
    return f"{v.mean():.{digits}f}" if len(v) == 1 else f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


ROWS: tuple[tuple[str, str, Callable[[dict], float], int], ...] = (
    ("NPS slope (0.02-0.25 cyc/px)", "nps_slope", lambda s: s["nps_slope"], 2),
    ("NPS power share > 0.25 cyc/px", "nps_high_share", lambda s: s["nps_high_share"], 4),
    ("High-pass RMS in lung field", "highpass_rms", lambda s: s["highpass_rms"], 4),
    ("Histogram median", "q50", lambda s: s["quantiles"][2], 3),
    ("Histogram 5-95 % range", "q5_95", lambda s: s["quantiles"][4] - s["quantiles"][0], 3),
    ("Histogram entropy (bits)", "entropy", lambda s: s["entropy"], 2),
    ("Rib edge 10-90 % (px)", "rib_px", lambda s: s["rib_rise_px"], 2),
    ("Diaphragm edge 10-90 % (px)", "dome_px", lambda s: s["dome_rise_px"], 2),
)


def _closer(sets: Mapping[str, list[dict]], get: Callable[[dict], float]) -> str:
    """The phantom family whose mean is nearer the film's value (the first source)."""
    names = list(sets)
    film = get(sets[names[0]][0])
    gaps = {name: abs(np.nanmean([get(r) for r in sets[name]]) - film) for name in names[1:]}
    return min(gaps, key=gaps.get) if all(np.isfinite(list(gaps.values()))) else "n/a"


def _table(sets: Mapping[str, list[dict]]) -> list[str]:
    """Markdown table: one row per statistic and resolution, one column per source, and the nearer family."""
    names = list(sets)
    head = "| Statistic | Resolution | " + " | ".join(names) + " | nearer the film |"
    lines = [head, "|---|---|" + "---|" * (len(names) + 1)]
    for label, _, get, digits in ROWS:
        for res in ("full", *map(str, MODEL_SIZES)):
            cells = [_fmt([get(r[res]) for r in sets[name]], digits) for name in names]
            nearer = _closer(sets, lambda r, res=res, get=get: get(r[res]))
            where = res if res == "full" else res + " px"
            lines.append(f"| {label} | {where} | " + " | ".join(cells) + f" | {nearer} |")
    for label, key in (("Rib edge 10-90 % (mm)", "rib_rise_mm"), ("Diaphragm edge 10-90 % (mm)", "dome_rise_mm")):
        cells = [_fmt([r["full"][key] for r in sets[name]], 2) for name in names]
        nearer = _closer(sets, lambda r, key=key: r["full"][key])
        lines.append(f"| {label} | full | " + " | ".join(cells) + f" | {nearer} |")
    quantiles = [
        "/".join(f"{q:.2f}" for q in np.mean([r["full"]["quantiles"] for r in sets[name]], axis=0)) for name in names
    ]
    lines.append("| Histogram quantiles 5/25/50/75/95 % | full | " + " | ".join(quantiles) + " | |")
    return lines


def _figure(sets: Mapping[str, list[dict]], path: Path) -> None:
    """Examples with their lung fields and edge windows, the NPS at full and model resolution, the histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(2, 3, figsize=(15, 9.5))
    for ax, (name, results) in zip(axes[0], sets.items(), strict=True):
        image, mask, rib, dome = results[0]["example"]
        rows, cols = image.shape
        step = max(1, max(rows, cols) // 400)  # a small figure: show every step-th pixel, in full-size coordinates
        ax.imshow(image[::step, ::step], cmap="gray", vmin=0, vmax=1, extent=(0, cols, rows, 0))
        ys, xs = np.arange(0, rows, step) + step / 2, np.arange(0, cols, step) + step / 2
        ax.contour(xs, ys, mask[::step, ::step], levels=[0.5], colors="tab:orange", linewidths=0.8)
        for (r0, r1, c0, c1), colour in ((rib, "tab:cyan"), (dome, "tab:red")):
            ax.add_patch(Rectangle((c0 * cols, r0 * rows), (c1 - c0) * cols, (r1 - r0) * rows, fill=False, ec=colour))
        ax.set_title(f"{name} ({rows} x {cols})")
        ax.axis("off")
    colours = dict(zip(sets, ("black", "tab:blue", "tab:green"), strict=False))
    for name, results in sets.items():
        pixel = results[0]["full"]["pixel_mm"]
        freq, nps = results[0]["full"]["nps_freq"] / pixel, np.mean([r["full"]["nps"] for r in results], axis=0)
        axes[1, 0].loglog(freq, nps * pixel**2, color=colours[name], label=name)
        freq = results[0]["224"]["nps_freq"]
        axes[1, 1].loglog(freq, np.mean([r["224"]["nps"] for r in results], axis=0), color=colours[name], label=name)
        for r in results:
            hist, edges = np.histogram(r["example"][0] if "example" in r else np.array([]), 128, (0, 1), density=True)
            if "example" in r:
                axes[1, 2].plot(0.5 * (edges[1:] + edges[:-1]), hist, color=colours[name], label=name)
    axes[1, 0].set(title="Lung NPS, full resolution", xlabel="cycles/mm", ylabel="NPS (value² mm²)")
    axes[1, 1].set(title="Lung NPS, 224 px", xlabel="cycles/px", ylabel="NPS (value² px²)")
    axes[1, 1].xaxis.set_minor_formatter(NullFormatter())
    axes[1, 2].set(title="Histogram of the example", xlabel="intensity (bright = attenuation)", ylabel="density")
    for ax in axes[1]:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=72, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Measure the film and both families, write docs/phantom_families.md and docs/phantom_families.png."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="phantoms per family")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (labels and renders)")
    parser.add_argument("--height", type=int, default=1024, help="phantom height in px (width: the film's aspect)")
    parser.add_argument("--time-600", action="store_true", help="also time 600 images per family, 2 workers")
    parser.add_argument("--out", default="docs/phantom_families.md", help="markdown file; the figure beside it (.png)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    film, film_mask, rib, dome = _film()
    film_stats = _statistics(film, film_mask, rib, dome, FILM_PIXEL_MM)
    film_stats["example"] = (film, film_mask, rib, dome)
    shape = (args.height, int(round(args.height * film.shape[1] / film.shape[0])))
    sets = {"RG1 film": [film_stats]}
    for family in phantoms.FAMILIES:
        start = time.perf_counter()
        sets[family] = _phantom_set(family, args.n, args.seed, shape)
        print(
            f"{family}: {args.n} phantoms of {shape[0]} x {shape[1]} rendered and measured in "
            f"{time.perf_counter() - start:.1f} s"
        )
    jobs = phantoms._plan(600, args.seed, 0.3, 512, 1024, 0.25)
    prevalence = phantoms.label_prevalence([job.labels for job in jobs])
    timing = _time_600(args.seed) if args.time_600 else None

    out = Path(args.out)
    figure = out.with_suffix(".png")
    _figure(sets, figure)
    command = "python scripts/compare_phantoms_to_film.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Phantom families against a real CR film",
        "",
        "Generated by `" + command.strip() + "` (do not edit by hand).",
        "",
        "Two phantom families render the bundle's synthetic data: `classic` (`xmark_bundle/data/phantoms.py`: an",
        "attenuation map drawn at up to 512 px, upsampled, quantum noise added) and `physical`",
        "(`xmark_bundle/data/radiograph_chain.py`: line integrals of spline anatomy in centimetres, then collimation,",
        "AEC dose, scatter, Poisson noise, detector blur, log conversion and CR/DX processing). Both share the label",
        "model, the CheXpert layout, the patients and the splits: the same seed gives the same CSVs.",
        f"Both are measured on {args.n} phantoms each of {shape[0]} x {shape[1]} px (seed {args.seed}; labels",
        "from the shared label model; 430 mm / long side taken as the pixel size) against pydicom-data's",
        f"`{FILM}` (Philips CR, PA, 1955 x 1841, MONOCHROME1; pixel spacing not recorded, {FILM_PIXEL_MM} mm",
        "assumed; lung fields and edge windows hand-placed, shown on the figure). Phantom cells are mean ± sd over",
        "phantoms. See the script's docstring for each statistic's definition. The film is one patient on one",
        "system with its own stored window: a reference point, not a distribution, so 'nearer the film' says which",
        "family's mean lies closer to that one image, not which family is realistic.",
        "",
        *_table(sets),
        "",
        "![Examples, lung NPS and histograms](phantom_families.png)",
        "",
        "## Label prevalences (both families)",
        "",
        "The label model is shared (`sample_labels`), so the prevalences are the same for both families; measured",
        f"on the 600-image plan of seed {args.seed} (the demo's size):",
        "",
        "| Label | positive | uncertain |",
        "|---|---|---|",
        *(f"| {name} | {prevalence[name]['positive']:.3f} | {prevalence[name]['uncertain']:.3f} |" for name in LABELS),
        "",
        f"No Finding rate: {prevalence['No Finding']['positive']:.3f}.",
    ]
    if timing:
        lines += [
            "",
            "## Rendering time",
            "",
            "600 images of 512-1024 px with 2 workers (`write_phantom_dataset(..., workers=2)`, this machine's 2",
            "cores, shared with other jobs): "
            + ", ".join(f"{family} {seconds:.0f} s" for family, seconds in timing.items())
            + ".",
        ]
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(_table(sets)))
    print(f"Wrote {out} and {figure}.")


if __name__ == "__main__":
    main()
