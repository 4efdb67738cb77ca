"""Write a datalist whose training split is a seeded random share of another's (validation and test unchanged): the
small clean set a data user fine-tunes a model on (removal attacks), with the same relative image paths.

Example: ``python scripts/subset_datalist.py --datalist data/datalist.json --fraction 0.1 --out data/clean10.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.fileio import write_json  # noqa: E402


def subset_datalist(datalist: dict, fraction: float, seed: int) -> dict:
    """``datalist`` with round(fraction * n) of its training entries, drawn without replacement (order kept)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    training = datalist["training"]
    keep = sorted(np.random.default_rng(seed).choice(len(training), max(1, round(fraction * len(training))), False))
    metadata = {**datalist.get("metadata", {}), "subset": {"fraction": fraction, "seed": seed, "of": len(training)}}
    return {**datalist, "metadata": metadata, "training": [training[i] for i in keep]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", required=True, help="the full datalist")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the training entries to keep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")
    parser.add_argument("--out", required=True, help="datalist to write (beside the images' base folder)")
    args = parser.parse_args(argv)
    subset = subset_datalist(json.loads(Path(args.datalist).read_text()), args.fraction, args.seed)
    out = write_json(args.out, subset)
    print(f"wrote {out}: {len(subset['training'])} training entries")
    return out


if __name__ == "__main__":
    main()
