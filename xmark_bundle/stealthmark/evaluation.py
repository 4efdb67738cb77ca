"""Harmlessness of a (watermarked) segmentation model: its masks on clean and on triggered images against the
reference masks, and how many mask pixels the owner's trigger flips (the bundle's ``evaluating`` step)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from monai.transforms import AsDiscreted, Compose, LoadImaged

from xmark_bundle.data import LoadXRayd
from xmark_bundle.fileio import atomic_path
from xmark_bundle.transforms import ResizeLongestPadd
from xmark_bundle.verification.queries import datalist_items
from xmark_bundle.verification.seg_blackbox import open_segmentation_suspect

from .metrics import harmlessness
from .triggers import apply_trigger
from .verification import finite_json, owner_record

__all__ = ["load_segmentation_pairs", "run_harmlessness"]


def load_segmentation_pairs(items: list[dict[str, Any]], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 1 x S x S in [0, 1]) and 0/1 masks of datalist ``items``, letterboxed to ``image_size``."""
    preprocess = Compose(
        [
            LoadXRayd(keys="image"),
            LoadImaged(
                keys="label", reader="PILReader", reverse_indexing=False, image_only=True, ensure_channel_first=True
            ),
            ResizeLongestPadd(keys=["image", "label"], spatial_size=image_size),
            AsDiscreted(keys="label", threshold=0.5),
        ]
    )
    pairs = [preprocess(dict(item)) for item in items]
    return (
        torch.stack([p["image"].as_tensor().float() for p in pairs]),
        torch.stack([p["label"].as_tensor().float() for p in pairs]),
    )


def run_harmlessness(
    suspect: str | os.PathLike,
    record_file: str | os.PathLike,
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    data_list_key: str = "validation",
    batch_size: int = 8,
    output_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Dice, column Dice (the authors'), pixel AUC, volumetric similarity and HD95 of ``suspect`` on the split's clean
    and triggered images (the owner's trigger from ``record_file``), and the flip share; writes harmlessness.json."""
    record = owner_record(record_file)
    items = datalist_items(datalist, data_list_key, dataset_dir)
    images, masks = load_segmentation_pairs(items, int(record["image_size"]))
    model = open_segmentation_suspect(suspect, device=device)
    triggered = apply_trigger(images, record["trigger"], int(record["key"]))

    def maps(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model.probability_maps(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).float()

    report = {
        "suspect": model.describe(),
        "trigger": record["trigger"],
        "split": data_list_key,
        **harmlessness(maps(images), maps(triggered), masks),
    }
    clean, trig = report["clean"]["dice"]["mean"], report["triggered"]["dice"]["mean"]
    print(
        f"harmlessness of {model.location}: Dice {clean:.4f} clean, {trig:.4f} triggered; mask pixels flipped by the "
        f"trigger {report['flip_share']['mean']:.4f} (n = {report['images']})",
        flush=True,
    )
    if output_dir is not None:
        out = Path(output_dir) / "harmlessness.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(finite_json(report), indent=2, allow_nan=False) + "\n")
    return report
