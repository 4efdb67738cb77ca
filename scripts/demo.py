"""End-to-end demo on built-in phantoms: data set, datalist, classifier training and evaluation.

Each stage runs the same command a user would type (shown before it runs) and is skipped when its output already
exists, so an interrupted demo resumes. ``--quick`` shrinks everything for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Demo sizes. The generator is narrower than the paper's (64..1024) and runs at 256 px so that it trains on two
#: CPU cores in minutes; phantoms are 1024-2048 px; all target samples train G (the demo set is small).
SETTINGS = {
    "full": {
        "min_size": 1024,
        "max_size": 2048,
        "generator": {
            "image_size": 256,
            "generator_channels": "[16,32,64,128,256]",
            "generator_fraction": 1.0,
            "batch_size": 16,
            "max_epochs": 15,
        },
    },
    "quick": {
        "n": 48,
        "min_size": 256,
        "max_size": 384,
        "generator": {
            "image_size": 64,
            "generator_channels": "[4,8,16,32,64]",
            "generator_fraction": 1.0,
            "batch_size": 8,
            "max_epochs": 1,
        },
    },
}


def run_stage(name: str, cmd: list[str], done: Path) -> None:
    """Run ``cmd`` from the bundle root unless ``done`` exists; stop the demo with the stage name on failure."""
    if done.exists():
        print(f"[demo] {name}: already done ({done.relative_to(ROOT) if done.is_relative_to(ROOT) else done})")
        return
    print(f"[demo] {name}: {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"[demo] stage '{name}' failed (exit code {result.returncode}); fix the error above and rerun.")
    print(f"[demo] {name}: done in {time.perf_counter() - start:.0f} s", flush=True)


def bundle_cmd(run_id: str, configs: list[str], **overrides: object) -> list[str]:
    """A ``python -m monai.bundle run`` command line for ``configs`` with ``--key value`` overrides."""
    config_arg = configs[0] if len(configs) == 1 else json.dumps(configs).replace('"', "'")
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="demo output folder (relative to the bundle root)")
    parser.add_argument("--n", type=int, default=600, help="number of phantom images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test setting (minutes, not meaningful)")
    args = parser.parse_args()

    out = (ROOT / args.out).resolve()
    setting = SETTINGS["quick" if args.quick else "full"]
    n, epochs = (setting["n"], 1) if args.quick else (args.n, args.epochs)
    sizes = ["--min-size", str(setting["min_size"]), "--max-size", str(setting["max_size"])]
    sizes += ["--valid-fraction", "0.25", "--workers", "2"]
    phantoms, models = out / "phantoms", out / "models"
    datalist = phantoms / "datalist.json"
    py = sys.executable

    run_stage(
        "phantoms",
        [py, "scripts/make_phantoms.py", "--out", str(phantoms), "--n", str(n), "--seed", str(args.seed), *sizes],
        phantoms / "valid.csv",
    )
    run_stage(
        "datalist",
        [
            py,
            "scripts/prepare_datalist.py",
            "--csv",
            str(phantoms / "train.csv"),
            "--test-csv",
            str(phantoms / "valid.csv"),
            "--out",
            str(datalist),
            "--policy",
            "u-ones",
            "--seed",
            str(args.seed),
        ],
        datalist,
    )
    common = {"dataset_dir": phantoms, "datalist_file": datalist, "ckpt_dir": models / "classifier", "seed": args.seed}
    run_stage(
        "surrogate classifier",
        bundle_cmd("training", ["configs/train_classifier.json"], max_epochs=epochs, **common),
        models / "classifier" / "training_info.json",
    )
    report = models / "classifier" / "classification_report.json"
    run_stage(
        "classifier evaluation",
        bundle_cmd("run", ["configs/train_classifier.json", "configs/evaluate_classifier.json"], **common),
        report,
    )
    summary = json.loads(report.read_text())
    print("\n[demo] surrogate classifier on the phantom test split (per-label AUROC):")
    for label, row in summary["per_label"].items():
        print(f"  {label:<18} {row['auroc'] if row['auroc'] is None else round(row['auroc'], 3)}")
    print(f"  {'mean':<18} {summary['mean_auroc']:.3f}    report: {report}")

    generator = models / "generator"
    run_stage(
        "watermark generator",
        bundle_cmd(
            "training",
            ["configs/train.json"],
            dataset_dir=phantoms,
            datalist_file=datalist,
            ckpt_dir=generator,
            output_dir=generator / "logs",
            surrogate_ckpt=models / "classifier" / "model.pt",
            seed=args.seed,
            **setting["generator"],
        ),
        generator / "training_info.json",
    )
    metrics = json.loads((generator / "logs" / "metrics.json").read_text())
    best = next(row for row in metrics["history"] if row["epoch"] == metrics["best"]["epoch"])
    print(
        f"\n[demo] generator (best epoch {best['epoch']}): surrogate WSR {best['val_wsr']:.3f}, "
        f"LPIPS {best['val_lpips']:.4f} (backbone: {metrics['lpips_backbone']}), "
        f"max |x_hat - x| {best['val_max_abs_diff']:.4f} (eps {metrics['epsilon']:.4f}), "
        f"PSNR {best['val_psnr']:.1f} dB, SSIM {best['val_ssim']:.3f}"
    )


if __name__ == "__main__":
    main()
