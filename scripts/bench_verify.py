"""Wall time of black-box ownership verification for n queries, per stage, on phantoms: the paper's test alone, the
calibrated verdict with a family of m + 1 generators (first suspect: the family's queries are made and kept), and a
second suspect (the kept queries reused), and the first suspect again (its kept answers reused, as for another owner
of the same pool), with the ratios to the paper's test alone.

G, its family and the suspects are randomly initialised (speed does not depend on training): default-width X-Mark
generators at ``--image-size`` and ResNet18 suspects given as TorchScript files, queried at 224 px.
Example: ``python scripts/bench_verify.py --n 100 --image-size 512 --members 19``
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
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark  # noqa: E402
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier  # noqa: E402
from xmark_bundle.networks.generator import XMarkGenerator  # noqa: E402
from xmark_bundle.networks.pipeline import WatermarkPipeline  # noqa: E402
from xmark_bundle.verification import VerificationSettings, verify_ownership  # noqa: E402
from xmark_bundle.verification.family import make_generator_family  # noqa: E402


def _generator(image_size: int) -> WatermarkPipeline:
    """A default-width X-Mark generator with a ResNet18 surrogate at ``image_size`` (random weights)."""
    surrogate = ResizedClassifier(build_classifier("resnet18"))
    return WatermarkPipeline(XMarkGenerator(), surrogate, "classifier.layer4", image_size=image_size).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="verification queries (non-target samples)")
    parser.add_argument("--image-size", type=int, default=512, help="G's model resolution")
    parser.add_argument("--members", type=int, default=19, help="other members m of the owner's family")
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
        for name in ("suspect_a", "suspect_b"):
            torch.jit.trace(build_classifier("resnet18").eval(), torch.rand(1, 1, 224, 224)).save(str(tmp / name))
        members = [tmp / "family" / f"member_{j:03d}" / "model.pt" for j in range(args.members + 1)]
        for ckpt in members:
            save_watermark(_generator(args.image_size), ckpt)
        family = make_generator_family(members, tmp / "family.json", owner_index=0)
        generator = load_watermark(members[0])
        settings = VerificationSettings(n_samples=args.n, query_size=224)
        runs = {}
        for number, (label, suspect, with_family) in enumerate(
            (
                ("paper's test alone", "suspect_a", None),
                ("calibrated, first suspect (family queries made)", "suspect_a", family.path),
                ("calibrated, another suspect (family queries kept)", "suspect_b", family.path),
                ("calibrated, first suspect again (its answers kept)", "suspect_a", family.path),
            )
        ):
            start = time.perf_counter()
            report = verify_ownership(
                generator, str(tmp / suspect), tmp / "data" / "datalist.json", tmp / f"run{number}", settings,
                generator_ckpt=members[0], dataset_dir=tmp / "data", progress=False, family=with_family,
            )  # fmt: skip
            runs[label] = (time.perf_counter() - start, report["timings_s"])
    base = runs["paper's test alone"][0]
    print(f"\nverification of n = {args.n} queries, G at {args.image_size} px, family of m = {args.members} others")
    for label, (total, timings) in runs.items():
        print(f"{label:<52} {total:8.1f} s wall   ratio to the paper's test alone {total / base:5.2f}")
        for stage, seconds in timings.items():
            print(f"    {stage:<20} {seconds:8.2f} s")


if __name__ == "__main__":
    main()
