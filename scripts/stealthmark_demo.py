"""StealthMark CPU demo: train a watermarked and a benign lung segmenter on phantoms, then verify both (black box).

Everything goes through ``monai.bundle`` with the StealthMark bundle's configs (``stealthmark/configs``): phantoms with
lung masks, ``training`` twice (the owner's watermarked model, and a benign model with another seed and no trigger),
then ``verifying`` and ``evaluating`` (harmlessness) of each with the owner's record. Prints both verdicts and writes
the reports under ``--out``.

Example: ``python scripts/stealthmark_demo.py --out outputs/stealthmark_demo``. The defaults (60 phantoms, BasicUNet of
width 8 at 64 px, 120 epochs at lr 3e-3, patch trigger, epsilon 0.1) were chosen on development phantoms (seed 0) so
that the watermark is learnt on a CPU in a few minutes; MONAI's residual UNet did not learn it in the same steps.

Research options: ``--decoy-share`` trains the owner's model with decoys (a keyed trigger only: ``blocks``,
``blocks8`` or ``noise``); ``--other-key K [K ...]`` also verifies every model with a copy of the owner's record
under each key ``K`` (the same trigger under another key: does the verdict belong to this key or to the trigger?);
``--no-benign`` skips the benign model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

from monai.bundle import run  # noqa: E402

from xmark_bundle.data.phantoms import SEG_DATALIST, write_phantom_dataset  # noqa: E402
from xmark_bundle.fileio import write_json  # noqa: E402
from xmark_bundle.stealthmark.records import OWNER_RECORD  # noqa: E402

BUNDLE = Path(__file__).resolve().parents[1] / "stealthmark"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the command line, run the four stages and print one verdict per model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/stealthmark_demo", help="output folder")
    parser.add_argument("--n", type=int, default=60, help="phantom images")
    parser.add_argument("--phantom-seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="network input size (the paper: 256)")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--val-interval", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (the paper: 1e-4 at 256 px)")
    parser.add_argument("--arch", default="basicunet")
    parser.add_argument("--width", type=int, default=8, help="first stage's channels")
    parser.add_argument("--trigger", default="patch")
    parser.add_argument("--epsilon", type=float, default=0.1, help="the floor (the paper: 0.05 or 0.1)")
    parser.add_argument("--share", type=float, default=0.5, help="share of training images triggered")
    parser.add_argument("--key", type=int, default=2027, help="the owner's secret key")
    parser.add_argument(
        "--decoy-share", type=float, default=0.0, help="share of training images with the trigger under other keys"
    )
    parser.add_argument(
        "--other-key",
        type=int,
        nargs="+",
        default=[],
        help="also verify with a copy of the owner's record under each of these keys",
    )
    parser.add_argument("--no-benign", action="store_true", help="skip the benign model")
    parser.add_argument("--owner-seed", type=int, default=1)
    parser.add_argument("--benign-seed", type=int, default=2)
    parser.add_argument("--n-queries", type=int, default=20)
    parser.add_argument(
        "--badnet", action="store_true", help="also train the harmful baseline badnet_seg (owner's key, trigger, seed)"
    )
    args = parser.parse_args(argv)

    out = Path(args.out)
    data = out / "phantoms"
    start = time.perf_counter()
    if not (data / SEG_DATALIST).is_file():
        write_phantom_dataset(
            data,
            args.n,
            args.phantom_seed,
            dicom_fraction=0.2,
            min_size=160,
            max_size=256,
            valid_fraction=0.3,
            masks=True,
        )
    common = {
        "dataset_dir": str(data),
        "image_size": args.image_size,
        "max_epochs": args.epochs,
        "arch": args.arch,
        "width": args.width,
        "trigger": args.trigger,
        "epsilon": args.epsilon,
        "trigger_share": args.share,
        "decoy_share": args.decoy_share,
        "key": args.key,
        "device": "cpu",
        "batch_size": args.batch_size,
        "val_interval": args.val_interval,
        "learning_rate": args.lr,
    }
    models = {"watermarked": ("stealthmark", args.owner_seed)}
    if not args.no_benign:
        models["benign"] = ("none", args.benign_seed)
    if args.badnet:
        models["badnet_seg"] = ("badnet_seg", args.owner_seed)
    for name, (method, seed) in models.items():
        if not (out / name / "model.pt").is_file():
            run(
                "training",
                config_file=str(BUNDLE / "configs" / "train.json"),
                ckpt_dir=str(out / name),
                method=method,
                seed=seed,
                **common,
            )
    record = out / "watermarked" / OWNER_RECORD
    records = {"": record}
    for other_key in args.other_key:
        other = out / f"record_key_{other_key}" / OWNER_RECORD
        write_json(other, {**json.loads(record.read_text()), "key": other_key})
        records[f"@{other_key}"] = other
    verdicts = {}
    for name in models:
        for suffix, record_file in records.items():
            run(
                "verifying",
                config_file=str(BUNDLE / "configs" / "verify.json"),
                dataset_dir=str(data),
                record_file=str(record_file),
                suspect=str(out / name),
                n_samples=args.n_queries,
                output_dir=str(out / "verification" / (name + suffix)),
                device="cpu",
            )
            verdicts[name + suffix] = json.loads(
                (out / "verification" / (name + suffix) / "verification.json").read_text()
            )
        run(
            "evaluating",
            config_file=str(BUNDLE / "configs" / "evaluate.json"),
            dataset_dir=str(data),
            record_file=str(record),
            suspect=str(out / name),
            output_dir=str(out / "harmlessness" / name),
            device="cpu",
        )
        harm = json.loads((out / "harmlessness" / name / "harmlessness.json").read_text())
        for suffix in records:
            verdicts[name + suffix]["harmlessness"] = harm
    print(
        f"\nStealthMark demo (this run {time.perf_counter() - start:.0f} s): owner's key {args.key}, "
        f"trigger {args.trigger}, decoy share {args.decoy_share}"
    )
    for name, report in verdicts.items():
        test = report.get("test", {})
        print(
            f"  {name:<17} {report['verdict']:<14} floor {test.get('mean_clean', float('nan')):.4f} -> "
            f"{test.get('mean_triggered', float('nan')):.4f}, p = {test.get('p_ttest', float('nan')):.3g}, "
            f"ASR {report.get('asr', float('nan')):.2f}; Dice {report['harmlessness']['clean']['dice']['mean']:.4f} "
            f"clean, {report['harmlessness']['triggered']['dice']['mean']:.4f} triggered, mask pixels flipped by "
            f"the trigger {report['harmlessness']['flip_share']['mean']:.4f}"
        )
    return verdicts


if __name__ == "__main__":
    main()
