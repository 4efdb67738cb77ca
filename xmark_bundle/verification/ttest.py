"""Statistics of black-box ownership verification: X-Mark's paired one-sided t-test and the watermark success rate.

For n benign non-target queries, ``Pb`` is the suspect model's target-label probability of each image and ``Pv`` that
of its watermarked version. The test is ``H0: Pb + tau = Pv`` against ``H1: Pb + tau < Pv``, computed exactly as
``scipy.stats.ttest_rel(pb + tau, pv, alternative="less")``; ownership is claimed when ``p < alpha``.

Beside it, ``wilcoxon_p``: the one-sided Wilcoxon signed-rank test of the same hypothesis on the paired differences
``Pv - (Pb + tau)`` (``scipy.stats.wilcoxon(..., alternative="greater")``), which does not assume them normal: model
probabilities pile up at 0 and 1. It is reported, not used for the verdict (the paper's test decides); pairs whose
difference is zero are dropped (scipy's default), and with none left ``wilcoxon_p = 1``.

Constant differences: when every paired difference ``Pv - Pb`` equals the same ``d`` (within ``1e-12``, e.g. a
saturated model answering 0 for benign and 1 for watermarked images), the sample variance is zero and the t statistic
is undefined (scipy gives NaN or +-inf and warns about precision loss). The limit of the test is used instead:
``p = 0`` when ``d - tau > 1e-12`` (every pair shows a lift beyond the margin), otherwise ``p = 1``; ``statistic`` is
then reported as ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import ttest_rel, wilcoxon

__all__ = ["ProbabilityError", "check_probabilities", "ownership_test", "watermark_success_rate"]

#: Spread of the paired differences (and distance of their value from tau) treated as zero.
CONSTANT_TOLERANCE = 1e-12


class ProbabilityError(ValueError):
    """Probabilities that cannot enter the test (NaN/inf, outside [0, 1], too few); the message names their source."""


def check_probabilities(values: ArrayLike, source: str) -> np.ndarray:
    """``values`` as a float64 array, after checking that every entry is finite and within [0, 1]."""
    array = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        raise ProbabilityError(f"{source}: {int(bad.sum())} of {array.size} probabilities are NaN or infinite")
    outside = (array < 0) | (array > 1)
    if outside.any():
        raise ProbabilityError(
            f"{source}: {int(outside.sum())} of {array.size} probabilities lie outside [0, 1] "
            f"(min {array.min():.4g}, max {array.max():.4g}); does the model output logits?"
        )
    return array


def ownership_test(
    pb: ArrayLike, pv: ArrayLike, tau: float = 0.25, alpha: float = 0.05, source: str = "suspect model"
) -> dict[str, Any]:
    """One-sided paired t-test of ``Pb + tau < Pv``: p-value, statistic, ``delta_p = mean(Pv - Pb)``, the verdict, and
    the Wilcoxon signed-rank p of the same hypothesis beside it (module docstring).

    ``source`` names the model in error messages. Raises :class:`ProbabilityError` for unusable probabilities.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    pb = check_probabilities(pb, f"{source} (benign queries Pb)")
    pv = check_probabilities(pv, f"{source} (watermarked queries Pv)")
    if pb.ndim != 1 or pb.shape != pv.shape:
        raise ProbabilityError(
            f"{source}: Pb and Pv must be paired 1-D arrays of equal length, got {pb.shape} and {pv.shape}"
        )
    n = pb.size
    if n < 2:
        raise ProbabilityError(f"{source}: the paired t-test needs at least 2 query pairs, got {n}")
    shifted = pb + tau
    differences = pv - pb
    if np.ptp(shifted - pv) <= CONSTANT_TOLERANCE:
        statistic = None
        p_value = 0.0 if differences.mean() - tau > CONSTANT_TOLERANCE else 1.0
    else:
        result = ttest_rel(shifted, pv, alternative="less")
        statistic, p_value = float(result.statistic), float(result.pvalue)
    beyond = pv - shifted
    wilcoxon_p = (
        1.0
        if not np.any(np.abs(beyond) > CONSTANT_TOLERANCE)
        else float(wilcoxon(beyond, alternative="greater").pvalue)
    )
    owned = p_value < alpha
    verdict = (
        f"verified: trained on the protected data (p = {p_value:.3g} < alpha = {alpha})"
        if owned
        else f"not verified: no significant evidence of training on the protected data "
        f"(p = {p_value:.3g} >= alpha = {alpha})"
    )
    return {
        "owned": owned,
        "verdict": verdict,
        "p_value": p_value,
        "statistic": statistic,
        "wilcoxon_p": wilcoxon_p,
        "delta_p": float(differences.mean()),
        "mean_pb": float(pb.mean()),
        "mean_pv": float(pv.mean()),
        "n": int(n),
        "tau": float(tau),
        "alpha": float(alpha),
    }


def watermark_success_rate(pv: ArrayLike, threshold: float = 0.5, source: str = "suspect model") -> float:
    """WSR: share of watermarked non-target queries whose target-label probability is ``>= threshold``."""
    pv = check_probabilities(pv, f"{source} (watermarked queries Pv)")
    if pv.size == 0:
        raise ProbabilityError(f"{source}: WSR needs at least one watermarked query")
    return float(np.mean(pv >= threshold))
