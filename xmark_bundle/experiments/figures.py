"""The experiment's figure: what each method's verification found in each scenario, one dot per model.

One panel per method; the scenarios Malicious (each suspect seed), Ind-W (each suspect seed, an independent owner's
watermark) and Ind-M (each benign model) on the x axis, ΔP = mean(Pv) - mean(Pb) on the y axis, filled dots for a
verified model, and the margin τ the t-test asks for as a dashed line. Easier to read than Table 2's p-values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

from xmark_bundle.fileio import atomic_path

__all__ = ["save_scenarios_figure"]

SCENARIOS = (("Malicious", "malicious"), ("Ind-W", "ind_w"), ("Ind-M", None))


def _runs(method: Mapping[str, Any], key: str | None) -> list[Mapping[str, Any]]:
    if key is None:
        return list(method["ind_m"].values())
    return [suspect[key] for suspect in method["suspects"].values()]


def save_scenarios_figure(collected: Mapping[str, Any], path: str | os.PathLike, tau: float = 0.25) -> None:
    """Write the figure of every method's scenarios (PNG) to ``path`` atomically."""
    methods = collected["methods"]
    figure = Figure(figsize=(3.0 * len(methods) + 1, 3.6), layout="constrained")
    axes = figure.subplots(1, len(methods), sharey=True, squeeze=False)[0]
    for ax, (name, method) in zip(axes, methods.items(), strict=True):
        for x, (_, key) in enumerate(SCENARIOS):
            runs = _runs(method, key)
            offsets = [x + 0.25 * (i - (len(runs) - 1) / 2) / max(1, len(runs) - 1) for i in range(len(runs))]
            for offset, run in zip(offsets, runs, strict=True):
                owned = bool(run["owned"])
                ax.scatter(offset, run["delta_p"], s=28, color="C3" if owned else "white", edgecolor="C3", zorder=3)
            verified = sum(bool(run["owned"]) for run in runs)
            ax.annotate(f"{verified}/{len(runs)}", (x, 1.02), ha="center", va="bottom", fontsize=8)
        ax.axhline(tau, color="0.4", linestyle="--", linewidth=1)
        ax.axhline(0, color="0.8", linewidth=0.8)
        ax.set_xticks(range(len(SCENARIOS)), [label for label, _ in SCENARIOS])
        ax.set_ylim(-0.3, 1.12)
        ax.set_xlim(-0.5, len(SCENARIOS) - 0.5)
        ax.set_title(name, fontsize=10, pad=14)
    axes[0].set_ylabel("ΔP = mean Pv − mean Pb")
    figure.suptitle("Verification per scenario: filled = verified (count above), dashed = τ", fontsize=10)
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        figure.savefig(stream, format="png", dpi=110)
