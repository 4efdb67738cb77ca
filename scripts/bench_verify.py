"""Wall time of black-box ownership verification for n queries, per stage, on phantoms (one run).

G and the suspect are randomly initialised (speed does not depend on training): default-width X-Mark generator at
``--image-size`` and a ResNet18 suspect given as a TorchScript file, queried at 224 px.
Example: ``python scripts/bench_verify.py --n 100 --image-size 512``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmark_bundle.data.chexpert import prepare_datalist  # noqa: E402
from xmark_bundle.data.phantoms import write_phantom_dataset  # noqa: E402
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier  # noqa: E402
from xmark_bundle.networks.generator import XMarkGenerator  # noqa: E402
from xmark_bundle.networks.pipeline import WatermarkPipeline  # noqa: E402
from xmark_bundle.verification import verify_ownership  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="verification queries (non-target samples)")
    parser.add_argument("--image-size", type=int, default=512, help="G's model resolution")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # enough phantoms that the test split holds n non-target samples (No Finding is ~22 %)
        write_phantom_dataset(
            tmp / "data",
            n=int(args.n * 1.6 / 0.75) + 8,
            seed=0,
            min_size=1024,
            max_size=2048,
            valid_fraction=0.75,
            workers=2,
        )
        prepare_datalist(
            tmp / "data" / "train.csv", tmp / "data" / "datalist.json", test_csv=tmp / "data" / "valid.csv"
        )
        suspect = tmp / "suspect.ts"
        torch.jit.trace(build_classifier("resnet18").eval(), torch.rand(1, 1, 224, 224)).save(str(suspect))
        generator = WatermarkPipeline(
            XMarkGenerator(), ResizedClassifier(build_classifier("resnet18")), "classifier.layer4"
        )
        start = time.perf_counter()
        report = verify_ownership(
            generator.eval(),
            str(suspect),
            tmp / "data" / "datalist.json",
            tmp / "out",
            dataset_dir=tmp / "data",
            image_size=args.image_size,
            n_samples=args.n,
            progress=False,
        )
        total = time.perf_counter() - start
    print(f"\nverification of n = {report['n']} queries at G resolution {args.image_size}: {total:.1f} s wall")
    for stage, seconds in report["timings_s"].items():
        print(f"  {stage:<18} {seconds:8.2f} s")


if __name__ == "__main__":
    main()
