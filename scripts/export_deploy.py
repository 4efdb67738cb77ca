"""Export a watermark checkpoint as the TorchScript bundle that MONAI Deploy's MonaiBundleInferenceOperator runs.

``models/model.ts`` holds the scripted watermarking network (MONAI's ``ckpt_export`` of ``network_def``) and, as its
extra files, ``metadata.json``, ``inference.json`` and ``deploy.json``: configs/deploy.json with this checkpoint's
``image_size`` and ``epsilon`` written in as numbers. The operator parses the configs from the archive and never
sees ``models/model.pt``, so without these numbers inference.json's ``network_def`` would look for that file
(``./models/model.pt``, relative to wherever the MAP runs). The result is checked: the scripted network must give
what the checkpoint gives on the same input, or nothing is written. Like the checkpoint, the export is the owner's
secret (it marks images with the owner's watermark).

Example: ``python scripts/export_deploy.py --ckpt models/model.pt --out models/model.ts``; then
``scripts/deploy_app.py`` (docs/README.md, "MONAI Deploy").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

import torch  # noqa: E402
from monai.bundle import ckpt_export  # noqa: E402

from xmark_bundle.networks.checkpoint import load_watermark, watermark_record  # noqa: E402

#: The config names the operator is given (``BundleConfigNames(config_names=...)``), in merge order.
CONFIG_NAMES = ("inference", "deploy")


def deploy_config(record: dict, configs: Path = ROOT / "configs") -> dict:
    """configs/deploy.json with a checkpoint's image size and budget (its ``record``) as numbers."""
    config = json.loads((configs / "deploy.json").read_text(encoding="utf-8"))
    return {**config, "image_size": int(record["image_size"]), "epsilon": float(record["epsilon"])}


def export_deploy(checkpoint: str | Path, out: str | Path, configs: Path = ROOT / "configs") -> Path:
    """Write ``out`` (TorchScript with the configs the operator reads) from ``checkpoint``; atomic.

    Written under its own name in a temporary folder beside ``out`` (the archive's inner folder is named after the
    file, and the operator looks for ``<name>/extra/<config>.json``), checked, then moved into place."""
    checkpoint, out = Path(checkpoint), Path(out)
    record = watermark_record(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        target, deploy = Path(tmp) / out.name, Path(tmp) / "deploy.json"
        deploy.write_text(json.dumps(deploy_config(record, configs), indent=4))
        ckpt_export(
            net_id="network_def",
            filepath=str(target),
            ckpt_file=str(checkpoint),
            meta_file=str(configs / "metadata.json"),
            config_file=[str(configs / f"{name}.json") for name in CONFIG_NAMES[:-1]] + [str(deploy)],
            ckpt_path=str(checkpoint),
        )
        scripted, eager = torch.jit.load(str(target), map_location="cpu"), load_watermark(checkpoint, "cpu")
        size = int(record["image_size"])
        image = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = float((scripted(image) - eager(image)).abs().max())
        if difference > 1e-5:
            problem = f"the scripted network differs from {checkpoint} by {difference:.3g}"
            raise RuntimeError(f"{out}: {problem}; not written")
        os.replace(target, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(ROOT / "models" / "model.pt"), help="the owner's watermark checkpoint")
    parser.add_argument("--out", default=str(ROOT / "models" / "model.ts"), help="TorchScript file to write")
    args = parser.parse_args(argv)
    out = export_deploy(args.ckpt, args.out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) with configs {', '.join(CONFIG_NAMES)}")
    return out


if __name__ == "__main__":
    main()
