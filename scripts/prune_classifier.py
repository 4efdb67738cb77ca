"""Prune a bundle classifier's dormant penultimate units on clean data (the first half of fine-pruning, Liu et al.
2018); fine-tune the result with configs/finetune_pruned.json, which keeps them pruned. See
:mod:`xmark_bundle.networks.pruning`.

Example: ``python scripts/prune_classifier.py --ckpt suspect/model.pt --datalist data/clean10.json --dataset-dir data
--rate 0.5 --out pruned`` writes a classifier folder like the one training writes (``model.pt``, and
``training_info.json`` from the source's, its ``weights`` saying ``pruned:<source>``) with ``pruning.json`` (the units
and their mean activations): evaluation and verification take it as they take a trained classifier. The source
checkpoint is only read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.fileio import atomic_path, write_json  # noqa: E402
from xmark_bundle.networks.classifier import load_classifier  # noqa: E402
from xmark_bundle.networks.pruning import prune_dormant  # noqa: E402
from xmark_bundle.verification.queries import datalist_items, load_letterboxed  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="the classifier checkpoint to prune (model.pt)")
    parser.add_argument("--arch", help="its architecture (default: its training_info.json's, else resnet18)")
    parser.add_argument("--image-size", type=int, help="its input size (default: its training_info.json's, else 128)")
    parser.add_argument("--datalist", required=True, help="the clean data: this datalist's training split")
    parser.add_argument("--dataset-dir", help="base folder of the datalist's image paths (default: its folder)")
    parser.add_argument("--rate", type=float, required=True, help="share of the penultimate units to prune, [0, 1)")
    parser.add_argument("--out", required=True, help="folder of the pruned classifier (not the source's)")
    args = parser.parse_args(argv)
    source, out = Path(args.ckpt), Path(args.out)
    if out.resolve() == source.parent.resolve():
        parser.error(f"--out {out} holds the source checkpoint; write the pruned model elsewhere")
    info_file = source.parent / "training_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    arch, size = args.arch or info.get("arch", "resnet18"), args.image_size or int(info.get("image_size", 128))
    model = load_classifier(source, arch)
    items = datalist_items(args.datalist, "training", args.dataset_dir or Path(args.datalist).parent)
    if not items:
        parser.error(f"{args.datalist}: its training split is empty; pruning needs clean images to rank the units")
    report = prune_dormant(model, load_letterboxed(items, range(len(items)), size), args.rate)
    info |= {"arch": arch, "image_size": size, "weights": f"pruned:{source}"}
    write_json(out / "pruning.json", {"source": str(source), "n_images": len(items), **report})
    write_json(out / "training_info.json", {**info, "pruning_rate": args.rate, "pruning_datalist": str(args.datalist)})
    with atomic_path(out / "model.pt") as tmp:  # last: the runner takes model.pt as the sign of a finished stage
        torch.save({"model": model.state_dict()}, tmp)
    print(f"pruned {len(report['units'])} of {report['n_units']} units of {source} on {len(items)} images: {out}")
    return report


if __name__ == "__main__":
    main()
