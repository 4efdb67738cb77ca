"""Masked BCE, multi-label AUROC with uncertain targets, and the F1-threshold classification report."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from xmark_bundle.engines.metrics import MultiLabelAUROC, per_label_auroc
from xmark_bundle.engines.report import (
    classification_report,
    f1_optimal_threshold,
    write_classification_report,
    write_evaluation_report,
)
from xmark_bundle.losses.classification import MaskedBCEWithLogitsLoss


def test_masked_bce_ignores_negative_targets():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    target = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    kept = torch.tensor([True, False, True, True])
    expected = F.binary_cross_entropy_with_logits(logits.flatten()[kept], target.flatten()[kept])
    torch.testing.assert_close(MaskedBCEWithLogitsLoss()(logits, target), expected)


def test_per_label_auroc_hand_computed():
    # label 0: positives score 0.9, 0.4; negatives 0.5, 0.1 -> 3 of 4 pairs ordered -> 0.75
    # label 1: the uncertain (-1) row would make it perfect-inverse if counted; kept rows are perfectly ordered
    y_pred = torch.tensor([[0.9, 0.8], [0.4, 0.2], [0.5, 0.1], [0.1, 0.9]])
    y = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    np.testing.assert_allclose(per_label_auroc(y_pred, y), [0.75, 1.0])
    metric = MultiLabelAUROC()
    metric(list(y_pred), list(y))  # decollated, as the Ignite handler passes it
    assert abs(metric.aggregate().item() - 0.875) < 1e-6
    assert metric.get_buffer()[0].shape == (4, 2)


def test_f1_optimal_threshold():
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2])
    target = np.array([1, 1, 0, 1, 0])
    # t=0.8: P=1,R=2/3 -> 0.8 ; t=0.3: P=3/4,R=1 -> 0.857 (best) ; t=0.2: P=3/5 -> 0.75
    assert f1_optimal_threshold(scores, target) == 0.3


def test_report_applies_validation_threshold_to_test(tmp_path):
    val = (torch.tensor([[0.9], [0.6], [0.4], [0.1]]), torch.tensor([[1.0], [1.0], [0.0], [0.0]]))
    test = (torch.tensor([[0.7], [0.55], [0.5], [0.2]]), torch.tensor([[1.0], [0.0], [1.0], [-1.0]]))
    report = classification_report(val, test, ["Edema"])
    row = report["per_label"]["Edema"]
    assert row["threshold"] == pytest.approx(0.6)  # F1 = 1 on validation
    # test at t=0.6: 0.7 -> 1 (right), 0.55 -> 0 (right), 0.5 -> 0 (wrong); the uncertain row is skipped
    assert row["ba"] == pytest.approx(2 / 3)
    assert row["n_test"] == 3 and row["auroc"] == pytest.approx(0.5)
    out = tmp_path / "r.json"
    write_classification_report(val, test, out, ["Edema"], seed=3)
    assert json.loads(out.read_text())["seed"] == 3


def test_evaluation_report_gives_wsr_and_its_clean_baseline(tmp_path):
    val = (torch.tensor([[0.9], [0.6], [0.4], [0.1]]), torch.tensor([[1.0], [1.0], [0.0], [0.0]]))  # threshold 0.6
    test = (torch.tensor([[0.7], [0.65], [0.5], [0.2], [0.3]]), torch.tensor([[1.0], [0.0], [0.0], [0.0], [-1.0]]))
    watermarked = torch.tensor([0.95, 0.8, 0.3])  # the three non-target test samples (label 0), watermarked
    report = write_evaluation_report(val, test, watermarked, 0, tmp_path / "e.json", ["No Finding"])
    wsr = report["wsr"]
    assert wsr["threshold"] == pytest.approx(0.6) and wsr["value"] == pytest.approx(2 / 3) and wsr["n"] == 3
    assert wsr["clean_positive_rate"] == pytest.approx(1 / 3)  # 0.65 of the clean non-targets already passes
    assert json.loads((tmp_path / "e.json").read_text())["wsr"] == wsr
