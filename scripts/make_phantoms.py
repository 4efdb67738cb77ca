"""Write the synthetic chest-radiograph phantom data set (CheXpert layout, PNG and DICOM) used by the offline demo.

Example: ``python scripts/make_phantoms.py --out outputs/phantoms --n 800 --seed 0 --workers 2``; ``--masks`` adds each
image's lung mask (``masks/``) and the segmentation datalist ``seg_datalist.json`` for the StealthMark bundle;
``--family physical`` renders the second family (:mod:`xmark_bundle.data.radiograph_chain`) with the same patients
and labels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.data.labels import LABELS  # noqa: E402
from xmark_bundle.data.phantoms import FAMILIES, TARGET_PREVALENCE, write_phantom_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, write the data set and print the achieved label prevalences against the targets."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (train.csv, valid.csv, train/, valid/)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes")
    parser.add_argument("--dicom-fraction", type=float, default=0.3, help="share of images written as DICOM")
    parser.add_argument("--min-size", type=int, default=1024, help="smallest image side in pixels")
    parser.add_argument("--max-size", type=int, default=3000, help="largest image side in pixels")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of patients in valid.csv")
    parser.add_argument(
        "--masks", action="store_true", help="also write lung masks under masks/ and seg_datalist.json (StealthMark)"
    )
    parser.add_argument("--workers", type=int, default=1, help=f"worker processes (this machine: {os.cpu_count()})")
    parser.add_argument("--family", choices=FAMILIES, default="classic", help="phantom renderer (default: classic)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    summary = write_phantom_dataset(
        args.out,
        n=args.n,
        seed=args.seed,
        dicom_fraction=args.dicom_fraction,
        min_size=args.min_size,
        max_size=args.max_size,
        valid_fraction=args.valid_fraction,
        workers=args.workers,
        progress=True,
        masks=args.masks,
        family=args.family,
    )
    elapsed = time.perf_counter() - start
    print(
        f"Wrote {summary['images']} {args.family} images of {summary['patients']} patients to {summary['out_dir']} "
        f"({summary['train_images']} train, {summary['valid_images']} valid, {summary['dicom_images']} DICOM) "
        f"in {elapsed:.1f} s ({summary['images'] / elapsed:.2f} images/s)."
    )
    print(f"{'label':<18} {'positive':>9} {'target':>7} {'uncertain':>10} {'target':>7}   (targets: CheXpert frontal)")
    for name in LABELS:
        got = summary["prevalence"][name]
        pos, unc = (f"{v:.3f}" for v in TARGET_PREVALENCE[name]) if name in TARGET_PREVALENCE else ("derived", "-")
        print(f"{name:<18} {got['positive']:>9.3f} {pos:>7} {got['uncertain']:>10.3f} {unc:>7}")
    return summary


if __name__ == "__main__":
    main()
