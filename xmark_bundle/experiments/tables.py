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

from collections.abc import Mapping
from typing import Any

from scipy import stats

from xmark_bundle.experiments.detectability import detectability_table

__all__ = ["false_accusations", "kind_label", "plain_words", "tables"]


def _seeds(values: list[float]) -> dict[str, list[float]]:
    return {"per_seed": [float(v) for v in values]}


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


def false_accusations(ind_m: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """How many benign models the watermark verified, of how many, with the Clopper-Pearson 95 % interval."""
    n = len(ind_m)
    k = sum(bool(r["owned"]) for r in ind_m.values())
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"k": k, "n": n, "rate": k / n, "low": float(interval.low), "high": float(interval.high)}


def tables(collected: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table 1 and Table 2 of the experiment, one row per method (cells per suspect seed or per benign model)."""
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
        "Malicious specific",
        "Ind-W ΔP",
        "Ind-W p",
        "Ind-M ΔP",
        "Ind-M p",
        "false accusations",
        "95 % interval",
    ]
    rows2 = []
    for name, method in collected["methods"].items():
        benign_runs = list(method["ind_m"].values())
        falsely = false_accusations(method["ind_m"])
        for first, (variant, suspects) in enumerate(_variants(method).items()):
            cells = {
                "Malicious ΔP": _seeds([s["malicious"]["delta_p"] for s in suspects]),
                "Malicious p": _seeds([s["malicious"]["p_value"] for s in suspects]),
                "Malicious Wilcoxon p": _seeds([s["malicious"]["wilcoxon_p"] for s in suspects]),
                "Malicious specific": {
                    "value": f"{sum(bool(s['malicious']['control']['specific']) for s in suspects)} of {len(suspects)}"
                },
                "Ind-W ΔP": _seeds([s["ind_w"]["delta_p"] for s in suspects]),
                "Ind-W p": _seeds([s["ind_w"]["p_value"] for s in suspects]),
            }
            if first == 0:  # Ind-M is the method's, whatever the suspects: once per method
                cells |= {
                    "Ind-M ΔP": _seeds([r["delta_p"] for r in benign_runs]),
                    "Ind-M p": _seeds([r["p_value"] for r in benign_runs]),
                    "false accusations": {"value": f"{falsely['k']} of {falsely['n']}"},
                    "95 % interval": {"value": f"{falsely['low']:.3f}–{falsely['high']:.3f}"},
                }
            rows2.append({"label": _label(name, variant, kinds), "cells": cells})
    notes2 = (
        "Malicious and Ind-W: one cell value per suspect seed; Ind-M: one per benign model. p: one-sided paired t-test "
        "of Pb + τ < Pv (τ 0.25), verified when p < 0.05; specific: the control (a perturbation of the watermark's "
        "size without its structure) does not trigger the suspect and the watermark beats it by τ. False accusations: "
        "benign models verified, with the Clopper-Pearson 95 % interval."
    )
    detected = {name: m["detectability"] for name, m in collected["methods"].items() if m.get("detectability")}
    extra = [detectability_table(detected)] if detected else []
    removal = removal_table(collected)
    extra += [removal] if removal["rows"] else []
    return [
        {
            "title": "Table 1: accuracy, watermark success and release quality",
            "columns": columns1 + list(quality_columns) + [lap_column],
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
                    }
                    | ({"kept epoch": _seeds([r["kept_epoch"] for r in runs])} if "kept_epoch" in runs[0] else {}),
                }
            )
    return {
        "title": "Removal: the malicious suspects fine-tuned or pruned on a clean share of the training split",
        "columns": ["BA", "WSR at 0.5", "Malicious p", "verified", "kept epoch"],
        "rows": rows,
        "notes": "head: the last linear layer only; full: every layer; pruned: the share of penultimate units (the "
        "last convolutional stage's pooled output) least active on the clean share removed; fine-pruned: pruned, "
        "then every layer fine-tuned with them kept removed. 'best of N epochs': the fine-tuning keeps the epoch with "
        "the best mean AUROC on the clean validation split (the bundle's training recipe, what a data user running it "
        "gets); 'N epochs': it keeps the last (removal kept_checkpoint 'last'); kept epoch per seed. Cells per "
        "suspect seed.",
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
    """One sentence per scenario, suspect and method, with the control's warning where it applies."""
    lines = []
    for name, method in collected["methods"].items():
        for suspect, s in method["suspects"].items():
            lines.append(
                f"{name}, Malicious ({suspect}): the model trained on the release is {_verdict(s['malicious'])}."
            )
            ind_w = s["ind_w"]
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
