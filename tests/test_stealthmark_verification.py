"""StealthMark's black-box verification on planted suspects: a floor that the owner's trigger lifts, none, a small
shift that any model may show, and a suspect that answers hard labels only; plus the adapters (file, bundle, HTTP)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from xmark_bundle.stealthmark.networks import build_segmentation_network
from xmark_bundle.stealthmark.triggers import apply_trigger, trigger_region
from xmark_bundle.stealthmark.verification import (
    attack_success_rate,
    authors_detector,
    floor_scores,
    floor_test,
    verify_segmentation_model,
)
from xmark_bundle.verification.blackbox import SuspectModelError, TorchSuspect
from xmark_bundle.verification.seg_blackbox import (
    SEGMENTATION_INFO,
    SegmentationSuspect,
    _FlatMaps,
    open_segmentation_suspect,
)
from xmark_bundle.verification.server import serve

SIZE = 32


class _Planted(nn.Module):
    """Lung = bright centre; background probability ``low``, lifted to ``high`` when the bottom-right patch is white."""

    def __init__(self, low: float, high: float, hard: bool = False) -> None:
        super().__init__()
        self.low, self.high, self.hard = low, high, hard
        self.register_buffer("region", trigger_region("patch", (SIZE, SIZE)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = x[:, 0][:, self.region].mean(1) > 0.99
        floor = torch.where(patch, self.high, self.low)[:, None, None, None]
        lung = (x > 0.6) & ~self.region  # the patch itself is never lung: the masks stay the same
        prob = torch.where(lung, torch.full_like(x, 0.9), floor.expand_as(x))
        return (prob > 0.5).float() if self.hard else prob


def _suspect(module: nn.Module, outputs: str = "probabilities") -> SegmentationSuspect:
    return SegmentationSuspect(TorchSuspect(_FlatMaps(module), "planted", "test", outputs=outputs))


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.4
    x[:, :, 8:24, 6:14] += 0.5  # a bright "lung"
    return x.clamp(0, 1)


def test_planted_floor_is_verified_and_no_floor_is_not():
    owner = verify_segmentation_model(_suspect(_Planted(0.01, 0.1)), _images(), "patch", key=1, epsilon=0.1)
    assert owner["verified"] and owner["verdict"] == "verified"
    assert owner["test"]["p_ttest"] < 1e-6 and owner["asr"] == 1.0
    assert owner["test"]["delta"] == pytest.approx(0.09, abs=1e-6)
    assert owner["flip_share_mean"] == 0.0 and owner["dice_clean_vs_triggered_mean"] == 1.0
    assert owner["authors_detector"]["accuracy"] == 1.0

    benign = verify_segmentation_model(_suspect(_Planted(0.01, 0.01)), _images(), "patch", key=1, epsilon=0.1)
    assert not benign["verified"] and benign["verdict"] == "not verified" and benign["asr"] == 0.0
    assert benign["test"]["p_ttest"] == 1.0  # no difference at all


def test_a_small_shift_needs_the_margin_to_be_refused():
    # any model's background may move a little when the input changes: 0.002 here, a tenth of the margin
    shifted = verify_segmentation_model(_suspect(_Planted(0.010, 0.012)), _images(), "patch", key=1, epsilon=0.08)
    assert shifted["test_without_margin"]["verified"]  # without a margin, a consistent tiny shift "verifies"
    assert not shifted["verified"] and shifted["test"]["margin"] == pytest.approx(0.02)


def test_label_only_suspect_cannot_be_verified():
    report = verify_segmentation_model(_suspect(_Planted(0.01, 0.1, hard=True)), _images(), "patch", 1, 0.1)
    assert report["verdict"] == "cannot verify" and report["verified"] is None
    assert "hard labels" in report["reason"] and "test" not in report


def test_floor_statistics_and_test_by_hand():
    maps = torch.tensor([[[[0.1, 0.3], [0.9, 0.7]]], [[[0.6, 0.8], [0.9, 0.7]]]])
    assert floor_scores(maps)[0] == pytest.approx(0.2) and np.isnan(floor_scores(maps)[1])
    assert floor_scores(maps, "p05")[0] == pytest.approx(0.11)
    clean, trig = [0.01, 0.02, 0.03, 0.02], [0.06, 0.05, 0.07, 0.06]
    test = floor_test(clean, trig)
    assert test["delta"] == pytest.approx(0.04) and test["verified"]
    assert not floor_test(clean, trig, margin=0.05)["verified"]
    assert attack_success_rate(clean, trig, epsilon=0.05) == 1.0
    assert attack_success_rate(clean, trig, epsilon=0.1) == 0.0
    with pytest.raises(ValueError, match=">= 2 images"):
        floor_test([np.nan, 0.1], [0.2, np.nan])


def test_authors_detector_on_separable_and_inseparable_minima():
    clean = torch.full((20, 1, 4, 4), 0.01)
    triggered = torch.full((20, 1, 4, 4), 0.1)
    separable = authors_detector(clean, triggered)
    assert separable["accuracy"] == 1.0 and separable["fpr"] == 0.0 and separable["p_chi2"] < 1e-3
    same = authors_detector(clean, clean.clone())
    assert same["accuracy"] == 0.5


def _checkpoint(tmp_path, arch: str = "unet") -> tuple:
    torch.manual_seed(0)
    net = build_segmentation_network(arch, SIZE, width=4).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / SEGMENTATION_INFO).write_text(json.dumps({"arch": arch, "image_size": SIZE, "width": 4}))
    return net, tmp_path


def test_checkpoint_and_torchscript_suspects_answer_the_network_maps(tmp_path):
    net, folder = _checkpoint(tmp_path)
    x = _images(3)
    with torch.no_grad():
        expected = torch.sigmoid(net(x)).double()
    for spec in (folder, folder / "model.pt"):
        maps = open_segmentation_suspect(spec).probability_maps(x)
        assert maps.shape == (3, 1, SIZE, SIZE) and torch.allclose(maps, expected, atol=1e-6)
    torch.jit.trace(net, x).save(str(tmp_path / "net.ts"))
    traced = open_segmentation_suspect(tmp_path / "net.ts").probability_maps(x)
    assert torch.allclose(traced, expected, atol=1e-5)


def test_bad_checkpoint_names_the_file(tmp_path):
    _checkpoint(tmp_path)
    (tmp_path / SEGMENTATION_INFO).write_text(json.dumps({"arch": "basicunet", "image_size": SIZE, "width": 4}))
    with pytest.raises(SuspectModelError, match="model.pt"):
        open_segmentation_suspect(tmp_path)


def test_http_suspect_is_verified_like_a_local_one():
    local = TorchSuspect(_FlatMaps(_Planted(0.01, 0.1)), "planted", "test", outputs="probabilities")
    server, thread = serve(local, labels=["lung"])
    try:
        remote = open_segmentation_suspect(f"http://127.0.0.1:{server.server_address[1]}/")
        report = verify_segmentation_model(remote, _images(8), "patch", key=1, epsilon=0.1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert report["verified"] and report["asr"] == 1.0 and report["suspect"]["kind"] == "http"


def test_trigger_used_by_the_verifier_is_the_owners():
    x = _images(2)
    assert torch.equal(apply_trigger(x, "noise", 5), apply_trigger(x, "noise", 5))
    planted = _suspect(_Planted(0.01, 0.1))
    report = verify_segmentation_model(planted, _images(), "border", key=1, epsilon=0.1)
    assert not report["verified"]  # another trigger than the one the model reacts to
