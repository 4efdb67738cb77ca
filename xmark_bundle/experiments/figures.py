"""The experiment's figures, each beside the table it shows (:data:`FIGURES`).

``scenarios.png``: what each method's verification found in each scenario, one dot per model: one panel per method;
the scenarios Malicious (each suspect seed), Ind-W (each suspect seed, an independent owner's watermark) and Ind-M
(each benign model) on the x axis, ΔP = mean(Pv) - mean(Pb) on the y axis, filled dots for a verified model, and the
margin τ the t-test asks for as a dashed line. Easier to read than Table 2's p-values.

``removal.png`` (when the experiment ran removal attacks): WSR at 0.5 and clean BA of the malicious suspects against
the epochs of head-only and full fine-tuning (0: as trained) and against the pruning rate, pruning alone (0: as
trained) and then fine-tuned (0: every layer fine-tuned for as many epochs), a line per method through the seeds' mean,
a dot per seed (filled: still verified), as the paper's Fig. 7.

``variants.png`` (when the experiment trained several kinds of suspect: sizes, architectures, evasions): WSR at 0.5
and clean BA per kind, a dot per suspect seed (filled: verified) and a bar at the mean, a colour per method; the
declared kind is labelled with its architecture and size (:func:`~xmark_bundle.experiments.tables.kind_label`).

``null_uniformity.png`` (when verifications carry the calibrated verdict): per method, the distribution function of the
calibrated p-values of every model that never saw the release (spread over their grid cells,
:mod:`~xmark_bundle.experiments.null`) against the uniform's diagonal, with the KS p in the legend.

``null_by_owner.png`` (when a method's null p-values come from several owners): a panel per such method, the same
distribution function per owner: the calibrated verdict's alpha holds over the owner's random draw, and an owner whose
member lifts every model more than the others' lies above the diagonal on its own.

``floors.png`` (a StealthMark experiment): a panel per architecture x trigger; for the owners' watermarked models
(and the ``badnet_seg`` baseline where declared), the benign models and the other keys' models, one dot per
verification (model x owner's record) at its background floor's rise on triggered queries (mean triggered floor -
mean clean floor), filled when verified, the count verified above each group, and the verifier's margin dashed.

``detectability.png`` (when the experiment measured detectability): the AUROC of every detector of the detectability
table per method, a bar each, chance (0.5) dashed; drawn from the table itself (:func:`draw_detectability`), so a
published results.json can be drawn again without the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from xmark_bundle.experiments.detectability import detectability_table
from xmark_bundle.experiments.null import null_p_values, null_p_values_by_owner, null_uniformity
from xmark_bundle.experiments.tables import ind_w_runs, kind_label
from xmark_bundle.fileio import atomic_path

__all__ = [
    "FIGURES",
    "draw_detectability",
    "save_detectability_figure",
    "save_figures",
    "save_floors_figure",
    "save_null_by_owner_figure",
    "save_null_figure",
    "save_removal_figure",
    "save_scenarios_figure",
    "save_variants_figure",
]

SCENARIOS = (("Malicious", "malicious"), ("Ind-W", "ind_w"), ("Ind-M", None))


def _runs(method: Mapping[str, Any], key: str | None) -> list[Mapping[str, Any]]:
    if key is None:
        return list(method["ind_m"].values())
    if key == "ind_w":  # every independent owner's verification of every suspect
        return [run for suspect in method["suspects"].values() for run in ind_w_runs(suspect)]
    return [suspect[key] for suspect in method["suspects"].values()]


def _spread(x: float, n: int, width: float) -> list[float]:
    """``n`` positions spread evenly over ``width`` around ``x``: the dots of one group do not hide each other."""
    return [x + width * (i - (n - 1) / 2) / max(1, n - 1) for i in range(n)]


def save_scenarios_figure(collected: Mapping[str, Any], path: str | os.PathLike, tau: float = 0.25) -> bool:
    """Write the figure of every method's scenarios (PNG) to ``path`` atomically; True (there is always one)."""
    methods = collected["methods"]
    figure = Figure(figsize=(3.0 * len(methods) + 1, 3.6), layout="constrained")
    axes = figure.subplots(1, len(methods), sharey=True, squeeze=False)[0]
    for ax, (name, method) in zip(axes, methods.items(), strict=True):
        for x, (_, key) in enumerate(SCENARIOS):
            runs = _runs(method, key)
            for offset, run in zip(_spread(x, len(runs), 0.25), runs, strict=True):
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
    title = "Verification per scenario: filled = verified (count above), dashed = τ"
    figure.suptitle(title, fontsize=10, wrap=True)  # wrapped to the figure's width: one method makes it narrow
    _save(figure, path)
    return True


def _floor_groups(collected: Mapping[str, Any], arch: str, trigger: str) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """(group, its verifications) of one architecture x trigger: each method's owners with their own records, then
    every benign and other-key model with every owner's record; groups without a verification are left out."""
    models = [m for m in collected.get("models", {}).values() if m["arch"] == arch and m["trigger"] == trigger]
    groups = [
        (f"{method} owners", [m["verification"] for m in models if m["method"] == method])
        for method in dict.fromkeys(m["method"] for m in models)
    ]
    benign = [b["verification"].get(trigger, {}) for b in collected.get("benign", {}).values() if b["arch"] == arch]
    others = [
        o["verification"]
        for o in collected.get("other_keys", {}).values()
        if (o["arch"], o["trigger"]) == (arch, trigger)
    ]
    groups += [("benign", [run for records in benign for run in records.values()])]
    groups += [("other keys", [run for records in others for run in records.values()])]
    return [(label, runs) for label, runs in groups if runs]


def save_floors_figure(collected: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Write a StealthMark experiment's floor figure (PNG) to ``path`` atomically; False for any other experiment."""
    if collected.get("task") != "segmentation" or not collected.get("models"):
        return False
    archs, triggers = collected["architectures"], collected["triggers"]
    figure = Figure(figsize=(2.9 * len(triggers) + 1, 3.0 * len(archs) + 0.6), layout="constrained")
    axes = figure.subplots(len(archs), len(triggers), sharey=True, squeeze=False)
    rises = []
    for row, arch in enumerate(archs):
        for col, trigger in enumerate(triggers):
            ax, groups = axes[row][col], _floor_groups(collected, arch, trigger)
            for x, (_, runs) in enumerate(groups):
                for offset, run in zip(_spread(x, len(runs), 0.3), runs, strict=True):
                    rise = run["floor_triggered"] - run["floor_clean"]
                    rises.append(rise)
                    colour = "C3" if run["owned"] else "white"
                    ax.scatter(offset, rise, s=22, color=colour, edgecolor="C3", zorder=3)
                verified = sum(bool(run["owned"]) for run in runs)
                ax.annotate(
                    f"{verified}/{len(runs)}",
                    (x, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            margins = {run.get("margin") for _, runs in groups for run in runs} - {None}
            for margin in margins:
                ax.axhline(margin, color="0.4", linestyle="--", linewidth=1)
            ax.axhline(0, color="0.8", linewidth=0.8)
            ax.set_xticks(range(len(groups)), [label.replace(" ", "\n", 1) for label, _ in groups], fontsize=8)
            ax.set_xlim(-0.5, len(groups) - 0.5)
            ax.set_title(f"{arch}, {trigger}", fontsize=10, pad=14)
        axes[row][0].set_ylabel("floor rise (triggered − clean)")
    low = min([0.0, *rises])
    axes[0][0].set_ylim(low - 0.01, max([0.05, *rises]) + 0.01)
    title = "StealthMark verification: one dot per model x owner's record, filled = verified, dashed = margin"
    figure.suptitle(title, fontsize=10, wrap=True)
    _save(figure, path)
    return True


def _save(figure: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        figure.savefig(stream, format="png", dpi=110)


#: The removal figure's panels: (title, the x value of a run, x label, its curves as (the runs' mode, line style)).
REMOVAL_PANELS = (
    ("head-only fine-tuning", "epochs", "epochs run", (("head", "-"),)),
    ("full fine-tuning", "epochs", "epochs run", (("full", "-"),)),
    (
        "pruning (dashed: alone; solid: then fine-tuning)",
        "rate",
        "share of penultimate units pruned",
        (("pruned", "--"), ("fine-pruned", "-")),
    ),
)


def _removal_points(suspects: list[Mapping[str, Any]], mode: str, x_key: str) -> list[tuple[float, float, float, bool]]:
    """(x, WSR, BA, verified) of every suspect's runs of ``mode``, with the point at x 0: the suspect as trained, or
    for fine-pruning every layer fine-tuned for as many epochs with nothing pruned."""
    runs = [run for s in suspects for run in s["removal"].values() if run["mode"] == mode]
    if mode == "fine-pruned":
        same = {run["epochs"] for run in runs}
        start = [r for s in suspects for r in s["removal"].values() if r["mode"] == "full" and r["epochs"] in same]
        points = [(0.0, r["wsr"], r["mean_ba"], _lead_verdict(r)) for r in start]
    else:
        points = [(0.0, s["malicious"]["wsr"], s["mean_ba"], _lead_verdict(s["malicious"])) for s in suspects]
    return points + [(float(run[x_key]), run["wsr"], run["mean_ba"], _lead_verdict(run)) for run in runs]


def _lead_verdict(run: Mapping[str, Any]) -> bool:
    """The calibrated verdict where the verification has it (the product's lead verdict), else the margin test's."""
    calibrated = run.get("calibrated")
    return bool(calibrated["owned"]) if isinstance(calibrated, Mapping) else bool(run["owned"])


def save_removal_figure(collected: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Write the removal figure to ``path`` atomically; False (nothing written) when no suspect ran removal."""
    methods = {
        name: [s for s in method["suspects"].values() if s.get("removal")]
        for name, method in collected["methods"].items()
    }
    methods = {name: suspects for name, suspects in methods.items() if suspects}
    modes = {run["mode"] for suspects in methods.values() for s in suspects for run in s["removal"].values()}
    panels = [panel for panel in REMOVAL_PANELS if any(mode in modes for mode, _ in panel[3])]
    if not panels:
        return False
    figure = Figure(figsize=(3.4 * len(panels) + 1.4, 5.2), layout="constrained")
    axes = figure.subplots(2, len(panels), sharey="row", squeeze=False)
    for column, (title, x_key, x_label, curves) in enumerate(panels):
        for mode, style in (curve for curve in curves if curve[0] in modes):
            for colour, (name, suspects) in enumerate(methods.items()):
                points = _removal_points(suspects, mode, x_key)
                xs = sorted({x for x, *_ in points})
                for row in (0, 1):
                    ax = axes[row][column]
                    means = [sum(p[row + 1] for p in points if p[0] == x) / sum(p[0] == x for p in points) for x in xs]
                    label = name if row == 0 and (column, style) == (0, "-") else None
                    ax.plot(xs, means, color=f"C{colour}", linewidth=1.2, linestyle=style, label=label)
                    for x, wsr, ba, owned in points:
                        face = f"C{colour}" if owned else "white"
                        ax.scatter(x, (wsr, ba)[row], s=18, color=face, edgecolor=f"C{colour}", zorder=3)
        axes[0][column].set_title(title, fontsize=9)
        kept_best = any(
            run.get("kept_checkpoint", "best") == "best"
            for suspects in methods.values()
            for s in suspects
            for run in s["removal"].values()
            if run["mode"] in {mode for mode, _ in curves} and run["epochs"]
        )
        axes[1][column].set_xlabel(x_label + (" (the best one kept)" if kept_best and x_key == "epochs" else ""))
    axes[0][0].set_ylabel("WSR at 0.5")
    axes[1][0].set_ylabel("clean BA")
    axes[0][0].set_ylim(-0.05, 1.05)
    figure.legend(loc="outside right upper", fontsize=8)
    calibrated = any(
        isinstance(run.get("calibrated"), Mapping)
        for ss in methods.values()
        for s in ss
        for run in s["removal"].values()
    )
    verdict = "verified by the calibrated verdict where a family exists" if calibrated else "still verified"
    title = f"Removal: a dot per suspect seed (filled = {verdict}), lines through the mean"
    figure.suptitle(title, fontsize=10, wrap=True)
    _save(figure, path)
    return True


def save_variants_figure(collected: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Write the figure of the kinds of suspect (scale, architecture, evasion) to ``path`` atomically; False (nothing
    written) when the experiment trained one kind only."""
    methods = collected["methods"]
    order = list(dict.fromkeys(str(s.get("variant", "")) for m in methods.values() for s in m["suspects"].values()))
    if len(order) < 2:
        return False
    figure = Figure(figsize=(1.1 * len(order) * max(1, len(methods)) ** 0.5 + 3, 5.2), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    width = 0.7 / len(methods)
    for colour, (name, method) in enumerate(methods.items()):
        for x, variant in enumerate(order):
            suspects = [s for s in method["suspects"].values() if str(s.get("variant", "")) == variant]
            centre = x - 0.35 + width * (colour + 0.5)
            for ax, values in (
                (axes[0], [s["malicious"]["wsr"] for s in suspects]),
                (axes[1], [s["mean_ba"] for s in suspects]),
            ):
                if not values:
                    continue
                ax.hlines(sum(values) / len(values), centre - width / 2, centre + width / 2, color=f"C{colour}")
                for value, s in zip(values, suspects, strict=True):
                    face = f"C{colour}" if s["malicious"]["owned"] else "white"
                    ax.scatter(centre, value, s=18, color=face, edgecolor=f"C{colour}", zorder=3)
        axes[0].plot([], [], color=f"C{colour}", label=name)
    axes[0].set_ylabel("WSR at 0.5 (Malicious)")
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].set_ylabel("clean BA")
    kinds = collected.get("suspect_kinds", {})
    axes[1].set_xticks(range(len(order)), [kind_label(v, kinds.get(v, {}), "\n") for v in order])
    figure.legend(loc="outside right upper", fontsize=8)
    title = "Kinds of suspect: a dot per seed (filled = verified), a bar at the mean"
    figure.suptitle(title, fontsize=10, wrap=True)
    _save(figure, path)
    return True


def draw_detectability(table: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the bars of the detectability ``table``'s AUROC columns (one group per detector, a bar per method, a
    method's value above 0.5 separating marked from unmarked files, below 0.5 the other way round) to ``path``."""
    columns = [column for column in table["columns"] if column.endswith("AUROC")]
    rows = table["rows"]
    figure = Figure(figsize=(1.2 * len(columns) + 3, 3.6), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(1, len(rows))
    for colour, row in enumerate(rows):
        for x, column in enumerate(columns):
            value = row["cells"].get(column, {}).get("value")
            if isinstance(value, (int, float)):
                label = row["label"] if x == 0 else None
                ax.bar(x - 0.4 + width * (colour + 0.5), value, width, color=f"C{colour}", label=label)
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(columns)), [column.removesuffix(" AUROC") for column in columns], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUROC marked vs unmarked")
    figure.legend(loc="outside right upper", fontsize=8)
    title = "Detectability: can a data user find the marked files? (dashed: chance)"
    figure.suptitle(title, fontsize=10, wrap=True)
    _save(figure, path)


def save_detectability_figure(collected: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Write the detectability figure to ``path`` atomically; False (nothing written) when no method measured it."""
    detected = {name: m["detectability"] for name, m in collected["methods"].items() if m.get("detectability")}
    if not detected:
        return False
    draw_detectability(detectability_table(detected), path)
    return True


def _null_curves(ax: Any, found: Mapping[str, Mapping[str, Any]], legend_size: float = 8) -> None:
    """The uniform's diagonal and each entry's distribution function of its spread p-values, KS p in the legend."""
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="uniform")
    for name, uniform in found.items():
        spread = sorted(uniform["spread_p"])
        share = [(i + 1) / len(spread) for i in range(len(spread))]
        label = f"{name}: n {uniform['n']}, KS p {uniform['ks_p']:.2g}"
        ax.step([0.0, *spread, 1.0], [0.0, *share, 1.0], where="post", label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="calibrated p (spread over its grid cell)", ylabel="share of models")
    ax.legend(fontsize=legend_size, loc="lower right")


def save_null_figure(collected: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Write the calibrated null's uniformity figure (PNG) when any method has calibrated p-values; True if written."""
    found = {name: null_uniformity(null_p_values(method)) for name, method in collected["methods"].items()}
    found = {name: uniform for name, uniform in found.items() if uniform is not None}
    if not found:
        return False
    figure = Figure(figsize=(5.2, 4.6), layout="constrained")
    _null_curves(figure.add_subplot(), found)
    title = "Calibrated p of models that never saw the release: uniform if its error rate holds"
    figure.suptitle(title, fontsize=10, wrap=True)
    _save(figure, path)
    return True


def save_null_by_owner_figure(collected: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Write the per-owner null figure (a panel per method whose null p-values come from several owners); True if
    written."""
    panels = {}
    for name, method in collected["methods"].items():
        owners = null_p_values_by_owner(method)
        by_owner = {f"owner {owner}": null_uniformity(values) for owner, values in owners.items()}
        if len(by_owner) > 1:
            panels[name] = by_owner
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    figure = Figure(figsize=(4.0 * cols, 3.7 * rows + 0.5), layout="constrained")
    for i, (name, by_owner) in enumerate(panels.items()):
        ax = figure.add_subplot(rows, cols, i + 1)
        _null_curves(ax, by_owner, legend_size=7)
        ax.set_title(name, fontsize=9)
    title = "Calibrated p of models that never saw the release, per owner: alpha holds over the owner's draw"
    figure.suptitle(title, fontsize=10, wrap=True)
    _save(figure, path)
    return True


#: Each figure's file, the function that draws it, and the table (by the start of its title) it goes beside.
FIGURES: dict[str, tuple[Callable[[Mapping[str, Any], Path], bool], str]] = {
    "scenarios.png": (save_scenarios_figure, "Table 2"),
    "removal.png": (save_removal_figure, "Removal"),
    "variants.png": (save_variants_figure, "Table 1"),
    "detectability.png": (save_detectability_figure, "Detectability"),
    "null_uniformity.png": (save_null_figure, "Table 2"),
    "null_by_owner.png": (save_null_by_owner_figure, "Table 2"),
    "floors.png": (save_floors_figure, "Verification (StealthMark)"),
}
#: the figures of a segmentation (StealthMark) experiment; every other one is a classification experiment's
SEGMENTATION_FIGURES = ("floors.png",)


def save_figures(collected: Mapping[str, Any], out: Path) -> list[str]:
    """Draw every figure that ``collected`` has data for into ``out``; the file names written."""
    segmentation = collected.get("task") == "segmentation"
    drawn = [name for name in FIGURES if (name in SEGMENTATION_FIGURES) == segmentation]
    return [name for name in drawn if FIGURES[name][0](collected, out / name)]
