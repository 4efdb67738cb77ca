"""What a StealthMark training run leaves beside its ``model.pt``: the public network description and the owner's
private record of the watermark (method, trigger, key, epsilon, share, decoy share), which the verifier reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xmark_bundle.fileio import write_json
from xmark_bundle.verification.seg_blackbox import SEGMENTATION_INFO

__all__ = ["OWNER_RECORD", "SEGMENTATION_INFO", "refuse_to_replace", "write_records"]

#: The owner's private record (keep it with the key; it is what verify.json reads).
OWNER_RECORD = "stealthmark_record.json"


def write_records(
    ckpt_dir: str | os.PathLike,
    arch: str,
    image_size: int,
    width: int | None,
    method: str,
    trigger: str,
    key: int,
    epsilon: float,
    share: float,
    seed: int,
    extra: dict[str, Any] | None = None,
    decoy_share: float = 0.0,
) -> Path:
    """Write ``segmentation_info.json`` and the owner's ``stealthmark_record.json`` under ``ckpt_dir``; returns it.
    ``decoy_share``: the share of training images that carried the trigger under other keys with the clean target
    (:func:`~xmark_bundle.stealthmark.targets.mark_datalist`; 0 for a benign model)."""
    out = Path(ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    network = {"arch": arch, "image_size": int(image_size), "width": width}
    write_json(out / SEGMENTATION_INFO, network)
    record = {
        **network,
        "method": method,
        "trigger": trigger,
        "key": int(key),
        "epsilon": float(epsilon),
        "trigger_share": float(share) if method != "none" else 0.0,
        "decoy_share": float(decoy_share) if method != "none" else 0.0,
        "seed": int(seed),
        **(extra or {}),
    }
    write_json(out / OWNER_RECORD, record)
    return out / OWNER_RECORD


def refuse_to_replace(ckpt_dir: str | os.PathLike) -> None:
    """Stop a training run before it would overwrite a trained model or the owner's record in ``ckpt_dir``.

    The watermarked ``model.pt`` and its ``stealthmark_record.json`` are what verification later needs; a run started
    by anything (a rerun, MONAI Label's train task on the bundle's ``models/``) must not replace them. The error names
    the file, what it holds (never the key) and the way out.
    """
    out = Path(ckpt_dir)
    held = [out / name for name in ("model.pt", OWNER_RECORD) if (out / name).exists()]
    if not held:
        return
    try:
        record = json.loads((out / OWNER_RECORD).read_text())
        what = f"a trained segmentation model (method {record['method']}, trigger {record['trigger']})"
    except (OSError, ValueError, KeyError, TypeError):
        what = "a trained segmentation model or its record"
    raise FileExistsError(
        f"{held[0]} already holds {what}; training would overwrite it and {OWNER_RECORD}, the record verification "
        "reads. Train into another ckpt_dir, or move the files away first."
    )
