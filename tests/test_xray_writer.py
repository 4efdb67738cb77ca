"""Tests for bundle.data.xray_writer on real files: pydicom-data's clinical DICOMs and PNG/JPEG/NIfTI/ITK files."""

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from bundle.data import (
    XRayWriteError,
    check_output_path,
    load_xray,
    max_stored_change,
    quantisation_step,
    to_stored,
    write_xray,
)
from bundle.transforms import apply_watermark, letterbox, letterbox_geometry, unletterbox

EPS = 16 / 255
# an asymmetric test image: every value distinct, so any flip or transpose is detected
ASYMMETRIC = np.arange(5 * 7).reshape(5, 7)


def copy_testdata(name: str, directory: Path) -> Path:
    """Copy a pydicom-data / pydicom test file into `directory` (tests never touch the installed originals)."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return Path(shutil.copy(path, directory / name))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sign_watermark(image: np.ndarray, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Benign letterboxed image and a watermarked one that adds a random +-EPS pattern (clamped to [0, 1])."""
    geometry = letterbox_geometry(image.shape, size)
    benign = letterbox(torch.from_numpy(image)[None], geometry)
    pattern = torch.sign(torch.randn(benign.shape, generator=torch.Generator().manual_seed(seed)))
    return (benign + EPS * pattern).clamp(0, 1), benign, geometry


def expected_stored(source: Path, watermarked: torch.Tensor, benign: torch.Tensor, geometry: dict) -> np.ndarray:
    """The stored pixels the watermark should produce, computed independently of the writer."""
    image, meta = load_xray(source)
    residual = unletterbox(watermarked - benign, geometry)[0].numpy()
    return to_stored(np.clip(image + residual, 0, 1), meta)


def assert_same_elements(a: pydicom.Dataset, b: pydicom.Dataset, ignore: tuple[str, ...] = ("PixelData",)) -> None:
    """Every data element of `a` is in `b` with the same VR and value, and vice versa (apart from `ignore`)."""
    tags = {elem.tag for elem in a} | {elem.tag for elem in b}
    for tag in sorted(tags):
        if pydicom.datadict.keyword_for_tag(tag) in ignore:
            continue
        assert tag in a and tag in b, f"{tag} present in only one dataset"
        assert a[tag] == b[tag], f"{tag} differs: {a[tag]} != {b[tag]}"


# --- the CR chest radiograph (MONOCHROME1, 15 of 16 bits, 1955 x 1841) ---


@pytest.fixture(scope="module")
def cr_watermarked(tmp_path_factory):
    """RG1_UNCR.dcm watermarked at model size 256 through apply_watermark, with what is needed to check it."""
    directory = tmp_path_factory.mktemp("cr")
    source = copy_testdata("RG1_UNCR.dcm", directory)
    before = digest(source)
    watermarked, benign, geometry = sign_watermark(load_xray(source)[0], 256)
    report = apply_watermark(source, watermarked, benign, geometry, EPS, directory / "out" / "RG1_UNCR.dcm")
    return source, before, report, expected_stored(source, watermarked, benign, geometry)


def test_cr_watermark_keeps_every_tag(cr_watermarked):
    source, _, report, _ = cr_watermarked
    original, written = pydicom.dcmread(source), pydicom.dcmread(report["path"])
    assert_same_elements(original, written)
    assert_same_elements(original.file_meta, written.file_meta, ignore=())
    assert original.preamble == written.preamble
    assert (written.PhotometricInterpretation, written.BitsStored, written.BitsAllocated) == ("MONOCHROME1", 15, 16)
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert written.pixel_array.shape == (1955, 1841) and written.pixel_array.dtype == np.uint16


def test_cr_watermark_pixels_and_budget(cr_watermarked):
    source, _, report, expected = cr_watermarked
    written, original = pydicom.dcmread(report["path"]).pixel_array, pydicom.dcmread(source).pixel_array
    np.testing.assert_array_equal(written, expected)  # residual resized to 1955 x 1841, added, re-quantised
    window = 29999.0  # PS3.3 LINEAR window of WindowCenter 15000 / WindowWidth 30000: [0, 29999]
    change = np.abs(written.astype(int) - original)
    assert change.max() == report["max_stored_change"] <= EPS * window + 1
    assert change.max() > 0.9 * EPS * window and change.mean() > 0.5 * EPS * window  # the watermark is there
    assert report["max_abs_change01"] <= EPS + report["quantisation_step01"]
    assert report["quantisation_step01"] == pytest.approx(1 / window)
    assert report["budget_ok"] and not report["lossy"]
    assert (report["format"], report["shape"], report["epsilon"]) == ("dicom", [1955, 1841], EPS)
    json.dumps(report)


def test_cr_source_is_unchanged(cr_watermarked):
    source, before, _, _ = cr_watermarked
    assert digest(source) == before
    assert digest(source) == digest(Path(get_testdata_file("RG1_UNCR.dcm")))


def test_cr_jpeg2000_lossless_is_reencoded_in_its_syntax(tmp_path):
    source = copy_testdata("RG1_J2KR.dcm", tmp_path)
    watermarked, benign, geometry = sign_watermark(load_xray(source)[0], 128, seed=1)
    report = apply_watermark(source, watermarked, benign, geometry, EPS, tmp_path / "out.dcm")
    written = pydicom.dcmread(report["path"])
    assert written.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert_same_elements(pydicom.dcmread(source), written)
    np.testing.assert_array_equal(written.pixel_array, expected_stored(source, watermarked, benign, geometry))
    assert report["budget_ok"] and report["max_stored_change"] > 0


def test_cr_lossy_jpeg2000_is_written_lossless(tmp_path):
    source = copy_testdata("RG1_J2KI.dcm", tmp_path)
    image, meta = load_xray(source)
    changed = image.copy()
    changed[:200, :300] = np.clip(changed[:200, :300] + EPS, 0, 1)
    write_xray(changed, meta, source, tmp_path / "out.dcm")
    original, written = pydicom.dcmread(source), pydicom.dcmread(tmp_path / "out.dcm")
    assert written.file_meta.TransferSyntaxUID == JPEG2000Lossless  # was 1.2.840.10008.1.2.4.91 (JPEG 2000)
    assert_same_elements(
        original.file_meta, written.file_meta, ignore=("TransferSyntaxUID", "FileMetaInformationGroupLength")
    )
    assert_same_elements(original, written)
    assert written.LossyImageCompression == "01"  # the image did go through lossy compression once
    np.testing.assert_array_equal(written.pixel_array, to_stored(changed, meta))
    np.testing.assert_array_equal(written.pixel_array[200:], original.pixel_array[200:])


# --- other DICOM transfer syntaxes and intensity chains ---


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
        ("MR_small_RLE.dcm", RLELossless),
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", ExplicitVRLittleEndian),  # no JPEG Lossless encoder: written uncompressed
    ],
)
def test_dicom_transfer_syntaxes(tmp_path, name, syntax):
    source = copy_testdata(name, tmp_path)
    image, meta = load_xray(source)
    changed = image.copy()
    changed[::3, ::2] = np.clip(changed[::3, ::2] - 0.02, 0, 1)
    out = write_xray(changed, meta, source, tmp_path / f"out_{name}")
    original, written = pydicom.dcmread(source), pydicom.dcmread(out)
    assert written.file_meta.TransferSyntaxUID == syntax
    assert_same_elements(original, written)
    # changed pixels are re-quantised, the others keep their stored values (also those clipped by the window)
    expected = np.where(changed == image, original.pixel_array, to_stored(changed, meta))
    np.testing.assert_array_equal(written.pixel_array, expected)
    np.testing.assert_allclose(load_xray(out)[0], changed, atol=quantisation_step(meta))


def test_pixels_clipped_by_the_window_keep_their_stored_values(tmp_path):
    # MR_small: window 600 / 1600 covers stored values up to ~1400 of 127..2145
    source = copy_testdata("MR_small.dcm", tmp_path)
    image, meta = load_xray(source)
    stored = pydicom.dcmread(source).pixel_array
    clipped = stored > meta.window_high
    assert clipped.mean() > 0.05 and np.all(image[clipped] == 1.0)
    write_xray(image, meta, source, tmp_path / "same.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "same.dcm").pixel_array, stored)
    brighter = np.clip(image + EPS, 0, 1)  # saturated pixels stay saturated, so they keep their values
    write_xray(brighter, meta, source, tmp_path / "bright.dcm")
    written = pydicom.dcmread(tmp_path / "bright.dcm")
    np.testing.assert_array_equal(written.pixel_array[clipped], stored[clipped])
    np.testing.assert_array_equal(written.pixel_array[~clipped], to_stored(brighter, meta)[~clipped])
    assert (written.SmallestImagePixelValue, written.LargestImagePixelValue) == (0, 4000)  # still true bounds


def test_smallest_and_largest_pixel_values_widen(tmp_path):
    source = copy_testdata("MR_small.dcm", tmp_path)
    ds = pydicom.dcmread(source)
    ds.SmallestImagePixelValue, ds.LargestImagePixelValue = 200, 1000
    ds.save_as(source)
    image, meta = load_xray(source)
    write_xray(np.clip(image - EPS, 0, 1), meta, source, tmp_path / "out.dcm")
    written = pydicom.dcmread(tmp_path / "out.dcm")
    assert written.SmallestImagePixelValue == written.pixel_array.min() < 200
    assert written.LargestImagePixelValue == max(1000, written.pixel_array.max())


def test_voi_lut_sequence_round_trip_and_step(tmp_path):
    source = copy_testdata("vlut_04.dcm", tmp_path)
    image, meta = load_xray(source)
    assert meta.mapping == "lut"
    write_xray(image, meta, source, tmp_path / "out.dcm")
    np.testing.assert_array_equal(
        pydicom.dcmread(tmp_path / "out.dcm").pixel_array, pydicom.dcmread(source).pixel_array
    )
    levels = np.unique(image)
    assert 0 < quantisation_step(meta) >= np.diff(levels).max() - 1e-6


# --- PNG / JPEG ---


@pytest.mark.parametrize(("dtype", "scale"), [(np.uint8, 7), (np.uint16, 1800)])
def test_png_round_trip_is_exact_and_keeps_metadata(tmp_path, dtype, scale):
    pixels = (ASYMMETRIC * scale).astype(dtype)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "site 7")
    Image.fromarray(pixels).save(tmp_path / "x.png", pnginfo=info, dpi=(150, 150))
    image, meta = load_xray(tmp_path / "x.png")
    write_xray(image, meta, tmp_path / "x.png", tmp_path / "out" / "x.png")
    with Image.open(tmp_path / "out" / "x.png") as written:
        assert written.text == {"Comment": "site 7"} and round(written.info["dpi"][0]) == 150
        assert written.mode == Image.open(tmp_path / "x.png").mode
        np.testing.assert_array_equal(np.asarray(written), pixels)
    changed = image.copy()
    changed[1:3, 2:5] = np.clip(changed[1:3, 2:5] + 0.05, 0, 1)
    write_xray(changed, meta, tmp_path / "x.png", tmp_path / "changed.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "changed.png")), to_stored(changed, meta))


def test_equal_channel_rgb_png_stays_rgb(tmp_path):
    pixels = (ASYMMETRIC * 7).astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(tmp_path / "rgb.png")
    image, meta = load_xray(tmp_path / "rgb.png")
    write_xray(np.clip(image + 0.1, 0, 1), meta, tmp_path / "rgb.png", tmp_path / "out.png")
    written = np.asarray(Image.open(tmp_path / "out.png"))
    assert written.shape == (5, 7, 3)
    np.testing.assert_array_equal(written, np.stack([to_stored(np.clip(image + 0.1, 0, 1), meta)] * 3, axis=-1))
    assert load_xray(tmp_path / "out.png")[1].photometric == "RGB"


def test_jpeg_is_rewritten_at_quality_100_and_reported_lossy(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.clip(np.add.outer(np.arange(96), np.arange(80)) + rng.normal(0, 4, (96, 80)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.jpg", quality=90)
    image, meta = load_xray(tmp_path / "x.jpg")
    watermarked, benign, geometry = sign_watermark(image, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_watermark(tmp_path / "x.jpg", watermarked, benign, geometry, EPS, tmp_path / "out.jpg")
    assert report["lossy"] and report["format"] == "jpeg"
    warned = [str(w.message) for w in caught if "after lossy JPEG re-encoding" in str(w.message)]
    assert len(warned) == (0 if report["budget_ok"] else 1) and all("out.jpg" in message for message in warned)
    with Image.open(tmp_path / "out.jpg") as written:
        assert (written.format, written.mode) == ("JPEG", "L")
        decoded = np.asarray(written).astype(int)
    wanted = expected_stored(tmp_path / "x.jpg", watermarked, benign, geometry).astype(int)
    assert np.abs(decoded - wanted).max() <= 3  # quality 100: a few grey levels
    assert report["max_abs_change01"] <= EPS + 4 / 255


# --- NIfTI / ITK ---


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_keeps_header_layout_and_scaling(tmp_path, suffix):
    raw = (ASYMMETRIC * 100 - 1000).astype(np.int16)
    affine = np.array([[0.0, -0.2, 0, 10], [0.3, 0, 0, -5], [0, 0, 1.5, 2], [0, 0, 0, 1]])
    source_image = nib.Nifti1Image(raw.T[..., None], affine)  # data[i, j, 0] = raw[j, i]
    source_image.header.set_slope_inter(0.5, 7.0)
    source_image.header["descrip"] = b"chest PA"
    nib.save(source_image, tmp_path / f"x{suffix}")
    image, meta = load_xray(tmp_path / f"x{suffix}")
    changed = image.copy()
    changed[0, :] = np.clip(changed[0, :] + 0.01, 0, 1)
    write_xray(changed, meta, tmp_path / f"x{suffix}", tmp_path / f"out{suffix}")
    original, written = nib.load(tmp_path / f"x{suffix}"), nib.load(tmp_path / f"out{suffix}")
    assert written.shape == (7, 5, 1) and written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(written.affine, original.affine)
    assert (written.dataobj.slope, written.dataobj.inter) == (0.5, 7.0)
    for field in ("descrip", "pixdim", "qform_code", "sform_code", "xyzt_units", "dim"):
        np.testing.assert_array_equal(written.header[field], original.header[field])
    unscaled = np.asarray(written.dataobj.get_unscaled())
    np.testing.assert_array_equal(unscaled[..., 0].T, to_stored(changed, meta))
    np.testing.assert_array_equal(unscaled[..., 0].T[1:], raw[1:])
    assert (tmp_path / f"out{suffix}").read_bytes()[:2] == (b"\x1f\x8b" if suffix == ".nii.gz" else b"\x5c\x01")


@pytest.mark.parametrize(("suffix", "compressed"), [(".mha", False), (".mha", True), (".nrrd", True)])
def test_itk_keeps_geometry_and_compression(tmp_path, suffix, compressed):
    pixels = (ASYMMETRIC * 1000).astype(np.uint16)
    source_image = itk.image_from_array(pixels[None])  # 3-D with one slice
    source_image.SetSpacing([0.14, 0.15, 2.0])
    source_image.SetOrigin([-12.0, 30.0, 5.0])
    itk.imwrite(source_image, str(tmp_path / f"x{suffix}"), compression=compressed)
    image, meta = load_xray(tmp_path / f"x{suffix}")
    changed = np.clip(image - 0.01, 0, 1)
    write_xray(changed, meta, tmp_path / f"x{suffix}", tmp_path / f"out{suffix}")
    written = itk.imread(str(tmp_path / f"out{suffix}"))
    assert tuple(written.GetSpacing()) == pytest.approx((0.14, 0.15, 2.0))
    assert tuple(written.GetOrigin()) == pytest.approx((-12.0, 30.0, 5.0))
    array = itk.array_from_image(written)
    assert array.shape == (1, 5, 7) and array.dtype == np.uint16
    np.testing.assert_array_equal(array[0], to_stored(changed, meta))
    header = (tmp_path / f"out{suffix}").read_bytes()[:400]
    assert (b"CompressedData = True" in header or b"encoding: gzip" in header) == compressed


def test_float_image_keeps_its_data_range(tmp_path):
    pixels = np.linspace(-3.0, 5.5, 35, dtype=np.float32).reshape(5, 7)
    itk.imwrite(itk.image_from_array(pixels), str(tmp_path / "f.mha"))
    image, meta = load_xray(tmp_path / "f.mha")
    changed = np.clip(image + 0.05, 0, 1)  # would raise the minimum and so change the data-range window
    write_xray(changed, meta, tmp_path / "f.mha", tmp_path / "out.mha")
    written, written_meta = load_xray(tmp_path / "out.mha")
    assert (written_meta.window_low, written_meta.window_high) == (meta.window_low, meta.window_high)
    assert written[0, 0] == 0.0 and written[-1, -1] == 1.0
    np.testing.assert_allclose(written[1:-1], changed[1:-1], atol=1e-6)
    assert quantisation_step(meta) == 0.0


# --- safety ---


def test_refuses_to_write_onto_the_source(tmp_path):
    pixels = ASYMMETRIC.astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image, meta = load_xray(tmp_path / "x.png")
    (tmp_path / "sub").mkdir()
    for target in (tmp_path / "x.png", tmp_path / "sub" / ".." / "x.png"):
        with pytest.raises(XRayWriteError, match=r"refusing to overwrite the source"):
            write_xray(image, meta, tmp_path / "x.png", target)
    os.link(tmp_path / "x.png", tmp_path / "hardlink.png")
    with pytest.raises(XRayWriteError, match=r"hardlink\.png: refusing to overwrite the source"):
        check_output_path(tmp_path / "x.png", tmp_path / "hardlink.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), pixels)


def test_refuses_other_extensions_detached_headers_and_wrong_shapes(tmp_path):
    Image.fromarray(ASYMMETRIC.astype(np.uint8)).save(tmp_path / "x.png")
    image, meta = load_xray(tmp_path / "x.png")
    with pytest.raises(XRayWriteError, match=r"out\.jpg: must keep the source's extension '\.png'"):
        write_xray(image, meta, tmp_path / "x.png", tmp_path / "out.jpg")
    with pytest.raises(XRayWriteError, match=r"out\.png: image shape \(7, 5\) differs from the source's \(5, 7\)"):
        write_xray(image.T, meta, tmp_path / "x.png", tmp_path / "out.png")
    Image.fromarray(ASYMMETRIC.astype(np.uint16)).save(tmp_path / "y.png")
    with pytest.raises(XRayWriteError, match=r"y\.png: holds uint16 .* meta describes uint8"):
        write_xray(image, meta, tmp_path / "y.png", tmp_path / "out.png")
    itk.imwrite(itk.image_from_array(ASYMMETRIC.astype(np.uint16)), str(tmp_path / "d.mhd"))
    image, meta = load_xray(tmp_path / "d.mhd")
    with pytest.raises(XRayWriteError, match=r"d\.mhd: detached-header \.mhd"):
        write_xray(image, meta, tmp_path / "d.mhd", tmp_path / "out.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mhd", "d.raw", "x.png", "y.png"]


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    source = copy_testdata("MR_small.dcm", tmp_path)
    image, meta = load_xray(source)

    def save_half_then_fail(ds, filename, **kwargs):  # a full disk: part of the file is written, then an error
        Path(filename).write_bytes(source.read_bytes()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.Dataset, "save_as", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        write_xray(image, meta, source, tmp_path / "out" / "x.dcm")
    assert list((tmp_path / "out").iterdir()) == []


def test_max_stored_change_of_identical_files(tmp_path):
    source = copy_testdata("CT_small.dcm", tmp_path)
    copy = Path(shutil.copy(source, tmp_path / "copy.dcm"))
    change = max_stored_change(source, copy)
    assert (change["max_stored_change"], change["max_abs_change01"]) == (0.0, 0.0)
    _, meta = load_xray(source)
    assert change["quantisation_step01"] == pytest.approx(meta.rescale_slope / (meta.window_high - meta.window_low))
