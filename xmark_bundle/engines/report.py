"""Classification report: per-label AUROC and BA (accuracy at the validation threshold that maximises F1)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmark_bundle.engines.metrics import per_label_auroc
from xmark_bundle.fileio import sha256_file, write_json


def f1_optimal_threshold(scores: np.ndarray, target: np.ndarray) -> float:
    """Threshold t maximising F1 of ``scores >= t`` against binary ``target`` (ties: the highest t)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], target[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # predicting positive for all scores >= s[i]
    f1 = 2 * tp / (tp + fp + y.sum())
    f1 = np.where(last, f1, -1.0)
    return float(s[int(np.argmax(f1))]) if y.sum() > 0 else float(s.max() + 1e-6)


def classification_report(
    val: Sequence[torch.Tensor], test: Sequence[torch.Tensor], labels: Sequence[str]
) -> dict[str, Any]:
    """Per-label thresholds from ``val`` (probabilities, targets) applied to ``test``: AUROC, BA, threshold."""
    (val_p, val_y), (test_p, test_y) = ([t.detach().cpu().double().numpy() for t in pair] for pair in (val, test))
    auroc = per_label_auroc(torch.as_tensor(test_p), torch.as_tensor(test_y))
    per_label = {}
    for k, name in enumerate(labels):
        vk, tk = val_y[:, k] >= 0, test_y[:, k] >= 0
        t = f1_optimal_threshold(val_p[vk, k], val_y[vk, k])
        acc = float(np.mean((test_p[tk, k] >= t) == (test_y[tk, k] > 0.5))) if tk.any() else float("nan")
        per_label[name] = {
            "auroc": None if np.isnan(auroc[k]) else float(auroc[k]),
            "ba": acc,
            "threshold": t,
            "n_test": int(tk.sum()),
            "n_test_positive": int((test_y[tk, k] > 0.5).sum()),
        }
    return {
        "per_label": per_label,
        "mean_auroc": float(np.nanmean(auroc)) if not np.isnan(auroc).all() else None,
        "mean_ba": float(np.nanmean([v["ba"] for v in per_label.values()])),
        "n_validation": int(val_y.shape[0]),
        "n_test": int(test_y.shape[0]),
    }


def write_classification_report(
    val: Sequence[torch.Tensor],
    test: Sequence[torch.Tensor],
    output_file: str | os.PathLike,
    labels: Sequence[str],
    checkpoint: str | os.PathLike | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Compute :func:`classification_report`, add provenance, write it as JSON and print a per-label table."""
    report = classification_report(val, test, labels)
    if checkpoint is not None:
        report["checkpoint"] = {"path": str(checkpoint), "sha256": sha256_file(checkpoint)}
    report.update(extra)
    write_json(output_file, report)
    print(f"{'label':<18}{'AUROC':>8}{'BA':>8}{'thr':>8}{'n+':>6}")
    for name, row in report["per_label"].items():
        auroc = "n/a" if row["auroc"] is None else f"{row['auroc']:.3f}"
        print(f"{name:<18}{auroc:>8}{row['ba']:>8.3f}{row['threshold']:>8.3f}{row['n_test_positive']:>6}")
    print(f"{'mean':<18}{report['mean_auroc'] or float('nan'):>8.3f}{report['mean_ba']:>8.3f}   -> {Path(output_file)}")
    return report


def write_evaluation_report(
    val: Sequence[torch.Tensor],
    test: Sequence[torch.Tensor],
    watermarked_prob: torch.Tensor,
    target_index: int,
    output_file: str | os.PathLike,
    labels: Sequence[str],
    quality: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Suspect-model evaluation: clean BA/AUROC, WSR at label k's validation threshold, release image quality.

    ``watermarked_prob`` holds label k's probability for the watermarked NON-target test samples; the report also
    gives the share of those samples *without* watermark that already pass the threshold (``clean_positive_rate``).
    """
    report = classification_report(val, test, labels)
    row = report["per_label"][labels[target_index]]
    prob = torch.as_tensor(watermarked_prob).double().reshape(-1)
    if prob.numel() == 0:
        raise ValueError("no watermarked non-target test samples: the WSR is undefined")
    test_p, test_y = (torch.as_tensor(t).detach().cpu().double() for t in test)
    clean = test_p[test_y[:, target_index] == 0, target_index]  # the same non-target samples, unwatermarked
    report["wsr"] = {
        "target_label": labels[target_index],
        "threshold": row["threshold"],
        "value": float((prob >= row["threshold"]).double().mean()),
        "n": int(prob.numel()),
        "mean_probability": float(prob.mean()),
        # the threshold's false-positive rate on clean non-target test samples: what the WSR must be read against
        "clean_positive_rate": float((clean >= row["threshold"]).double().mean()) if clean.numel() else None,
    }
    if quality is not None:
        report["release_quality"] = quality
    report.update(extra)
    write_json(output_file, report)
    print(
        f"BA {report['mean_ba']:.3f}  AUROC {report['mean_auroc']:.3f}  "
        f"WSR {report['wsr']['value']:.3f} (n={report['wsr']['n']}, threshold {row['threshold']:.3f}; clean "
        f"non-target samples above it: {report['wsr']['clean_positive_rate']})  -> {output_file}"
    )
    return report
