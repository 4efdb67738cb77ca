"""The bundle inside MONAI Label 0.8.5, with the real package (``make test-monailabel``: its own environment, since
monailabel needs numpy < 2 and the bundle pins numpy 2; ``make test`` does not collect this folder).

``BundleInferTask`` takes ``preprocessing``, ``network_def`` with ``models/model.pt``, ``postprocessing``, adds its
``Restored`` and writes ``pred`` with its ITK writer; ``BundleTrainTask`` replaces ``train#dataset#data`` with its
datastore's ``{"image", "label"}`` pairs and adds a ``CheckpointLoader`` unless the config declares one.

The app in ``monailabel_app/`` runs in the real server (``monailabel start_server`` on 127.0.0.1): a 15-bit MONOCHROME1
DICOM goes through MONAI Label's DICOMweb datastore (dicomweb-client's ``DICOMfileClient`` serves a folder of ``.dcm``
files as a DICOMweb server would), reaches the task as a series folder, and comes back with the pixels that
``configs/inference.json`` releases for the same file, in the source's header. Its multi-GPU training runs a real
``torchrun`` (two processes, gloo). The StealthMark bundle (``stealthmark/``): ``BundleInferTask`` returns the mask that
its ``inference.json`` writes, and ``BundleTrainTask`` stops before replacing the owner's model.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
import torch
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.utils.app import app_instance
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import md5_digest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.networks.checkpoint import save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.stealthmark.networks import build_segmentation_network
from xmark_bundle.stealthmark.records import write_records
from xmark_bundle.transforms.watermark import watermarked_path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "monailabel_app"
BUDGET = 16 / 255  # the owner's budget: the largest change of a pixel, as a share of the data's range
BITS = 15
SERVER_START_S = 300


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


def _make_bundle(root: Path) -> Path:
    """A bundle root as MONAI Label gets it: configs, the package and the owner's watermark in models/model.pt."""
    shutil.copytree(ROOT / "configs", root / "configs")
    (root / "xmark_bundle").symlink_to(ROOT / "xmark_bundle", target_is_directory=True)
    torch.manual_seed(0)
    generator = XMarkGenerator(channels=[4, 8, 16, 32, 64])
    with torch.no_grad():  # large weights: the residual uses the whole budget
        for p in generator.parameters():
            p.mul_(5.0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), 64)
    pipeline = WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=64)
    save_watermark(pipeline, root / "models" / "model.pt")
    return root


@pytest.fixture()
def bundle(tmp_path) -> Path:
    return _make_bundle(tmp_path / "xmark")


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


# --- the app in monailabel_app/, in the real server ---


def _write_chest_dicom(path: Path, image01: np.ndarray, series_uid: str, study_uid: str) -> Path:
    """A 15-bit MONOCHROME1 DX chest radiograph without a VOI window: [0, 1] is the whole 15-bit range."""
    stored = np.round((1.0 - image01) * (2**BITS - 1)).astype(np.uint16)  # MONOCHROME1 stores bone dark
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = "phantom", "Phantom^One", "20260101", "120000"
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "DX", "CHEST", 1, 1
    ds.set_pixel_data(stored, "MONOCHROME1", BITS)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post(url: str, timeout: float = 300) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _released(bundle: Path, source: Path, out: Path) -> Path:
    """configs/inference.json run as a command on a folder holding only ``source``: the file it releases."""
    dataset = out / "input"
    dataset.mkdir(parents=True)
    shutil.copy2(source, dataset / source.name)
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--dataset_dir", str(dataset), "--output_dir", str(out / "output"),
         "--progress", "False"],
        check=True, cwd=bundle, env={**os.environ, "PYTHONPATH": str(bundle)}, capture_output=True, timeout=600,
    )  # fmt: skip
    return out / "output" / source.name


def _check_budget(source: Path, marked: Path) -> int:
    """The largest change in stored units; it keeps the budget of the 15-bit range and marks most pixels."""
    change = np.abs(_stored(marked).astype(np.int64) - _stored(source).astype(np.int64))
    assert 0 < change.max() <= BUDGET * (2**BITS - 1) + 1  # + 1: rounding to stored units
    assert (change > 0).mean() > 0.5
    return int(change.max())


@pytest.fixture(scope="module")
def server(tmp_path_factory, images):
    """``monailabel start_server`` with the app on a folder of DICOM files served through the DICOMweb datastore."""
    folder = tmp_path_factory.mktemp("server")
    bundle = _make_bundle(folder / "xmark")
    app = folder / "app"
    app.mkdir()
    shutil.copy(APP / "main.py", app / "main.py")
    image01, _ = load_xray(images["png"])
    study = generate_uid()
    single, double = generate_uid(), generate_uid()
    dicoms = folder / "dicoms"
    source = _write_chest_dicom(dicoms / "chest.dcm", image01, single, study)
    for view in ("pa", "lateral"):  # one series of two images: not one radiograph
        _write_chest_dicom(dicoms / "two" / f"{view}.dcm", image01, double, study)
    port = _free_port()
    log = folder / "server.log"
    cmd = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(dicoms),
        "--host", "127.0.0.1", "--port", str(port),
        "--conf", "bundle", str(bundle), "--conf", "datastore", "dicomfile",
    ]  # fmt: skip
    env = {**os.environ, "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(folder / "cache")}
    # what the monailabel script runs, without the PYTHONPATH it derives from its own location (here the repository
    # root, two folders above .venv-monailabel/bin): the app finds the package in the bundle root itself
    env.pop("PYTHONPATH", None)
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(f"{url}/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"monailabel start_server did not answer in {SERVER_START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield {"url": url, "bundle": bundle, "source": source, "single": single, "double": double, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_server_starts_and_lists_the_bundle(server):
    status, body = _get(f"{server['url']}/info/")
    assert status == 200
    info = json.loads(body)
    assert "xmark" in info["models"] and "xmark" in info["trainers"]


def test_dicom_series_through_the_server_gets_the_release_pixels_and_header(server, tmp_path):
    status, body = _post(f"{server['url']}/infer/xmark?image={server['single']}&output=image")
    assert status == 200, body[-2000:]
    returned = tmp_path / "returned.dcm"
    returned.write_bytes(body)
    assert "Input is a Directory; Consider it as DICOM" in server["log"].read_text()  # the series folder route

    source = server["source"]
    released = _released(server["bundle"], source, tmp_path / "inference")
    np.testing.assert_array_equal(_stored(returned), _stored(released))  # what inference.json releases
    ds, original = pydicom.dcmread(returned), pydicom.dcmread(source)
    assert ds.PhotometricInterpretation == original.PhotometricInterpretation == "MONOCHROME1"
    assert ds.BitsStored == BITS and ds.PatientID == original.PatientID  # the source's header
    assert ds.StudyInstanceUID == original.StudyInstanceUID and ds.SeriesInstanceUID == original.SeriesInstanceUID
    # a derived image, as inference.json writes it: sent back to the PACS it does not collide with its source
    assert ds.SOPInstanceUID == pydicom.dcmread(released).SOPInstanceUID != original.SOPInstanceUID
    print(f"DICOMweb series route: largest change {_check_budget(source, returned)} stored units of {2**BITS - 1}")


def test_series_of_two_images_is_refused_naming_the_folder(server):
    status, body = _post(f"{server['url']}/infer/xmark?image={server['double']}&output=image")
    assert status == 422
    detail = json.loads(body)["detail"]
    assert f"{server['double']}: is a directory holding 2 files and 0 folders, not an image file" in detail


def test_app_on_a_local_dicom_folder_gets_the_release_pixels(bundle, images, tmp_path, monkeypatch):
    """The app's local datastore (``*.dcm`` listed): the task gets the file itself."""
    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)  # no watcher left on tmp_path
    image01, _ = load_xray(images["png"])
    studies = tmp_path / "studies"
    source = _write_chest_dicom(studies / "chest.dcm", image01, generate_uid(), generate_uid())
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(APP / "main.py", app_dir / "main.py")
    app = app_instance(str(app_dir), str(studies), {"bundle": str(bundle)})  # MONAI Label's own app loader
    assert app.datastore().list_images() == ["chest"]
    result = app.infer({"model": "xmark", "image": "chest", "device": "cpu"})
    returned = Path(result["file"])
    np.testing.assert_array_equal(_stored(returned), _stored(_released(bundle, source, tmp_path / "inference")))
    assert pydicom.dcmread(returned).PhotometricInterpretation == "MONOCHROME1"
    print(f"local DICOM route: largest change {_check_budget(source, returned)} stored units of {2**BITS - 1}")


def test_app_returns_a_jpegs_release_within_the_budget(bundle, images, tmp_path, monkeypatch):
    """A JPEG source: the app returns the file inference.json writes, whose residual was shrunk where the lossy
    re-encoding broke the budget, not ``pred`` encoded again (which would move pixels past it)."""
    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    image01, _ = load_xray(images["png"])
    studies = tmp_path / "studies"
    studies.mkdir()
    source = studies / "chest.jpg"
    Image.fromarray(np.round(image01 * 255).astype(np.uint8)).save(source, quality=90)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(APP / "main.py", app_dir / "main.py")
    app = app_instance(str(app_dir), str(studies), {"bundle": str(bundle)})
    result = app.infer({"model": "xmark", "image": "chest", "device": "cpu"})
    returned = Path(result["file"])
    released = _released(bundle, source, tmp_path / "inference")
    assert returned.read_bytes() == released.read_bytes()
    change = np.abs(load_xray(returned)[0] - load_xray(source)[0])
    assert 0 < change.max() <= BUDGET + 1 / 255 + 1e-6  # + 1 / 255: rounding to 8-bit stored values
    print(f"JPEG route: largest change {change.max() * 255:.0f} of 255")


def test_app_without_the_release_file_writes_lossless_pixels_and_refuses_lossy(bundle, images, tmp_path, monkeypatch):
    """``save_watermarked: false``: the app writes ``pred`` itself, the release's pixels for a PNG; a JPEG would be
    re-encoded without the budget check, so it is refused (HTTP 422) naming the file and the setting."""
    from fastapi import HTTPException

    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)
    released = _released(bundle, images["png"], tmp_path / "inference")  # before the setting changes
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["save_watermarked"] = False
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(images["png"], studies / "chest.png")
    image01, _ = load_xray(images["png"])
    Image.fromarray(np.round(image01 * 255).astype(np.uint8)).save(studies / "lossy.jpg", quality=90)
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(APP / "main.py", app_dir / "main.py")
    app = app_instance(str(app_dir), str(studies), {"bundle": str(bundle)})
    result = app.infer({"model": "xmark", "image": "chest", "device": "cpu"})
    np.testing.assert_array_equal(_stored(Path(result["file"])), _stored(released))
    assert not (bundle / "outputs").exists()
    with pytest.raises(HTTPException) as refused:
        app.infer({"model": "xmark", "image": "lossy", "device": "cpu"})
    assert refused.value.status_code == 422
    assert "lossy.jpg" in refused.value.detail and "save_watermarked true" in refused.value.detail


def _app_module():
    spec = importlib.util.spec_from_file_location("xmark_monailabel_app", APP / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_multi_gpu_train_runs_torchrun_on_the_package_and_reports_its_failure(bundle, images, tmp_path, monkeypatch):
    """Two torchrun processes (gloo on CPU) import xmark_bundle from the bundle root and stop at the guard that
    keeps the owner's watermark; their failure reaches the caller instead of "Training Finished"."""
    monkeypatch.delenv("PYTHONPATH", raising=False)  # only the task's own PYTHONPATH lets them import the package
    model = bundle / "models" / "model.pt"
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    task = _app_module().XMarkTrainTask(str(bundle), {})
    request = {"model": "xmark", "max_epochs": 1, "device": "cpu", "force_multi_gpu": True, "gpus": "0,1"}
    request["val_split"] = 0.2
    with pytest.raises(RuntimeError, match=r"(?s)torchrun exit status 1\).*already holds the trained xmark watermark"):
        task(request, _datastore(tmp_path, images))
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before


# --- the StealthMark segmentation bundle (stealthmark/) ---


@pytest.fixture()
def stealthmark_bundle(tmp_path, images) -> Path:
    """The StealthMark bundle root as MONAI Label gets it: configs, the package, the owner's model.pt and records.

    A small seeded U-Net whose output bias is set so that about half of a phantom's pixels are lung: a mask with
    both values, so that a transposed or shifted one cannot pass."""
    root = tmp_path / "stealthmark"
    shutil.copytree(ROOT / "stealthmark" / "configs", root / "configs")
    (root / "xmark_bundle").symlink_to(ROOT / "xmark_bundle", target_is_directory=True)
    torch.manual_seed(0)
    network = build_segmentation_network("unet", 64, 8)
    image01, _ = load_xray(images["png"])
    with torch.no_grad():
        logits = network(torch.nn.functional.interpolate(torch.as_tensor(image01)[None, None], size=(64, 64)))
        [p for n, p in network.named_parameters() if n.endswith("bias") and p.numel() == 1][-1].sub_(logits.median())
    (root / "models").mkdir()
    torch.save({"model": network.state_dict()}, root / "models" / "model.pt")
    write_records(root / "models", "unet", 64, 8, "stealthmark", "patch", 7, 0.05, 0.5, 0)
    return root


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_stealthmark_infer_task_returns_the_mask_inference_json_writes(stealthmark_bundle, images, kind, tmp_path):
    source = images[kind]
    task = BundleInferTask(str(stealthmark_bundle), conf={})
    assert task.is_valid()
    result_file, _ = task({"image": str(source), "device": "cpu"})
    served = _stored(Path(result_file)).squeeze()  # MONAI Label's Restored + Writer: label 1 = lung

    dataset = tmp_path / "input"
    dataset.mkdir()
    shutil.copy2(source, dataset / source.name)
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(stealthmark_bundle / "configs" / "inference.json"), "--bundle_root", str(stealthmark_bundle),
         "--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "output"), "--device", "cpu"],
        check=True, cwd=stealthmark_bundle, env={**os.environ, "PYTHONPATH": str(stealthmark_bundle)},
        capture_output=True, timeout=600,
    )  # fmt: skip
    written = np.asarray(Image.open(tmp_path / "output" / f"{source.stem}_lung.png"))
    assert served.dtype == np.uint8 and served.shape == written.shape == load_xray(source)[0].shape
    np.testing.assert_array_equal(served.astype(np.int64) * 255, written)
    assert 0.05 < served.mean() < 0.95


def test_stealthmark_train_task_never_replaces_the_owners_model(stealthmark_bundle, images, tmp_path):
    models = stealthmark_bundle / "models"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in models.iterdir()}
    task = BundleTrainTask(str(stealthmark_bundle), conf={})
    assert task.is_valid()
    request = {"model": "stealthmark", "max_epochs": 1, "device": "cpu", "multi_gpu": False, "val_split": 0.2}
    match = r"FileExistsError: .*model\.pt already holds a trained segmentation model \(method stealthmark, trigger"
    with pytest.raises(SystemExit, match=match):
        task(request, _datastore(tmp_path, images))
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in models.iterdir()} == before


def test_app_on_a_dicomweb_url_hands_the_task_the_series_not_monai_labels_nifti(bundle, images, tmp_path, monkeypatch):
    """An http DICOMweb datastore, its series already in MONAI Label's cache (no DICOMweb server reachable here):
    with MONAI Label's default conversion the task would get a uint16 NIfTI without Bits Stored; the app's gets the
    series folder and returns the DICOM that inference.json releases."""
    url = "http://127.0.0.1:9/dicomweb"  # nothing answers: every image must come from the cache
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI", True)  # MONAI Label's default
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "cache"))
    series = generate_uid()
    cached = tmp_path / "cache" / md5_digest(url) / series / "1.dcm"  # where DICOMWebDatastore downloads a series
    source = _write_chest_dicom(cached, load_xray(images["png"])[0], series, generate_uid())
    app_dir = tmp_path / "app"
    (app_dir / "bin").mkdir(parents=True)
    for tool in ("itkimage2segimage", "itkimage2segimage.exe"):  # MONAI Label would download dcmqi (DICOM SEG) here
        (app_dir / "bin" / tool).touch()
    shutil.copy(APP / "main.py", app_dir / "main.py")
    app = app_instance(str(app_dir), url, {"bundle": str(bundle)})
    result = app.infer({"model": "xmark", "image": series, "device": "cpu"})
    returned = Path(result["file"])
    assert returned.suffix == ".dcm" and pydicom.dcmread(returned).PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(_stored(returned), _stored(_released(bundle, source, tmp_path / "inference")))
    print(f"DICOMweb (http) route: largest change {_check_budget(source, returned)} stored units of {2**BITS - 1}")
