"""The calibrated verdict: rank the owner's watermark among m other members of its own family.

Every member j of the family (the owner's watermark and m others of the same kind: other keys, or generators trained
with the same recipe and other seeds) marks the same n non-target samples; the suspect's target-label probability of
each gives the paired statistic ``S_j = mean(P_j - Pb)`` (``Pb``: the benign queries, shared by all members). The
p-value is the owner's rank among the members,

    p = (1 + #{j != owner : S_j >= S_owner}) / (m + 1),

ties counted against the owner. If the suspect never saw the owner's release, nothing singles out the owner's member
among the others (it was drawn at random from the same family before release), so the m + 1 statistics are
exchangeable and ``P(p <= a) <= a`` for every a, whatever else the suspect was trained on, other watermarks of the same
kind included. The smallest possible p is ``1 / (m + 1)``: m = 19 can reach 0.05, m = 99 can reach 0.01.

That probability is over the owner's random draw. Members differ in potency (how much a member lifts *any* model's
probability), so for one owner, drawn once, the rank on models that never saw its release is not uniform.
:func:`reference_adjusted_rank` is a research variant for that: each member's statistic on K reference models the owner
trained on its own clean data is subtracted before ranking, ``S_j - mean_r R_rj``, which removes the potency that
every model shares; it is computed from the same verifications (the experiments' benign models as references) and
is not the product's verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from xmark_bundle.verification.ttest import check_probabilities

__all__ = ["RANK_STATISTIC", "REFERENCE_STATISTIC", "min_members", "rank_test", "reference_adjusted_rank"]

#: What the rank test compares, for reports.
RANK_STATISTIC = "mean(P_member - Pb) over the same non-target samples"
#: What the reference-adjusted rank compares, for reports.
REFERENCE_STATISTIC = "mean(P_member - Pb) minus its mean over the owner's clean reference models"


def min_members(alpha: float) -> int:
    """The fewest other members m with which the rank test can reach ``p <= alpha`` (``1 / (m + 1) <= alpha``)."""
    return int(np.ceil(1.0 / alpha - 1.0 - 1e-9))


def _owner_rank(statistics: np.ndarray, owner_index: int) -> tuple[float, int, int, float]:
    """The owner's statistic, how many of the m others reach it (ties against the owner), m, and the rank p."""
    owner = float(statistics[owner_index])
    others = np.delete(statistics, owner_index)
    at_least = int(np.sum(others >= owner))
    return owner, at_least, int(others.size), (1 + at_least) / (others.size + 1)


def rank_test(
    pb: ArrayLike, member_probs: ArrayLike, owner_index: int, alpha: float = 0.05, source: str = "suspect model"
) -> dict[str, Any]:
    """The owner's rank p-value among the family's members and the calibrated verdict (module docstring).

    ``pb``: n benign probabilities; ``member_probs``: (m + 1) x n probabilities of the members' watermarked queries,
    row ``owner_index`` the owner's. ``owned`` is ``p <= alpha``; ``reachable`` says whether m allows that at all.
    """
    pb = check_probabilities(pb, f"{source} (benign queries)")
    probs = check_probabilities(member_probs, f"{source} (family queries)")
    if probs.ndim != 2 or probs.shape[1] != pb.shape[0]:
        raise ValueError(f"{source}: member probabilities of shape {probs.shape} do not pair with {pb.shape[0]} Pb")
    if probs.shape[0] < 2:
        raise ValueError(f"{source}: a family needs the owner and at least one other member, got {probs.shape[0]}")
    if not 0 <= owner_index < probs.shape[0]:
        raise ValueError(f"owner_index {owner_index} is outside the family's {probs.shape[0]} members")
    statistics = (probs - pb[None, :]).mean(axis=1)
    owner, at_least, m, p = _owner_rank(statistics, owner_index)
    owned = bool(p <= alpha)
    return {
        "test": "rank of the owner's watermark among its family",
        "statistic_definition": RANK_STATISTIC,
        "members": m,
        "owner_index": int(owner_index),
        "owner_statistic": owner,
        "member_statistics": [float(s) for s in statistics],
        "others_at_least_owner": at_least,
        "p_value": float(p),
        "alpha": float(alpha),
        "reachable": bool(1.0 / (m + 1) <= alpha),
        "owned": owned,
        "verdict": (
            f"calibrated: trained on the owner's release (rank p = {p:.3g} <= {alpha:g}: the owner's watermark lifts "
            f"P more than all {m} other members)"
            if owned
            else f"calibrated: not verified (rank p = {p:.3g} > {alpha:g}; {at_least} of {m} other members lift P as "
            "much or more)"
        ),
    }


def reference_adjusted_rank(
    member_statistics: ArrayLike, reference_statistics: ArrayLike, owner_index: int, alpha: float = 0.05
) -> dict[str, Any]:
    """The rank test on potency-adjusted statistics ``S_j - mean_r R_rj`` (module docstring; a research variant).

    ``member_statistics``: the suspect's ``S_j`` for the m + 1 members (:func:`rank_test`'s ``member_statistics``);
    ``reference_statistics``: K x (m + 1), the same statistics of K >= 1 reference models that never saw the release.
    """
    statistics = np.asarray(member_statistics, dtype=np.float64)
    references = np.atleast_2d(np.asarray(reference_statistics, dtype=np.float64))
    if statistics.ndim != 1 or references.shape[1:] != statistics.shape or references.shape[0] < 1:
        raise ValueError(
            f"reference statistics of shape {references.shape} do not pair with {statistics.shape[0]} members"
        )
    if not 0 <= owner_index < statistics.size:
        raise ValueError(f"owner_index {owner_index} is outside the family's {statistics.size} members")
    adjusted = statistics - references.mean(axis=0)
    owner, at_least, m, p = _owner_rank(adjusted, owner_index)
    return {
        "test": "rank of the owner's watermark among its family, each member's potency on reference models removed",
        "statistic_definition": REFERENCE_STATISTIC,
        "members": m,
        "references": int(references.shape[0]),
        "owner_index": int(owner_index),
        "owner_statistic": owner,
        "others_at_least_owner": at_least,
        "p_value": float(p),
        "alpha": float(alpha),
        "owned": bool(p <= alpha),
    }
