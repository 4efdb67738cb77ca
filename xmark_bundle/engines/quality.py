"""Image quality of a watermarked release against its source: PSNR, SSIM and LPIPS per marked file.

PSNR and SSIM are computed at full resolution in [0, 1] intensity (the stored values through each file's own
mapping) and, with ``model_size``, on both images resized as a model of that input size sees them (the letterbox's
content, without its padding, which would count as unchanged pixels); LPIPS, a network metric, on both images
letterboxed to ``lpips_size`` (1024 px by default).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn

from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.fileio import sha256_file, write_json
from xmark_bundle.release import read_manifest
from xmark_bundle.transforms.geometry import letterbox, letterbox_geometry

#: PSNR of identical images is infinite; reports cap it here so that they stay valid JSON.
PSNR_CAP = 100.0


def release_quality(
    relative_paths: Sequence[str],
    source_dir: str | os.PathLike,
    release_dir: str | os.PathLike,
    lpips: nn.Module,
    lpips_size: int = 1024,
    model_size: int | None = None,
) -> dict[str, Any]:
    """Mean/max PSNR, SSIM (also at ``model_size``: ``psnr_model``, ``ssim_model``), LPIPS and max |release - source|
    over ``relative_paths`` (the marked files)."""
    if not relative_paths:
        raise ValueError("no marked files to compare: the release manifest lists none")
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=2, data_range=1.0)
    rows = []
    device = next(lpips.parameters(), torch.empty(0)).device
    for rel in relative_paths:
        src, _ = load_xray(Path(source_dir) / rel)
        rel_img, _ = load_xray(Path(release_dir) / rel)
        if src.shape != rel_img.shape:
            raise ValueError(f"{rel}: release shape {rel_img.shape} differs from source shape {src.shape}")
        a, b = (torch.from_numpy(x)[None, None] for x in (src, rel_img))
        geometry = letterbox_geometry(src.shape, lpips_size)
        small = [letterbox(t[0], geometry)[None].to(device) for t in (a, b)]
        with torch.no_grad():
            row = {
                "path": rel,
                "psnr": min(float(psnr(b, a).mean()), PSNR_CAP),
                "ssim": float(ssim(b, a).mean()),
                "lpips": float(lpips(small[1], small[0]).mean()),
                "max_abs_change": float(np.abs(rel_img - src).max()),
            }
            if model_size is not None:
                content = letterbox_geometry(src.shape, model_size)
                top, bottom, left, right = content["pad"]
                seen = [
                    letterbox(t, content)[..., top : model_size - bottom, left : model_size - right] for t in (a, b)
                ]
                row["psnr_model"] = min(float(psnr(seen[1], seen[0]).mean()), PSNR_CAP)
                row["ssim_model"] = float(ssim(seen[1], seen[0]).mean())
        rows.append(row)
    keys = ["psnr", "ssim", "lpips", "max_abs_change"] + (["psnr_model", "ssim_model"] if model_size else [])
    summary = {
        f"{stat}_{key}": float(fn([r[key] for r in rows]))
        for key in keys
        for stat, fn in (("mean", np.mean), ("max", np.max))
    }
    return {**summary, "n_files": len(rows), "lpips_size": lpips_size, "model_size": model_size, "files": rows}


def manifest_release_quality(
    manifest_file: str | os.PathLike,
    source_dir: str | os.PathLike,
    release_dir: str | os.PathLike,
    lpips: nn.Module,
    model_size: int | None = None,
) -> dict[str, Any]:
    """:func:`release_quality` of the files a release manifest lists as marked (decoys included), kept beside the
    manifest in ``<manifest>.quality.json`` and reused while the manifest, the folders, the model size and the LPIPS
    trunk are the same: every suspect trained on one release is evaluated against the same release."""
    manifest_file = Path(manifest_file)
    manifest = read_manifest(manifest_file)
    key = {
        "manifest_sha256": sha256_file(manifest_file),
        "source_dir": os.path.abspath(source_dir),
        "release_dir": os.path.abspath(release_dir),
        "model_size": model_size,
        "lpips_backbone": getattr(lpips, "backbone_status", None),
    }
    cache = manifest_file.with_name(manifest_file.stem + ".quality.json")
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return kept["quality"]
    files = [f["path"] for f in manifest["marked"] + manifest.get("decoys", [])]
    quality = release_quality(files, source_dir, release_dir, lpips, model_size=model_size)
    try:
        write_json(cache, {"key": key, "quality": quality})
    except OSError as err:  # a read-only manifest folder: the numbers stand, only the reuse is lost
        print(f"release quality not kept beside {manifest_file}: {err}")
    return quality
