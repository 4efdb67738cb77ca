"""The bundle inside MONAI Label 0.8.5, with the real package (``make test-monailabel``: its own environment, since
monailabel needs numpy < 2 and the bundle pins numpy 2; ``make test`` does not collect this folder).

``BundleInferTask`` takes ``preprocessing``, ``network_def`` with ``models/model.pt``, ``postprocessing``, adds its
``Restored`` and writes ``pred`` with its ITK writer; ``BundleTrainTask`` replaces ``train#dataset#data`` with its
datastore's ``{"image", "label"}`` pairs and adds a ``CheckpointLoader`` unless the config declares one.
"""

import hashlib
import json
import shutil
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
import torch
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.networks.checkpoint import save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.transforms.watermark import watermarked_path

ROOT = Path(__file__).resolve().parents[2]


def _stored(path: Path) -> np.ndarray:
    """A file's stored pixel values as rows x columns (pydicom for DICOM: ITK would apply the rescale)."""
    if path.suffix == ".dcm":
        return pydicom.dcmread(path).pixel_array
    return itk.array_from_image(itk.imread(str(path)))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("datastore")
    write_phantom_dataset(folder / "phantoms", n=8, seed=3, dicom_fraction=0.5, min_size=200, max_size=300)
    files = sorted((folder / "phantoms").rglob("*.*"))
    return {
        "png": next(p for p in files if p.suffix == ".png"),
        "dcm": next(p for p in files if p.suffix == ".dcm"),
    }


@pytest.fixture()
def bundle(tmp_path) -> Path:
    """A bundle root as MONAI Label gets it: configs and the owner's watermark in models/model.pt."""
    root = tmp_path / "xmark"
    shutil.copytree(ROOT / "configs", root / "configs")
    torch.manual_seed(0)
    generator = XMarkGenerator(channels=[4, 8, 16, 32, 64])
    with torch.no_grad():  # large weights: the residual uses the whole budget
        for p in generator.parameters():
            p.mul_(5.0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), 64)
    pipeline = WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=64)
    save_watermark(pipeline, root / "models" / "model.pt")
    return root


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_infer_task_returns_the_watermarked_file_on_the_source_grid(bundle, images, kind):
    source = images[kind]
    task = BundleInferTask(str(bundle), conf={})
    assert task.is_valid()
    result_file, _ = task({"image": str(source), "device": "cpu"})

    pred = _stored(Path(result_file))  # MONAI Label's Restored + Writer, as a client receives it
    original = _stored(source)
    assert pred.dtype == original.dtype and pred.shape == original.shape
    inference = bundle / "outputs" / "inference"  # inference.json's dataset_dir and output_dir
    released = watermarked_path(source, inference / "input", inference / "output")  # SaveWatermarkedd's copy
    np.testing.assert_array_equal(pred, _stored(released))
    benign01, meta = load_xray(source)
    marked01, _ = load_xray(released)
    change = np.abs(marked01 - benign01)
    assert 0 < change.max() <= 16 / 255 + 1e-3  # the budget, at full resolution
    assert (change > 0).mean() > 0.5  # the whole image carries the watermark, not a stretched letterbox


def test_infer_task_can_leave_saving_to_monai_label(bundle, images):
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["save_watermarked"] = False
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    result_file, _ = BundleInferTask(str(bundle), conf={})({"image": str(images["png"]), "device": "cpu"})
    assert Path(result_file).is_file() and not (bundle / "outputs").exists()


def _datastore(tmp_path: Path, images: dict[str, Path]) -> LocalDatastore:
    """MONAI Label's own datastore holding two images with final labels (as annotated in MONAI Label)."""
    store = tmp_path / "store"
    (store / "labels" / "final").mkdir(parents=True)
    for i in range(5):
        name = f"image{i}.png"
        shutil.copy(images["png"], store / name)
        shutil.copy(images["png"], store / "labels" / "final" / name)
    return LocalDatastore(str(store), extensions=("*.png",), auto_reload=False)


def test_train_task_never_replaces_the_owners_watermark(bundle, images, tmp_path):
    model = bundle / "models" / "model.pt"
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    task = BundleTrainTask(str(bundle), conf={})
    assert task.is_valid()
    request = {"model": "xmark", "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.2}
    with pytest.raises(SystemExit, match=r"FileExistsError: .*model\.pt already holds the trained xmark watermark"):
        task(request, _datastore(tmp_path, images))
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    handlers = task.bundle_config["train#handlers"]
    assert [h["_target_"] for h in handlers].count("CheckpointLoader") == 1  # ours: MONAI Label added none


def test_train_task_names_the_missing_target_flag(bundle, images, tmp_path):
    (bundle / "models" / "model.pt").unlink()  # a fresh bundle: nothing to protect
    task = BundleTrainTask(str(bundle), conf={})
    request = {"model": "xmark", "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.2}
    with pytest.raises(SystemExit, match=r"ValueError: train#dataset#data: 4 of 4 items have no is_target flag"):
        task(request, _datastore(tmp_path, images))
