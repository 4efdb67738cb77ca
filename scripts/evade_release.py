"""Apply a data user's cheap defence to every image of a release before training on it (JPEG 75, downscaling to
512 px, Gaussian noise 0.02, histogram equalisation); see :mod:`xmark_bundle.experiments.evasion`.

Example: ``python scripts/evade_release.py --release REL --evasion jpeg75 --out REL_jpeg75``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.experiments.evasion import EVASIONS, evade_release  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True, help="the release folder (with its datalist.json)")
    parser.add_argument("--evasion", required=True, choices=sorted(EVASIONS), help="what the data user does")
    parser.add_argument("--out", required=True, help="the evaded copy to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random evasions")
    args = parser.parse_args(argv)
    out = evade_release(args.release, args.out, args.evasion, args.seed)
    print(f"wrote {out} ({args.evasion})")
    return out


if __name__ == "__main__":
    main()
