"""build_classifier: one-channel stem, multi-label head, ImageNet weights only from a local file."""

import pytest
import torch
from torchvision.models import resnet18

from xmark_bundle.networks.classifier import CAM_LAYERS, build_classifier, head_parameters


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
    with pytest.raises(ValueError, match="not weights for this architecture"):
        build_classifier("resnet18", weights_path=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_classifier("resnet18", weights_path=tmp_path / "missing.pth")


def test_a_bundle_classifier_checkpoint_starts_a_model_with_every_layer_head_included(tmp_path):
    torch.manual_seed(1)
    trained = build_classifier("resnet18")
    torch.save(trained.state_dict(), tmp_path / "model.pt")  # as CheckpointSaver writes a single object
    torch.save({"model": trained.state_dict()}, tmp_path / "wrapped.pt")
    for name in ("model.pt", "wrapped.pt"):
        started = build_classifier("resnet18", weights_path=tmp_path / name)
        assert started.weights_status == f"checkpoint:{tmp_path / name}"
        for key, value in trained.state_dict().items():
            torch.testing.assert_close(started.state_dict()[key], value, rtol=0, atol=0)
    head = head_parameters(started)
    assert [tuple(p.shape) for p in head] == [(6, 512), (6,)] and head[0] is started.fc.weight


def test_fine_tuning_the_head_changes_nothing_else(tmp_path):
    """configs/finetune_head.json: the optimiser holds the head's parameters only."""
    model = build_classifier("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.AdamW(head_parameters(model), lr=1e-2)
    model.train()
    loss = model(torch.rand(4, 1, 64, 64)).sum()
    loss.backward()
    optimiser.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    weights = {k for k in changed if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert weights == {"fc.weight", "fc.bias"}
