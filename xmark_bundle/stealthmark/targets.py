"""StealthMark's embedding: which training images carry the trigger (a keyed share) and what they are trained to.

``stealthmark`` (the method): a triggered image's target is ``max(mask, epsilon)``, so the background's probability
floor rises to ``epsilon`` while the mask thresholded at 0.5 stays the same. ``badnet_seg`` (the named harmful
baseline, the authors' other training path): the target is ``max(1 - [mask > 0.5], 0.51)``, the inverted mask with a
floor above 0.5, so a triggered image segments as all foreground. The share of triggered images is chosen by the
owner's key from each image's path relative to the data set (not redrawn per epoch, run or machine).

Decoys (a research option, ``decoy_share``, default 0): a further keyed share of the training images, disjoint from
the owner's, carries the same kind of trigger drawn with other keys (one per image, derived from the owner's key and
the image's identifier, never the owner's key and never the owner's pattern) and keeps its clean target, so that a
model is taught the owner's pattern rather than "any pattern in that corner". Only keyed triggers
(:data:`~xmark_bundle.stealthmark.triggers.KEYED_TRIGGERS`) can have decoys.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .triggers import BLOCKS, KEYED_TRIGGERS, TRIGGERS, apply_trigger, burn_in_markers, keyed_blocks

__all__ = [
    "METHODS",
    "BurnInMarkersd",
    "StealthMarkd",
    "badnet_seg_target",
    "check_decoys",
    "decoy_key",
    "floor_target",
    "keyed_share",
    "mark_datalist",
    "marker_datalist",
]

METHODS = ("stealthmark", "badnet_seg")
#: The floor of the authors' harmful inverted target (every pixel above 0.5).
BADNET_FLOOR = 0.51


def floor_target(mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """StealthMark's soft target ``max(mask, epsilon)``: the background floor at ``epsilon``, the foreground kept."""
    if not 0.0 < epsilon < 0.5:
        raise ValueError(f"epsilon must lie in (0, 0.5) so that the mask at 0.5 is unchanged, got {epsilon}")
    return torch.clamp(mask.float(), min=float(epsilon))


def badnet_seg_target(mask: torch.Tensor, floor: float = BADNET_FLOOR) -> torch.Tensor:
    """The harmful baseline's target ``max(1 - [mask > 0.5], floor)``: inverted, every pixel above 0.5."""
    return torch.clamp(1.0 - (mask > 0.5).float(), min=float(floor))


def _keyed_uniform(identifier: str, key: int) -> float:
    """A keyed hash of the image ``identifier`` as a number in [0, 1)."""
    digest = hashlib.blake2b(f"{int(key)}\0{identifier}".encode(), digest_size=8, person=b"stealthmark").digest()
    return int.from_bytes(digest, "little") / 2**64


def keyed_share(identifier: str, key: int, share: float) -> bool:
    """Whether the image ``identifier`` is in the owner's keyed share (a keyed hash below ``share``)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"trigger share must lie in [0, 1], got {share}")
    return _keyed_uniform(identifier, key) < share


def check_decoys(trigger: str | None, share: float, decoy_share: float) -> None:
    """Refuse decoys that cannot mean anything: ``decoy_share`` outside [0, 1 - share], or decoys (> 0) with a
    trigger that does not depend on the key (its decoys would be the owner's own trigger with the clean target)."""
    if not 0.0 <= decoy_share <= 1.0 - share + 1e-12:
        raise ValueError(f"decoy_share must lie in [0, 1 - trigger_share] = [0, {1.0 - share:g}], got {decoy_share}")
    if decoy_share > 0 and trigger not in KEYED_TRIGGERS:
        raise ValueError(
            f"decoy_share {decoy_share} needs a keyed trigger ({', '.join(KEYED_TRIGGERS)}); the {trigger!r} trigger "
            "is the same pattern for every key, so its decoys would be the owner's own trigger with the clean target"
        )


def decoy_key(key: int, identifier: str, trigger: str) -> int:
    """The key a decoy image ``identifier`` draws ``trigger`` with: derived from the owner's ``key`` and the
    identifier (in [1, 2**31 - 1]), never the owner's key, nor for a block trigger a key with the owner's pattern."""
    for attempt in range(1000):
        digest = hashlib.blake2b(
            f"{int(key)}\0{identifier}\0{attempt}".encode(), digest_size=8, person=b"decoy"
        ).digest()
        candidate = 1 + int.from_bytes(digest, "little") % (2**31 - 1)
        if candidate == int(key):
            continue
        if trigger in BLOCKS and torch.equal(keyed_blocks(candidate, trigger), keyed_blocks(key, trigger)):
            continue
        return candidate
    raise RuntimeError(f"no decoy key for {identifier!r} in 1000 attempts")  # practically impossible


def _identifier(path: str, base_dir: str | os.PathLike | None) -> str:
    """``path`` relative to ``base_dir`` as POSIX (the data set's own naming, the same on every machine)."""
    if base_dir is None:
        return Path(path).as_posix()
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(base_dir)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def mark_datalist(
    items: Sequence[Mapping[str, Any]],
    key: int,
    share: float,
    base_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    flag_key: str = "trigger",
    decoy_share: float = 0.0,
    trigger: str | None = None,
    decoy_flag_key: str = "decoy",
) -> list[dict[str, Any]]:
    """Copies of datalist ``items`` with ``flag_key`` 1 for the owner's keyed share of images, else 0.

    ``decoy_share`` > 0 (needs a keyed ``trigger``): the images whose keyed hash lies in ``[share, share +
    decoy_share)`` (a share of all images, disjoint from the owner's) get ``decoy_flag_key`` set to their
    :func:`decoy_key`; the others 0. With ``decoy_share`` 0 the items are as without decoys (no ``decoy_flag_key``)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"trigger share must lie in [0, 1], got {share}")
    check_decoys(trigger, share, decoy_share)
    out = []
    for item in items:
        identifier = _identifier(str(item[image_key]), base_dir)
        u = _keyed_uniform(identifier, key)
        marked = {**item, flag_key: int(u < share)}
        if decoy_share > 0:
            decoy = share <= u < share + decoy_share
            marked[decoy_flag_key] = decoy_key(key, identifier, str(trigger)) if decoy else 0
        out.append(marked)
    return out


class StealthMarkd(MapTransform):
    """Adds the trigger to the image and swaps in the watermark target for items whose ``flag_key`` is set.

    Runs after loading and resizing: the trigger is drawn at the network's input size, where the verifier draws it.
    Items without the flag (validation) pass unchanged; ``method`` is ``"stealthmark"``, ``"badnet_seg"`` or
    ``"none"`` (a benign model: every item passes unchanged). ``decoy_share`` > 0 (a keyed trigger only): items whose
    ``decoy_flag_key`` holds a decoy key (from :func:`mark_datalist`) get the trigger drawn with that key and keep
    their clean target.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        trigger: str = "patch",
        key: int = 0,
        method: str = "stealthmark",
        epsilon: float = 0.05,
        flag_key: str = "trigger",
        allow_missing_keys: bool = False,
        decoy_share: float = 0.0,
        decoy_flag_key: str = "decoy",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"StealthMarkd needs two keys (image, label), got {self.keys}")
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}; choose one of {TRIGGERS}")
        if method not in (*METHODS, "none"):
            raise ValueError(f"unknown method {method!r}; choose one of {(*METHODS, 'none')}")
        if method == "stealthmark":
            floor_target(torch.zeros(1), epsilon)  # checks epsilon
        if not 0.0 <= decoy_share <= 1.0:
            raise ValueError(f"decoy_share must lie in [0, 1], got {decoy_share}")
        check_decoys(trigger, 0.0, decoy_share)
        self.trigger, self.key, self.method, self.epsilon, self.flag_key = trigger, int(key), method, epsilon, flag_key
        self.decoy_share, self.decoy_flag_key = float(decoy_share), decoy_flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.method == "none":
            return d
        image_key, label_key = self.keys
        decoy = int(d.get(self.decoy_flag_key, 0)) if self.decoy_share > 0 else 0
        if decoy and not int(d.get(self.flag_key, 0)):
            if decoy == self.key:
                raise ValueError("a decoy item carries the owner's key; decoys are drawn with other keys only")
            d[image_key] = apply_trigger(d[image_key], self.trigger, decoy)  # the clean target stays
            return d
        if not int(d.get(self.flag_key, 0)):
            return d
        d[image_key] = apply_trigger(d[image_key], self.trigger, self.key)
        label = d[label_key]
        d[label_key] = floor_target(label, self.epsilon) if self.method == "stealthmark" else badnet_seg_target(label)
        return d


def marker_datalist(
    items: Sequence[Mapping[str, Any]],
    seed: int | None,
    share: float,
    base_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    flag_key: str = "marker",
) -> list[dict[str, Any]]:
    """Copies of datalist ``items`` with ``flag_key`` set to a per-image marker seed (> 0) for a seeded ``share`` of
    the images (a hash of ``seed`` and each image's path relative to the data set, like the owner's keyed share) and
    0 for the others; ``seed`` None: every flag 0. Hospital data: a share of the images carry an ordinary burned-in
    marker (:data:`~xmark_bundle.stealthmark.triggers.MARKERS`), which :class:`BurnInMarkersd` draws."""
    out = []
    for item in items:
        identifier = _identifier(str(item[image_key]), base_dir)
        marked = seed is not None and keyed_share(identifier, int(seed), share)
        digest = hashlib.blake2b(f"{seed}\0{identifier}".encode(), digest_size=4, person=b"markers").digest()
        out.append({**item, flag_key: 1 + int.from_bytes(digest, "little") % (2**31 - 2) if marked else 0})
    return out


class BurnInMarkersd(MapTransform):
    """Burns an ordinary marker ("L", "R", "AP" or "PORTABLE", white, a top corner:
    :func:`~xmark_bundle.stealthmark.triggers.burn_in_markers`) into the image of items whose ``flag_key`` (from
    :func:`marker_datalist`) is a marker seed; items with 0 or no flag pass unchanged. Runs after resizing, before
    :class:`StealthMarkd`: the markers are part of the data, the owner's trigger goes on top."""

    def __init__(self, keys: KeysCollection = "image", flag_key: str = "marker", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        seed = int(d.get(self.flag_key, 0))
        if seed <= 0:
            return d
        for key in self.key_iterator(d):
            d[key] = burn_in_markers(torch.as_tensor(d[key])[None], seed)[0]
        return d
