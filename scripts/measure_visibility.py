"""How visible is the watermark where a reader looks: at the file's own resolution, for ways of mapping G's residual.

G works at a model resolution S (128-1024 px) and the release maps its residual onto the file's grid (2-8x larger)
by bilinear upsampling. This measures, on target-class files as the release marks them, for each mapping:

- full-resolution PSNR and SSIM of marked against source (MONAI's SSIMMetric, data range 1);
- the share of the full-resolution residual's energy above G's Nyquist frequency (the upsampling's block texture:
  a smooth upsampling leaves none there);
- what a model at S still sees: the cosine between the mapped residual letterboxed back to S and G's own residual,
  and the surrogate's change of P(target) on the re-letterboxed marked file (on target files G lowers it, L_t: more
  negative is stronger; a proxy of power, the real power is a suspect trained on such a release);
- the time of each mapping;

and draws crops at full resolution (source, marked, residual) for each. Mappings: ``bilinear`` (the release's),
``bicubic`` (smooth, clamped to the budget), ``lowpass`` (Gaussian low-pass of the residual at S, sigma 1 px, then
bilinear: a band-limited residual).

Example: ``python scripts/measure_visibility.py --generator_ckpt outputs/demo/models/xmark/watermark/model.pt
--dataset_dir outputs/demo/phantoms --n 12 --out docs/visibility``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.metrics import SSIMMetric
from monai.networks.layers import GaussianFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmark_bundle.data.labels import LABELS  # noqa: E402
from xmark_bundle.data.selection import split_by_target  # noqa: E402
from xmark_bundle.data.xray_io import load_xray  # noqa: E402
from xmark_bundle.fileio import atomic_path, write_json  # noqa: E402
from xmark_bundle.networks.checkpoint import load_watermark  # noqa: E402
from xmark_bundle.transforms.geometry import letterbox, letterbox_geometry, unletterbox  # noqa: E402
from xmark_bundle.verification.queries import datalist_items  # noqa: E402

MAPPINGS = ("bilinear", "bicubic", "lowpass")


def _mapped(delta: torch.Tensor, geometry: dict, mapping: str, eps: float) -> torch.Tensor:
    """G's residual (1 x 1 x S x S) on the file's grid (1 x 1 x H x W) by ``mapping``, within the budget."""
    if mapping == "lowpass":
        delta = GaussianFilter(2, sigma=1.0)(delta)
    mode = "bicubic" if mapping == "bicubic" else "bilinear"
    return unletterbox(delta, geometry, mode).clamp(-eps, eps)


def _above_nyquist(residual: np.ndarray, resized: tuple[int, int]) -> float:
    """Share of ``residual``'s energy above the Nyquist frequency of the S-grid content it was upsampled from."""
    power = np.abs(np.fft.fft2(residual)) ** 2
    fy = np.abs(np.fft.fftfreq(residual.shape[0], d=1.0 / residual.shape[0]))[:, None] / (resized[0] / 2)
    fx = np.abs(np.fft.fftfreq(residual.shape[1], d=1.0 / residual.shape[1]))[None, :] / (resized[1] / 2)
    return float(power[np.maximum(fy, fx) > 1.0].sum() / max(power.sum(), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator_ckpt", type=Path, required=True)
    parser.add_argument("--dataset_dir", type=Path, required=True)
    parser.add_argument("--datalist", type=Path, default=None, help="default: DATASET_DIR/datalist.json")
    parser.add_argument("--n", type=int, default=12, help="target-class training files to measure")
    parser.add_argument("--out", type=Path, default=Path("outputs/visibility"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    generator = load_watermark(args.generator_ckpt)
    size, eps = int(generator.image_size), float(generator.eps)
    target = generator.watermark_record["target_label"]
    surrogate = getattr(generator, "surrogate", None)
    items = datalist_items(args.datalist or args.dataset_dir / "datalist.json", "training", args.dataset_dir)
    targets, _ = split_by_target(items, LABELS.index(target))
    chosen = [items[i] for i in targets[: args.n]]
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0)
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in MAPPINGS}
    crops: list[dict[str, np.ndarray]] = []
    for number, item in enumerate(chosen):
        image01, meta = load_xray(item["image"])
        source = torch.from_numpy(image01)[None, None]
        geometry = letterbox_geometry(meta.shape, size)
        x = letterbox(source, geometry)
        delta = generator(x) - x
        crop = {"source": image01}
        for mapping in MAPPINGS:
            start = time.perf_counter()
            residual = _mapped(delta, geometry, mapping, eps)
            seconds = time.perf_counter() - start
            marked = (source + residual).clamp(0, 1)
            mse = float(((marked - source) ** 2).mean())
            seen = letterbox(marked, geometry) - x
            row = {
                "psnr_full": 10 * np.log10(1.0 / max(mse, 1e-20)),
                "ssim_full": float(ssim(marked, source).mean()),
                "above_nyquist": _above_nyquist(residual[0, 0].numpy(), tuple(geometry["resized_shape"])),
                "cosine_at_model_size": float(
                    torch.nn.functional.cosine_similarity(seen.flatten(), delta.flatten(), dim=0)
                ),
                "seconds": seconds,
            }
            if surrogate is not None:
                k = LABELS.index(target)
                p = [torch.sigmoid(surrogate(v)[0, k]).item() for v in (x, letterbox(marked, geometry))]
                row["surrogate_change"] = p[1] - p[0]
            rows[mapping].append(row)
            crop[mapping] = marked[0, 0].numpy()
        crops.append(crop)
        print(f"[visibility] {number + 1}/{len(chosen)} {item['image']}", flush=True)
    summary = {m: {key: float(np.mean([r[key] for r in values])) for key in values[0]} for m, values in rows.items()}
    report = {
        "generator_ckpt": str(args.generator_ckpt),
        "method": generator.watermark_record["method"],
        "image_size": size,
        "epsilon": eps,
        "files": [str(item["image"]) for item in chosen],
        "mean": summary,
        "per_file": rows,
    }
    write_json(args.out / "visibility.json", report, indent=4)  # the model zoo's pretty-format-json
    _figure(crops[0], eps, args.out / "visibility.png", size)
    print(f"{'mapping':<10} {'PSNR full':>10} {'SSIM full':>10} {'> Nyquist':>10} {'cos at S':>9} {'dP surr.':>9}")
    for mapping, m in summary.items():
        print(
            f"{mapping:<10} {m['psnr_full']:10.2f} {m['ssim_full']:10.4f} {m['above_nyquist']:10.4f} "
            f"{m['cosine_at_model_size']:9.3f} {m.get('surrogate_change', float('nan')):9.3f}"
        )
    print(f"written: {args.out / 'visibility.json'}, visibility.png")


def _figure(crop: dict[str, np.ndarray], eps: float, path: Path, size: int) -> None:
    """Full-resolution crops (a quarter of the short side, at the image centre) of source, marked and residual."""
    source = crop["source"]
    side = min(source.shape) // 4
    top, left = source.shape[0] // 2 - side // 2, source.shape[1] // 2 - side // 2
    window = (slice(top, top + side), slice(left, left + side))
    fig = Figure(figsize=(3.0 * (1 + len(MAPPINGS)), 6.4), layout="constrained")
    axes = fig.subplots(2, 1 + len(MAPPINGS))
    axes[0, 0].imshow(source[window], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0, 0].set_title(f"source, {side} px crop at full size", fontsize=9)
    axes[1, 0].set_axis_off()
    for column, mapping in enumerate(MAPPINGS, start=1):
        axes[0, column].imshow(crop[mapping][window], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0, column].set_title(f"marked, residual {mapping}", fontsize=9)
        residual = (crop[mapping] - source)[window]
        axes[1, column].imshow(residual, cmap="gray", vmin=-eps, vmax=eps, interpolation="nearest")
        axes[1, column].set_title(f"residual ({mapping}), ±ε", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"G at {size} px, file {source.shape[0]} x {source.shape[1]} px: what a reader sees", wrap=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


if __name__ == "__main__":
    main()
