"""build_classifier: one-channel stem, multi-label head, ImageNet weights only from a local file."""

import pytest
import torch
from torchvision.models import resnet18

from xmark_bundle.networks.classifier import CAM_LAYERS, build_classifier


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_one_channel_multilabel_shapes(arch):
    model = build_classifier(arch, num_classes=6).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 6)
    assert model.get_submodule(CAM_LAYERS[arch]) is not None
    assert model.weights_status == "untrained"


def test_imagenet_weights_from_local_file_sum_rgb_stem(tmp_path):
    reference = resnet18()  # 3-channel, 1000 classes: the layout of torchvision's ImageNet file
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_classifier("resnet18", num_classes=6, weights_path=path)
    assert model.weights_status == f"imagenet:{path}"
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.fc.out_features == 6


def test_pretrained_without_local_file_warns_and_stays_untrained(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="starts untrained"):
        model = build_classifier("resnet18", pretrained=True)
    assert model.weights_status == "untrained"


def test_wrong_weights_file_is_rejected(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(build_classifier("vgg16_bn", in_channels=3, num_classes=1000).state_dict(), path)
    with pytest.raises(ValueError, match="not ImageNet weights"):
        build_classifier("resnet18", weights_path=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_classifier("resnet18", weights_path=tmp_path / "missing.pth")
