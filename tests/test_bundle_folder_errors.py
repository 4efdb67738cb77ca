"""A bundle folder that cannot run says why on one line: without the xmark_bundle package (MONAI's own message would
be "Cannot locate ... load_watermark"), and with models/model.ts but no models/model.pt (MONAI Label counts either as
a model). Real ``python -m monai.bundle run`` processes in a temporary folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmark_bundle.errors import PACKAGE_CHECK, require_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in [*ROOT.glob("configs/*.json"), *ROOT.glob("stealthmark/configs/*.json")])
# the configs that import the package or set the expressions run first (the others are override files)
RUNNABLE = [p for p in CONFIGS if {"imports", "initialize"} & set(json.loads(p.read_text()))]


def _run(cwd: Path, args: list[str], pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _bundle_without_package(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(ROOT / "configs", folder / "configs")
    (folder / "models").mkdir()
    (folder / "in").mkdir()
    Image.fromarray((np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16)).save(folder / "in" / "x.png")
    return folder


@pytest.mark.parametrize("config", RUNNABLE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_runnable_config_checks_the_package_first(config):
    """A config that imports the package, or sets the expressions run first, starts them with the package check."""
    assert json.loads(config.read_text())["initialize"][0] == PACKAGE_CHECK
    assert len(RUNNABLE) >= 12 and ROOT / "configs" / "inference.json" in RUNNABLE


@pytest.mark.parametrize(
    "args",
    [
        ["--config_file", "configs/inference.json", "--dataset_dir", "in", "--output_dir", "out"],
        ["watermarking", "--config_file", "configs/watermark.json", "--dataset_dir", "in", "--release_dir", "rel"],
    ],
    ids=["inference", "watermarking"],
)
def test_configs_and_models_without_the_package_name_it(tmp_path, args):
    folder = _bundle_without_package(tmp_path)
    torch.save({}, folder / "models" / "model.pt")
    done = _run(folder, args, pythonpath=None)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cannot run this bundle: its Python package xmark_bundle is not importable from {folder}")
    assert "pip install" in last and "Traceback" not in done.stderr and "Cannot locate" not in done.stderr
    assert not (folder / "out").exists() and not (folder / "rel").exists()


def test_a_model_ts_without_model_pt_is_named(tmp_path):
    """MONAI Label's validity check takes models/model.ts; the bundle needs models/model.pt and says so."""
    folder = _bundle_without_package(tmp_path)
    torch.jit.script(torch.nn.Identity()).save(str(folder / "models" / "model.ts"))  # a real TorchScript file
    args = ["--config_file", "configs/inference.json", "--dataset_dir", "in", "--output_dir", "out"]
    done = _run(folder, args, pythonpath=str(ROOT))
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("inference failed: FileNotFoundError: generator checkpoint not found: ./models/model.pt")
    assert "./models/model.ts beside it is a TorchScript export" in last and "Traceback" not in done.stderr
    assert not (folder / "out").exists()


def test_require_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: .*model\.pt \(train it") as caught:
        require_checkpoint(tmp_path / "model.pt")
    assert "TorchScript" not in str(caught.value)
    (tmp_path / "model.ts").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model\.ts beside it is a TorchScript export"):
        require_checkpoint(tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes(b"")
    require_checkpoint(tmp_path / "model.pt")
