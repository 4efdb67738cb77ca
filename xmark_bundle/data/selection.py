"""Seeded sample selection for the target label k: the generator's balanced training set and the release's marked share.

Target samples have label k == 1; non-target samples have label k == 0. Uncertain targets (< 0) belong to neither, so
they are never used to train the generator nor to verify (counting them would inflate the WSR).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xmark_bundle.data.labels import LABELS


def target_index(datalist: Mapping[str, Any], target_label: str) -> int:
    """The position of ``target_label`` in the datalist's label order (the six CheXpert labels by default)."""
    labels = list(datalist.get("labels", LABELS))
    if target_label not in labels:
        raise ValueError(f"target label {target_label!r} is not one of the datalist's labels {labels}")
    return labels.index(target_label)


def split_by_target(items: Sequence[dict[str, Any]], target_index: int) -> tuple[list[int], list[int]]:
    """Indices of target (label k == 1) and non-target (label k == 0) items; uncertain ones are left out."""
    target = [i for i, item in enumerate(items) if item["label"][target_index] == 1]
    non_target = [i for i, item in enumerate(items) if item["label"][target_index] == 0]
    return target, non_target


def select_fraction(indices: Sequence[int], fraction: float, seed: int, minimum: int = 1) -> list[int]:
    """A seeded random ``fraction`` of ``indices`` (at least ``minimum``, rounded to nearest), returned sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if len(indices) < minimum:
        raise ValueError(f"need at least {minimum} candidate samples, found {len(indices)}")
    count = min(len(indices), max(minimum, round(fraction * len(indices))))
    chosen = np.random.default_rng(seed).choice(np.asarray(indices), size=count, replace=False)
    return sorted(int(i) for i in chosen)


def balanced_generator_set(
    items: Sequence[dict[str, Any]], target_index: int, fraction: float = 0.1, seed: int = 0
) -> list[dict[str, Any]]:
    """The generator's training set: ``fraction`` of the target samples plus as many non-target samples (seeded).

    Each returned item is a copy with ``is_target`` (1.0 or 0.0) added, target samples first.
    """
    target, non_target = split_by_target(items, target_index)
    chosen_t = select_fraction(target, fraction, seed)
    if len(non_target) < len(chosen_t):
        raise ValueError(f"only {len(non_target)} non-target samples for {len(chosen_t)} target samples")
    chosen_nt = select_fraction(non_target, len(chosen_t) / len(non_target), seed + 1)
    return [{**items[i], "is_target": 1.0} for i in chosen_t] + [{**items[i], "is_target": 0.0} for i in chosen_nt]


def with_target_flag(items: Sequence[dict[str, Any]], target_index: int) -> list[dict[str, Any]]:
    """Copies of the items whose label k is certain, with ``is_target`` (1.0 / 0.0) added (for validation sets)."""
    target, non_target = split_by_target(items, target_index)
    flag = dict.fromkeys(target, 1.0) | dict.fromkeys(non_target, 0.0)
    return [{**items[i], "is_target": flag[i]} for i in sorted(flag)]


def require_target_flags(items: Sequence[dict[str, Any]], split: str) -> None:
    """Fail clearly when the items of ``split`` ("train", "validate") of a generator run lack ``is_target`` (1.0 / 0.0).

    configs/train.json adds the flag from each image's labels (:func:`balanced_generator_set`); a caller that replaces
    the datalist (MONAI Label's train task sets ``train#dataset#data`` to ``{"image", "label"}`` pairs) must add it.
    """
    bad = [i for i, item in enumerate(items) if item.get("is_target") not in (0, 1)]
    if bad:
        example = {k: items[bad[0]][k] for k in list(items[bad[0]])[:3]}
        raise ValueError(
            f"{split}#dataset#data: {len(bad)} of {len(items)} items have no is_target flag (1.0 target, 0.0 "
            f"non-target), e.g. item {bad[0]} {example}; a generator learns from target and non-target images, so "
            "every item needs it (train.json adds it from the image's labels, as in a datalist from "
            "scripts/prepare_datalist.py)"
        )


def non_target_items(items: Sequence[dict[str, Any]], target_index: int) -> list[dict[str, Any]]:
    """The items whose label k is certainly absent (== 0): the queries for WSR and ownership verification."""
    return [items[i] for i in split_by_target(items, target_index)[1]]
