"""X-Mark end to end at the smallest size where its science can be tested: generator, release, suspects, verdicts.

360 development phantoms (seed 3) of 256-384 px, everything at 96 px: a ResNet18 surrogate (seed 1, 8 epochs), the
paper's X-Mark generator (configs/train.json: EigenCAM conditioning, four-part loss; 12 epochs), a clean-label
release marking every target image (gamma 1), and for each suspect seed two ResNet18 suspects, one trained on the
release (malicious) and one on the clean data (benign). Each model is verified with the paper's margin test at its
own size. The learning effect of a suspect seed is its malicious ΔP minus its benign ΔP: what the release taught
it, beyond what G's edit does to a model of the same seed that never saw a marked image.

Writes ``verdicts_g<generator seed>.json`` (``verdicts``: ΔP, p, WSR and the verdict of every model;
``learning_effect`` per suspect seed) in ``--out``; resumable (a finished step is kept).
tests/test_learning_end_to_end_xmark.py runs it; to measure the spread over generator seeds::

    for g in 101 102 103; do python scripts/xmark_tiny_run.py --out /tmp/xmark_tiny --generator-seed $g; done
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmark_bundle.data.chexpert import prepare_datalist  # noqa: E402
from xmark_bundle.data.phantoms import write_phantom_dataset  # noqa: E402
from xmark_bundle.experiments.stages import bundle_cmd  # noqa: E402
from xmark_bundle.fileio import write_json  # noqa: E402
from xmark_bundle.networks.checkpoint import load_watermark  # noqa: E402
from xmark_bundle.release import watermark_release  # noqa: E402
from xmark_bundle.verification import VerificationSettings, verify_ownership  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 96
SURROGATE_SEED = 1


def _train(configs: str, out: Path, **overrides: object) -> None:
    """Run a bundle training into ``out`` unless its ``model.pt`` exists; a failure names the command's error."""
    if (out / "model.pt").is_file():
        return
    cmd = bundle_cmd("training", [configs], progress=False, num_workers=0, ckpt_dir=out, **overrides)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def _classifier(data: Path, out: Path, seed: int) -> None:
    _train(
        "configs/train_classifier.json", out, dataset_dir=data, datalist_file=data / "datalist.json", image_size=SIZE,
        max_epochs=8, learning_rate=0.001, batch_size=16, seed=seed,
    )  # fmt: skip


def run(out: Path, generator_seed: int, suspect_seeds: list[int]) -> dict:
    """Make (or reuse) every step under ``out`` and return the verdicts (also written to ``verdicts_g<seed>.json``)."""
    if SURROGATE_SEED in suspect_seeds or generator_seed in suspect_seeds:
        raise ValueError(f"suspect seeds {suspect_seeds} must differ from the surrogate's ({SURROGATE_SEED}) and G's")
    source = out / "source"
    if not (source / "datalist.json").is_file():
        write_phantom_dataset(source, n=360, seed=3, min_size=256, max_size=384, dicom_fraction=0.0)
        prepare_datalist(source / "train.csv", source / "datalist.json", test_csv=source / "valid.csv")
    _classifier(source, out / "surrogate", SURROGATE_SEED)
    generator_dir = out / f"generator{generator_seed}"
    _train(
        "configs/train.json", generator_dir, dataset_dir=source, output_dir=generator_dir / "logs",
        surrogate_ckpt=out / "surrogate" / "model.pt", surrogate_size=SIZE, image_size=SIZE, batch_size=8,
        generator_fraction=1.0, generator_channels="[16,32,64,128,256]", max_epochs=12, learning_rate=0.001,
        seed=generator_seed,
    )  # fmt: skip
    checkpoint = generator_dir / "model.pt"
    generator = load_watermark(checkpoint)
    release, manifest_file = out / f"release{generator_seed}", out / f"manifest{generator_seed}.json"
    if not manifest_file.is_file():
        watermark_release(
            generator, checkpoint, source, source / "datalist.json", release, manifest_file, gamma=1.0, progress=False
        )
    manifest = json.loads(manifest_file.read_text())
    settings = VerificationSettings(query_size=SIZE, n_samples=40, batch_size=8)
    models = {"surrogate": out / "surrogate"}
    for seed in suspect_seeds:
        models[f"malicious_seed{seed}"] = out / f"malicious_g{generator_seed}_seed{seed}"
        _classifier(release, models[f"malicious_seed{seed}"], seed)
        models[f"benign_seed{seed}"] = out / f"benign_seed{seed}"
        _classifier(source, models[f"benign_seed{seed}"], seed)
    verdicts = {}
    for name, model in models.items():
        found = verify_ownership(
            generator, str(model), source / "datalist.json", out / f"verify_g{generator_seed}" / name, settings,
            progress=False,
        )  # fmt: skip
        verdicts[name] = {key: found[key] for key in ("owned", "delta_p", "p_value", "wsr")}
    effect = {
        str(s): verdicts[f"malicious_seed{s}"]["delta_p"] - verdicts[f"benign_seed{s}"]["delta_p"]
        for s in suspect_seeds
    }
    result = {
        "generator_seed": generator_seed,
        "suspect_seeds": suspect_seeds,
        "method": generator.watermark_record["method"],
        "release": {"budget_ok": manifest["budget_ok"], "marked": len(manifest["marked"])},
        "verdicts": verdicts,
        "learning_effect": effect,
        "mean_learning_effect": sum(effect.values()) / len(effect),
    }
    write_json(out / f"verdicts_g{generator_seed}.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for every step (resumable)")
    parser.add_argument("--generator-seed", type=int, default=101)
    parser.add_argument("--suspect-seeds", default="2,4", help="comma-separated; not the surrogate's seed (1)")
    args = parser.parse_args()
    result = run(args.out, args.generator_seed, [int(s) for s in args.suspect_seeds.split(",")])
    for name, v in result["verdicts"].items():
        print(f"{name:>18}: dP {v['delta_p']:+.3f}  p {v['p_value']:.2g}  WSR {v['wsr']:.2f}  owned {v['owned']}")
    print(f"learning effect per suspect seed {result['learning_effect']}, mean {result['mean_learning_effect']:.3f}")


if __name__ == "__main__":
    main()
