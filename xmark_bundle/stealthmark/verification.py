"""Black-box verification of a segmentation model for StealthMark: does the owner's trigger lift its background floor?

For each query image the suspect is asked twice, clean and with the owner's trigger. The **floor score** of a
probability map is the mean (or the 5th percentile) of the probabilities over the pixels it predicts as background
(below 0.5). A model trained with StealthMark raises it towards ``epsilon`` on triggered inputs, and a model that never
saw the trigger should not. The test is one-sided and paired, against a margin ``tau = margin_fraction * epsilon``
(default a quarter of the owner's epsilon): ``ttest_rel(triggered, clean + tau, alternative="greater")``, with a
Wilcoxon signed-rank test on the same differences beside it and the test without margin reported too; the verdict is
``p < alpha``. **ASR** (attack success rate) is the share of query images whose floor score rises by at least
``epsilon / 2`` with the trigger. The authors' detector (a logistic regression of the per-image minimum probability
separating triggered from clean answers, with a chi-square test of its confusion matrix) is reported beside it for
fidelity. A suspect that returns hard labels only cannot be verified, and is told so.

``qr_mode`` (:data:`.qr.QR_MODES`, or ``both``) adds a QR explanation beside the floor test (it does not change the
verdict; ``both``: the two, under ``qr_all``, with the random-mask one as ``qr``):
``authors_grid`` is the authors' grid occlusion on the first query image, reported as *not model-dependent* (its
binarised output is the verifier's own pattern for any model whose output moves); ``random_mask`` is the
model-dependent explanation of :func:`.qr.random_mask_explanation` over the query images. Both report the module
agreement with the owner's QR code, its binomial p over the data modules and what OpenCV decodes.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix

from xmark_bundle.fileio import atomic_path
from xmark_bundle.verification.queries import datalist_items, load_letterboxed
from xmark_bundle.verification.seg_blackbox import SegmentationSuspect, label_only, open_segmentation_suspect

from .metrics import dice_per_image, flip_share
from .qr import QR_MODES, data_modules, grid_occlusion_explanation, owner_qr, qr_report, random_mask_explanation
from .targets import METHODS
from .triggers import TRIGGERS, apply_trigger, burn_in_markers

__all__ = [
    "FLOOR_STATISTICS",
    "attack_success_rate",
    "authors_detector",
    "floor_scores",
    "floor_test",
    "finite_json",
    "owner_id_of",
    "owner_record",
    "qr_explanation",
    "run_verification",
    "verify_segmentation_model",
]

FLOOR_STATISTICS = ("mean", "p05")
CANNOT_VERIFY = "cannot verify"


def floor_scores(maps: torch.Tensor, statistic: str = "mean") -> np.ndarray:
    """Per-image floor score of B x 1 x H x W probability maps over predicted background (NaN if there is none)."""
    if statistic not in FLOOR_STATISTICS:
        raise ValueError(f"unknown floor statistic {statistic!r}; choose one of {FLOOR_STATISTICS}")
    scores = []
    for prob in maps.reshape(maps.shape[0], -1).double():
        background = prob[prob < 0.5]
        if background.numel() == 0:
            scores.append(float("nan"))
        elif statistic == "mean":
            scores.append(float(background.mean()))
        else:
            scores.append(float(torch.quantile(background, 0.05)))
    return np.asarray(scores)


def floor_test(
    clean: Sequence[float], triggered: Sequence[float], alpha: float = 0.05, margin: float = 0.0
) -> dict[str, Any]:
    """Paired one-sided tests of H1: triggered floor > clean floor + ``margin``, over the images where both are
    defined (``ttest_rel(triggered, clean + margin, alternative="greater")``, Wilcoxon on the same differences)."""
    clean, triggered = np.asarray(clean, float), np.asarray(triggered, float)
    keep = np.isfinite(clean) & np.isfinite(triggered)
    c, t = clean[keep], triggered[keep]
    if keep.sum() < 2:
        raise ValueError(f"the floor test needs >= 2 images with background on both queries, got {int(keep.sum())}")
    diff = t - c - margin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant differences: scipy warns and returns NaN
        p_t = float(stats.ttest_rel(t, c + margin, alternative="greater").pvalue)
    p_t = 1.0 if not np.isfinite(p_t) else p_t
    p_w = float(stats.wilcoxon(diff, alternative="greater").pvalue) if np.any(diff != 0) else 1.0
    return {
        "n": int(keep.sum()),
        "mean_clean": float(c.mean()),
        "mean_triggered": float(t.mean()),
        "delta": float((t - c).mean()),
        "margin": float(margin),
        "p_ttest": p_t,
        "p_wilcoxon": p_w,
        "alpha": alpha,
        "verified": bool(p_t < alpha),
    }


def attack_success_rate(clean: Sequence[float], triggered: Sequence[float], epsilon: float) -> float:
    """Share of images whose floor score rises by at least ``epsilon / 2`` with the trigger (undefined scores fail)."""
    rise = np.asarray(triggered, float) - np.asarray(clean, float)
    return float(np.mean(np.nan_to_num(rise, nan=-np.inf) >= epsilon / 2))


def authors_detector(
    clean_maps: torch.Tensor, triggered_maps: torch.Tensor, statistic: str = "min", seed: int = 0
) -> dict[str, Any]:
    """The authors' detector: logistic regression on the per-image min (or max) probability, fitted on half of the
    images (clean 0, triggered 1) and tested on the other half; chi-square p of the test confusion matrix, FPR, FNR."""
    reduce = {"min": torch.amin, "max": torch.amax}[statistic]
    clean = reduce(clean_maps.flatten(1), 1).numpy()
    trig = reduce(triggered_maps.flatten(1), 1).numpy()
    n = len(clean)
    if n < 4:
        raise ValueError(f"the authors' detector needs >= 4 query images, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    fit, test = order[: n // 2], order[n // 2 :]

    def xy(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([clean[idx], trig[idx]])[:, None], np.repeat([0, 1], len(idx))

    x_fit, y_fit = xy(fit)
    x_test, y_test = xy(test)
    classifier = LogisticRegression(max_iter=1000, random_state=42).fit(x_fit, y_fit)
    matrix = confusion_matrix(y_test, classifier.predict(x_test), labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in matrix.ravel())
    try:
        p = float(stats.chi2_contingency(matrix).pvalue)
    except ValueError:  # a row or column of zeros: no test possible
        p = float("nan")
    return {
        "statistic": statistic,
        "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1),
        "confusion_matrix": matrix.tolist(),
        "fpr": fp / max(fp + tn, 1),
        "fnr": fn / max(fn + tp, 1),
        "p_chi2": p,
    }


def _query(suspect: SegmentationSuspect, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The suspect's probability maps for ``images``, asked ``batch_size`` at a time."""
    return torch.cat([suspect.probability_maps(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def owner_id_of(record: Mapping[str, Any]) -> str:
    """The text of the owner's QR code: the record's ``owner_id``, else ``SM-<key>`` (a version-1 symbol for keys of
    up to 7 digits)."""
    return str(record.get("owner_id") or f"SM-{int(record['key'])}")


def qr_explanation(
    suspect: SegmentationSuspect,
    images: torch.Tensor,
    trigger: str,
    key: int,
    owner_id: str,
    mode: str = "random_mask",
    n_samples: int = 4096,
    seed: int = 0,
    occlusion: float = 0.5,
    batch_size: int = 64,
    threshold: float = 0.0,
) -> dict[str, Any]:
    """The QR explanation of ``suspect`` in ``mode`` (``authors_grid`` or ``random_mask``, binarised at
    ``threshold``) against the owner's code for ``owner_id``: agreement, binomial p over the data modules, the decoded
    text, and the binarised grid."""
    if mode not in QR_MODES or mode == "none":
        raise ValueError(f"unknown QR explanation mode {mode!r}; choose one of {QR_MODES[1:]}")
    modules = owner_qr(owner_id)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return suspect.probability_maps(x)

    if mode == "authors_grid":
        explanation, _ = grid_occlusion_explanation(predict, images[0], modules, batch_size)
        explanation = explanation[: modules.shape[0], : modules.shape[1]]
    else:
        explanation, weights = random_mask_explanation(
            predict,
            images,
            modules,
            lambda x: apply_trigger(x, trigger, key),
            n_samples=n_samples,
            seed=seed,
            occlusion=occlusion,
            batch_size=batch_size,
            threshold=threshold,
        )
    report = qr_report(explanation, modules, owner_id, mode)
    if mode == "authors_grid":
        report["note"] = (
            "not model-dependent: the binarised grid occlusion returns the verifier's own pattern for any model whose "
            "output moves at all (an untrained network included)"
        )
    else:
        data = data_modules(modules)
        signs = np.where(modules, 1.0, -1.0)
        report.update(
            n_samples=n_samples,
            seed=seed,
            occlusion=occlusion,
            threshold=threshold,
            # binarised by the sign: varies from model to model, for ranks among non-owner models
            agreement_data_sign=float(((weights > 0) == modules)[data].mean()),
            # 2 x the mean signed weight over the data modules: an estimate of the trigger's floor rise
            rise_estimate=float(2 * (signs * weights)[data].mean()),
            weights=[[round(float(w), 6) for w in row] for row in weights],
        )
    report["explanation"] = ["".join("1" if v else "0" for v in row) for row in explanation]
    return report


def verify_segmentation_model(
    suspect: SegmentationSuspect,
    images: torch.Tensor,
    trigger: str,
    key: int,
    epsilon: float,
    alpha: float = 0.05,
    statistic: str = "mean",
    batch_size: int = 8,
    margin_fraction: float = 0.25,
    qr_mode: str = "none",
    owner_id: str | None = None,
    qr_samples: int = 4096,
    qr_seed: int = 0,
) -> dict[str, Any]:
    """Query ``suspect`` with ``images`` (N x 1 x H x W in [0, 1]) clean and triggered; the floor test's report.

    The verdict needs the floor to rise by more than ``margin_fraction * epsilon`` on average: any model's
    background moves a little when pixels change, and a paired test with no margin would call that ownership."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}; choose one of {TRIGGERS}")
    if qr_mode not in (*QR_MODES, "both"):
        raise ValueError(f"unknown QR explanation mode {qr_mode!r}; choose one of {(*QR_MODES, 'both')}")
    triggered_images = apply_trigger(images, trigger, key)
    clean_maps = _query(suspect, images, batch_size)
    triggered_maps = _query(suspect, triggered_images, batch_size)
    report: dict[str, Any] = {
        "suspect": suspect.describe(),
        "trigger": trigger,
        "epsilon": epsilon,
        "floor_statistic": statistic,
        "n_queries": len(images),
    }
    if label_only(clean_maps) and label_only(triggered_maps):
        reason = (
            f"suspect {suspect.location} answers hard labels only (every value 0 or 1): the probability floor that "
            "StealthMark moves is not observable, so ownership cannot be verified from its answers"
        )
        return {**report, "verdict": CANNOT_VERIFY, "verified": None, "reason": reason}
    clean, trig = floor_scores(clean_maps, statistic), floor_scores(triggered_maps, statistic)
    test = floor_test(clean, trig, alpha, margin_fraction * epsilon)
    report["test_without_margin"] = floor_test(clean, trig, alpha)
    report.update(
        test=test,
        asr=attack_success_rate(clean, trig, epsilon),
        asr_definition="share of query images whose floor score rises by at least epsilon/2 with the trigger",
        flip_share_mean=float(flip_share(clean_maps, triggered_maps).mean()),
        dice_clean_vs_triggered_mean=float(dice_per_image(triggered_maps, clean_maps).mean()),
        authors_detector=authors_detector(clean_maps, triggered_maps) if len(images) >= 4 else None,
        floor_clean=clean.tolist(),
        floor_triggered=trig.tolist(),
        verified=test["verified"],
        verdict="verified" if test["verified"] else "not verified",
    )
    modes = {"none": (), "both": ("authors_grid", "random_mask")}.get(qr_mode, (qr_mode,))
    explanations = {
        mode: qr_explanation(
            suspect,
            images,
            trigger,
            key,
            owner_id or f"SM-{int(key)}",
            mode,
            qr_samples,
            qr_seed,
            threshold=margin_fraction * epsilon / 2,
        )
        for mode in modes
    }
    if explanations:
        report["qr"] = explanations[modes[-1]]  # both: the model-dependent one
    if len(explanations) > 1:
        report["qr_all"] = explanations
    return report


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN and infinite floats as None, for strict JSON (an image without background has no floor)."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def owner_record(path: str | os.PathLike) -> dict[str, Any]:
    """The owner's private record of a watermarked model (method, trigger, key, epsilon, image size), checked."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the owner's StealthMark record ({err})") from err
    missing = {"method", "trigger", "key", "epsilon", "image_size"} - set(record)
    if missing:
        raise ValueError(f"{path}: the owner's StealthMark record lacks {sorted(missing)}")
    if record["method"] not in (*METHODS, "none"):
        raise ValueError(f"{path}: unknown method {record['method']!r}")
    return record


def _sentence(report: Mapping[str, Any]) -> str:
    """One plain sentence for the verdict."""
    if report["verdict"] == CANNOT_VERIFY:
        return f"CANNOT VERIFY {report['suspect']['location']}: {report['reason']}."
    test = report["test"]
    word = "VERIFIED" if report["verified"] else "NOT VERIFIED"
    return (
        f"{word}: {report['suspect']['location']} — the '{report['trigger']}' trigger moves the background floor "
        f"from {test['mean_clean']:.4f} to {test['mean_triggered']:.4f} (paired one-sided t-test against a rise of "
        f"{test['margin']:.4f}: p = "
        f"{test['p_ttest']:.3g}, Wilcoxon p = {test['p_wilcoxon']:.3g}, n = {test['n']}), ASR {report['asr']:.2f}."
    )


def run_verification(
    suspect: str | os.PathLike,
    record_file: str | os.PathLike,
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    data_list_key: str = "validation",
    n_samples: int = 20,
    seed: int = 0,
    alpha: float = 0.05,
    statistic: str = "mean",
    batch_size: int = 8,
    margin_fraction: float = 0.25,
    output_dir: str | os.PathLike | None = None,
    suspect_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    qr_mode: str = "none",
    qr_samples: int = 4096,
    query_markers: int | None = None,
) -> dict[str, Any]:
    """The bundle's ``verifying`` step: read the owner's record, load ``n_samples`` seeded query images of the split,
    verify ``suspect``, write ``verification.json`` under ``output_dir`` and print the verdict. ``query_markers``: a
    seed; an ordinary burned-in marker (:func:`~xmark_bundle.stealthmark.triggers.burn_in_markers`) is drawn on every
    query image first (a false-accusation check: hospital images carry such text near where triggers go)."""
    record = owner_record(record_file)
    items = datalist_items(datalist, data_list_key, dataset_dir)
    if len(items) < 2:
        raise ValueError(f"{datalist} [{data_list_key}]: need >= 2 query images, found {len(items)}")
    indices = sorted(np.random.default_rng(seed).permutation(len(items))[: min(n_samples, len(items))].tolist())
    images = load_letterboxed(items, indices, int(record["image_size"]))
    if query_markers is not None:
        images = burn_in_markers(images, int(query_markers))
    model = open_segmentation_suspect(suspect, device=device, **dict(suspect_options or {}))
    report = verify_segmentation_model(
        model,
        images,
        record["trigger"],
        int(record["key"]),
        float(record["epsilon"]),
        alpha,
        statistic,
        batch_size,
        margin_fraction,
        qr_mode,
        owner_id_of(record),
        qr_samples,
        seed,
    )
    report["decoy_share"] = float(record.get("decoy_share", 0.0))
    report["queries"] = [str(items[i]["image"]) for i in indices]
    report["query_markers"] = query_markers
    print(_sentence(report), flush=True)
    if "qr" in report:
        qr = report["qr"]
        dependent = "model-dependent" if qr["model_dependent"] else "NOT model-dependent"
        print(
            f"QR explanation ({qr['mode']}, {dependent}): {qr['agreement_data']:.3f} of the {qr['data_modules']} data "
            f"modules agree with the owner's code (binomial p = {qr['p_binomial_data']:.3g}); OpenCV decodes "
            f"{qr['decoded']!r}",
            flush=True,
        )
    if output_dir is not None:
        out = Path(output_dir) / "verification.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(finite_json(report), indent=2, allow_nan=False) + "\n")
    return report
