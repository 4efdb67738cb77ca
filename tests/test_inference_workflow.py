"""configs/inference.json watermarks real files at full resolution; ckpt_export gives a matching model.ts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image
from pydicom.data import get_testdata_file

from bundle.data import load_xray
from bundle.data.xray_writer import quantisation_step
from bundle.networks.classifier import ResizedClassifier, build_classifier
from bundle.networks.generator import XMarkGenerator
from bundle.networks.pipeline import WatermarkPipeline

ROOT = Path(__file__).resolve().parents[1]
SIZE, CHANNELS = 64, [4, 8, 16, 32, 64]
OVERRIDES = {"image_size": SIZE, "generator_channels": CHANNELS}


def _pipeline(**key: object) -> WatermarkPipeline:
    torch.manual_seed(0)
    generator = XMarkGenerator(channels=CHANNELS, **key)
    with torch.no_grad():  # large weights so that the residual uses the whole budget
        for p in generator.parameters():
            p.mul_(5.0)
    return WatermarkPipeline(generator, ResizedClassifier(build_classifier("resnet18"), 224), "classifier.layer4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(_pipeline().state_dict(), path)
    return path


def test_inference_watermarks_real_cr_radiograph(tmp_path, checkpoint):
    source = Path(get_testdata_file("RG1_UNCR.dcm"))  # real CR chest film, MONOCHROME1, 15 bit, 1955 x 1841
    inputs = tmp_path / "in"
    (inputs / "chest").mkdir(parents=True)
    shutil.copy(source, inputs / "chest" / "cr.dcm")
    Image.fromarray((np.arange(90 * 70).reshape(90, 70) * 9).astype(np.uint16)).save(inputs / "small.png")
    before = (inputs / "chest" / "cr.dcm").read_bytes()

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(ROOT),
        dataset_dir=str(inputs),
        output_dir=str(tmp_path / "out"),
        ckpt_path=str(checkpoint),
        **OVERRIDES,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    workflow.run()

    out = tmp_path / "out" / "chest" / "cr.dcm"
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) == [
        "chest/cr.dcm",
        "small.png",
    ]
    assert (inputs / "chest" / "cr.dcm").read_bytes() == before  # source untouched
    ref, new = pydicom.dcmread(source), pydicom.dcmread(out)
    for element in ref:
        if element.tag != 0x7FE00010:
            assert new[element.tag].value == element.value, element.name
    assert {e.tag for e in new} == {e.tag for e in ref}
    assert new.PhotometricInterpretation == "MONOCHROME1" and new.BitsStored == ref.BitsStored
    assert new.pixel_array.shape == ref.pixel_array.shape == (1955, 1841)
    benign01, meta = load_xray(source)
    marked01, _ = load_xray(out)
    change = np.abs(marked01 - benign01).max()
    assert 0 < change <= 16 / 255 + quantisation_step(meta) + 1e-6
    assert not np.array_equal(new.pixel_array, ref.pixel_array)


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_exported_torchscript_matches_eager(tmp_path, checkpoint, keyed):
    key = {"key_cells": 128, "key_seed": 2, "key_pattern": "grating"} if keyed else {}
    if keyed:  # inference.json builds an unkeyed generator: the checkpoint's key must come along
        checkpoint = tmp_path / "keyed.pt"
        torch.save(_pipeline(**key).state_dict(), checkpoint)
    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts)]
    cmd += ["--ckpt_file", str(checkpoint), "--meta_file", "configs/metadata.json"]
    cmd += ["--config_file", "configs/inference.json", "--use_trace", "True", "--input_shape", f"[1,1,{SIZE},{SIZE}]"]
    cmd += ["--image_size", str(SIZE), "--generator_channels", json.dumps(CHANNELS)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)

    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"]
    eager = _pipeline(**key).eval()
    eager.load_state_dict(torch.load(checkpoint, weights_only=True))
    assert eager.generator.keyed == keyed
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=0)
