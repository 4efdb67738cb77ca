"""Human-facing output of a verification run: the paired-probability figure and the short stdout summary.

The JSON record is written by :func:`xmark_bundle.fileio.write_json`; these two render the same result for people.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xmark_bundle.fileio import atomic_path

__all__ = ["save_family_figure", "save_verification_figure", "summary_lines"]


def save_verification_figure(
    path: str | os.PathLike,
    pb: np.ndarray,
    pv: np.ndarray,
    result: Mapping[str, Any],
    benign: torch.Tensor,
    watermarked: torch.Tensor,
    gain: float = 10.0,
    pc: np.ndarray | None = None,
) -> Path:
    """PNG with Pv against Pb (lines y = x and y = x + tau) and up to 3 rows benign / watermarked / gain x residual.

    ``benign`` and ``watermarked`` are E x 1 x S x S example images in [0, 1]; ``result`` is the test's dict.
    ``pc`` (the unkeyed control's probabilities, optional) is drawn against Pb as grey crosses.
    """
    rows = min(3, benign.shape[0])
    fig = Figure(figsize=(13, 3.6 * max(rows, 1)), layout="constrained")
    grid = fig.add_gridspec(max(rows, 1), 4, width_ratios=(1.6, 1, 1, 1))
    ax = fig.add_subplot(grid[:, 0])
    tau = result["tau"]
    line = np.array([0.0, 1.0])
    ax.plot(line, line, color="grey", linestyle=":", label="Pv = Pb")
    ax.plot(line, line + tau, color="tab:red", linestyle="--", label=f"Pv = Pb + tau (tau = {tau:g})")
    above = pv > pb + tau
    ax.scatter(pb[above], pv[above], s=14, color="tab:red", label=f"Pv > Pb + tau ({int(above.sum())})")
    ax.scatter(pb[~above], pv[~above], s=14, color="tab:blue", label=f"Pv <= Pb + tau ({int((~above).sum())})")
    if pc is not None:
        ax.scatter(pb, pc, s=14, marker="x", color="grey", alpha=0.7, label="control Pc vs Pb")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", xlabel="Pb (benign query)")
    ax.set_ylabel("Pv (watermarked query)")
    # two short lines: one long line is cut at the figure's edge next to the image panels
    ax.set_title(f"n = {result['n']}, p = {result['p_value']:.3g}\ndP = mean(Pv - Pb) = {result['delta_p']:+.3f}")
    control = result.get("control")
    warning = ""
    if control is not None and result["owned"] and not control["specific"]:
        warning = "\nwarning: not specific to this generator (see the control, grey crosses)"
    fig.suptitle(result["verdict"] + warning)
    ax.legend(loc="lower right", fontsize=8)
    titles = ("benign", "watermarked", f"residual x{gain:g} (grey = 0)")
    for r in range(rows):
        x, xw = benign[r, 0].float().cpu(), watermarked[r, 0].float().cpu()
        for c, image in enumerate((x, xw, (0.5 + gain * (xw - x)).clamp(0, 1))):
            panel = fig.add_subplot(grid[r, c + 1])
            panel.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            panel.set_axis_off()
            panel.set_title(f"#{r + 1} {titles[c]}", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def save_family_figure(path: str | os.PathLike, calibrated: Mapping[str, Any]) -> Path:
    """PNG of the calibrated verdict: each family member's statistic, the owner's marked, its rank p in the title."""
    stats = np.asarray(calibrated["member_statistics"])
    owner = calibrated["owner_index"]
    others = np.delete(stats, owner)
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.add_subplot()
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, others.size)
    ax.scatter(others, jitter, s=22, color="grey", alpha=0.8, label=f"{others.size} other members of the family")
    ax.scatter([stats[owner]], [0.0], s=160, marker="*", color="tab:red", zorder=3, label="the owner's watermark")
    ax.axvline(0.0, color="grey", linestyle=":")
    ax.set(ylim=(-1, 1), yticks=[], xlabel="mean(P_member - Pb) on the same non-target samples")
    ax.set_title(
        f"rank p = {calibrated['p_value']:.3g} ({calibrated['others_at_least_owner']} of {calibrated['members']} "
        f"others at least as high); alpha = {calibrated['alpha']:g}",
        fontsize=10,
    )
    fig.suptitle("calibrated verdict: " + ("verified" if calibrated["owned"] else "not verified"), fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def save_key_vetting_figure(path: str | os.PathLike, report: Mapping[str, Any]) -> Path:
    """PNG of a key-vetting report: each candidate key's rise of P(k) per reference model, the limit as a line."""
    candidates, limit = report["candidates"], report["max_reaction"]
    seeds = [c["key_seed"] for c in candidates]
    fig = Figure(figsize=(max(7.0, 0.35 * len(seeds) + 5), 4), layout="constrained")
    ax = fig.add_subplot()
    for j, name in enumerate(candidates[0]["reactions"]):
        rise = [c["reactions"][name] for c in candidates]
        ax.scatter(seeds, rise, s=18, marker="os^vD<>"[j % 7], label="/".join(Path(name).parts[-2:]))
    ax.axhline(limit, color="tab:red", linestyle="--", label=f"limit {limit:g}")
    ax.axhline(0.0, color="grey", linestyle=":")
    if report["key_seed"] is not None:
        ax.axvline(report["key_seed"], color="tab:green", alpha=0.4, linewidth=6, label=f"chosen {report['key_seed']}")
    ax.set(xlabel="key seed", ylabel=f"rise of mean P({report['target_label']})")
    ax.set_xlim(min(seeds) - 1, max(seeds) + 1)  # key seeds are integers: one screened key is not at the axis edge
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(
        f"key vetting: {report['key_pattern']} keys at magnitude {report['key_magnitude']:g}, n = {report['n']}"
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """Readable lines for stdout: suspect, queries, probabilities, WSR, test, verdict and the unkeyed control."""
    suspect, generator = report["suspect"], report["generator"]
    suspect_hash = f", sha256 {suspect['sha256'][:12]}" if suspect.get("sha256") else ""
    generator_name = generator["checkpoint"] or "(in memory)"
    generator_hash = f" (sha256 {generator['sha256'][:12]})" if generator.get("sha256") else ""
    statistic = "undefined (constant differences)" if report["statistic"] is None else f"{report['statistic']:.3f}"
    return [
        *_calibrated_lines(report.get("calibrated") or {}),
        *_reference_lines(report.get("reference_adjusted")),
        f"suspect: {suspect['location']} [{suspect['kind']}{suspect_hash}]",
        f"queries: {report['n']} non-target samples ('{report['target_label']}' absent), "
        f"generator {generator_name}{generator_hash} at {generator['image_size']} px, "
        f"queried at {report['query_size']} px",
        f"mean Pb = {report['mean_pb']:.3f}, mean Pv = {report['mean_pv']:.3f}, dP = mean(Pv - Pb) = "
        f"{report['delta_p']:+.3f}",
        f"WSR (Pv >= {report['wsr_threshold']:g}) = {100 * report['wsr']:.1f} %",
        f"paired t-test H1: Pb + {report['tau']:g} < Pv: t = {statistic}, p = {report['p_value']:.3g} "
        f"(Wilcoxon signed-rank p = {report['wilcoxon_p']:.3g})",
        f"VERDICT (paper's margin test, no known error rate against other watermarks): {report['verdict']}",
        *_control_lines(report),
    ]


def _calibrated_lines(calibrated: Mapping[str, Any]) -> list[str]:
    """The calibrated verdict first, or why there is none."""
    if not calibrated.get("available"):
        return [f"CALIBRATED VERDICT: none ({calibrated.get('reason', 'no family')})"] if calibrated else []
    family = calibrated["family"]
    others = np.delete(np.asarray(calibrated["member_statistics"]), calibrated["owner_index"])
    lines = [
        f"CALIBRATED VERDICT: {calibrated['verdict']}",
        f"  family: {family['members']} other {family['kind']} of {family['method']} ({family['file']}, commitment "
        f"{family['commitment'][:12]}); owner's statistic {calibrated['owner_statistic']:+.3f}, others "
        f"{others.min():+.3f} to {others.max():+.3f}",
        "  guarantee: a model that never saw the release is accused with probability <= alpha over the random draw of "
        "the owner's member from this family before the release (for one owner, over many models, it can differ)",
    ]
    if not calibrated["reachable"]:
        lines.append(f"  WARNING: with {calibrated['members']} other members the rank p can never reach alpha")
    return lines


def _reference_lines(adjusted: Mapping[str, Any] | None) -> list[str]:
    """The research variant's line, where reference reports were given."""
    if not adjusted:
        return []
    return [
        f"reference-adjusted rank (research, not a verdict): p = {adjusted['p_value']:.3g} over {adjusted['members']} "
        f"other members, each member's mean statistic on {adjusted['references']} reference model(s) subtracted"
    ]


def _control_lines(report: Mapping[str, Any]) -> list[str]:
    """The control's line, with a warning when the verdict is not specific to this generator."""
    control = report.get("control")
    if control is None:
        return []
    versus = control.get("p_value_vs_watermark")
    line = (
        f"control ({control['description']}): mean Pc = {control['mean_pc']:.3f}, "
        f"dP = {control['delta_p']:+.3f}, p = {control['p_value']:.3g}"
        + ("" if versus is None else f"; watermark above control + {report['tau']:g}: p = {versus:.3g}")
    )
    if control["specific"]:
        return [line + ": the suspect reacts to our watermark, not to the control: a positive verdict is specific"]
    if not report["owned"]:
        return [line]
    if control.get("reacts", True):
        warning = (
            "WARNING: the suspect also reacts to the control, a perturbation of the same size without our key; it "
            "has learned 'perturbed' rather than this generator's watermark, so a positive verdict is not specific "
            "evidence of this data set"
        )
    else:
        warning = (
            f"WARNING: our watermark does not beat the control by tau = {report['tau']:g}; the suspect reacts to "
            "other perturbations of this size nearly as much (a clean model can), so a positive verdict is not "
            "specific evidence of this generator's watermark"
        )
    return [line, warning]
