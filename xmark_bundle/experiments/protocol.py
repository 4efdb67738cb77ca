"""The evaluation protocol every declaration follows (DESIGN.md §5), checked when it is loaded.

Seeds are named by role: the phantom sets' ``data`` (the report seed of a report declaration) and ``development``
seeds, the owner's ``surrogate``, the ``owners`` (watermark generator seeds, or key seeds for keyed methods; one
release each), the ``independent_owners`` (each its own surrogate and watermark; the last one trained on the disjoint
phantom set ``independent_phantoms``), the malicious ``suspects`` (trained on every owner's release), the benign
models' seeds (``benign``) and the ``family_pool`` (watermarks made with the owners' recipe and these seeds: with each
owner's they form the owner's family for the calibrated verdict, :mod:`xmark_bundle.verification.family`). Surrogate,
owner, independent-owner, suspect, benign and pool seeds are disjoint sets: a suspect that shares the surrogate's seed
measures adversarial transfer, not learning. A report declaration (data seed other than the development seed) also
needs a data seed >= 1000 used in no other role, >= 3 owners, independent owners and suspects, and a pool of
>= 19 (the calibrated verdict can reach p = 0.05 only with m >= 19 other members).

Declarations published before this protocol are marked ``"protocol": "legacy"``: such a file loads only while every
results.json it publishes is in ``docs/experiments/`` with its data seed as report seed (it reproduces what was
published, with the old implicit seeds: surrogate and owner = data seed, independent owner = data seed + 1000), and
the publisher refuses to publish it again: a change needs a new declaration under this protocol and a new report seed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ExperimentError",
    "LEGACY",
    "LEGACY_INDEPENDENT_OFFSET",
    "MIN_FAMILY_POOL",
    "MIN_REPLICATES",
    "MIN_REPORT_SEED",
    "SeedRoles",
    "legacy_roles",
    "published_parts",
    "seed_list",
    "seed_roles",
]

#: The value of a declaration's ``protocol`` key for one published before this protocol.
LEGACY = "legacy"
#: A report phantom seed is at least this (seeds below were used by tests and development).
MIN_REPORT_SEED = 1000
#: Owners, independent owners and suspects a report declaration needs at least.
MIN_REPLICATES = 3
#: A legacy declaration's independent owner: the data seed plus this offset (the runner's rule before this protocol).
LEGACY_INDEPENDENT_OFFSET = 1000
#: The model roles whose seeds must be disjoint, in the order errors name them.
MODEL_ROLES = ("surrogate", "owners", "independent_owners", "suspects", "benign", "family_pool")
#: Pool members a report declaration needs at least: the calibrated verdict's smallest p is 1 / (m + 1).
MIN_FAMILY_POOL = 19


@dataclass(frozen=True)
class SeedRoles:
    """A declaration's seeds by role (see the module docstring)."""

    data: int
    development: int
    surrogate: int
    owners: tuple[int, ...]
    independent_owners: tuple[int, ...]
    suspects: tuple[int, ...]
    benign: tuple[int, ...]
    independent_phantoms: int | None = None
    family_pool: tuple[int, ...] = ()

    @property
    def report(self) -> bool:
        """Whether the tables come from fresh data (a data seed other than the development seed)."""
        return self.data != self.development

    def by_role(self) -> dict[str, tuple[int, ...]]:
        """The model seeds of each role (benign: every benign model's seed)."""
        return {
            "surrogate": (self.surrogate,),
            "owners": self.owners,
            "independent_owners": self.independent_owners,
            "suspects": self.suspects,
            "benign": self.benign,
            "family_pool": self.family_pool,
        }

    def phantoms_of(self, independent_owner: int) -> int:
        """The phantom seed an independent owner trains on: the disjoint set for the last one, when declared."""
        if self.independent_phantoms is not None and independent_owner == self.independent_owners[-1]:
            return self.independent_phantoms
        return self.data


class ExperimentError(ValueError):
    """A declaration that cannot be run; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")


def _error(path: Path, problem: str) -> ExperimentError:
    return ExperimentError(path, problem)


def seed_list(path: Path, seeds: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """A non-empty list of distinct integer seeds under ``seeds[key]``."""
    values = seeds.get(key)
    integers = isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not integers or not values:
        raise _error(path, f"seeds.{key} must be a non-empty list of integer seeds, got {values!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise _error(path, f"seeds.{key} lists seeds {repeated} more than once")
    return tuple(values)


def _seed(path: Path, seeds: Mapping[str, Any], key: str) -> int:
    value = seeds.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _error(path, f"seeds.{key} must be an integer seed, got {value!r}")
    return value


def seed_roles(path: Path, seeds: Mapping[str, Any], benign: Iterable[int]) -> SeedRoles:
    """The seed roles of a declaration under this protocol, checked (disjoint roles; report rules)."""
    required = ("data", "development", "surrogate", "owners", "independent_owners", "suspects")
    missing = [key for key in required if key not in seeds]
    if missing:
        raise _error(path, f"seeds lacks {missing}: name every seed by its role ({', '.join(required)})")
    unknown = set(seeds) - {*required, "independent_phantoms", "family_pool"}
    if unknown:
        raise _error(path, f"seeds: unknown roles {sorted(unknown)}")
    phantoms = seeds.get("independent_phantoms")
    roles = SeedRoles(
        data=_seed(path, seeds, "data"),
        development=_seed(path, seeds, "development"),
        surrogate=_seed(path, seeds, "surrogate"),
        owners=seed_list(path, seeds, "owners"),
        independent_owners=seed_list(path, seeds, "independent_owners"),
        suspects=seed_list(path, seeds, "suspects"),
        benign=tuple(benign),
        independent_phantoms=None if phantoms is None else _seed(path, seeds, "independent_phantoms"),
        family_pool=seed_list(path, seeds, "family_pool") if "family_pool" in seeds else (),
    )
    check_disjoint(path, roles)
    if roles.independent_phantoms is not None and roles.independent_phantoms in (roles.data, roles.development):
        raise _error(path, "seeds.independent_phantoms must differ from the data and development seeds")
    if roles.report:
        check_report(path, roles)
    return roles


def check_disjoint(path: Path, roles: SeedRoles) -> None:
    """Refuse any seed shared by two model roles, naming the seeds and the roles."""
    by_role = roles.by_role()
    collisions = []
    for i, first in enumerate(MODEL_ROLES):
        for second in MODEL_ROLES[i + 1 :]:
            shared = sorted(set(by_role[first]) & set(by_role[second]))
            if shared:
                collisions.append(f"{first} and {second} share {shared}")
    if collisions:
        raise _error(path, "seed roles must be disjoint: " + "; ".join(collisions))


def check_report(path: Path, roles: SeedRoles) -> None:
    """A report declaration's rules: a fresh data seed >= 1000 in no model role, >= 3 replicates of each kind."""
    if roles.data < MIN_REPORT_SEED:
        problem = f"report seed {roles.data} < {MIN_REPORT_SEED}: seeds below were used by tests and development"
        raise _error(path, problem)
    used = [role for role, seeds in roles.by_role().items() if roles.data in seeds]
    if used:
        raise _error(path, f"report seed {roles.data} is also a model seed ({', '.join(used)}); use it for data only")
    few = {
        key: len(getattr(roles, key))
        for key in ("owners", "independent_owners", "suspects")
        if len(getattr(roles, key)) < MIN_REPLICATES
    }
    if few:
        raise _error(path, f"a report declaration needs >= {MIN_REPLICATES} of each of {sorted(few)}, got {few}")
    if roles.independent_phantoms is None:
        raise _error(path, "a report declaration needs seeds.independent_phantoms (one independent owner's own data)")
    if len(roles.family_pool) < MIN_FAMILY_POOL:
        raise _error(
            path,
            f"a report declaration needs seeds.family_pool with >= {MIN_FAMILY_POOL} seeds (the calibrated verdict's "
            f"family), got {len(roles.family_pool)}",
        )


def legacy_roles(seeds: Mapping[str, Any], benign: Iterable[int]) -> SeedRoles:
    """The implicit seeds a legacy declaration ran with (surrogate and owner: the data seed)."""
    data = int(seeds["data"])
    return SeedRoles(
        data=data,
        development=int(seeds["development"]),
        surrogate=data,
        owners=(data,),
        independent_owners=(data + LEGACY_INDEPENDENT_OFFSET,),
        suspects=tuple(int(s) for s in seeds["suspects"]),
        benign=tuple(benign),
    )


def published_parts(name: str, publish: Mapping[str, Sequence[int]]) -> list[str]:
    """The results names a declaration publishes (its ``publish`` parts, or its own name)."""
    return list(publish) or [name]


def check_legacy(path: Path, name: str, publish: Mapping[str, Sequence[int]], data_seed: int, docs: Path) -> None:
    """A legacy declaration loads only beside every results.json it published, each on its data seed."""
    for part in published_parts(name, publish):
        results = docs / part / "results.json"
        try:
            report = json.loads(results.read_text(encoding="utf-8"))["seeds"]["report"]
        except (OSError, ValueError, KeyError, TypeError):
            raise _error(
                path,
                f"protocol 'legacy' is only for declarations already published, and {results} is missing or "
                "unreadable; declare seeds by role under the current protocol instead",
            ) from None
        if report != data_seed:
            raise _error(
                path,
                f"protocol 'legacy': {results} was published on report seed {report}, not {data_seed}: a newer "
                "declaration replaced these results, so remove this legacy declaration",
            )


def is_legacy(raw: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Whether a raw declaration says ``"protocol": "legacy"`` (any other value is refused)."""
    protocol = raw.get("protocol")
    if protocol not in (None, LEGACY):
        raise _error(Path(path), f"protocol must be {LEGACY!r} or absent (the current protocol), got {protocol!r}")
    return protocol == LEGACY
