"""Is the calibrated verdict's error rate what it claims? Its p-values on models that never saw the release.

A model that never saw an owner's release (a benign model, the surrogate, a model with the surrogate's seed) should
give calibrated p-values that are uniform: ``P(p <= a) <= a``. The rank p of a family of m + 1 lies on the grid
``k / (m + 1)``; a Kolmogorov-Smirnov test against the continuous uniform would reject any grid, so each p is spread
over its grid cell, ``p - U / (m + 1)`` with U uniform on [0, 1) from a fixed seed, which is exactly uniform under the
null (and larger, conservative, where members tie). :func:`null_uniformity` gives that KS p and the share at or below
0.05; the figure ``null_uniformity.png`` shows the spread p-values' distribution function against the diagonal.

Uniform over what: the owner's member is one random draw from the family, so ``P(p <= a) <= a`` holds over that draw.
For one owner, drawn once, the members are not exchangeable on every model alike: a member whose perturbation lifts
any model's probability more than the others' (its own potency) ranks high on most benign models, and that owner's
verdict accuses more than ``a`` of them, another owner's fewer. :func:`null_p_values_by_owner` keeps the p-values of
each owner apart, so the tables give each owner's KS p and false accusations beside the pooled ones.

:func:`reference_adjusted_runs` recomputes every verification of an owner's watermark with the research variant
:func:`~xmark_bundle.verification.rank.reference_adjusted_rank`, the owner's benign models (Ind-M, never the surrogate
or its seed) as the reference models: a benign model's own verdict uses the other benign models (leave one out), a
malicious suspect's and a seed control's all of them. No query is made again: the members' statistics are in the
verifications. Designed after a look at the running comparison_v2's Ind-M verifications (docs/research_log.md), so its
numbers there are exploratory; the second phantom family's run, not looked at, measures it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

from xmark_bundle.verification.rank import reference_adjusted_rank

__all__ = ["null_p_values", "null_p_values_by_owner", "null_uniformity", "reference_adjusted_runs"]

#: Where a method's entry keeps the runs of models that never saw its releases.
NULL_ROWS = ("ind_m", "ind_m_seed_controls")


def null_p_values(method: Mapping[str, Any]) -> list[tuple[float, int]]:
    """(calibrated p, members m) of every run of a model that never saw the method's releases, where it has one."""
    return [value for values in null_p_values_by_owner(method).values() for value in values]


def null_p_values_by_owner(method: Mapping[str, Any]) -> dict[Any, list[tuple[float, int]]]:
    """:func:`null_p_values` per owner (each run's ``owner``; None for runs that name none), owners in run order."""
    found: dict[Any, list[tuple[float, int]]] = {}
    for rows in NULL_ROWS:
        for run in method.get(rows, {}).values():
            calibrated = run.get("calibrated")
            if isinstance(calibrated, Mapping):
                value = (float(calibrated["p_value"]), int(calibrated["members"]))
                found.setdefault(run.get("owner"), []).append(value)
    return found


def null_uniformity(values: list[tuple[float, int]], seed: int = 0) -> dict[str, Any] | None:
    """KS test of the spread p-values against the uniform, and the share of raw p at or below 0.05; None when empty."""
    if not values:
        return None
    p = np.array([v for v, _ in values])
    cell = 1.0 / (np.array([m for _, m in values]) + 1.0)
    spread = p - np.random.default_rng(seed).uniform(0.0, 1.0, p.size) * cell
    return {
        "n": int(p.size),
        "ks_p": float(stats.kstest(spread, "uniform").pvalue),
        "at_most_0.05": float(np.mean(p <= 0.05)),
        "spread_p": [float(v) for v in spread],
    }


def _statistics(run: Mapping[str, Any]) -> tuple[list[float], int] | None:
    calibrated = run.get("calibrated")
    if isinstance(calibrated, Mapping) and "member_statistics" in calibrated:
        return list(calibrated["member_statistics"]), int(calibrated["owner_index"])
    return None


def reference_adjusted_runs(method: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The reference-adjusted rank of each Ind-M, seed-control and malicious verification of ``method`` (module
    docstring): {"ind_m" | "ind_m_seed_controls" | "malicious": {run key: result with its ``owner``}}; empty where an
    owner has fewer than two benign models with the calibrated verdict."""
    references: dict[Any, dict[str, list[float]]] = {}
    for key, run in method.get("ind_m", {}).items():
        found = _statistics(run)
        if found is not None:
            references.setdefault(run.get("owner"), {})[key] = found[0]
    runs = {
        "ind_m": method.get("ind_m", {}),
        "ind_m_seed_controls": method.get("ind_m_seed_controls", {}),
        "malicious": {
            key: {**s["malicious"], "owner": s.get("owner")} for key, s in method.get("suspects", {}).items()
        },
    }
    adjusted: dict[str, dict[str, dict[str, Any]]] = {group: {} for group in runs}
    for group, group_runs in runs.items():
        for key, run in group_runs.items():
            found = _statistics(run)
            refs = references.get(run.get("owner"), {})
            others = [stats_ for ref_key, stats_ in refs.items() if not (group == "ind_m" and ref_key == key)]
            if found is None or not others:
                continue
            result = reference_adjusted_rank(found[0], others, found[1], alpha=float(run["calibrated"]["alpha"]))
            adjusted[group][key] = {**result, "owner": run.get("owner")}
    return adjusted
