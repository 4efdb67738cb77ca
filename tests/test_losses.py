"""Tests of X-Mark's generator objective: Laplacian pyramid, LPIPS without downloads, Lt/Lnt BCE and their sum."""

from __future__ import annotations

import math
import socket

import lpips
import pytest
import torch
import torchvision

from xmark_bundle.losses.watermark import (
    LaplacianPyramidLoss,
    LPIPSLoss,
    XMarkLoss,
    collapse_laplacian_pyramid,
    laplacian_pyramid,
    target_label_bce,
)

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's cache name for AlexNet_Weights.IMAGENET1K_V1


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty TORCH_HOME and sockets that refuse to connect: any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path


@pytest.fixture(scope="module")
def untrained_lpips(tmp_path_factory) -> LPIPSLoss:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        with pytest.warns(UserWarning, match="untrained"):
            return LPIPSLoss()


@pytest.mark.parametrize("shape", [(2, 3, 64, 48), (1, 1, 67, 33)])
@pytest.mark.parametrize("levels", [1, 3, 4])
def test_pyramid_shapes_and_exact_reconstruction(shape, levels):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pyramid = laplacian_pyramid(x, levels)
    assert len(pyramid) == levels
    expected = shape[2:]
    for level in pyramid:
        assert tuple(level.shape) == shape[:2] + tuple(expected)
        expected = tuple(math.ceil(s / 2) for s in expected)
    torch.testing.assert_close(collapse_laplacian_pyramid(pyramid), x, rtol=0, atol=1e-12)


def test_pyramid_of_constant_has_empty_bands_and_constant_residual():
    pyramid = laplacian_pyramid(torch.full((1, 1, 32, 30), 0.25), 3)
    for band in pyramid[:-1]:
        assert band.abs().max() < 1e-6
    torch.testing.assert_close(pyramid[-1], torch.full((1, 1, 8, 8), 0.25))


def test_pyramid_rejects_too_small_images():
    with pytest.raises(ValueError, match="at least 3 px"):
        laplacian_pyramid(torch.rand(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="B x C x H x W"):
        laplacian_pyramid(torch.rand(32, 32), 1)


def test_laplacian_loss_values():
    loss = LaplacianPyramidLoss(levels=3)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert loss(x, x) == 0
    # A constant shift lives only in the low-pass residual: the loss is exactly the shift.
    torch.testing.assert_close(loss(x + 0.1, x), torch.tensor(0.1))
    # A zero-mean Nyquist checkerboard is removed by the binomial blur, so it lives only in the finest band.
    checker = 0.05 * (1 - 2 * (torch.arange(32)[:, None] + torch.arange(32)[None, :]).remainder(2).float())
    bands = laplacian_pyramid(checker[None, None], 3)
    torch.testing.assert_close(bands[0][0, 0], checker)
    assert bands[1].abs().max() < 1e-7 and bands[2].abs().max() < 1e-7
    torch.testing.assert_close(loss(x + checker, x), torch.tensor(0.05))


def test_laplacian_loss_reductions():
    gen = torch.Generator().manual_seed(6)
    x, x_hat = torch.rand(3, 1, 32, 32, generator=gen), torch.rand(3, 1, 32, 32, generator=gen)
    per_sample = LaplacianPyramidLoss(reduction="none")(x_hat, x)
    assert per_sample.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(per_sample[i], LaplacianPyramidLoss()(x_hat[i : i + 1], x[i : i + 1]))
    torch.testing.assert_close(LaplacianPyramidLoss()(x_hat, x), per_sample.mean())
    torch.testing.assert_close(LaplacianPyramidLoss(reduction="sum")(x_hat, x), per_sample.sum())


def test_lpips_offline_without_weights_is_untrained(offline):
    with pytest.warns(UserWarning) as record:
        metric = LPIPSLoss("alex")
    messages = [str(w.message) for w in record]
    assert any(ALEXNET_FILE in m and "Nothing is downloaded" in m for m in messages)
    assert any("LPIPS runs on an untrained alexnet trunk" in m for m in messages)
    assert metric.backbone_status == "untrained"
    assert not any(offline.rglob("*.pth"))


def test_lpips_loads_cached_torchvision_weights(offline):
    checkpoints = offline / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, checkpoints / ALEXNET_FILE)
    metric = LPIPSLoss("alex")
    assert metric.backbone_status == f"imagenet:{checkpoints / ALEXNET_FILE}"
    torch.testing.assert_close(metric.metric.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(metric.metric.net.slice5, "10").weight, state["features.10.weight"])


def test_lpips_weight_file_errors(offline):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        LPIPSLoss(weights_path=offline / "missing.pth")
    wrong = offline / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet.pth: not torchvision alexnet"):
        LPIPSLoss(weights_path=wrong)


def test_lpips_values_gradients_and_eval_mode(untrained_lpips):
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    x_hat = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    x_hat.requires_grad_(True)
    assert untrained_lpips(x, x) == 0
    distance = untrained_lpips(x_hat, x)
    assert distance > 0
    # lpips' own LPIPS with the same weights, fed what its README asks for: 3-channel images in [-1, 1]
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(untrained_lpips.metric.state_dict())
    with torch.no_grad():
        expected = reference(2 * x_hat.repeat(1, 3, 1, 1) - 1, 2 * x.repeat(1, 3, 1, 1) - 1).mean()
    torch.testing.assert_close(distance.detach(), expected, rtol=1e-5, atol=1e-7)
    distance.backward()
    assert x_hat.grad.abs().sum() > 0
    untrained_lpips.train()
    assert not untrained_lpips.metric.training
    assert untrained_lpips(x_hat, x) == distance  # dropout stays off
    assert not any(p.requires_grad for p in untrained_lpips.parameters())


def test_lpips_per_sample_reduction(offline, untrained_lpips):
    with pytest.warns(UserWarning, match="untrained"):
        per_sample = LPIPSLoss(reduction="none")
    per_sample.load_state_dict(untrained_lpips.state_dict())  # same random trunk as the fixture
    gen = torch.Generator().manual_seed(7)
    x, x_hat = torch.rand(3, 1, 64, 64, generator=gen), torch.rand(3, 1, 64, 64, generator=gen)
    values = per_sample(x_hat, x)
    assert values.shape == (3,) and (values > 0).all()
    torch.testing.assert_close(values.mean(), untrained_lpips(x_hat, x))
    torch.testing.assert_close(values[1], untrained_lpips(x_hat[1:2], x[1:2]))
    # XMarkLoss averages it, so one per-sample instance can serve both the loss and a per-sample evaluator.
    terms = XMarkLoss(0, per_sample)(x, x_hat, torch.zeros(3, 6), torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(terms["lpips"], values.mean())


def test_target_label_bce_matches_hand_computed_values():
    logits = torch.tensor([[0.0, 2.0], [0.0, -1.0], [0.0, 0.5]])
    mask = torch.tensor([True, False, True])
    # BCE(z, 0) = log(1 + e^z), BCE(z, 1) = log(1 + e^-z)
    torch.testing.assert_close(
        target_label_bce(logits, 1, mask, 0.0), torch.tensor((math.log1p(math.e**2) + math.log1p(math.e**0.5)) / 2)
    )
    torch.testing.assert_close(target_label_bce(logits, 1, ~mask, 1.0), torch.tensor(math.log1p(math.e)))
    assert target_label_bce(logits, 1, torch.zeros(3, dtype=torch.bool), 1.0) == 0


def test_xmark_loss_combines_weighted_terms(untrained_lpips):
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 1, 64, 64, generator=gen)
    x_hat = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    logits = torch.randn(4, 6, generator=gen)
    is_target = torch.tensor([True, False, False, True])
    terms = XMarkLoss(target_index=5, lpips=untrained_lpips)(x, x_hat, logits, is_target)
    assert terms["loss_t"] == target_label_bce(logits, 5, is_target, 0.0)
    assert terms["loss_nt"] == target_label_bce(logits, 5, ~is_target, 1.0)
    assert terms["lpips"] == untrained_lpips(x_hat, x)
    assert terms["laplacian"] == LaplacianPyramidLoss(3)(x_hat, x)
    expected = terms["loss_t"] + terms["loss_nt"] + 10 * terms["lpips"] + 3 * terms["laplacian"]
    torch.testing.assert_close(terms["loss"], expected)

    ablated = XMarkLoss(5, untrained_lpips, lambda_lpips=2.0, use_laplacian=False)(x, x_hat, logits, is_target)
    torch.testing.assert_close(ablated["laplacian"], terms["laplacian"])  # still reported
    torch.testing.assert_close(ablated["loss"], terms["loss_t"] + terms["loss_nt"] + 2 * terms["lpips"])


def test_xmark_loss_without_target_samples(untrained_lpips):
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(5))
    logits = torch.tensor([[0.0] * 5 + [1.0], [0.0] * 5 + [-1.0]])
    terms = XMarkLoss(5, untrained_lpips)(x, x, logits, torch.zeros(2, dtype=torch.bool))
    assert terms["loss_t"] == 0 and terms["lpips"] == 0 and terms["laplacian"] == 0
    torch.testing.assert_close(terms["loss"], torch.tensor((math.log1p(math.e**-1) + math.log1p(math.e)) / 2))


def test_xmark_loss_rejects_bad_inputs(untrained_lpips):
    loss = XMarkLoss(6, untrained_lpips)
    x = torch.rand(2, 1, 64, 64)
    with pytest.raises(ValueError, match="column 6"):
        loss(x, x, torch.zeros(2, 6), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="booleans"):
        XMarkLoss(0, untrained_lpips)(x, x, torch.zeros(2, 6), torch.zeros(2))
