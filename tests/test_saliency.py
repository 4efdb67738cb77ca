"""Tests of the batched torch EigenCAM against grad-cam 1.5.7's EigenCAM, of its fixed sign convention, and of the
hook-free path that lets a WatermarkPipeline be scripted with the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import EigenCAM as GradCamEigenCAM

from xmark_bundle.networks.classifier import CAM_LAYERS, ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.saliency import EigenCAM, eigencam_saliency, principal_projection, projection_to_saliency

SIZE = 224


@pytest.fixture(scope="module")
def surrogate() -> torch.nn.Module:
    """Seeded, randomly initialised one-channel torchvision ResNet18 with six outputs."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model.eval()


def _inputs() -> torch.Tensor:
    """Two random images and three structured ones (disk, ramp, disk on a ramp)."""
    gen = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    disk = ((xx - 0.3) ** 2 + yy**2 < 0.2).float()
    ramp = (xx + 1) / 2
    structured = torch.stack([disk, ramp, 0.6 * disk + 0.3 * ramp])[:, None]
    return torch.cat([torch.rand(2, 1, SIZE, SIZE, generator=gen), structured])


def test_agrees_with_grad_cam_up_to_sign(surrogate):
    images = _inputs()
    cam = EigenCAM(surrogate, "layer4")
    ours = cam(images)
    flipped = projection_to_saliency(-principal_projection(cam.activations(images)), (SIZE, SIZE))
    with GradCamEigenCAM(surrogate, target_layers=[surrogate.layer4]) as reference_cam:
        reference = reference_cam(input_tensor=images, targets=None)
    assert ours.shape == (len(images), 1, SIZE, SIZE)
    for i, ref in enumerate(reference):
        candidates = (ours[i, 0].numpy(), flipped[i, 0].numpy())
        best = max(candidates, key=lambda c: np.corrcoef(c.ravel(), ref.ravel())[0, 1])
        assert np.corrcoef(best.ravel(), ref.ravel())[0, 1] >= 0.99
        # Same math and both interpolations use half-pixel centres: the maps agree to float precision.
        assert np.abs(best - ref).max() < 1e-4


def test_sign_follows_channel_mean_activation():
    gen = torch.Generator().manual_seed(2)
    acts = torch.randn(16, 32, 7, 7, generator=gen)
    projection = principal_projection(acts)
    channel_mean = acts.mean(dim=1)
    for p, m in zip(projection, channel_mean, strict=True):
        assert np.corrcoef(p.ravel().numpy(), m.ravel().numpy())[0, 1] >= 0
    torch.testing.assert_close(principal_projection(-acts), -projection, rtol=0, atol=1e-4)


def test_highlights_the_active_region():
    gen = torch.Generator().manual_seed(3)
    acts = 0.1 * torch.rand(2, 64, 8, 8, generator=gen)
    acts[:, :, 1:3, 5:7] += 2.0 * torch.rand(2, 64, 1, 1, generator=gen)  # a blob active in every channel
    saliency = projection_to_saliency(principal_projection(acts), (8, 8))[:, 0]
    assert saliency[:, 1:3, 5:7].amin() > 0.9
    background = torch.ones(8, 8, dtype=torch.bool)
    background[1:3, 5:7] = False
    assert saliency[:, background].amax() < 0.1


def test_batched_equals_per_sample_and_range(surrogate):
    images = _inputs()[:3]
    cam = EigenCAM(surrogate, "layer4")
    batched = cam(images)
    single = torch.cat([cam(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert batched.min() >= 0 and batched.max() <= 1 and batched.amax(dim=(1, 2, 3)).min() > 0.99
    assert not batched.requires_grad


def test_leaves_no_hooks_and_restores_modes(surrogate):
    surrogate.train()
    surrogate.bn1.eval()
    stats = surrogate.layer1[0].bn1.running_mean.clone()
    try:
        EigenCAM(surrogate, "layer4")(_inputs()[:2])
        assert not surrogate.layer4._forward_hooks
        assert surrogate.training and surrogate.layer4.training and not surrogate.bn1.training
        torch.testing.assert_close(surrogate.layer1[0].bn1.running_mean, stats, rtol=0, atol=0)  # ran in eval mode
    finally:
        surrogate.eval()


def test_gradients_on_request(surrogate):
    images = _inputs()[:2].requires_grad_(True)
    EigenCAM(surrogate, "layer4")(images, enable_grad=True).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_unknown_layer_is_a_clear_error(surrogate):
    with pytest.raises(ValueError, match="'layer9' not found in ResNet"):
        EigenCAM(surrogate, "layer9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu(surrogate):
    images = _inputs()
    cpu = EigenCAM(surrogate, "layer4")(images)
    gpu_model = torchvision.models.resnet18(num_classes=6)
    gpu_model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    gpu_model.load_state_dict(surrogate.state_dict())
    gpu = EigenCAM(gpu_model.cuda().eval(), "layer4")(images.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)


# --- hook-free path: ResizedClassifier.cam_features and the scripted WatermarkPipeline -------------------------------


@pytest.fixture(scope="module")
def resized() -> dict[str, torch.nn.Module]:
    """Seeded one-channel surrogates (64 px) of the three CAM_LAYERS families, in eval mode."""
    torch.manual_seed(4)
    return {
        arch: ResizedClassifier(build_classifier(arch), 64).eval() for arch in ("resnet18", "vgg16_bn", "densenet121")
    }


def _hooked_activations(model: torch.nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The layer's output captured by a forward hook during the full forward pass (the reference)."""
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn", "densenet121"])
def test_cam_features_equal_the_hooked_layer(resized, arch):
    model = resized[arch]
    assert model.cam_layer == f"classifier.{CAM_LAYERS[arch]}"
    images = torch.rand(2, 1, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        features = model.cam_features(images)
    torch.testing.assert_close(features, _hooked_activations(model, model.cam_layer, images), rtol=0, atol=0)
    cam = EigenCAM(model, model.cam_layer)
    assert cam.hook_free
    reference = eigencam_saliency(_hooked_activations(model, model.cam_layer, images), (96, 96))
    torch.testing.assert_close(cam(images), reference, rtol=0, atol=0)


def test_hook_free_eigencam_keeps_eval_mode_restoring_and_gradients(resized):
    model = resized["resnet18"]
    model.train()
    model.classifier.bn1.eval()
    stats = model.classifier.layer1[0].bn1.running_mean.clone()
    try:
        images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        EigenCAM(model, "classifier.layer4")(images, enable_grad=True).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        assert not model.classifier.layer4._forward_hooks
        assert model.training and model.classifier.layer4.training and not model.classifier.bn1.training
        torch.testing.assert_close(model.classifier.layer1[0].bn1.running_mean, stats, rtol=0, atol=0)
        assert not EigenCAM(model, "classifier.layer4")(images.detach()).requires_grad
    finally:
        model.eval()


def _pipeline(surrogate: torch.nn.Module, generator: torch.nn.Module | None = None) -> WatermarkPipeline:
    torch.manual_seed(7)
    generator = generator or XMarkGenerator([4, 8, 16, 32, 64], key_cells=4, key_seed=3, residual_blur=1)
    with torch.no_grad():  # non-trivial generator weights, so the saliency conditioning shows in the output
        for p in generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return WatermarkPipeline(generator, surrogate, surrogate.cam_layer, image_size=64).eval()


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_scripted_pipeline_equals_eager(resized, arch):
    pipeline = _pipeline(resized[arch])
    keys = set(pipeline.state_dict())
    assert pipeline.scriptable and all(k.startswith(("generator.", "surrogate.classifier.")) for k in keys)
    scripted = torch.jit.script(pipeline)
    images = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        eager = pipeline(images)
        torch.testing.assert_close(scripted(images), eager, rtol=0, atol=1e-6)
        # The saliency reaches the output: another map gives another watermark.
        other = pipeline.generator(images, torch.zeros_like(images))
    assert (eager - other).abs().max() > 0
    assert set(scripted.state_dict()) == keys
    assert callable(pipeline.saliency) and pipeline.saliency(images).shape == images.shape


def test_pipeline_at_another_layer_stays_eager_only(resized):
    surrogate = resized["resnet18"]
    pipeline = WatermarkPipeline(XMarkGenerator([4, 8, 16, 32, 64]), surrogate, "classifier.layer3", 64).eval()
    assert not pipeline.scriptable and not pipeline.saliency.hook_free
    with torch.no_grad():
        assert pipeline(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)
