"""Which samples query a model, and how they are loaded: shared by verification, key vetting and the probe script.

Queries are ``n`` seeded non-target samples (label k == 0) of a datalist split, letterboxed to the watermark's
resolution S (``LoadXRayd`` + ``ResizeLongestPadd``); the suspect sees them resized to its own input size.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.data import load_decathlon_datalist
from monai.transforms import Compose

from xmark_bundle.data import LoadXRayd
from xmark_bundle.data.labels import LABELS
from xmark_bundle.data.selection import select_fraction, split_by_target
from xmark_bundle.transforms import ResizeLongestPadd

__all__ = ["QuerySettings", "choose_non_target", "datalist_items", "load_letterboxed", "query_samples"]


@dataclass(frozen=True)
class QuerySettings:
    """How a model is queried: the target label, the datalist split, how many seeded samples, at which size."""

    target_label: str = "No Finding"
    data_list_key: str = "test"
    n_samples: int = 100
    seed: int = 0
    query_size: int = 224
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.target_label not in LABELS:
            raise ValueError(f"unknown target_label {self.target_label!r}; choose one of {list(LABELS)}")
        if self.n_samples < 2 or self.batch_size < 1 or self.query_size < 1:
            raise ValueError(
                f"need n_samples >= 2, batch_size >= 1 and query_size >= 1, "
                f"got {self.n_samples}, {self.batch_size} and {self.query_size}"
            )


def datalist_items(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]], key: str, base_dir: str | os.PathLike | None
) -> list[dict[str, Any]]:
    """Datalist items (``image``, ``label``) of split ``key`` from a JSON file, or the given items."""
    if isinstance(datalist, (str, os.PathLike)):
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist not found: {datalist} (make it with scripts/prepare_datalist.py)")
        try:
            return load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=key, base_dir=base_dir)
        except ValueError as err:
            raise ValueError(f"{datalist}: no usable '{key}' split ({err})") from err
    return list(datalist)


def choose_non_target(items: Sequence[Mapping[str, Any]], k: int, n: int, seed: int, where: str) -> list[int]:
    """Seeded choice of ``n`` non-target item indices (all of them, with a warning, when fewer exist)."""
    _, non_target = split_by_target(items, k)
    if len(non_target) < 2:
        raise ValueError(f"{where}: only {len(non_target)} non-target sample(s) for '{LABELS[k]}'; need at least 2")
    if len(non_target) < n:
        warnings.warn(
            f"{where}: only {len(non_target)} non-target samples for '{LABELS[k]}', fewer than n_samples = {n}; "
            "using all of them",
            stacklevel=4,
        )
        return list(non_target)
    return select_fraction(non_target, n / len(non_target), seed)


def query_samples(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    dataset_dir: str | os.PathLike | None,
    settings: QuerySettings,
) -> tuple[list[Mapping[str, Any]], list[int], str]:
    """The split's items, the seeded indices of the non-target ones to query, and where they come from."""
    items = datalist_items(datalist, settings.data_list_key, dataset_dir)
    if isinstance(datalist, (str, os.PathLike)):
        where = f"{os.fspath(datalist)} [{settings.data_list_key}]"
    else:
        where = "datalist"
    k = LABELS.index(settings.target_label)
    return items, choose_non_target(items, k, settings.n_samples, settings.seed, where), where


def load_letterboxed(items: Sequence[Mapping[str, Any]], indices: Sequence[int], image_size: int) -> torch.Tensor:
    """The images of ``items[i]`` for ``i`` in ``indices``, read and letterboxed to B x 1 x ``image_size``²."""
    preprocess = Compose([LoadXRayd(keys="image"), ResizeLongestPadd(keys="image", spatial_size=image_size)])
    return torch.stack([preprocess({"image": items[i]["image"]})["image"].as_tensor() for i in indices])
