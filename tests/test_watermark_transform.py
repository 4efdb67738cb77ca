"""Tests for xmark_bundle.transforms.watermark: residual mapping to full resolution and the postprocessing transform."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.transforms import Compose
from PIL import Image
from pydicom.data import get_testdata_file

from xmark_bundle.data import LoadXRayd, XRayWriteError, load_xray
from xmark_bundle.transforms import (
    ResizeLongestPadd,
    SaveWatermarkedd,
    apply_watermark,
    budget_scale,
    letterbox,
    letterbox_geometry,
    unletterbox,
    watermarked_path,
)

EPS = 16 / 255


def gradient_png(path: Path, shape: tuple[int, int], dtype=np.uint16) -> Path:
    """A smooth 16-bit grey PNG well inside the intensity range, so no pixel clips when the watermark is added."""
    rows, cols = np.meshgrid(np.linspace(0.2, 0.5, shape[0]), np.linspace(0.0, 0.3, shape[1]), indexing="ij")
    Image.fromarray(((rows + cols) * np.iinfo(dtype).max).astype(dtype)).save(path)
    return path


def model_inputs(path: Path, size: int) -> tuple[torch.Tensor, dict]:
    image = load_xray(path)[0]
    geometry = letterbox_geometry(image.shape, size)
    return letterbox(torch.from_numpy(image)[None], geometry), geometry


def test_residual_lands_on_the_full_resolution_grid_with_orientation(tmp_path):
    source = gradient_png(tmp_path / "wide.png", (60, 150))  # non-square: padded above and below
    benign, geometry = model_inputs(source, 64)
    top, bottom, left, right = geometry["pad"]
    assert top > 0 and bottom > 0 and left == right == 0
    residual = torch.zeros_like(benign)
    residual[..., : 64 // 2] = EPS / 2  # left half brighter, right half darker, padding rows random
    residual[..., 64 // 2 :] = -EPS / 2
    residual[..., :top, :] = torch.rand(1, top, 64) * EPS
    report = apply_watermark(source, benign + residual, benign, geometry, EPS, tmp_path / "out" / "wide.png")
    change = load_xray(report["path"])[0].astype(np.float64) - load_xray(source)[0]
    step = report["quantisation_step01"]
    assert change.shape == (60, 150)
    np.testing.assert_allclose(change[:, :70], EPS / 2, atol=step)  # the padding did not leak into the top rows
    np.testing.assert_allclose(change[:, 80:], -EPS / 2, atol=step)
    assert report["budget_ok"] and report["max_abs_change01"] <= EPS / 2 + step


def test_residual_is_clamped_to_epsilon(tmp_path):
    source = gradient_png(tmp_path / "tall.png", (90, 40))
    benign, geometry = model_inputs(source, 32)
    report = apply_watermark(source, (benign + 3 * EPS)[0], benign[0], geometry, EPS, tmp_path / "o" / "tall.png")
    change = load_xray(report["path"])[0].astype(np.float64) - load_xray(source)[0]
    np.testing.assert_allclose(change, EPS, atol=report["quantisation_step01"])  # 2-D inputs accepted too


def test_apply_watermark_refuses_bad_inputs(tmp_path):
    source = gradient_png(tmp_path / "x.png", (30, 20))
    benign, geometry = model_inputs(source, 16)
    with pytest.raises(XRayWriteError, match=r"x\.png: refusing to overwrite the source"):
        apply_watermark(source, benign, benign, geometry, EPS, tmp_path / "x.png")
    other = letterbox_geometry((20, 30), 16)
    with pytest.raises(XRayWriteError, match=r"x\.png: is 30x20, but the geometry is for \(20, 30\)"):
        apply_watermark(source, benign, benign, other, EPS, tmp_path / "o" / "x.png")
    with pytest.raises(ValueError, match="epsilon must be in"):
        apply_watermark(source, benign, benign, geometry, 0.0, tmp_path / "o" / "x.png")
    with pytest.raises(ValueError, match="shapes differ"):
        apply_watermark(source, benign[..., :8], benign, geometry, EPS, tmp_path / "o" / "x.png")
    assert not (tmp_path / "o").exists()


def test_save_watermarkedd_in_a_monai_pipeline(tmp_path):
    dataset_dir, output_dir = tmp_path / "data", tmp_path / "released"
    (dataset_dir / "p1" / "s1").mkdir(parents=True)
    (dataset_dir / "p2").mkdir()
    projection = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # a real signed 16-bit file, relabelled DX
    projection.Modality = "DX"
    projection.save_as(dataset_dir / "p2" / "dx.dcm")
    files = [
        gradient_png(dataset_dir / "p1" / "s1" / "view1_frontal.png", (70, 50)),
        dataset_dir / "p2" / "dx.dcm",
        dataset_dir / "p2" / "scan.nii.gz",
    ]
    nib.save(nib.Nifti1Image(np.arange(40 * 30, dtype=np.int16).reshape(40, 30), np.eye(4)), files[2])

    preprocessing = Compose([LoadXRayd("image"), ResizeLongestPadd("image", spatial_size=32)])
    postprocessing = SaveWatermarkedd("pred", output_dir=output_dir, dataset_dir=dataset_dir, epsilon=EPS)
    loader = DataLoader(Dataset([{"image": str(f)} for f in files], transform=preprocessing), batch_size=3)
    batch = next(iter(loader))
    pattern = torch.sign(torch.randn(batch["image"].shape, generator=torch.Generator().manual_seed(0)))
    batch["pred"] = (batch["image"] + EPS * pattern).clamp(0, 1)  # stands in for the generator's output
    outputs = [postprocessing(item) for item in decollate_batch(batch)]

    for source, item, benign, pred in zip(files, outputs, decollate_batch(batch["image"]), batch["pred"], strict=True):
        released = output_dir / source.relative_to(dataset_dir)
        report = item["watermark"]
        assert report["path"] == str(released) and report["source"] == str(source)
        assert report["budget_ok"] and 0 < report["max_abs_change01"]
        image, meta = load_xray(released)
        source_image, source_meta = load_xray(source)
        assert image.shape == source_image.shape and meta.format == source_meta.format
        # the file is the source plus the known 32 px residual, its padding cropped and resized to the file's grid,
        # scaled to the range the data occupy: the PNG fills its 16 bits, CT_small's values (16-bit container) fit
        # 14 signed bits and the NIfTI's (int16) 12: a quarter and a sixteenth of the window
        residual = unletterbox((pred - benign).as_tensor()[None], benign.meta["xmark_geometry"])[0, 0].numpy()
        scale = budget_scale(source_meta)
        assert scale == pytest.approx({".png": 1.0, ".dcm": 16383 / 65535, ".gz": 4095 / 65535}[source.suffix])
        expected = np.clip(source_image.astype(np.float64) + scale * residual, 0, 1)
        error = np.abs(image.astype(np.float64) - expected).max()
        # half a stored unit of rounding, plus one where the whole-unit budget (stored_budget) rounds down
        assert error <= 1.5 * report["quantisation_step01"] + 1e-5, (source.name, error)
        assert report["max_change_of_range"] <= EPS
        assert (meta.stored_dtype, meta.photometric) == (source_meta.stored_dtype, source_meta.photometric)
    written, original = pydicom.dcmread(output_dir / "p2" / "dx.dcm"), pydicom.dcmread(files[1])
    # by default a derived image: its own SOP Instance UID, referencing the source's (a PACS keeps both)
    assert written.SOPInstanceUID != original.SOPInstanceUID
    assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
    assert written.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert written.ImageType[0] == "DERIVED" and list(written.ImageType[1:]) == list(original.ImageType[1:])
    assert outputs[1]["watermark"]["format"] == "dicom"


def _dicom_item(tmp_path: Path) -> tuple[dict, Path, Path]:
    dataset_dir = tmp_path / "data"
    dataset_dir.mkdir()
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))  # a real CR chest film
    ds.save_as(dataset_dir / "cr.dcm")
    item = ResizeLongestPadd("image", spatial_size=32)(LoadXRayd("image")({"image": str(dataset_dir / "cr.dcm")}))
    pattern = torch.sign(torch.randn(item["image"].shape, generator=torch.Generator().manual_seed(1)))
    item["pred"] = (item["image"] + EPS * pattern).clamp(0, 1)
    return item, dataset_dir, dataset_dir / "cr.dcm"


@pytest.mark.parametrize("mode", ["new", "keep", "release"])
def test_save_watermarkedd_sop_instance_uid_modes(tmp_path, mode):
    """'new' writes a derived image (a new UID, the same UID again for the same pixels), 'keep' keeps the source's
    UID and warns that a PACS would see a collision, 'release' keeps it silently (a release replaces its sources)."""
    import warnings

    from xmark_bundle.transforms import KeptInstanceUIDWarning

    item, dataset_dir, source = _dicom_item(tmp_path)
    outputs = []
    for run in range(2):
        transform = SaveWatermarkedd(
            "pred", output_dir=tmp_path / f"out{run}", dataset_dir=dataset_dir, epsilon=EPS, sop_instance_uid=mode
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs.append(Path(transform(item)["watermark"]["path"]))
        kept = [w for w in caught if issubclass(w.category, KeptInstanceUIDWarning)]
        assert len(kept) == (mode == "keep"), [str(w.message) for w in caught]
        if kept:
            assert str(kept[0].message).startswith(f"{outputs[-1]}: keeps the SOP Instance UID of its source")
    original, written = pydicom.dcmread(source), pydicom.dcmread(outputs[0])
    assert outputs[0].read_bytes() == outputs[1].read_bytes()  # deterministic, whatever the mode
    np.testing.assert_array_equal(written.pixel_array, pydicom.dcmread(outputs[1]).pixel_array)
    assert not np.array_equal(written.pixel_array, original.pixel_array)
    if mode == "new":
        assert written.SOPInstanceUID != original.SOPInstanceUID and "DerivationDescription" in written
    else:
        assert written.SOPInstanceUID == original.SOPInstanceUID
        assert "DerivationDescription" not in written and "SourceImageSequence" not in written


def test_save_watermarkedd_refuses_an_unknown_uid_mode(tmp_path):
    with pytest.raises(ValueError, match="sop_instance_uid must be one of new, keep, release, got 'fresh'"):
        SaveWatermarkedd("pred", output_dir=tmp_path, dataset_dir=tmp_path, epsilon=EPS, sop_instance_uid="fresh")


def test_save_watermarkedd_writes_an_outside_source_under_the_output_and_needs_geometry(tmp_path):
    source = gradient_png(tmp_path / "x.png", (30, 20))  # not inside dataset_dir (as from MONAI Label's datastore)
    item = ResizeLongestPadd("image", spatial_size=16)(LoadXRayd("image")({"image": str(source)}))
    item["pred"] = item["image"].clone()
    transform = SaveWatermarkedd("pred", output_dir=tmp_path / "out", dataset_dir=tmp_path / "data", epsilon=EPS)
    written = Path(transform(item)["watermark"]["path"])
    assert written == watermarked_path(source, tmp_path / "data", tmp_path / "out") and written.name == "x.png"
    assert written.parent.parent == tmp_path / "out" / "external"  # a folder per source folder
    assert [p.name for p in (tmp_path / "out").rglob("*.png")] == ["x.png"]
    with pytest.raises(ValueError, match="xmark_geometry"):
        transform(LoadXRayd("image")({"image": str(source)}) | {"pred": item["pred"]})
