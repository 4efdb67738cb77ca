"""A watermark checkpoint rebuilds its module from its own record: method, architecture, budget, key, resolution."""

import pytest
import torch

from xmark_bundle.data.labels import LABELS
from xmark_bundle.networks.checkpoint import (
    WatermarkRecord,
    load_watermark,
    read_watermark_checkpoint,
    save_watermark,
    watermark_record,
)
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import SSCLBWGenerator, XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline

SIZE = 64


def _pipeline(generator: torch.nn.Module, arch: str = "resnet18", size: int = 48) -> WatermarkPipeline:
    torch.manual_seed(1)
    surrogate = ResizedClassifier(build_classifier(arch), size)
    return WatermarkPipeline(generator, surrogate, f"classifier.{'layer4' if arch == 'resnet18' else 'features'}", SIZE)


GENERATORS = {
    "xmark": lambda: XMarkGenerator([4, 8, 16, 32, 64], eps=8 / 255, residual_blur=1),
    "xmark_no_conditioning": lambda: XMarkGenerator([4, 8, 16], conditioning=False),
    "keyed_grating": lambda: XMarkGenerator([4, 8, 16, 32, 64], key_cells=128, key_pattern="grating", key_seed=5),
    "sscl_bw": lambda: SSCLBWGenerator([4, 8, 16, 32, 64, 4]),
}


@pytest.mark.parametrize("name", list(GENERATORS))
def test_a_checkpoint_alone_rebuilds_the_same_watermark(name, tmp_path):
    torch.manual_seed(0)
    original = _pipeline(GENERATORS[name]()).eval()
    with torch.no_grad():  # trained-looking weights: not what a fresh constructor gives
        for p in original.generator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_watermark(original, tmp_path / "model.pt", target_label="Edema")
    rebuilt = load_watermark(tmp_path / "model.pt")
    assert type(rebuilt.generator) is type(original.generator) and not rebuilt.training
    assert rebuilt.image_size == SIZE and rebuilt.eps == original.eps and rebuilt.method == original.method
    assert rebuilt.surrogate.size == 48 and torch.equal(rebuilt.generator.key, original.generator.key)
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))
    record = watermark_record(tmp_path / "model.pt")
    assert record["target_label"] == "Edema" and record["labels"] == list(LABELS)
    assert record["method"] == name.removesuffix("_no_conditioning")


def test_another_surrogate_architecture_travels_with_the_checkpoint(tmp_path):
    original = _pipeline(XMarkGenerator([4, 8, 16]), arch="vgg16_bn", size=32).eval()
    save_watermark(original, tmp_path / "vgg.pt")
    rebuilt = load_watermark(tmp_path / "vgg.pt")
    assert (
        rebuilt.surrogate.classifier.architecture["arch"] == "vgg16_bn" and rebuilt.cam_layer == "classifier.features"
    )


def test_an_unkeyed_default_key_seed_is_recorded_and_a_keyed_one_is_random():
    drawn = {XMarkGenerator([4, 8, 16], key_cells=16).config()["key_seed"] for _ in range(4)}
    assert len(drawn) > 1  # no guessable default key
    generator = XMarkGenerator([4, 8, 16], key_cells=16)
    again = XMarkGenerator(**{k: v for k, v in generator.config().items() if k != "_target_"})
    assert torch.equal(again.key, generator.key)  # the recorded seed rebuilds the same key


def test_files_that_are_not_watermark_checkpoints_are_refused_with_their_name(tmp_path):
    pipeline = _pipeline(XMarkGenerator([4, 8, 16]))
    torch.save(pipeline.state_dict(), tmp_path / "bare.pt")  # weights without a record
    with pytest.raises(ValueError, match=r"bare\.pt: not a watermark checkpoint \(no 'watermark' record"):
        load_watermark(tmp_path / "bare.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pt: not a readable PyTorch checkpoint"):
        load_watermark(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError, match=r"generator checkpoint not found: .*missing\.pt"):
        load_watermark(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_watermark(tmp_path)
    record = WatermarkRecord(pipeline, "No Finding", LABELS).state_dict()
    record["network"]["generator"]["_target_"] = "os.system"  # a record may build only the bundle's networks
    torch.save({"model": pipeline.state_dict(), "watermark": record}, tmp_path / "foreign.pt")
    outside = r"foreign\.pt: the watermark record names classes outside xmark_bundle\.networks"
    with pytest.raises(ValueError, match=outside):
        read_watermark_checkpoint(tmp_path / "foreign.pt")
    record = WatermarkRecord(pipeline, "No Finding", LABELS).state_dict()
    record["network"]["generator"]["channels"] = [4, 8, 32]  # weights that do not fit the recorded network
    torch.save({"model": pipeline.state_dict(), "watermark": record}, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match=r"mismatch\.pt: weights do not fit the recorded network"):
        load_watermark(tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="is not one of the labels"):
        WatermarkRecord(pipeline, "Fracture", LABELS)


def test_a_resumed_run_refuses_the_record_of_another_network():
    record = WatermarkRecord(_pipeline(XMarkGenerator([4, 8, 16])), "No Finding", LABELS)
    record.load_state_dict(record.state_dict())  # its own record: accepted
    other = WatermarkRecord(_pipeline(SSCLBWGenerator([4, 8, 16, 32, 64, 4])), "No Finding", LABELS)
    with pytest.raises(ValueError, match="describes another network"):
        record.load_state_dict(other.state_dict())
