"""The Python package installs under its own name (what a MONAI Deploy or MONAI Label environment needs)."""

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_bundles():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == json.loads((ROOT / "configs" / "metadata.json").read_text())["version"]


def test_wheel_installs_xmark_bundle_and_imports_outside_the_bundle_root(tmp_path):
    source = tmp_path / "source"  # setuptools builds in the source tree: build a copy, not the checkout
    shutil.copytree(ROOT / "xmark_bundle", source / "xmark_bundle", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "requirements.txt"):
        shutil.copy(ROOT / name, source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), source],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("xmark_bundle-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {n for n in names if n.endswith(".py")}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "xmark_bundle").rglob("*.py")}
    assert modules == expected  # the package, whole, and nothing else (no tests, scripts or configs)
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("METADATA"))
    assert "Name: xmark-bundle" in metadata and "Requires-Dist: monai==" in metadata

    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    probe = "import xmark_bundle.networks.checkpoint as c, sys; print(c.__file__)"
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert Path(imported.stdout.strip()).is_relative_to(target)
