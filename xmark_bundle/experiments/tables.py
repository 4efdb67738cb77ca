"""From an experiment's ``collected.json`` to its tables (results.json format) and a plain-words summary.

Table 1 (per method): clean-test BA and mean AUROC of the suspects (benign models beside), WSR at 0.5 (the headline:
a verifier does not know the suspect's thresholds), the paper-style WSR at the suspect's validation threshold with the
share of clean non-target images over that threshold, and the released files' quality at full resolution. Table 2
(per method): Malicious and Ind-W over suspect seeds (ΔP, the paper's t-test p, the Wilcoxon signed-rank p, whether
the control calls the verdict specific) and Ind-M over every benign model: the share falsely verified with its
Clopper-Pearson 95 % interval. With detectability measured, a third table: how well a data user finds the marked
files (:mod:`~xmark_bundle.experiments.detectability`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from scipy import stats

from xmark_bundle.experiments.detectability import detectability_table
from xmark_bundle.experiments.null import (
    null_p_values,
    null_p_values_by_owner,
    null_uniformity,
    reference_adjusted_runs,
)

__all__ = ["by_owner", "false_accusations", "ind_w_runs", "kind_label", "plain_words", "tables"]


def _seeds(values: list[float]) -> dict[str, list[float]]:
    return {"per_seed": [float(v) for v in values]}


def ind_w_runs(suspect: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A suspect's Ind-W verifications: one per independent owner (a legacy run: its one independent owner)."""
    if "ind_w_owners" in suspect:
        return list(suspect["ind_w_owners"].values())
    return [suspect["ind_w"]]


def by_owner(runs: list[Mapping[str, Any]], value: Any) -> str | None:
    """``value(run)`` as mean ± sd per owner and the sd of the owners' means (None with fewer than two owners): the
    spread between owners beside the cells' spread over every owner x suspect."""
    groups: dict[Any, list[float]] = {}
    for run in runs:
        groups.setdefault(run.get("owner"), []).append(float(value(run)))
    if len(groups) < 2:
        return None
    means = {owner: statistics.fmean(values) for owner, values in groups.items()}

    def sd(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    parts = [f"{owner}: {means[owner]:.3f} ± {sd(values):.3f}" for owner, values in groups.items()]
    return "; ".join(parts) + f"; sd of owner means {sd(list(means.values())):.3f}"


def _verified(runs: list[Mapping[str, Any]], verdict: str = "margin") -> str | None:
    """``k of n`` verified by the paper's margin t-test, or by the calibrated rank test where every run has it."""
    if verdict == "margin":
        return f"{sum(bool(r['owned']) for r in runs)} of {len(runs)}"
    if not runs or not all(isinstance(r.get("calibrated"), Mapping) for r in runs):
        return None
    return f"{sum(bool(r['calibrated']['owned']) for r in runs)} of {len(runs)}"


def _variants(method: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """The method's suspects grouped by their kind (``variant``; "" when the experiment declares one kind)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for suspect in method["suspects"].values():
        groups.setdefault(str(suspect.get("variant", "")), []).append(suspect)
    return groups


def kind_label(variant: str, kind: Mapping[str, Any], separator: str = " ") -> str:
    """A kind of suspect by name: the variant's own, or for the declared suspect (variant "") what it is, so a reader
    of the scale or transfer results sees the size or architecture the other kinds are compared with."""
    if variant:
        return variant
    return f"declared{separator}({kind['arch']}, {kind['image_size']} px)" if kind else "declared"


def _label(name: str, variant: str, kinds: Mapping[str, Mapping[str, Any]]) -> str:
    """A row's method and, where the experiment trained several kinds of suspect, its kind."""
    return f"{name}, {kind_label(variant, kinds.get(variant, {}))} suspects" if len(kinds) > 1 or variant else name


def false_accusations(ind_m: Mapping[str, Mapping[str, Any]], verdict: str = "margin") -> dict[str, Any]:
    """How many benign models the watermark verified, of how many, with the Clopper-Pearson 95 % interval (with
    several owners: owner x benign model cells; ``verdict`` "calibrated": by the calibrated test's verdicts)."""
    n = len(ind_m)
    if verdict == "calibrated":
        k = sum(bool(r["calibrated"]["owned"]) for r in ind_m.values())
    else:
        k = sum(bool(r["owned"]) for r in ind_m.values())
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"k": k, "n": n, "rate": k / n, "low": float(interval.low), "high": float(interval.high)}


def tables(collected: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table 1 and Table 2 of the experiment, one row per method (cells per suspect seed or per benign model); a
    segmentation experiment's tables come from :func:`~xmark_bundle.experiments.segmentation.segmentation_tables`."""
    if collected.get("task") == "segmentation":
        from xmark_bundle.experiments.segmentation import segmentation_tables

        return segmentation_tables(collected)
    quality_columns = ("PSNR full res (dB)", "SSIM full res", "PSNR model res (dB)", "SSIM model res", "LPIPS")
    lap_column = "residual L_Lap (G, val.)"
    columns1 = ["BA", "mean AUROC", "WSR at 0.5", "WSR at val. threshold", "clean over that threshold"]
    rows1 = []
    benign = list(collected["benign"].values())
    rows1.append(
        {
            "label": "benign models (clean data)",
            "cells": {
                "BA": _seeds([b["mean_ba"] for b in benign]),
                "mean AUROC": _seeds([b["mean_auroc"] for b in benign]),
            },
        }
    )
    lpips_untrained = False
    kinds = collected.get("suspect_kinds", {})
    for name, method in collected["methods"].items():
        for variant, suspects in _variants(method).items():
            lpips_untrained |= any(s.get("lpips_backbone") == "untrained" for s in suspects)
            quality = suspects[0]["release_quality"]  # the same release for every suspect
            cells = {
                "BA": _seeds([s["mean_ba"] for s in suspects]),
                "mean AUROC": _seeds([s["mean_auroc"] for s in suspects]),
                "WSR at 0.5": _seeds([s["malicious"]["wsr"] for s in suspects]),
                "WSR at val. threshold": _seeds([s["wsr_at_validation_threshold"]["value"] for s in suspects]),
                "clean over that threshold": _seeds(
                    [s["wsr_at_validation_threshold"]["clean_positive_rate"] for s in suspects]
                ),
                quality_columns[0]: {"value": round(float(quality["mean_psnr"]), 2)},
                quality_columns[1]: {"value": round(float(quality["mean_ssim"]), 4)},
                **{
                    column: {"value": round(float(quality[key]), 4)}
                    for column, key in zip(quality_columns[2:4], ("mean_psnr_model", "mean_ssim_model"), strict=True)
                    if key in quality
                },
                quality_columns[4]: {"value": round(float(quality["mean_lpips"]), 5)},
            }
            owners = by_owner(suspects, lambda s: s["malicious"]["wsr"])
            if owners:
                cells["WSR at 0.5 by owner"] = {"value": owners}
            if "val_lap" in method.get("watermark", {}):  # a trained generator's Laplacian term at its kept epoch
                cells[lap_column] = {"value": round(float(method["watermark"]["val_lap"]), 5)}
            rows1.append({"label": f"{_label(name, variant, kinds)} (γ {method['gamma']})", "cells": cells})
    notes1 = (
        "BA, AUROC: clean test split. WSR at 0.5: the malicious verification's queries. Quality: the released marked "
        "files against their sources, at full resolution and as the watermark's model sees them; LPIPS at 1024 px. "
        "Residual L_Lap: the generator's Laplacian term on the validation images at the epoch it kept (generators "
        "only)."
    )
    if lpips_untrained:
        notes1 += " LPIPS is computed with an untrained trunk (no ImageNet weights reach this machine): not comparable."
    columns2 = [
        "Malicious ΔP",
        "Malicious p",
        "Malicious Wilcoxon p",
        "Malicious verified",
        "Malicious calibrated p",
        "Malicious verified (calibrated)",
        "Malicious ΔP by owner",
        "control ΔP",
        "control p",
        "Malicious specific",
        "Ind-W ΔP",
        "Ind-W p",
        "Ind-W verified",
        "Ind-W verified (calibrated)",
        "Ind-W verified by independent owner",
        "Ind-W verified by independent owner (calibrated)",
        "Ind-M ΔP",
        "Ind-M p",
        "false accusations",
        "95 % interval",
        "false accusations by owner",
        "false accusations (calibrated)",
        "95 % interval (calibrated)",
        "false accusations by owner (calibrated)",
        "calibrated null: KS p vs uniform (n)",
        "calibrated null by owner: KS p (n)",
        "Malicious verified (reference-adjusted)",
        "false accusations (reference-adjusted)",
        "false accusations by owner (reference-adjusted)",
        "reference-adjusted null by owner: KS p (n)",
        "surrogate and its seed (Ind-M) verified",
        "surrogate and its seed (Ind-M) ΔP",
    ]
    rows2 = []
    for name, method in collected["methods"].items():
        benign_runs = list(method["ind_m"].values())
        adjusted = reference_adjusted_runs(method)  # once per method: every kind of suspect reads it
        for first, (variant, suspects) in enumerate(_variants(method).items()):
            malicious = [s["malicious"] for s in suspects]
            ind_w = [run for s in suspects for run in ind_w_runs(s)]
            cells = {
                "Malicious ΔP": _seeds([r["delta_p"] for r in malicious]),
                "Malicious p": _seeds([r["p_value"] for r in malicious]),
                "Malicious Wilcoxon p": _seeds([r["wilcoxon_p"] for r in malicious]),
                "Malicious verified": {"value": _verified(malicious)},
                "control ΔP": _seeds([r["control"]["delta_p"] for r in malicious]),
                "control p": _seeds([r["control"]["p_value"] for r in malicious]),
                "Malicious specific": {
                    "value": f"{sum(bool(r['control']['specific']) for r in malicious)} of {len(malicious)}"
                },
                "Ind-W ΔP": _seeds([r["delta_p"] for r in ind_w]),
                "Ind-W p": _seeds([r["p_value"] for r in ind_w]),
                "Ind-W verified": {"value": _verified(ind_w)},
                **_calibrated_cells(malicious, "Malicious "),
                **_calibrated_cells(ind_w, "Ind-W ", with_p=False),
            }
            owners = by_owner([{**r, "owner": s.get("owner")} for s, r in zip(suspects, malicious, strict=True)],
                              lambda r: r["delta_p"])  # fmt: skip
            if owners:
                cells["Malicious ΔP by owner"] = {"value": owners}
            cells |= _ind_w_by_independent_owner(suspects)
            if first == 0:  # Ind-M is the method's, whatever the suspects: once per method
                cells |= _ind_m_cells(method, benign_runs)
            keys = [key for key, s in method["suspects"].items() if str(s.get("variant", "")) == variant]
            cells |= _reference_adjusted_cells(adjusted, keys, with_ind_m=first == 0)
            rows2.append({"label": _label(name, variant, kinds), "cells": cells})
    notes2 = (
        "Malicious and Ind-W: one cell value per suspect seed (with several owners, per owner x suspect, Ind-W per "
        "suspect x independent owner: mean ± sd over all of them, and per owner beside); Ind-M: one per benign model "
        "(and owner). p: one-sided paired t-test of Pb + τ < Pv (τ 0.25), verified when p < 0.05; calibrated: the "
        "rank test of the owner's watermark against its family (where the verification has it); control: the "
        "suspect's ΔP and p for the control queries (a perturbation of the watermark's size without its structure); "
        "specific: the control does not trigger the suspect and the watermark beats it by τ. Ind-W by independent "
        "owner: every suspect meets the same independent owner's watermark, so one that happens to lift these "
        "suspects more than its family does is counted once per suspect; the independent draws are the independent "
        "owners, not the verifications. False accusations: "
        "benign models verified, with the Clopper-Pearson 95 % interval (several owners: owner x benign cells, which "
        "share models, so the interval is optimistic). The calibrated verdict's alpha holds over the owner's random "
        "draw from its family; by owner: each owner's own false accusations and the KS p of its own null p-values (a "
        "member's potency shifts its rank on every model alike). Reference-adjusted (a research variant, not the "
        "product's verdict): the same rank after each member's mean statistic over the owner's benign models is "
        "subtracted (a benign model's own left out), computed from the same verifications. The surrogate and a "
        "benign model with the surrogate's seed are shown apart: they measure adversarial transfer, not a false "
        "accusation."
    )
    detected = {name: m["detectability"] for name, m in collected["methods"].items() if m.get("detectability")}
    extra = [detectability_table(detected)] if detected else []
    removal = removal_table(collected)
    extra += [removal] if removal["rows"] else []
    return [
        {
            "title": "Table 1: accuracy, watermark success and release quality",
            "columns": columns1 + ["WSR at 0.5 by owner"] + list(quality_columns) + [lap_column],
            "rows": rows1,
            "notes": notes1,
        },
        {
            "title": "Table 2: verification scenarios and false accusations",
            "columns": columns2,
            "rows": rows2,
            "notes": notes2,
        },
        *extra,
    ]


def _calibrated_cells(runs: list[Mapping[str, Any]], prefix: str = "", with_p: bool = True) -> dict[str, Any]:
    """The calibrated verdict's count (``{prefix}verified (calibrated)``) and, ``with_p``, its p per run
    (``{prefix}calibrated p``), where every run's verification has the block; else none."""
    verified = _verified(runs, "calibrated")
    if verified is None:
        return {}
    cells = {f"{prefix}verified (calibrated)": {"value": verified}}
    if with_p:
        cells[f"{prefix}calibrated p"] = _seeds([r["calibrated"]["p_value"] for r in runs])
    return cells


def _ind_w_by_independent_owner(suspects: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Ind-W ``k of n`` per independent owner (margin, and calibrated where every run has it): each independent
    owner's watermark meets every suspect, so its verdicts are not independent of each other. Empty with fewer than
    two independent owners."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for suspect in suspects:
        for key, run in suspect.get("ind_w_owners", {}).items():
            groups.setdefault(key.removeprefix("independent_owner"), []).append(run)
    if len(groups) < 2:
        return {}
    cells = {}
    for verdict, column in (("margin", ""), ("calibrated", " (calibrated)")):
        counts = {owner: _verified(runs, verdict) for owner, runs in groups.items()}
        if all(count is not None for count in counts.values()):
            value = "; ".join(f"{owner}: {count}" for owner, count in counts.items())
            cells[f"Ind-W verified by independent owner{column}"] = {"value": value}
    return cells


def _by_owner(runs: Mapping[str, Mapping[str, Any]]) -> dict[Any, dict[str, Mapping[str, Any]]]:
    """``runs`` grouped by their ``owner``, in run order."""
    owners: dict[Any, dict[str, Mapping[str, Any]]] = {}
    for key, run in runs.items():
        owners.setdefault(run.get("owner"), {})[key] = run
    return owners


def _accused_by_owner(owners: Mapping[Any, Mapping[str, Mapping[str, Any]]], verdict: str = "margin") -> dict[str, str]:
    """A by-owner cell: each owner's ``k of n`` benign models verified (:func:`false_accusations`)."""
    counts = {owner: false_accusations(runs, verdict) for owner, runs in owners.items()}
    return {"value": "; ".join(f"{owner}: {c['k']} of {c['n']}" for owner, c in counts.items())}


def _ks_by_owner(values: Mapping[Any, list[tuple[float, int]]]) -> dict[str, str]:
    """A by-owner cell: the KS p of each owner's null p-values (:func:`null_uniformity`) and their number."""
    uniform = {owner: null_uniformity(found) for owner, found in values.items()}
    return {"value": "; ".join(f"{owner}: {u['ks_p']:.3g} ({u['n']})" for owner, u in uniform.items())}


def _reference_adjusted_cells(adjusted: Mapping[str, Any], suspect_keys: list[str], with_ind_m: bool) -> dict[str, Any]:
    """The research variant's cells from a method's
    :func:`~xmark_bundle.experiments.null.reference_adjusted_runs`: the malicious suspects of ``suspect_keys``
    verified, and with ``with_ind_m`` the benign models it accuses, pooled and by owner, with each owner's KS p;
    empty where no owner has two benign models with the calibrated verdict."""
    cells: dict[str, Any] = {}
    malicious = [adjusted["malicious"][key] for key in suspect_keys if key in adjusted["malicious"]]
    if malicious:
        cells["Malicious verified (reference-adjusted)"] = {"value": _verified(malicious)}
    if with_ind_m and adjusted["ind_m"]:
        falsely = false_accusations(adjusted["ind_m"])
        cells["false accusations (reference-adjusted)"] = {"value": f"{falsely['k']} of {falsely['n']}"}
        owners = _by_owner(adjusted["ind_m"])
        if len(owners) > 1:
            cells["false accusations by owner (reference-adjusted)"] = _accused_by_owner(owners)
            values = {owner: [(r["p_value"], r["members"]) for r in runs.values()] for owner, runs in owners.items()}
            cells["reference-adjusted null by owner: KS p (n)"] = _ks_by_owner(values)
    return cells


def _ind_m_cells(method: Mapping[str, Any], benign_runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Ind-M's cells: ΔP and p per benign model (and owner), the false accusations under both verdicts, and the
    surrogate-seed controls apart."""
    falsely = false_accusations(method["ind_m"])
    cells = {
        "Ind-M ΔP": _seeds([r["delta_p"] for r in benign_runs]),
        "Ind-M p": _seeds([r["p_value"] for r in benign_runs]),
        "false accusations": {"value": f"{falsely['k']} of {falsely['n']}"},
        "95 % interval": {"value": f"{falsely['low']:.3f}–{falsely['high']:.3f}"},
    }
    owners = _by_owner(method["ind_m"])
    if len(owners) > 1:
        cells["false accusations by owner"] = _accused_by_owner(owners)
    if _verified(benign_runs, "calibrated") is not None:
        calibrated = false_accusations(method["ind_m"], "calibrated")
        cells["false accusations (calibrated)"] = {"value": f"{calibrated['k']} of {calibrated['n']}"}
        cells["95 % interval (calibrated)"] = {"value": f"{calibrated['low']:.3f}–{calibrated['high']:.3f}"}
        if len(owners) > 1:  # the alpha bound holds over the owner's draw: each owner's own rate beside it
            cells["false accusations by owner (calibrated)"] = _accused_by_owner(owners, "calibrated")
    uniform = null_uniformity(null_p_values(method))
    if uniform is not None:  # every model that never saw the release, surrogate-seed controls included
        cells["calibrated null: KS p vs uniform (n)"] = {"value": f"{uniform['ks_p']:.3g} ({uniform['n']})"}
        by_owner = null_p_values_by_owner(method)
        if len(by_owner) > 1:
            cells["calibrated null by owner: KS p (n)"] = _ks_by_owner(by_owner)
    controls = list(method.get("ind_m_seed_controls", {}).values())
    if controls:
        cells["surrogate and its seed (Ind-M) verified"] = {"value": _verified(controls)}
        cells["surrogate and its seed (Ind-M) ΔP"] = _seeds([r["delta_p"] for r in controls])
    return cells


def removal_table(collected: Mapping[str, Any]) -> dict[str, Any]:
    """Each method's malicious suspects fine-tuned on a clean share (head only or every layer, by epochs): clean BA,
    WSR at 0.5 and the Malicious p per suspect seed, and how many stay verified."""
    rows = []
    for name, method in collected["methods"].items():
        original = [s for s in method["suspects"].values() if s.get("removal")]
        if not original:
            continue
        tuned = [s["removal"] for s in original]
        rows.append(
            {
                "label": f"{name}, as trained",
                "cells": {
                    "BA": _seeds([s["mean_ba"] for s in original]),
                    "WSR at 0.5": _seeds([s["malicious"]["wsr"] for s in original]),
                    "Malicious p": _seeds([s["malicious"]["p_value"] for s in original]),
                    "verified": {"value": f"{sum(bool(s['malicious']['owned']) for s in original)} of {len(original)}"},
                    **_calibrated_cells([s["malicious"] for s in original]),
                },
            }
        )
        for key in tuned[0]:
            runs = [t[key] for t in tuned]
            rows.append(
                {
                    "label": f"{name}, {_removal_label(runs[0])}",
                    "cells": {
                        "BA": _seeds([r["mean_ba"] for r in runs]),
                        "WSR at 0.5": _seeds([r["wsr"] for r in runs]),
                        "Malicious p": _seeds([r["p_value"] for r in runs]),
                        "verified": {"value": f"{sum(bool(r['owned']) for r in runs)} of {len(runs)}"},
                        **_calibrated_cells(runs),
                    }
                    | ({"kept epoch": _seeds([r["kept_epoch"] for r in runs])} if "kept_epoch" in runs[0] else {}),
                }
            )
    return {
        "title": "Removal: the malicious suspects fine-tuned or pruned on a clean share of the training split",
        "columns": [
            "BA",
            "WSR at 0.5",
            "Malicious p",
            "verified",
            "calibrated p",
            "verified (calibrated)",
            "kept epoch",
        ],
        "rows": rows,
        "notes": "head: the last linear layer only; full: every layer; pruned: the share of penultimate units (the "
        "last convolutional stage's pooled output) least active on the clean share removed; fine-pruned: pruned, "
        "then every layer fine-tuned with them kept removed. 'best of N epochs': the fine-tuning keeps the epoch with "
        "the best mean AUROC on the clean validation split (the bundle's training recipe, what a data user running it "
        "gets); 'N epochs': it keeps the last (removal kept_checkpoint 'last'); kept epoch per seed. Cells per "
        "suspect seed. verified: the paper's margin t-test; calibrated: the rank of the owner's watermark among its "
        "family (where the watermark has one).",
    }


def _removal_label(run: Mapping[str, Any]) -> str:
    if run["mode"] == "pruned":
        return f"pruned {run['rate']:.0%}, not fine-tuned"
    epochs = f"{'best of ' if run.get('kept_checkpoint', 'best') == 'best' else ''}{run['epochs']} epochs"
    if run["mode"] == "fine-pruned":
        return f"fine-pruned {run['rate']:.0%}, then {epochs}"
    return f"fine-tuned {run['mode']}, {epochs}"


def _verdict(result: Mapping[str, Any]) -> str:
    found = f"p = {result['p_value']:.2g}, WSR at 0.5 = {result['wsr']:.2f}"
    if not result["owned"]:
        return f"not verified ({found})"
    specific = result["control"]["specific"]
    warning = "" if specific else "; WARNING: the control says the reaction is not specific to this watermark"
    return f"verified ({found}{warning})"


def plain_words(collected: Mapping[str, Any]) -> list[str]:
    """One sentence per scenario, suspect and method, with the control's warning where it applies (a segmentation
    experiment: :func:`~xmark_bundle.experiments.segmentation.segmentation_plain_words`)."""
    if collected.get("task") == "segmentation":
        from xmark_bundle.experiments.segmentation import segmentation_plain_words

        return segmentation_plain_words(collected)
    lines = []
    for name, method in collected["methods"].items():
        for suspect, s in method["suspects"].items():
            lines.append(
                f"{name}, Malicious ({suspect}): the model trained on the release is {_verdict(s['malicious'])}."
            )
            for ind_w in ind_w_runs(s):
                lines.append(
                    f"{name}, Ind-W ({suspect}): queried with an independent owner's {name} watermark it is "
                    f"{_verdict(ind_w)}" + (" - another owner's watermark triggers it too." if ind_w["owned"] else ".")
                )
        falsely = false_accusations(method["ind_m"])
        lines.append(
            f"{name}, Ind-M: {falsely['k']} of {falsely['n']} models trained on the clean data "
            f"{'is' if falsely['n'] == 1 else 'are'} verified" + (" - a false accusation." if falsely["k"] else ".")
        )
    return lines
