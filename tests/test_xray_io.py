"""Tests for xmark_bundle.data.xray_io on real files: pydicom-data's clinical DICOMs and files written here."""

import gzip
import json
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.transforms import LoadImaged
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, RLELossless

from xmark_bundle.data import LoadXRayd, XRayLoadError, XRayMeta, XRayReader, load_xray, to_stored, xray_io

# an asymmetric test image: every value distinct, so any flip or transpose is detected
ASYMMETRIC = np.arange(5 * 7).reshape(5, 7)


def cr_chest(name: str) -> str:
    """Path of pydicom-data's CR chest radiograph (MONOCHROME1, 15 of 16 bits, 1955 x 1841)."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data file {name} is missing"
    return path


@pytest.fixture(scope="module")
def cr_uncompressed() -> tuple[np.ndarray, XRayMeta, pydicom.Dataset]:
    path = cr_chest("RG1_UNCR.dcm")
    image, meta = load_xray(path)
    return image, meta, pydicom.dcmread(path)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 0, **tags) -> Path:
    """Write `pixels` as an Explicit VR Little Endian DX (digital radiograph) image with the given extra tags."""
    ds = DicomDataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_chain(path: str | Path) -> np.ndarray:
    """pydicom's own modality + VOI chain of a file, as float64."""
    ds = pydicom.dcmread(path)
    return apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)


# --- real clinical DICOM (pydicom-data) ---


def test_cr_chest_shape_and_meta(cr_uncompressed):
    image, meta, ds = cr_uncompressed
    assert image.shape == (1955, 1841) == (ds.Rows, ds.Columns)
    assert image.dtype == np.float32 and 0.0 <= image.min() < image.max() <= 1.0
    assert (meta.photometric, meta.bits_stored, meta.bits_allocated, meta.signed) == ("MONOCHROME1", 15, 16, False)
    assert (meta.mapping, meta.window_source) == ("linear", "Window Center/Width")
    json.dumps(asdict(meta))  # JSON-serialisable


def test_cr_chest_matches_pydicom_chain_inverted(cr_uncompressed):
    image, _, ds = cr_uncompressed
    # Window Center/Width are present: pydicom windows into the output range 0 .. 2**BitsStored - 1
    expected = 1.0 - pydicom_chain(cr_chest("RG1_UNCR.dcm")) / (2**ds.BitsStored - 1)
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_cr_chest_monochrome1_shows_bone_bright(cr_uncompressed):
    image = cr_uncompressed[0]
    right_lung, left_lung, spine = image[300:600, 400:650], image[300:600, 1150:1450], image[300:600, 860:980]
    assert spine.mean() > right_lung.mean() + 0.2
    assert spine.mean() > left_lung.mean() + 0.2


def test_cr_chest_jpeg2000_lossless_equals_uncompressed(cr_uncompressed):
    image, meta = load_xray(cr_chest("RG1_J2KR.dcm"))
    np.testing.assert_array_equal(image, cr_uncompressed[0])
    assert meta.transfer_syntax == "1.2.840.10008.1.2.4.90"  # JPEG 2000 Lossless Only


def test_cr_chest_round_trip_is_exact(cr_uncompressed):
    image, meta, ds = cr_uncompressed
    stored = to_stored(image, meta)
    assert stored.dtype == ds.pixel_array.dtype
    np.testing.assert_array_equal(stored, ds.pixel_array)


def test_voi_lut_sequence_matches_pydicom():
    path = get_testdata_file("vlut_04.dcm")
    image, meta = load_xray(path)
    assert (meta.mapping, meta.window_source, meta.window_high) == ("lut", "VOI LUT Sequence", 65535.0)
    np.testing.assert_allclose(image, pydicom_chain(path) / 65535.0, atol=1e-6)  # 16-bit LUT entries
    np.testing.assert_array_equal(to_stored(image, meta), pydicom.dcmread(path).pixel_array)


def test_modality_lut_sequence_matches_pydicom():
    path = get_testdata_file("mlut_18.dcm")
    image, meta = load_xray(path)
    values = pydicom_chain(path)
    assert meta.mapping == "lut" and meta.signed
    np.testing.assert_allclose(image, (values - values.min()) / (values.max() - values.min()), atol=1e-6)
    np.testing.assert_array_equal(to_stored(image, meta), pydicom.dcmread(path).pixel_array)


def test_modality_lut_sequence_with_window_matches_pydicom(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("mlut_18.dcm"))
    ds.WindowCenter, ds.WindowWidth = 30000, 50000
    ds.save_as(tmp_path / "mlut_window.dcm")
    image, meta = load_xray(tmp_path / "mlut_window.dcm")
    assert (meta.mapping, meta.window_source) == ("lut", "Window Center/Width")
    # pydicom windows a 16-bit Modality LUT's output into 0 .. 2**16 - 1
    np.testing.assert_allclose(image, pydicom_chain(tmp_path / "mlut_window.dcm") / 65535.0, atol=1e-6)
    inside = (image > 0) & (image < 1)
    assert inside.mean() > 0.5
    np.testing.assert_array_equal(to_stored(image, meta)[inside], ds.pixel_array[inside])


# --- DICOM written here ---


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path):
    pixels = (ASYMMETRIC * 100).astype(np.uint16)
    mono2, _ = load_xray(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", 12))
    mono1, meta1 = load_xray(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", 12))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-7)
    np.testing.assert_allclose(mono2, pixels / 4095.0, atol=1e-7)
    np.testing.assert_array_equal(to_stored(mono1, meta1), pixels)


@pytest.mark.parametrize(
    ("dtype", "bits_stored", "values"),
    [
        (np.uint8, 8, [0, 1, 128, 255]),
        (np.uint16, 12, [0, 1, 2048, 4095]),
        (np.uint16, 16, [0, 1, 40000, 65535]),
        (np.int16, 16, [-32768, -1, 0, 32767]),
        (np.int16, 12, [-2048, -5, 7, 2047]),
    ],
)
def test_full_stored_range_without_window(tmp_path, dtype, bits_stored, values):
    pixels = np.array([values, values[::-1]], dtype=dtype)
    image, meta = load_xray(write_dicom(tmp_path / "x.dcm", pixels, bits_stored=bits_stored))
    low = -(2 ** (bits_stored - 1)) if np.issubdtype(dtype, np.signedinteger) else 0
    np.testing.assert_allclose(image, (pixels.astype(np.float64) - low) / (2**bits_stored - 1), atol=1e-7)
    assert (meta.window_source, meta.bits_stored, meta.stored_dtype) == ("stored range", bits_stored, pixels.dtype.name)
    np.testing.assert_array_equal(to_stored(image, meta), pixels)


def test_empty_window_tags_mean_the_full_stored_range(tmp_path):
    pixels = np.array([[0, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "e.dcm", pixels, bits_stored=12, WindowCenter=None, WindowWidth="")
    image, meta = load_xray(path)
    assert meta.window_source == "stored range"
    np.testing.assert_allclose(image, [[0.0, 1.0]])


def test_rescale_and_window_match_pydicom(tmp_path):
    pixels = (ASYMMETRIC * 50).astype(np.int16) - 800
    path = write_dicom(
        tmp_path / "ct.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=-1000, WindowWidth=6000
    )
    image, meta = load_xray(path)
    assert (meta.rescale_slope, meta.rescale_intercept) == (2.0, -1024.0)
    low, high = (-(2**15) * 2 - 1024, (2**15 - 1) * 2 - 1024)  # pydicom's output range after rescale
    np.testing.assert_allclose(image, (pydicom_chain(path) - low) / (high - low), atol=1e-6)
    np.testing.assert_array_equal(to_stored(image, meta), pixels)  # the window holds every pixel


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_functions_match_pydicom_and_invert(tmp_path, function):
    pixels = (ASYMMETRIC * 100 + 500).astype(np.uint16)
    path = write_dicom(tmp_path / "w.dcm", pixels, "MONOCHROME2", 12, WindowCenter=2000, WindowWidth=4500)
    ds = pydicom.dcmread(path)
    ds.VOILUTFunction = function
    ds.save_as(path)
    image, meta = load_xray(path)
    np.testing.assert_allclose(image, pydicom_chain(path) / 4095.0, atol=1e-6)
    assert meta.mapping == ("sigmoid" if function == "SIGMOID" else "linear")
    np.testing.assert_array_equal(to_stored(image, meta), pixels)


def test_narrow_window_clips_and_clipped_pixels_do_not_round_trip(tmp_path):
    pixels = np.array([[0, 999, 1000, 1500, 1999, 2000, 4095]], dtype=np.uint16)
    image, meta = load_xray(
        write_dicom(tmp_path / "n.dcm", pixels, bits_stored=12, WindowCenter=1500, WindowWidth=1001)
    )
    assert (meta.window_low, meta.window_high) == (1499.5 - 500, 1499.5 + 500)  # PS3.3 LINEAR: c - 0.5 +- (w - 1) / 2
    np.testing.assert_allclose(image[0, [0, 1, 5, 6]], [0, 0, 1, 1], atol=1e-7)
    stored = to_stored(image, meta)
    np.testing.assert_array_equal(stored[0, 2:5], pixels[0, 2:5])  # inside the window: exact
    np.testing.assert_array_equal(stored[0, [0, 1, 5, 6]], [1000, 1000, 2000, 2000])  # clipped: the window edge


def test_to_stored_clips_to_the_stored_range(tmp_path):
    pixels = np.array([[0, 4095]], dtype=np.uint16)
    _, meta = load_xray(write_dicom(tmp_path / "c.dcm", pixels, bits_stored=12))
    np.testing.assert_array_equal(to_stored(np.array([[-0.5, 0.5, 1.5]]), meta), [[0, 2048, 4095]])


def test_rle_compressed_dicom_loads_like_uncompressed(tmp_path):
    pixels = (ASYMMETRIC * 90).astype(np.uint16)
    path = write_dicom(tmp_path / "u.dcm", pixels, "MONOCHROME1", 12)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    image, meta = load_xray(tmp_path / "rle.dcm")
    assert meta.transfer_syntax == RLELossless
    np.testing.assert_array_equal(image, load_xray(path)[0])


def test_unsupported_transfer_syntax_is_named(tmp_path):
    path = write_dicom(tmp_path / "mpeg.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 Main Profile / Main Level
    ds.PixelData = encapsulate([b"\x00" * 16])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    with pytest.raises(XRayLoadError, match=r"mpeg\.dcm.*MPEG2 Main Profile.*1\.2\.840\.10008\.1\.2\.4\.100"):
        load_xray(path)


def test_dicom_without_extension_is_recognised(tmp_path):
    pixels = ASYMMETRIC.astype(np.uint8)
    write_dicom(tmp_path / "IM0001", pixels)
    image, meta = load_xray(tmp_path / "IM0001")
    assert meta.format == "dicom"
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-7)


def test_truncated_dicom_names_file_and_problem(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", np.ones((64, 64), np.uint16))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(XRayLoadError, match=r"cut\.dcm.*less than expected"):
        load_xray(path)


def test_truncated_compressed_dicom_is_reported():
    with pytest.raises(XRayLoadError, match="End of file reached"):
        load_xray(get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm"))


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", np.ones((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(XRayLoadError, match=r"nopix\.dcm.*no Pixel Data"):
        load_xray(path)


def test_multi_frame_dicom_is_refused(tmp_path):
    path = write_dicom(tmp_path / "multi.dcm", np.ones((3, 4, 4), np.uint16))
    with pytest.raises(XRayLoadError, match=r"multi\.dcm.*multi-frame.*3 frames"):
        load_xray(path)


def test_colour_dicom_is_refused(tmp_path):
    path = write_dicom(tmp_path / "rgb.dcm", np.ones((4, 4, 3), np.uint8), "RGB")
    with pytest.raises(XRayLoadError, match=r"rgb\.dcm.*colour"):
        load_xray(path)


def test_palette_colour_dicom_is_refused():
    with pytest.raises(XRayLoadError, match="Modality US is not a projection radiograph"):  # ultrasound
        load_xray(get_testdata_file("OBXXXX1A.dcm"))
    with pytest.raises(XRayLoadError, match="PALETTE COLOR"):
        load_xray(get_testdata_file("OBXXXX1A.dcm"), allow_any_modality=True)


# --- file-level errors ---


def test_missing_empty_unknown_and_garbage_files(tmp_path):
    with pytest.raises(XRayLoadError, match=r"absent\.dcm: file not found"):
        load_xray(tmp_path / "absent.dcm")
    (tmp_path / "empty.png").touch()
    with pytest.raises(XRayLoadError, match=r"empty\.png: file is empty"):
        load_xray(tmp_path / "empty.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(XRayLoadError, match=r"notes\.txt: unknown file extension '\.txt'"):
        load_xray(tmp_path / "notes.txt")
    (tmp_path / "garbage.dcm").write_bytes(b"\x01" * 400)
    with pytest.raises(XRayLoadError, match=r"garbage\.dcm: not a readable DICOM file"):
        load_xray(tmp_path / "garbage.dcm")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(XRayLoadError, match=r"garbage\.png: not a readable PNG file"):
        load_xray(tmp_path / "garbage.png")


def test_load_error_is_a_value_error():
    assert issubclass(XRayLoadError, ValueError)


# --- PNG / JPEG ---


@pytest.mark.parametrize(("dtype", "scale"), [(np.uint8, 7), (np.uint16, 1800)])
def test_png_round_trip_keeps_orientation(tmp_path, dtype, scale):
    pixels = (ASYMMETRIC * scale).astype(dtype)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image, meta = load_xray(tmp_path / "x.png")
    np.testing.assert_allclose(image, pixels / float(np.iinfo(dtype).max), atol=1e-7)
    assert meta.format == "png" and meta.photometric == "MONOCHROME2"
    assert (meta.stored_dtype, meta.shape) == (pixels.dtype.name, (5, 7))
    np.testing.assert_array_equal(to_stored(image, meta), pixels)


def test_jpeg_loads_decoded_values(tmp_path):
    pixels = (ASYMMETRIC * 7).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.jpg", quality=100)
    decoded = np.asarray(Image.open(tmp_path / "x.jpg"))
    image, meta = load_xray(tmp_path / "x.jpg")
    assert meta.format == "jpeg"
    np.testing.assert_allclose(image, decoded / 255.0, atol=1e-7)
    np.testing.assert_array_equal(to_stored(image, meta), decoded)
    assert np.abs(decoded.astype(int) - pixels).max() <= 3  # lossy, but the layout is preserved


def test_rgb_png_with_equal_channels_is_grey(tmp_path):
    pixels = (ASYMMETRIC * 7).astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    image, meta = load_xray(tmp_path / "grey_rgb.png")
    assert meta.photometric == "RGB"
    np.testing.assert_array_equal(to_stored(image, meta), pixels)
    colour = np.stack([pixels, pixels, pixels + 1], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(XRayLoadError, match=r"colour\.png: colour image"):
        load_xray(tmp_path / "colour.png")


def test_png_content_with_jpeg_extension_is_refused(tmp_path):
    Image.fromarray(ASYMMETRIC.astype(np.uint8)).save(tmp_path / "fake.jpg", format="PNG")
    with pytest.raises(XRayLoadError, match=r"fake\.jpg: file content is PNG, not JPEG"):
        load_xray(tmp_path / "fake.jpg")


# --- NIfTI / ITK ---


def test_nifti_rows_are_the_second_voxel_axis(tmp_path):
    pixels = (ASYMMETRIC * 100 - 1000).astype(np.int16)
    nib.save(nib.Nifti1Image(pixels.T[..., None], np.eye(4)), tmp_path / "x.nii.gz")  # data[i, j, 0] = pixels[j, i]
    image, meta = load_xray(tmp_path / "x.nii.gz")
    assert (meta.format, meta.shape, meta.window_low, meta.window_high) == ("nifti", (5, 7), -32768.0, 32767.0)
    np.testing.assert_allclose(image, (pixels + 32768.0) / 65535.0, atol=1e-7)
    np.testing.assert_array_equal(to_stored(image, meta), pixels)


def test_nifti_scaling_is_the_modality_rescale(tmp_path):
    raw = ASYMMETRIC.astype(np.uint8)
    image = nib.Nifti1Image(raw.T, np.eye(4))
    image.header.set_slope_inter(2.0, -10.0)
    nib.save(image, tmp_path / "scaled.nii")
    loaded, meta = load_xray(tmp_path / "scaled.nii")
    assert (meta.rescale_slope, meta.rescale_intercept, meta.window_low, meta.window_high) == (2.0, -10.0, -10.0, 500.0)
    np.testing.assert_allclose(loaded, raw / 255.0, atol=1e-7)
    np.testing.assert_array_equal(to_stored(loaded, meta), raw)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_rows_are_the_array_rows(tmp_path, suffix):
    pixels = (ASYMMETRIC * 1000).astype(np.uint16)
    itk.imwrite(itk.image_from_array(pixels[None]), str(tmp_path / f"x{suffix}"))  # 3-D with one slice
    image, meta = load_xray(tmp_path / f"x{suffix}")
    assert (meta.format, meta.shape, meta.stored_dtype) == ("itk", (5, 7), "uint16")
    np.testing.assert_allclose(image, pixels / 65535.0, atol=1e-7)
    np.testing.assert_array_equal(to_stored(image, meta), pixels)


def test_float_images_use_the_data_range(tmp_path):
    pixels = ASYMMETRIC.astype(np.float32) / 4 - 3
    itk.imwrite(itk.image_from_array(pixels), str(tmp_path / "f.mha"))
    image, meta = load_xray(tmp_path / "f.mha")
    assert (meta.window_source, meta.window_low, meta.window_high) == ("data range", -3.0, 5.5)
    np.testing.assert_allclose(image, (pixels + 3) / 8.5, atol=1e-7)
    np.testing.assert_allclose(to_stored(image, meta), pixels, atol=1e-5)


def test_volume_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 2), np.int16), np.eye(4)), tmp_path / "vol.nii")
    with pytest.raises(XRayLoadError, match=r"vol\.nii: expected a 2-D image.*\(4, 5, 2\)"):
        load_xray(tmp_path / "vol.nii")


# --- MONAI transform ---


def test_load_xrayd_gives_channel_first_meta_tensor(tmp_path):
    pixels = (ASYMMETRIC * 7).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    out = LoadXRayd("image")({"image": str(tmp_path / "x.png"), "label": 1})
    image = out["image"]
    assert isinstance(image, MetaTensor) and image.shape == (1, 5, 7) and image.dtype == torch.float32
    assert out["label"] == 1
    assert image.meta["filename_or_obj"] == str(tmp_path / "x.png")
    assert tuple(image.meta["spatial_shape"]) == (7, 5)  # MONAI's (x, y) order, as its own readers report it
    assert XRayMeta(**image.meta["xray"]) == load_xray(tmp_path / "x.png")[1]


def test_xray_reader_plugs_into_monai_load_image(tmp_path):
    pixels = (ASYMMETRIC * 7).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    loader = LoadImaged("image", reader=XRayReader(), ensure_channel_first=True, image_only=True)
    image = loader({"image": str(tmp_path / "x.png")}, reader=XRayReader())["image"]  # MONAI's own transform
    ours = LoadXRayd("image")({"image": str(tmp_path / "x.png")})["image"]
    assert image.shape == ours.shape == (1, 5, 7) and torch.equal(image.as_tensor(), ours.as_tensor())
    assert XRayMeta(**image.meta["xray"]) == load_xray(tmp_path / "x.png")[1]
    reader = XRayReader()
    assert reader.verify_suffix("a.dcm") and reader.verify_suffix(["b.PNG", "c.nii.gz"])
    assert not reader.verify_suffix(tmp_path / "notes.txt")
    with pytest.raises(XRayLoadError, match=r"missing\.png"):  # the reader's own error reaches the caller
        LoadXRayd("image")({"image": str(tmp_path / "missing.png")})


@pytest.mark.parametrize("dataset_type", [Dataset, CacheDataset])
def test_load_xrayd_batches_in_a_dataloader(tmp_path, dataset_type):
    pixels = (ASYMMETRIC * 100).astype(np.uint16)
    paths = [write_dicom(tmp_path / "a.dcm", pixels, "MONOCHROME1", 12), tmp_path / "b.png"]
    Image.fromarray(pixels).save(paths[1])
    items = [{"image": str(path), "label": torch.tensor([i])} for i, path in enumerate(paths)]
    batch = next(iter(DataLoader(dataset_type(items, transform=LoadXRayd("image")), batch_size=2)))
    assert batch["image"].shape == (2, 1, 5, 7)
    assert batch["image"].meta["filename_or_obj"] == [str(path) for path in paths]
    assert batch["image"].meta["xray"]["photometric"] == ["MONOCHROME1", "MONOCHROME2"]
    np.testing.assert_allclose(batch["image"][0, 0].numpy(), 1.0 - pixels / 4095.0, atol=1e-7)


# --- hostile and unusual inputs ---


def nifti_header_only(path: Path, shape: tuple[int, ...], dtype=np.int16) -> Path:
    """A NIfTI-1 file whose header claims `shape` but which holds only 64 bytes of data (416 bytes in all)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    data = header.binaryblock + b"\0" * 4 + b"\0" * 64  # header, empty extension flag, a few voxels
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def test_nifti_header_claiming_a_huge_image_is_refused_before_reading(tmp_path):
    huge = nifti_header_only(tmp_path / "huge.nii", (30000, 30000))
    assert huge.stat().st_size == 416
    tracemalloc.start()
    try:
        with pytest.raises(XRayLoadError, match=r"huge\.nii: header claims an image of shape \(30000, 30000\)"):
            load_xray(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # the 1.8 GB of claimed voxels were never allocated
    with pytest.raises(XRayLoadError, match=r"huge\.nii\.gz: header claims an image of shape \(30000, 30000\)"):
        load_xray(nifti_header_only(tmp_path / "huge.nii.gz", (30000, 30000)))
    # under the pixel limit, but more data than the file holds
    with pytest.raises(XRayLoadError, match=r"short\.nii: header claims \(3000, 2000\) voxels of int16, 12000352 b"):
        load_xray(nifti_header_only(tmp_path / "short.nii", (3000, 2000)))
    assert xray_io.MAX_PIXELS == 2**26


def test_a_small_png_claiming_a_huge_image_is_refused_before_it_is_decoded(tmp_path):
    """A 16-bit PNG of 13000 x 13000 zeros compresses to a few hundred KB; decoding it would take gigabytes."""
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((9000, 8000), np.uint16)).save(path)  # 72 M pixels, above the limit of 67 M
    assert path.stat().st_size < 1_000_000
    with pytest.raises(XRayLoadError, match=r"bomb\.png: header claims an image of shape \(9000, 8000\), more than"):
        load_xray(path)


def test_dicom_header_claiming_a_huge_image_is_refused(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", np.ones((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 30000, 30000
    ds.save_as(path)
    with pytest.raises(XRayLoadError, match=r"huge\.dcm: header claims an image of shape \(30000, 30000\)"):
        load_xray(path)


def test_bad_dicom_value_is_a_load_error_naming_the_file():
    path = get_testdata_file("badVR.dcm")  # pydicom's test file: an IS element holding '1A'
    with pytest.raises(XRayLoadError, match=r"badVR\.dcm: invalid DICOM header value \(ValueError: .*'1A'"):
        load_xray(path, allow_any_modality=True)


def test_directory_is_reported_as_a_directory(tmp_path):
    (tmp_path / "scan.dcm").mkdir()
    with pytest.raises(XRayLoadError, match=r"scan\.dcm: is a directory holding 0 files and 0 folders, not an image"):
        load_xray(tmp_path / "scan.dcm")


def test_series_folder_with_one_dicom_reads_as_that_file(tmp_path):
    """MONAI Label's DICOMweb datastore hands a task the folder it downloaded a series into."""
    series = tmp_path / "1.2.826.0.1.3680043.8.498.1"  # named by its SeriesInstanceUID, no extension
    series.mkdir()
    pixels = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 50
    source = write_dicom(series / "1.2.3.dcm", pixels, photometric="MONOCHROME1", bits_stored=15)
    image, meta = load_xray(series)
    expected, expected_meta = load_xray(source)
    np.testing.assert_array_equal(image, expected)
    assert meta == expected_meta and meta.source == str(source)
    loaded = LoadXRayd("image")({"image": str(series)})["image"]  # the bundle's preprocessing
    assert loaded.meta["filename_or_obj"] == str(source)  # the release is written from the file, not the folder
    np.testing.assert_array_equal(loaded[0].numpy(), expected)


def test_series_folder_with_several_images_is_refused_naming_it(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for name in ("a.dcm", "b.dcm"):
        write_dicom(series / name, np.ones((4, 4), np.uint16))
    with pytest.raises(XRayLoadError, match=r"series: is a directory holding 2 files and 0 folders, .*exactly one"):
        load_xray(series)


def png_with_sbit(path: Path, pixels: np.ndarray, bits: int) -> Path:
    """A grey PNG of `pixels` whose sBIT chunk declares `bits` significant bits."""
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([bits]))
    Image.fromarray(pixels).save(path, pnginfo=info)
    data = path.read_bytes()
    assert b"sBIT" in data[: data.index(b"IDAT")]
    return path


def test_png_sbit_gives_the_real_intensity_range(tmp_path):
    pixels = (ASYMMETRIC * 117).astype(np.uint16)  # 12-bit data (0 .. 3978) in a 16-bit PNG
    pixels[0, 0] = 4095
    image, meta = load_xray(png_with_sbit(tmp_path / "x12.png", pixels, 12))
    np.testing.assert_allclose(image, pixels / 4095.0, atol=1e-7)
    assert (meta.bits_allocated, meta.bits_stored, meta.window_low, meta.window_high) == (16, 12, 0.0, 4095.0)
    assert (meta.stored_dtype, meta.window_source) == ("uint16", "stored range")
    np.testing.assert_array_equal(to_stored(image, meta), pixels)
    np.testing.assert_array_equal(to_stored(np.ones_like(image), meta), 4095)  # never above the 12 bits
    # values scaled up to the full 16 bits (as the PNG standard recommends) keep the full range
    scaled = pixels << 4
    image, meta = load_xray(png_with_sbit(tmp_path / "x12_scaled.png", scaled, 12))
    assert (meta.bits_stored, meta.window_high) == (16, 65535.0)
    np.testing.assert_allclose(image, scaled / 65535.0, atol=1e-7)


def test_non_projection_modalities_are_refused_unless_allowed():
    ct, dose = get_testdata_file("CT_small.dcm"), get_testdata_file("rtdose.dcm")
    with pytest.raises(XRayLoadError, match=r"CT_small\.dcm: Modality CT is not a projection radiograph"):
        load_xray(ct)
    with pytest.raises(XRayLoadError, match=r"rtdose\.dcm: Modality RTDOSE is not a projection radiograph"):
        load_xray(dose)
    with pytest.raises(XRayLoadError, match="Modality CT"):
        LoadXRayd("image")({"image": ct})
    image, meta = load_xray(ct, allow_modalities=["ct"])
    assert image.shape == meta.shape == (128, 128)
    loaded = LoadXRayd("image", allow_any_modality=True)({"image": ct})["image"]
    np.testing.assert_array_equal(loaded[0].numpy(), image)
    with pytest.raises(XRayLoadError, match=r"rtdose\.dcm: multi-frame"):  # allowed, then refused for its shape
        load_xray(dose, allow_any_modality=True)
    assert {"CR", "DX"} <= xray_io.PROJECTION_MODALITIES and "CT" not in xray_io.PROJECTION_MODALITIES


def test_a_cr_extremity_film_is_outside_the_chest_scope_and_refused_naming_its_body_part(tmp_path, capsys):
    """RG3_UNCR.dcm is a real CR film of an extremity: the bundle marks and reads chest radiographs only."""
    extremity = get_testdata_file("RG3_UNCR.dcm")
    assert pydicom.dcmread(extremity, stop_before_pixels=True).BodyPartExamined == "EXTREMITY"
    refused = r"RG3_UNCR\.dcm: BodyPartExamined EXTREMITY is not a chest \(accepted: .*CHEST.*\); the bundle marks"
    with pytest.raises(XRayLoadError, match=refused):
        load_xray(extremity)
    with pytest.raises(XRayLoadError, match=refused):
        LoadXRayd("image")({"image": extremity})
    image, meta = load_xray(extremity, allow_body_parts=["extremity"])  # an explicit choice reads it
    assert image.shape == meta.shape and meta.photometric == "MONOCHROME1"
    assert load_xray(get_testdata_file("RG1_UNCR.dcm"))[0].shape == (1955, 1841)  # the CR chest film is in scope
    # the inference path (configs/inference.json screens its inputs) skips it with the reason
    from xmark_bundle.data.screening import screen_inputs

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "knee.dcm").write_bytes(Path(extremity).read_bytes())
    screened = screen_inputs(tmp_path / "in", tmp_path / "out", progress=False)
    assert not screened.readable and "BodyPartExamined EXTREMITY is not a chest" in screened.skipped["knee.dcm"]


def test_projection_modalities_of_other_body_parts_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "mammo.dcm"
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.Modality, ds.BodyPartExamined = "MG", "BREAST"
    ds.save_as(path)
    with pytest.raises(XRayLoadError, match=r"mammo\.dcm: Modality MG is not a chest radiograph \(accepted: CR, DX"):
        load_xray(path)
    with pytest.raises(XRayLoadError, match=r"mammo\.dcm: BodyPartExamined BREAST is not a chest"):
        load_xray(path, allow_modalities=["MG"])
    assert load_xray(path, allow_modalities=["MG"], allow_body_parts="breast")[0].shape == (1955, 1841)
    assert load_xray(path, allow_any_modality=True)[0].shape == (1955, 1841)
    assert xray_io.CHEST_MODALITIES < xray_io.PROJECTION_MODALITIES and "MG" not in xray_io.CHEST_MODALITIES


def test_load_xrayd_passes_an_image_the_reader_loaded_through_as_monai_deploy_hands_it(tmp_path):
    """MONAI Deploy's inference operator gives the preprocessing a MetaTensor built from its input Image (rows x
    columns, the loader's meta); LoadXRayd must give what it gives for the file itself."""
    path = cr_chest("RG1_UNCR.dcm")
    from_file = LoadXRayd("image")({"image": path})["image"]
    in_memory = MetaTensor.ensure_torch_and_prune_meta(from_file[0].numpy(), dict(from_file.meta))
    passed = LoadXRayd("image")({"image": in_memory, "other": path})["image"]
    assert passed.shape == from_file.shape == (1, *from_file.meta["xray"]["shape"])
    assert torch.equal(passed.as_tensor(), from_file.as_tensor()) and passed.meta["filename_or_obj"] == path
    with pytest.raises(ValueError, match="give one kind"):
        LoadXRayd(["image", "second"])({"image": in_memory, "second": path})
    with pytest.raises(ValueError, match="no X-ray metadata"):
        LoadXRayd("image")({"image": MetaTensor(from_file.as_tensor())})
    with pytest.raises(ValueError, match="has shape"):
        LoadXRayd("image")({"image": MetaTensor(from_file[:, :-1], meta=dict(from_file.meta))})
    with pytest.raises(ValueError, match="outside"):
        LoadXRayd("image")({"image": MetaTensor(from_file * 4095, meta=dict(from_file.meta))})


@pytest.mark.parametrize("modality", [None, "", "OT"])
def test_a_ct_slice_without_a_telling_modality_is_refused_by_its_sop_class(modality, tmp_path):
    """Modality missing, empty or OT says nothing: the SOP class (CT Image Storage) tells the file is no radiograph."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    ds.save_as(tmp_path / "slice.dcm")
    refused = r"slice\.dcm: Modality .* with SOP Class CT Image Storage: not a radiograph"
    with pytest.raises(XRayLoadError, match=refused):
        load_xray(tmp_path / "slice.dcm")
    assert load_xray(tmp_path / "slice.dcm", allow_any_modality=True)[0].shape == (128, 128)
    secondary = pydicom.dcmread(get_testdata_file("image_dfl.dcm"))  # OT, secondary capture: still read
    assert secondary.Modality == "OT" and load_xray(get_testdata_file("image_dfl.dcm"))[0].ndim == 2


@pytest.mark.parametrize("voi", ["LINEAR", "SIGMOID"])
def test_a_large_image_is_mapped_in_blocks_to_the_same_numbers_as_at_once(tmp_path, voi):
    """load_xray maps the window a block of rows at a time (bounded float64 temporaries): the result must equal the
    whole-image float64 chain bit for bit, or a release would change with the image's size."""
    rows = 2 * xray_io._BLOCK_PIXELS // 1500 + 7  # more than two blocks, the last one partial
    pixels = np.random.default_rng(3).integers(0, 4096, (rows, 1500)).astype(np.uint16)
    tags = {"WindowCenter": 1500, "WindowWidth": 2200, "RescaleSlope": 1.5, "RescaleIntercept": -100}
    tags["VOILUTFunction"] = voi
    image, meta = load_xray(write_dicom(tmp_path / "big.dcm", pixels, "MONOCHROME1", 12, **tags))
    modality = pixels.astype(np.float64) * 1.5 - 100
    if voi == "SIGMOID":
        expected = 1.0 / (1.0 + np.exp(-4.0 * (modality - 1500) / 2200))
    else:
        expected = np.clip((modality - meta.window_low) / (meta.window_high - meta.window_low), 0.0, 1.0)
    np.testing.assert_array_equal(image, (1.0 - expected).astype(np.float32))
