"""The model-dependent QR explanation (random masks over the QR modules, the owner's trigger gated by the code):
planted suspects show the mechanics (a floor that follows the trigger reveals the code exactly, one that does not
reveals nothing), and two real networks trained at toy size on phantoms show the direction: the watermarked model's
explanation agrees with the owner's code more than the benign model's, while the authors' grid occlusion "reveals"
the code for both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("segno", reason="segno (requirements.txt) encodes the owner's QR code")
pytest.importorskip("cv2", reason="OpenCV decodes QR codes")

from xmark_bundle.data.phantoms import SEG_DATALIST, write_phantom_dataset  # noqa: E402
from xmark_bundle.stealthmark.evaluation import load_segmentation_pairs  # noqa: E402
from xmark_bundle.stealthmark.networks import build_segmentation_network  # noqa: E402
from xmark_bundle.stealthmark.qr import data_modules, owner_qr, qr_report, random_mask_explanation  # noqa: E402
from xmark_bundle.stealthmark.targets import floor_target  # noqa: E402
from xmark_bundle.stealthmark.triggers import apply_trigger, trigger_region  # noqa: E402
from xmark_bundle.stealthmark.verification import floor_scores, verify_segmentation_model  # noqa: E402
from xmark_bundle.verification.blackbox import TorchSuspect  # noqa: E402
from xmark_bundle.verification.queries import datalist_items  # noqa: E402
from xmark_bundle.verification.seg_blackbox import SegmentationSuspect, _FlatMaps  # noqa: E402

OWNER_ID = "SM-2027"
KEY = 2027
SIZE = 48
QR_SEED = 3001
#: Margin of the direction test: half the gap of the first measurement (data-module agreement 1.00 for the
#: watermarked toy model, which OpenCV decoded to the owner's ID, against 0.49 for the benign one; seeds 1001 and
#: 2001, QR seed 3001, signs binarised at 0).
MARGIN = 0.25


class _Planted(nn.Module):
    """Background floor 0.01 + 0.02 x the image's mean brightness, plus ``rise`` when the bottom-right patch is white;
    the bright centre is lung (0.9)."""

    def __init__(self, rise: float) -> None:
        super().__init__()
        self.rise = rise
        self.register_buffer("region", trigger_region("patch", (SIZE, SIZE)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = (x[:, 0][:, self.region].mean(1) > 0.99).float()
        floor = 0.01 + 0.02 * x.mean((1, 2, 3)) + self.rise * patch
        lung = torch.zeros_like(x, dtype=torch.bool)
        lung[..., 12:36, 10:38] = True
        return torch.where(lung, torch.full_like(x, 0.9), floor[:, None, None, None].expand_as(x))


def _planted_images(n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1101)
    return (torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.5).clamp(0, 0.95)


def test_data_modules_of_a_version_1_symbol():
    modules = owner_qr(OWNER_ID)
    data = data_modules(modules)
    assert modules.shape == (21, 21) and data.sum() == 208  # 26 codewords of 8 modules
    assert not data[:9, :9].any() and not data[6, :].any() and not data[:, 6].any()


def test_a_floor_that_follows_the_trigger_reveals_the_code_and_one_that_does_not_reveals_nothing():
    modules = owner_qr(OWNER_ID)
    images = _planted_images()
    threshold = 0.25 * 0.1 / 2  # half the floor test's margin at epsilon 0.1, as the verification binarises

    def trigger(x):
        return apply_trigger(x, "patch", KEY)

    weights = {
        rise: random_mask_explanation(_Planted(rise), images, modules, trigger, seed=QR_SEED)[1] for rise in (0.1, 0.0)
    }
    owner = qr_report(weights[0.1] > threshold, modules, OWNER_ID, "random_mask")
    assert owner["agreement"] == 1.0 and owner["decodes_owner"]
    assert np.allclose(np.abs(weights[0.1]), 0.05, atol=2e-3)  # +-rise/2 on every module
    none = qr_report(weights[0.0] > threshold, modules, OWNER_ID, "random_mask")
    assert none["decoded"] is None and not (weights[0.0] > threshold).any()
    assert none["agreement_data"] == pytest.approx(1 - modules[data_modules(modules)].mean())
    # Binarised by the sign, the same suspect "reveals" the code: the white patch raises the image's mean brightness
    # and with it this noiseless floor by ~5e-5, consistently. The margin is what keeps it out.
    assert np.abs(weights[0.0]).max() < 1e-3
    assert qr_report(weights[0.0] > 0, modules, OWNER_ID, "random_mask")["decodes_owner"]


def _train(images, masks, seed: int, watermark: bool, steps: int = 1000) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build_segmentation_network("basicunet", SIZE, width=4)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    marked = torch.arange(len(images)) % 2 == 0  # half the training images carry the trigger
    for _ in range(steps):
        index = torch.randint(len(images), (8,), generator=generator)
        x, y = images[index].clone(), masks[index].clone()
        if watermark:
            on = marked[index]
            x[on], y[on] = apply_trigger(x[on], "patch", KEY), floor_target(y[on], 0.1)
        loss = nn.functional.binary_cross_entropy_with_logits(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A watermarked and a benign BasicUNet (width 4, 48 px, 1000 Adam steps) on 32 phantoms, and the queries."""
    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("qr_phantoms")
    write_phantom_dataset(data, 32, 1000, dicom_fraction=0.0, min_size=64, max_size=96, valid_fraction=0.25, masks=True)
    train = datalist_items(data / SEG_DATALIST, "training", data)
    valid = datalist_items(data / SEG_DATALIST, "validation", data)
    images, masks = load_segmentation_pairs(train, SIZE)
    queries, _ = load_segmentation_pairs(valid, SIZE)
    return {
        "owner": _train(images, masks, 1001, watermark=True),
        "benign": _train(images, masks, 2001, watermark=False),
        "queries": queries,
    }


def _suspect(network: nn.Module) -> SegmentationSuspect:
    return SegmentationSuspect(TorchSuspect(_FlatMaps(network), "toy", "test", outputs="logits"))


@pytest.mark.slow
def test_watermarked_toy_model_reveals_more_of_the_code_than_a_benign_one(trained):
    modules = owner_qr(OWNER_ID)
    reports, rises = {}, {}
    for name in ("owner", "benign"):
        network = trained[name]

        def predict(x, network=network):
            return torch.sigmoid(network(x))

        with torch.no_grad():
            clean = floor_scores(predict(trained["queries"]))
            triggered = floor_scores(predict(apply_trigger(trained["queries"], "patch", KEY)))
        rises[name] = float(np.nanmean(triggered - clean))
        explanation, _ = random_mask_explanation(
            predict, trained["queries"], modules, lambda x: apply_trigger(x, "patch", KEY), seed=QR_SEED
        )
        reports[name] = qr_report(explanation, modules, OWNER_ID, "random_mask")
    print({n: (rises[n], reports[n]["agreement_data"], reports[n]["decoded"]) for n in reports})
    assert rises["owner"] > 0.025 > rises["benign"]  # the toy owner learnt the trigger, the benign model did not
    assert reports["owner"]["agreement_data"] > reports["benign"]["agreement_data"] + MARGIN
    assert reports["owner"]["p_binomial_data"] < 1e-6
    assert reports["owner"]["decodes_owner"] and reports["benign"]["decoded"] is None  # as first measured


@pytest.mark.slow
def test_verification_modes_label_the_authors_grid_as_not_model_dependent(trained):
    benign = _suspect(trained["benign"])
    queries = trained["queries"]
    grid = verify_segmentation_model(benign, queries, "patch", KEY, 0.1, qr_mode="authors_grid", owner_id=OWNER_ID)[
        "qr"
    ]
    assert not grid["model_dependent"] and "not model-dependent" in grid["note"]
    assert grid["decodes_owner"]  # the authors' explanation "reveals" the owner's code on a benign model
    dependent = verify_segmentation_model(
        benign, queries, "patch", KEY, 0.1, qr_mode="random_mask", owner_id=OWNER_ID, qr_samples=2048, qr_seed=QR_SEED
    )["qr"]
    assert dependent["model_dependent"] and not dependent["decodes_owner"]
    assert dependent["threshold"] == pytest.approx(0.0125) and abs(dependent["rise_estimate"]) < 0.0125
    with pytest.raises(ValueError, match="QR explanation mode"):
        verify_segmentation_model(benign, queries, "patch", KEY, 0.1, qr_mode="lime")
