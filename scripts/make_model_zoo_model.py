"""Write the bundle's released ``models/model.pt`` for the MONAI model zoo: an UNTRAINED stand-in watermark checkpoint.

The file is a watermark checkpoint in the bundle's own format (:func:`xmark_bundle.networks.checkpoint.save_watermark`:
weights beside the record that rebuilds the network), so ``configs/inference.json``'s ``network_def``
(``load_watermark(@ckpt_path)``) loads it and the zoo's checks (``verify_net_in_out``, ``ckpt_export``) run on it.
Its weights are random (seeded): it adds a bounded but meaningless perturbation and proves nothing about anyone's
data. A released bundle ships no trained generator on purpose: a trained checkpoint is its owner's secret key
(docs/README.md, "Threat model"); every owner trains their own with configs/train.json, which writes the same format.

Nothing is downloaded. The default sizes are the demo's (generator widths 16..256 at 256 px, ``make demo``) with the
smallest supported surrogate (ResNet18 at 224 px); the surrogate's weights make up most of the file (about 45 MB of
about 51 MB), more than the zoo's 25 MB limit for files in its repository, so the file is published through
``large_files.yml`` as any bundle's weights are.

Example: ``python scripts/make_model_zoo_model.py --out models/model.pt`` (its md5 is ``large_files.yml``'s
``hash_val``); then, for MONAI Deploy, ``python scripts/export_deploy.py --ckpt models/model.pt --out
models/model.ts`` (plain ``ckpt_export`` leaves out the ``deploy.json`` that MONAI Deploy's operator reads).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

import torch  # noqa: E402

from xmark_bundle.data.labels import LABELS  # noqa: E402
from xmark_bundle.networks.checkpoint import save_watermark  # noqa: E402
from xmark_bundle.networks.classifier import CAM_LAYERS, ResizedClassifier, build_classifier  # noqa: E402
from xmark_bundle.networks.generator import DEFAULT_EPS, XMarkGenerator  # noqa: E402
from xmark_bundle.networks.pipeline import WatermarkPipeline  # noqa: E402


def stand_in_pipeline(
    channels: tuple[int, ...] = (16, 32, 64, 128, 256),
    image_size: int = 256,
    surrogate_arch: str = "resnet18",
    surrogate_size: int = 224,
    seed: int = 0,
) -> WatermarkPipeline:
    """An untrained X-Mark pipeline (seeded random weights, no key) in eval mode."""
    torch.manual_seed(seed)
    generator = XMarkGenerator(channels=channels, eps=DEFAULT_EPS, conditioning=True)
    surrogate = ResizedClassifier(build_classifier(surrogate_arch, num_classes=len(LABELS)), surrogate_size)
    return WatermarkPipeline(generator, surrogate, f"classifier.{CAM_LAYERS[surrogate_arch]}", image_size).eval()


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, write the checkpoint and print its size and MD5 (for ``large_files.yml``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "models" / "model.pt"), help="checkpoint to write")
    parser.add_argument("--channels", default="16,32,64,128,256", help="generator widths per level, comma-separated")
    parser.add_argument("--image-size", type=int, default=256, help="generator resolution (a multiple of 16)")
    parser.add_argument("--surrogate-arch", default="resnet18", choices=sorted(CAM_LAYERS), help="surrogate model")
    parser.add_argument("--surrogate-size", type=int, default=224, help="surrogate input side")
    parser.add_argument("--target-label", default=LABELS[0], choices=LABELS, help="label whose images are marked")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)

    channels = tuple(int(c) for c in args.channels.split(","))
    network = stand_in_pipeline(channels, args.image_size, args.surrogate_arch, args.surrogate_size, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_watermark(network, out, args.target_label, LABELS)
    digest = hashlib.md5(out.read_bytes()).hexdigest()
    print(f"wrote {out}: untrained stand-in, {out.stat().st_size / 1e6:.1f} MB, md5 {digest}")
    return out


if __name__ == "__main__":
    main()
