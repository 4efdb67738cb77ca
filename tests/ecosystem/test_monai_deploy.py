"""The bundle inside MONAI Deploy App SDK 4.0, with the real SDK and Holoscan (``make test-deploy``: its own
environment, since the SDK's Triton client needs protobuf < 7; ``make test`` does not collect this file).

scripts/export_deploy.py writes ``model.ts`` (the scripted network, configs ``inference`` and ``deploy`` with the
checkpoint's image size and budget as numbers); scripts/deploy_app.py runs the SDK's DICOM loader and series
selector, our X-ray loader, the SDK's ``MonaiBundleInferenceOperator`` on ``model.ts`` and a preview writer.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import run as bundle_run
from monai.deploy.operators.monai_bundle_inference_operator import get_bundle_config
from PIL import Image

from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.networks.checkpoint import save_watermark, watermark_record
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """The owner's checkpoint, its Deploy export and two phantom DICOM radiographs."""
    folder = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    generator = XMarkGenerator(channels=[4, 8, 16, 32, 64])
    with torch.no_grad():  # large weights: the residual uses the whole budget
        for p in generator.parameters():
            p.mul_(5.0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    pipeline = WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)
    save_watermark(pipeline, folder / "owner" / "model.pt")
    export = [sys.executable, "scripts/export_deploy.py", "--ckpt", str(folder / "owner" / "model.pt")]
    export += ["--out", str(folder / "map" / "model.ts")]
    done = subprocess.run(export, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    write_phantom_dataset(folder / "phantoms", n=6, seed=3, dicom_fraction=1.0, min_size=200, max_size=300)
    dicoms = sorted((folder / "phantoms").rglob("*.dcm"))
    return {"ckpt": folder / "owner" / "model.pt", "ts": folder / "map" / "model.ts", "dicoms": dicoms}


def _run_app(exported: dict[str, Path], inputs: list[Path], work: Path) -> subprocess.CompletedProcess:
    """scripts/deploy_app.py as a MAP runs it, from a folder that holds neither the bundle nor models/model.pt."""
    (work / "in").mkdir(parents=True)
    for i, source in enumerate(inputs):  # the phantoms' files share their names (view1_frontal.dcm)
        shutil.copy2(source, work / "in" / (source.name if i == 0 else f"{i}_{source.name}"))
    cmd = [sys.executable, str(ROOT / "scripts" / "deploy_app.py"), "-i", "in", "-o", "out", "-m", str(exported["ts"])]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)


def test_the_operator_reads_its_settings_from_model_ts_alone(exported):
    parser = get_bundle_config(str(exported["ts"]), ["inference", "deploy"])
    record = watermark_record(exported["ckpt"])
    assert parser.get("image_size") == record["image_size"] == SIZE  # numbers, not @network_def (models/model.pt)
    assert parser.get("epsilon") == pytest.approx(record["epsilon"])
    names = [t["_target_"] for t in parser.get("postprocessing")["transforms"]]
    assert names == ["xmark_bundle.transforms.SaveWatermarkedd", "ScaleIntensityRanged"]


def test_the_app_writes_the_marked_dicom_that_inference_json_writes(exported, tmp_path):
    source = exported["dicoms"][0]
    done = _run_app(exported, [source], tmp_path / "map")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    marked = tmp_path / "map" / "out" / source.name

    # the bundle's own inference workflow on the same file with the same checkpoint
    bundle_run(
        config_file=str(ROOT / "configs" / "inference.json"),
        bundle_root=str(ROOT),
        dataset_dir=str(tmp_path / "map" / "in"),
        output_dir=str(tmp_path / "reference"),
        ckpt_path=str(exported["ckpt"]),
        progress=False,
    )
    assert marked.read_bytes() == (tmp_path / "reference" / source.name).read_bytes()

    written, original = pydicom.dcmread(marked), pydicom.dcmread(source)
    assert written.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    # a derived image (sent back to the PACS it would otherwise collide with its source): its own SOP Instance UID,
    # the source referenced; the same UID as inference.json's (the bytes above are equal)
    assert written.SOPInstanceUID != original.SOPInstanceUID
    assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
    assert written.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert written.ImageType[0] == "DERIVED"
    assert written.pixel_array.dtype == original.pixel_array.dtype and written.pixel_array.shape == (
        original.pixel_array.shape
    )
    change = np.abs(load_xray(marked)[0] - load_xray(source)[0])
    epsilon = watermark_record(exported["ckpt"])["epsilon"]
    assert 0 < change.max() <= epsilon + 1e-3 and (change > 0).mean() > 0.5  # the whole image, within the budget

    preview = np.asarray(Image.open(tmp_path / "map" / "out" / f"{source.stem}_preview.png"))
    assert preview.dtype == np.uint8 and preview.shape == (SIZE, SIZE) and preview.max() > 100


def test_the_app_refuses_more_than_one_radiograph_and_writes_nothing(exported, tmp_path):
    done = _run_app(exported, exported["dicoms"][:2], tmp_path / "map")
    assert done.returncode != 0
    assert "the input holds 2 DICOM images" in done.stdout + done.stderr
    assert not list((tmp_path / "map").glob("out/*.dcm"))


def test_metadata_declares_what_the_operator_maps(exported):
    """The operator's inputs and outputs come from metadata's network_data_format: one image in, pred out."""
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())["network_data_format"]
    assert list(meta["inputs"]) == ["image"] and list(meta["outputs"]) == ["pred"]
    assert meta["inputs"]["image"]["num_channels"] == 1 and meta["outputs"]["pred"]["type"] == "image"
