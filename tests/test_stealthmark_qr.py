"""The authors' grid-occlusion explanation "reveals" the owner's QR code for an untrained
network, because the binarised explanation is the verifier's own pattern whenever the model's output moves at all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmark_bundle.stealthmark.networks import build_segmentation_network

segno = pytest.importorskip("segno", reason="segno (requirements.txt) encodes the owner's QR code")
pytest.importorskip("cv2", reason="OpenCV decodes QR codes")

from xmark_bundle.stealthmark.qr import decode_qr, grid_occlusion_explanation, owner_qr  # noqa: E402

OWNER = "owner:hospital-A/model-7"


def test_owner_qr_round_trips_through_opencv():
    modules = owner_qr(OWNER)
    assert modules.shape[0] == modules.shape[1] >= 21
    assert decode_qr(modules) == OWNER
    assert decode_qr(np.zeros_like(modules)) is None


def test_untrained_network_reveals_the_owners_qr():
    modules = owner_qr(OWNER)
    grid = modules.shape[0]
    torch.manual_seed(0)
    untrained = build_segmentation_network("unet", 64, width=4).eval()  # never trained, never saw a trigger
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(1))
    explanation, weights = grid_occlusion_explanation(lambda x: torch.sigmoid(untrained(x)), image, modules)
    assert np.array_equal(explanation[:grid, :grid], modules)  # the verifier's own pattern, exactly
    assert (weights[~modules] == 0).all()  # cells never blacked out: constant columns, weight exactly 0
    assert decode_qr(explanation) == OWNER


def test_another_key_reveals_another_qr_from_the_same_model():
    # the "revealed" code follows whoever runs the explanation, not the model
    torch.manual_seed(0)
    untrained = build_segmentation_network("unet", 64, width=4).eval()
    image = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(1))
    other = owner_qr("someone else")
    explanation, _ = grid_occlusion_explanation(lambda x: torch.sigmoid(untrained(x)), image, other)
    assert decode_qr(explanation) == "someone else"


def test_a_model_whose_output_never_moves_reveals_nothing():
    modules = owner_qr(OWNER)
    image = torch.rand(1, 64, 64)
    explanation, _ = grid_occlusion_explanation(lambda x: torch.full_like(x, 0.3), image, modules)
    assert not explanation.any() and decode_qr(explanation) is None
