"""Measure how well a data user could find a release's marked files without the key (container, pixels, and the
malicious model's features); writes a JSON report. See :mod:`xmark_bundle.experiments.detectability`.

Example: ``python scripts/detect_marked.py --release REL --manifest models/release_manifest.json --suspect
SUSPECT/model.pt --out detectability.json``. The experiment runner runs it per method when a declaration says
``"detectability": true``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.experiments.detectability import detectability  # noqa: E402
from xmark_bundle.fileio import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="the release folder (with its datalist.json)")
    parser.add_argument("--manifest", required=True, help="the release's private manifest")
    parser.add_argument("--suspect", help="a malicious model's checkpoint (model.pt) for the suspect's view")
    parser.add_argument("--arch", default="resnet18", help="the suspect's architecture")
    parser.add_argument("--image-size", type=int, default=128, help="the suspect's input size")
    parser.add_argument("--target-label", default="No Finding", help="the watermark's target label")
    parser.add_argument("--seed", type=int, default=0, help="folds, CNN and clustering seed")
    parser.add_argument("--out", required=True, help="JSON report to write")
    args = parser.parse_args(argv)
    report = detectability(
        args.release, args.manifest, args.suspect, args.arch, args.image_size, args.target_label, args.seed
    )
    write_json(args.out, report)
    pixels, container = report["pixels"], report["container"]
    print(
        f"{report['n_marked']} marked of {report['n_candidates']} candidates: bytes/pixel AUROC "
        f"{container['bytes_per_pixel_auroc']:.3f}, compressibility {container['compressibility_auroc']:.3f}, "
        f"high-pass {pixels['high_pass_energy_auroc']:.3f}, pyramid LR "
        f"{pixels['pyramid_logistic_regression_auroc']:.3f}, small CNN {pixels['small_cnn_auroc']:.3f}"
        + (f", spectral {report['suspect']['spectral_auroc']:.3f}" if "suspect" in report else "")
    )
    return report


if __name__ == "__main__":
    main()
