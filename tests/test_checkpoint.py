"""A watermark checkpoint rebuilds its module from its own record: method, architecture, budget, key, resolution."""

import warnings
import zipfile

import pytest
import torch

from xmark_bundle.data.labels import LABELS
from xmark_bundle.networks.checkpoint import (
    WatermarkRecord,
    load_watermark,
    record_digest,
    resave_watermark,
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
    _save_signed(pipeline, record, tmp_path / "foreign.pt")
    outside = r"foreign\.pt: the watermark record's entry 'network\.generator' names 'os\.system', which is not one"
    with pytest.raises(ValueError, match=outside):
        load_watermark(tmp_path / "foreign.pt")
    record = WatermarkRecord(pipeline, "No Finding", LABELS).state_dict()
    record["network"]["generator"]["channels"] = [4, 8, 32]  # weights that do not fit the recorded network
    _save_signed(pipeline, record, tmp_path / "mismatch.pt")
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


def _save_signed(pipeline: torch.nn.Module, record: dict, path) -> None:
    """Save ``record`` with ``pipeline``'s weights and a matching hash, as an attacker who read the code would."""
    weights = pipeline.state_dict()
    record = {k: v for k, v in record.items() if k != "sha256"}
    torch.save({"model": weights, "watermark": record | {"sha256": record_digest(record, weights)}}, path)


def _hostile_networks(marker) -> dict:
    """Records that ran code under MONAI's ConfigParser: an expression, a _requires_ entry, a reachable os.system."""
    touch = f"$__import__('pathlib').Path({str(marker)!r}).write_text('ran')"
    return {
        "expression": lambda net: net | {"image_size": touch + " and 64"},
        "requires": lambda net: net | {"_requires_": touch},
        "os_system": lambda net: (
            net
            | {"generator": {"_target_": "xmark_bundle.networks.checkpoint.os.system", "command": f"touch {marker}"}}
        ),
        "eval_in_list": lambda net: net | {"generator": net["generator"] | {"channels": [4, touch, 16]}},
        "reference": lambda net: net | {"cam_layer": "@_meta_"},
        "disabled": lambda net: net | {"surrogate": net["surrogate"] | {"_disabled_": True}},
        "plain_dict": lambda net: net | {"surrogate": {"size": 48}},
        "importlib_path": lambda net: (
            net | {"surrogate": net["surrogate"] | {"_target_": "xmark_bundle.networks.classifier.torch.load"}}
        ),
    }


HOSTILE = list(_hostile_networks("x"))
HOSTILE_ENTRY = {
    "expression": r"'network\.image_size' is a config expression",
    "requires": r"'network' has the key '_requires_'",
    "os_system": r"'network\.generator' names 'xmark_bundle\.networks\.checkpoint\.os\.system', which is not one",
    "eval_in_list": r"'network\.generator\.channels\[1\]' is a config expression",
    "reference": r"'network\.cam_layer' is a config expression",
    "disabled": r"'network\.surrogate' has the key '_disabled_'",
    "plain_dict": r"'network\.surrogate' is a mapping without a _target_",
    "importlib_path": r"'network\.surrogate' names 'xmark_bundle\.networks\.classifier\.torch\.load'",
}


@pytest.mark.parametrize("signed", [True, False], ids=["with_hash", "format_1"])
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_record_runs_nothing_and_is_refused_naming_file_and_entry(kind, signed, tmp_path, monkeypatch):
    """A checkpoint is data: no expression, _requires_ or reachable os.system runs, whether or not it has a hash."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran.txt"
    pipeline = _pipeline(XMarkGenerator([4, 8, 16]))
    record = WatermarkRecord(pipeline, "No Finding", LABELS).state_dict()
    record["network"] = _hostile_networks(marker)[kind](record["network"])
    path = tmp_path / "hostile.pt"
    if signed:
        _save_signed(pipeline, record, path)
    else:  # a record written before the hash existed
        plain = {k: v for k, v in record.items() if k != "sha256"} | {"format": 1}
        torch.save({"model": pipeline.state_dict(), "watermark": plain}, path)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"hostile\.pt: .*" + HOSTILE_ENTRY[kind]):
        warnings.simplefilter("ignore")
        load_watermark(path)
    assert not marker.exists() and not (tmp_path / f"touch {marker}").exists()


def _flip_weight_byte(path) -> None:
    """Flip one byte inside the stored data of the checkpoint's largest tensor (torch stores tensors uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as stream:
        stream.seek(entry.header_offset + 26)
        name_length, extra_length = (int.from_bytes(stream.read(2), "little") for _ in range(2))
        offset = entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2
        stream.seek(offset)
        byte = stream.read(1)[0]
        stream.seek(offset)
        stream.write(bytes([byte ^ 0x10]))


def test_a_flipped_byte_in_the_weights_fails_on_load(tmp_path):
    pipeline = _pipeline(XMarkGenerator([4, 8, 16]))
    save_watermark(pipeline, tmp_path / "model.pt")
    before = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    _flip_weight_byte(tmp_path / "model.pt")
    after = torch.load(tmp_path / "model.pt", weights_only=True)["model"]  # torch itself reads the damaged file
    assert sum(not torch.equal(before[k], after[k]) for k in before) == 1
    with pytest.raises(ValueError, match=r"model\.pt: the watermark record's sha256 does not match"):
        load_watermark(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt: the watermark record's sha256 does not match"):
        watermark_record(tmp_path / "model.pt")


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r | {"epsilon": 1.0},
        lambda r: r | {"target_label": "Edema"},
        lambda r: r | {"network": r["network"] | {"image_size": 32}},
        lambda r: r | {"network": r["network"] | {"generator": r["network"]["generator"] | {"eps": 0.5}}},
    ],
    ids=["epsilon", "target_label", "image_size", "generator_eps"],
)
def test_a_changed_setting_fails_on_load(change, tmp_path):
    pipeline = _pipeline(XMarkGenerator([4, 8, 16]))
    save_watermark(pipeline, tmp_path / "model.pt")
    whole = torch.load(tmp_path / "model.pt", weights_only=True)
    whole["watermark"] = change(whole["watermark"])
    torch.save(whole, tmp_path / "changed.pt")
    with pytest.raises(ValueError, match=r"changed\.pt: the watermark record's sha256 does not match"):
        load_watermark(tmp_path / "changed.pt")


def test_a_changed_weight_fails_on_load(tmp_path):
    pipeline = _pipeline(XMarkGenerator([4, 8, 16]))
    save_watermark(pipeline, tmp_path / "model.pt")
    whole = torch.load(tmp_path / "model.pt", weights_only=True)
    whole["model"]["generator.key"] = torch.ones(3)  # even a buffer: the key is part of what the hash covers
    torch.save(whole, tmp_path / "rekeyed.pt")
    with pytest.raises(ValueError, match=r"rekeyed\.pt: the watermark record's sha256 does not match"):
        load_watermark(tmp_path / "rekeyed.pt")


def test_a_format_1_checkpoint_loads_safely_with_a_warning_and_resaves_with_its_hash(tmp_path):
    """Checkpoints written before the hash load through the same safe builder, say they are unchecked, and re-save."""
    pipeline = _pipeline(XMarkGenerator([4, 8, 16])).eval()
    record = {k: v for k, v in WatermarkRecord(pipeline, "Edema", LABELS).state_dict().items() if k != "sha256"}
    torch.save({"model": pipeline.state_dict(), "watermark": record | {"format": 1}}, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match=r"old\.pt: a watermark checkpoint of format 1 carries no hash"):
        rebuilt = load_watermark(tmp_path / "old.pt")
    x = torch.rand(1, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pipeline(x))
    resave_watermark(tmp_path / "old.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning any more
        again = watermark_record(tmp_path / "old.pt")
    assert again["format"] == 2 and again["target_label"] == "Edema" and len(again["sha256"]) == 64


def test_the_checkpoint_saver_path_writes_the_hash(tmp_path):
    """configs/train.json saves {'model': pipeline, 'watermark': WatermarkRecord} through Ignite's Checkpoint."""
    from ignite.handlers import Checkpoint, DiskSaver

    pipeline = _pipeline(XMarkGenerator([4, 8, 16]))
    to_save = {"model": pipeline, "watermark": WatermarkRecord(pipeline, "Edema", LABELS)}
    Checkpoint(to_save, DiskSaver(str(tmp_path), require_empty=False), filename_prefix="x")(_engine())
    (saved,) = tmp_path.glob("x*.pt")
    record = watermark_record(saved)
    assert record["sha256"] == record_digest(record, pipeline.state_dict())
    with torch.no_grad():
        next(pipeline.generator.parameters()).add_(1.0)  # the saved hash is of the weights at saving time
    assert record["sha256"] != record_digest(record, pipeline.state_dict())


def _engine():
    """An Ignite engine at iteration 1, as a handler sees it."""
    from ignite.engine import Engine

    engine = Engine(lambda e, b: None)
    engine.state.iteration = engine.state.epoch = 1
    return engine
