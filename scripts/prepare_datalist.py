"""Write a MONAI datalist JSON (patient-level splits, six X-Mark labels) from CheXpert CSV files.

Example: ``python scripts/prepare_datalist.py --csv CheXpert-v1.0-small/train.csv --test-csv
CheXpert-v1.0-small/valid.csv --out datalist.json --policy u-ones --frontal-only
--path-prefix-strip CheXpert-v1.0-small/``
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.data.chexpert import POLICIES, prepare_datalist  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, write the datalist and print the split sizes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", required=True, help="CheXpert train.csv (or .csv.gz)")
    parser.add_argument("--test-csv", help="CSV for the test split (e.g. valid.csv); --csv then gives train/val only")
    parser.add_argument("--out", required=True, help="output datalist JSON")
    parser.add_argument("--policy", choices=POLICIES, default="u-ones", help="uncertain (-1) labels -> 1, 0 or kept")
    parser.add_argument("--frontal-only", action="store_true", help="keep frontal views only")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of patients for validation")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of patients for test (no --test-csv)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle")
    parser.add_argument("--path-prefix-strip", default="", help="prefix removed from the start of every CSV Path")
    args = parser.parse_args(argv)
    try:
        datalist = prepare_datalist(
            args.csv,
            args.out,
            test_csv=args.test_csv,
            policy=args.policy,
            frontal_only=args.frontal_only,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            path_prefix_strip=args.path_prefix_strip,
        )
    except (ValueError, OSError) as exc:  # bad CSV, bad option values, unreadable or missing file
        sys.exit(f"prepare_datalist: error: {exc}")
    for name, count in datalist["metadata"]["counts"].items():
        print(f"{name}: {count['images']} images, {count['patients']} patients")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
