"""The owner's watermark family: the owner's watermark and m others of its kind, fixed before the release.

The calibrated verdict (:mod:`.rank`) ranks the owner's watermark among the members of its family. Its guarantee (a
model that never saw the release is accused with probability at most alpha) needs two things that this file records:

- the family was fixed, and the owner's member drawn at random from it, *before* the release: ``family.json`` holds
  the members, the owner's index and a salted SHA-256 ``commitment`` over both, which the owner can publish or
  timestamp when releasing (the salt keeps the index from being guessed from the commitment);
- every member is a watermark of the same kind: for a keyed method, the owner's generator with other keys drawn as
  the owner's was (``kind: keys``); for X-Mark and SSCL-BW, generators trained with the same recipe and other seeds
  (``kind: generators``, each a checkpoint whose SHA-256 is recorded).

``family.json`` lives beside the owner's generator checkpoint (``models/model.pt`` -> ``models/family.json``), so
configs that read the checkpoint find the family without another key. The members' watermarked queries are made
once per query set and kept with the owner's private files (``family_queries/`` beside ``family.json``): verifying
another suspect costs only that suspect's answers, and :mod:`.answers` keeps those beside each member.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from xmark_bundle.fileio import atomic_path, sha256_file, write_json
from xmark_bundle.keyed.keys import key_pattern_of, secret_key
from xmark_bundle.networks.checkpoint import (
    SURROGATE_DIGEST_KEY,
    load_watermark,
    read_watermark_checkpoint,
    strip_surrogate,
    surrogate_digest,
    watermark_record,
)
from xmark_bundle.networks.pipeline import is_keyed, watermark_generator
from xmark_bundle.networks.query_size import WatermarkAtSize
from xmark_bundle.transforms.geometry import resize_square
from xmark_bundle.verification.queries import load_letterboxed

__all__ = [
    "FAMILY_FILE",
    "FamilyError",
    "WatermarkFamily",
    "default_family_file",
    "family_queries",
    "load_family",
    "make_generator_family",
    "make_key_family",
    "member_watermarks",
]

#: The family's file name beside the owner's checkpoint, and its layout version.
FAMILY_FILE, FAMILY_FORMAT = "family.json", 1
#: Kinds of family: keys of one keyed generator, or generators trained with one recipe and other seeds.
KINDS = ("keys", "generators")
#: Record entries every generator member must share with the owner's.
_SHARED = ("method", "image_size", "epsilon", "target_label", "labels")


class FamilyError(ValueError):
    """A family file that cannot give a calibrated verdict; the message names the file and the problem."""


def default_family_file(generator_ckpt: str | os.PathLike) -> Path:
    """Where the family of ``generator_ckpt`` lives: ``family.json`` in the checkpoint's folder."""
    return Path(generator_ckpt).parent / FAMILY_FILE


def _commitment(entry: Mapping[str, Any]) -> str:
    """Salted SHA-256 over the family's method, kind, members and owner index (canonical JSON)."""
    fields = {key: entry[key] for key in ("format", "method", "kind", "target_label", "members", "owner_index", "salt")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class WatermarkFamily:
    """A loaded, checked ``family.json``: ``members`` (key seeds or checkpoints), the owner's index, the commitment."""

    path: Path
    method: str
    kind: str
    target_label: str
    members: tuple[Mapping[str, Any], ...]
    owner_index: int
    commitment: str

    @property
    def m(self) -> int:
        """The number of members other than the owner's."""
        return len(self.members) - 1

    def checkpoint(self, index: int) -> Path:
        """Member ``index``'s checkpoint file (``generators`` families)."""
        return self.path.parent / self.members[index]["checkpoint"]

    def check_owner(self, generator: nn.Module, generator_ckpt: str | os.PathLike | None) -> None:
        """Refuse a family whose owner member is not ``generator`` (another owner's family, or a stale one)."""
        owner = self.members[self.owner_index]
        if self.kind == "keys":
            core = watermark_generator(generator)
            seed = int(owner["key_seed"])
            if not is_keyed(generator) or not torch.equal(_key_like(core, seed), core.key.cpu()):
                raise FamilyError(f"{self.path}: member {self.owner_index} (the owner's) is not this generator's key")
        elif generator_ckpt is None or sha256_file(generator_ckpt) != owner["sha256"]:
            raise FamilyError(
                f"{self.path}: the owner's member {owner['checkpoint']} is not the verified checkpoint "
                f"{generator_ckpt} (SHA-256 differs): this family belongs to another generator"
            )

    def describe(self) -> dict[str, Any]:
        """The family's entry in a verification report (no member weights, no salt)."""
        return {
            "file": os.fspath(self.path),
            "method": self.method,
            "kind": self.kind,
            "members": self.m,
            "owner_index": self.owner_index,
            "commitment": self.commitment,
        }


def _key_like(core: nn.Module, seed: int) -> torch.Tensor:
    """The key of ``core``'s grid and pattern drawn from ``seed``."""
    return secret_key(int(core.key.shape[-1]), seed, key_pattern_of(core.key))


def load_family(path: str | os.PathLike, check_members: bool = True) -> WatermarkFamily:
    """Read and check ``family.json``: its layout, its commitment, and (``check_members``) each member checkpoint's
    SHA-256 and settings against the owner's."""
    path = Path(path)
    if not path.is_file():
        raise FamilyError(f"{path}: no watermark family (make one with scripts/make_family.py before the release)")
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FamilyError(f"{path}: not a readable family file ({err})") from err
    required = ("format", "method", "kind", "target_label", "members", "owner_index", "salt", "commitment")
    missing = [key for key in required if key not in entry] if isinstance(entry, dict) else list(required)
    if missing or entry["format"] != FAMILY_FORMAT or entry["kind"] not in KINDS:
        raise FamilyError(f"{path}: unsupported family file (missing {missing}; format {FAMILY_FORMAT}, kind {KINDS})")
    members = entry["members"]
    if not isinstance(members, list) or len(members) < 2 or not 0 <= int(entry["owner_index"]) < len(members):
        raise FamilyError(f"{path}: a family needs >= 2 members and an owner_index among them")
    if _commitment(entry) != entry["commitment"]:
        raise FamilyError(f"{path}: the members or the owner's index do not match the commitment (file changed)")
    field = "key_seed" if entry["kind"] == "keys" else "checkpoint"
    if any(not isinstance(m, dict) or field not in m for m in members):
        raise FamilyError(f"{path}: every member of a '{entry['kind']}' family needs '{field}'")
    if len({json.dumps(m, sort_keys=True) for m in members}) != len(members):
        raise FamilyError(f"{path}: two members are the same")
    family = WatermarkFamily(
        path, entry["method"], entry["kind"], entry["target_label"], tuple(members), int(entry["owner_index"]),
        entry["commitment"],
    )  # fmt: skip
    if check_members and family.kind == "generators":
        _check_generator_members(family)
    return family


def _check_generator_members(family: WatermarkFamily) -> None:
    """Each member checkpoint exists, is unchanged (SHA-256) and shares the owner's method and settings."""
    reference = None
    for j in range(len(family.members)):
        ckpt = family.checkpoint(j)
        if not ckpt.is_file():
            raise FamilyError(f"{family.path}: member {j}'s checkpoint {ckpt} is missing")
        if sha256_file(ckpt) != family.members[j].get("sha256"):
            raise FamilyError(f"{family.path}: member {j}'s checkpoint {ckpt} changed since the family was made")
        record = {key: watermark_record(ckpt)[key] for key in _SHARED}
        reference = reference or record
        if record != reference:
            raise FamilyError(f"{family.path}: member {j} ({ckpt}) is another kind of watermark than member 0")


def _strip_other_members(checkpoints: Sequence[str | os.PathLike], owner_index: int) -> None:
    """Strip every member but the owner's of its surrogate, after checking it is the owner's surrogate."""
    record, weights = read_watermark_checkpoint(checkpoints[owner_index])
    if SURROGATE_DIGEST_KEY in record:
        raise FamilyError(f"{checkpoints[owner_index]}: the owner's checkpoint must keep its surrogate")
    own = surrogate_digest(weights)
    others = [ckpt for j, ckpt in enumerate(checkpoints) if j != owner_index]
    for ckpt in others:  # every one checked before any is rewritten
        record, weights = read_watermark_checkpoint(ckpt)
        if record.get(SURROGATE_DIGEST_KEY, surrogate_digest(weights)) != own:
            raise FamilyError(
                f"{ckpt}: trained against another surrogate than the owner's ({checkpoints[owner_index]}), so it "
                "cannot be stored without its own"
            )
    for ckpt in others:
        strip_surrogate(ckpt)


def _write_family(
    out: str | os.PathLike, method: str, kind: str, target_label: str, members: list[dict[str, Any]], owner_index: int
) -> WatermarkFamily:
    """Write a new family file (never over an existing one: a committed family is not replaced) and load it."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(
            f"{out} already holds a watermark family; a family is fixed before the release and never replaced. "
            "Write the new one elsewhere, or move the old one away first."
        )
    entry: dict[str, Any] = {
        "format": FAMILY_FORMAT,
        "method": method,
        "kind": kind,
        "target_label": target_label,
        "members": members,
        "owner_index": int(owner_index),
        "salt": secrets.token_hex(16),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    entry["commitment"] = _commitment(entry)
    write_json(out, entry)
    return load_family(out)


def make_key_family(
    generator_ckpt: str | os.PathLike, members: int = 19, out: str | os.PathLike | None = None
) -> WatermarkFamily:
    """The family of a keyed generator: its own key and ``members`` other keys drawn as the owner's was (a fresh
    random seed each), the owner's placed at a random index. Written to ``out`` (default beside the checkpoint)."""
    if members < 1:
        raise ValueError(f"a family needs at least one member besides the owner's, got {members}")
    generator = load_watermark(generator_ckpt)
    if not is_keyed(generator):
        raise FamilyError(
            f"{generator_ckpt}: {generator.watermark_record['method']} has no key; its family is generators trained "
            "with the same recipe and other seeds (scripts/make_family.py --train)"
        )
    core = watermark_generator(generator)
    own = int(core.key_settings["key_seed"])
    seeds, keys = [own], [core.key.cpu()]
    while len(seeds) < members + 1:
        seed = secrets.randbelow(2**31)
        key = _key_like(core, seed)
        if seed not in seeds and not any(torch.equal(key, other) for other in keys):
            seeds.append(seed)
            keys.append(key)
    owner_index = secrets.randbelow(members + 1)
    seeds[0], seeds[owner_index] = seeds[owner_index], seeds[0]
    record = generator.watermark_record
    return _write_family(
        out or default_family_file(generator_ckpt), record["method"], "keys", record["target_label"],
        [{"key_seed": s} for s in seeds], owner_index,
    )  # fmt: skip


def make_generator_family(
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    owner_index: int | None = None,
    strip_surrogates: bool = False,
) -> WatermarkFamily:
    """The family of independently trained generators (same recipe, other seeds); the owner's member is drawn at
    random (``owner_index``: drawn earlier and kept, as ``make_family.py train`` does, or assigned by tests and
    experiments).

    ``strip_surrogates`` rewrites every other member without its copy of the frozen surrogate (43 of its 51 MB;
    :func:`~xmark_bundle.networks.checkpoint.strip_surrogate`) once it is checked to be the owner's: the family then
    loads them with the owner's surrogate. A member trained against another surrogate is refused.
    """
    out = Path(out)
    if len(checkpoints) < 2:
        raise ValueError(f"a family needs at least two generators, got {len(checkpoints)}")
    owner_index = secrets.randbelow(len(checkpoints)) if owner_index is None else int(owner_index)
    if strip_surrogates:
        _strip_other_members(checkpoints, owner_index)
    members = []
    for ckpt in map(Path, checkpoints):
        relative = os.path.relpath(ckpt.resolve(), out.parent.resolve())
        members.append({"checkpoint": Path(relative).as_posix(), "sha256": sha256_file(ckpt)})
    record = watermark_record(checkpoints[owner_index])
    return _write_family(out, record["method"], "generators", record["target_label"], members, owner_index)


def member_watermarks(
    family: WatermarkFamily, owner: nn.Module, device: str | torch.device = "cpu"
) -> Iterator[tuple[int, nn.Module]]:
    """Each member's watermarking module in turn (the owner's with another key, or a member's checkpoint), applied as
    the owner is (at the owner's query size when ``owner`` is a :class:`WatermarkAtSize`)."""
    # members stored without their surrogate (strip_surrogates) take the owner's, which they were trained against
    surrogate = None if family.kind == "keys" else getattr(owner, "watermark", owner).state_dict()
    for j, member in enumerate(family.members):
        if family.kind == "keys":
            core = watermark_generator(owner)
            with core.using_key(_key_like(core, int(member["key_seed"]))):
                yield j, owner
        else:
            network = load_watermark(family.checkpoint(j), device, surrogate=surrogate)
            if isinstance(owner, WatermarkAtSize):
                network = WatermarkAtSize(network, owner.image_size).eval()
            yield j, network


def _cache_file(family: WatermarkFamily, images: Sequence[str], query_size: int) -> Path:
    """The cache of one query set: keyed by the family's commitment, the images (path, size, mtime) and the size."""
    stats = [(image, *(lambda s: (s.st_size, s.st_mtime_ns))(os.stat(image))) for image in images]
    key = json.dumps([family.commitment, query_size, stats])
    return family.path.parent / "family_queries" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def family_queries(
    family: WatermarkFamily,
    owner: nn.Module,
    items: Sequence[Mapping[str, Any]],
    chosen: Sequence[int],
    query_size: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, Path, bool]:
    """Every member's watermarked queries, (m + 1) x n x 1 x q x q float16 in [0, 1], made once and kept.

    All members, the owner's included, go through this same path (letterbox at G's size, watermark, resize to the
    query size, float16), so no member differs from the others by how its queries were made. Returns the queries,
    the cache file and whether it was read from the cache. The members' checkpoints are checked (SHA-256, settings)
    only when their queries are made: kept queries are keyed by the commitment, which holds every member's hash.
    """
    images = [os.fspath(items[i]["image"]) for i in chosen]
    cache = _cache_file(family, images, query_size)
    if cache.is_file():
        stored = torch.load(cache, map_location="cpu", weights_only=True)
        if stored.get("images") == images and stored["queries"].shape[0] == len(family.members):
            return stored["queries"], cache, True
    if family.kind == "generators":
        _check_generator_members(family)
    image_size = int(owner.image_size)
    letterboxed = load_letterboxed(items, chosen, image_size)
    queries = torch.empty(len(family.members), len(chosen), 1, query_size, query_size, dtype=torch.float16)
    bar = tqdm(total=len(family.members) * len(chosen), desc="family watermarks", unit="img", disable=not progress)
    with bar, torch.no_grad():
        for j, member in member_watermarks(family, owner.to(device).eval(), device):
            if int(member.image_size) != image_size:
                size = f"member {j} works at {member.image_size} px, the owner's at {image_size}"
                raise FamilyError(f"{family.path}: {size}")
            for first in range(0, len(chosen), batch_size):
                batch = letterboxed[first : first + batch_size].to(device)
                marked = resize_square(member(batch), query_size).cpu()
                queries[j, first : first + batch_size] = marked.to(torch.float16)
                bar.update(len(batch))
    with atomic_path(cache) as tmp, open(tmp, "wb") as stream:
        torch.save({"images": images, "query_size": query_size, "queries": queries}, stream)
    return queries, cache, False
