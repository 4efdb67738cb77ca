"""A data user's cheap defences applied to a release before training (issue: data-level evasion).

Each evasion maps an image in [0, 1] (the file's own intensity chain, :func:`~xmark_bundle.data.xray_io.load_xray`)
to another, and :func:`evade_release` writes the result back into the file's own container and grid
(:func:`~xmark_bundle.data.xray_writer.write_xray`), so the bundle's readers, datalist and recipes apply unchanged:

- ``jpeg75``: JPEG re-encoding at quality 75 (8-bit, as a JPEG export of the image would be);
- ``downscale512``: resized to 512 px on the longest side (antialiased) and back to the file's grid, i.e. the detail
  that a 512 px copy loses (an image of 512 px or less is unchanged);
- ``noise0.02``: additive Gaussian noise of standard deviation 0.02, clipped to [0, 1] (seeded per file);
- ``histeq``: histogram equalisation over 4096 grey levels.

Strong augmentation during training is not a file transform: ``configs/train_classifier_strong_aug.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm import tqdm

from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.data.xray_writer import write_xray

__all__ = ["EVASIONS", "evade_release"]


def _jpeg75(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255.0


def _downscale512(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if max(image.shape) <= 512:
        return image
    scale = 512 / max(image.shape)
    small = (round(image.shape[0] * scale), round(image.shape[1] * scale))
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=image.shape, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def _noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0.0, 0.02, image.shape), 0.0, 1.0).astype(np.float32)


def _histeq(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    levels = 4096
    index = np.clip(np.round(image * (levels - 1)).astype(np.int64), 0, levels - 1)
    cdf = np.cumsum(np.bincount(index.ravel(), minlength=levels)).astype(np.float64)
    cdf = (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1.0)
    return cdf[index].astype(np.float32)


#: name -> transform of a [0, 1] image (the generator seeds the random ones per file).
EVASIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "jpeg75": _jpeg75,
    "downscale512": _downscale512,
    "noise0.02": _noise,
    "histeq": _histeq,
}


def evade_release(release_dir: str | os.PathLike, out_dir: str | os.PathLike, evasion: str, seed: int = 0) -> Path:
    """Copy ``release_dir`` to ``out_dir`` with every image its datalist lists passed through ``evasion``.

    Written under a temporary name beside ``out_dir`` and renamed when complete (a rerun after an interruption
    starts again); an existing ``out_dir`` is refused.
    """
    if evasion not in EVASIONS:
        raise ValueError(f"unknown evasion {evasion!r}; known: {sorted(EVASIONS)}")
    release_dir, out_dir = Path(release_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: refusing to write an evaded release over it")
    datalist = json.loads((release_dir / "datalist.json").read_text())
    images = sorted({row["image"] for split in ("training", "validation", "test") for row in datalist.get(split, [])})
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    listed = {os.path.normpath(release_dir / rel) for rel in images}

    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if os.path.normpath(os.path.join(folder, n)) in listed]

    shutil.copytree(release_dir, partial, ignore=skip)  # everything else as it is; the images are written below
    for rel in tqdm(images, desc=f"evasion {evasion}", unit="img", mininterval=10):
        source = release_dir / rel
        image, meta = load_xray(source)
        digest = int.from_bytes(hashlib.sha256(f"{seed}:{rel}".encode()).digest()[:8], "little")
        write_xray(EVASIONS[evasion](image, np.random.default_rng(digest)), meta, source, partial / rel)
    os.replace(partial, out_dir)
    return out_dir
