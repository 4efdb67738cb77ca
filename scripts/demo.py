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
    parser.add_argument("--n", type=int, default=800, help="number of phantom images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test setting (minutes, not meaningful)")
    args = parser.parse_args()

    out = (ROOT / args.out).resolve()
    n, epochs, sizes = (args.n, args.epochs, ["--min-size", "1024", "--max-size", "3000"])
    if args.quick:
        n, epochs, sizes = 48, 1, ["--min-size", "256", "--max-size", "384"]
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


if __name__ == "__main__":
    main()
