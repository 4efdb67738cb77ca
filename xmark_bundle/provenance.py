"""Where a run ran: the versions of the packages that decide its numbers, and the machine.

Training repeats to the last bit on one machine but not on another CPU, whose vector units round differently
(docs/research_log.md, "on a second machine"), so training records, release manifests and verification reports
name both.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["PACKAGES", "cpu_name", "environment", "machine", "package_versions"]

#: The training stack and the image readers and writers.
PACKAGES: tuple[str, ...] = (
    "torch",
    "torchvision",
    "monai",
    "pytorch-ignite",
    "numpy",
    "scipy",
    "pydicom",
    "pillow",
    "nibabel",
    "itk",
    "lpips",
    "grad-cam",
)


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Python's version and each installed distribution's in ``names`` (``"not installed"`` for a missing one)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_name(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name from Linux's ``cpuinfo``, else what :mod:`platform` knows (e.g. ``arm`` or ``x86_64``)."""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """The operating system, CPU, core and thread counts, torch's build and CUDA device (None without one)."""
    return {
        "os": platform.platform(),
        "cpu": cpu_name(),
        "torch_build": torch.__version__,  # the local version names the build, e.g. 2.14.1+cu130
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def environment(names: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """:func:`package_versions` and :func:`machine` together: what a record needs to say where it was made."""
    return {"tools": package_versions(names), "machine": machine()}
