"""xmark_bundle.data.xray_writer on real files: pydicom-data's clinical DICOMs and PNG/JPEG/NIfTI/ITK files."""

import hashlib
import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from xmark_bundle.data import (
    XRayWriteError,
    check_output_path,
    max_stored_change,
    quantisation_step,
    to_stored,
    write_stored,
    write_xray,
)
from xmark_bundle.data import load_xray as _load_xray
from xmark_bundle.data.xray_writer import ContainerMismatchWarning, is_lossy, reencode_like, stored_values
from xmark_bundle.transforms import apply_watermark, letterbox, letterbox_geometry, unletterbox

EPS = 16 / 255
# an asymmetric test image: every value distinct, so any flip or transpose is detected
ASYMMETRIC = np.arange(5 * 7).reshape(5, 7)


def load_xray(path):
    """The tests use MR/CT/US files of pydicom-data for their transfer syntaxes and intensity chains."""
    return _load_xray(path, allow_any_modality=True)


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
    # Kakadu wrote the source: OpenJPEG keeps its COD and COM segments but writes its own QCD (guard bits)
    with pytest.warns(ContainerMismatchWarning, match=r"out\.dcm: differs from its source .* JPEG 2000 QCD segment"):
        report = apply_watermark(source, watermarked, benign, geometry, EPS, tmp_path / "out.dcm")
    written = pydicom.dcmread(report["path"])
    assert written.file_meta.TransferSyntaxUID == JPEG2000Lossless
    frame = next(generate_frames(written.PixelData, number_of_frames=1))
    assert b"Kakadu-2.2" in frame[:200] and b"OpenJPEG" not in frame  # the source's COM segment
    assert_same_elements(pydicom.dcmread(source), written)
    np.testing.assert_array_equal(written.pixel_array, expected_stored(source, watermarked, benign, geometry))
    assert report["budget_ok"] and report["max_stored_change"] > 0


def test_cr_lossy_jpeg2000_stays_lossy_at_the_source_ratio(tmp_path):
    source = copy_testdata("RG1_J2KI.dcm", tmp_path)
    image, meta = load_xray(source)
    assert is_lossy(meta)
    changed = image.copy()
    changed[:200, :300] = np.clip(changed[:200, :300] + EPS, 0, 1)
    with pytest.warns(ContainerMismatchWarning, match="JPEG 2000 QCD segment"):
        write_xray(changed, meta, source, tmp_path / "out.dcm")
    original, written = pydicom.dcmread(source), pydicom.dcmread(tmp_path / "out.dcm")
    assert written.file_meta.TransferSyntaxUID == JPEG2000  # 1.2.840.10008.1.2.4.91, as the source
    assert_same_elements(original.file_meta, written.file_meta, ignore=())
    assert_same_elements(original, written)
    assert written.LossyImageCompression == "01"
    # re-encoded at the source's own ratio (stored bits per codestream byte): the file keeps the source's size
    assert abs(os.path.getsize(tmp_path / "out.dcm") / os.path.getsize(source) - 1) < 0.01
    change = np.abs(written.pixel_array.astype(int) - to_stored(changed, meta))
    window = meta.window_high - meta.window_low
    assert np.percentile(change, 99) < 0.01 * window  # lossy, at roughly the source's quality
    assert change[:200, :300].mean() < 0.1 * EPS * window  # the change is there


def test_lossy_jpeg2000_written_by_openjpeg_matches_its_source(tmp_path):
    """A lossy JPEG 2000 source that OpenJPEG wrote (pydicom, GDCM) gets back the same codestream header."""
    ds = pydicom.dcmread(copy_testdata("RG1_UNCR.dcm", tmp_path))
    pixels = ds.pixel_array[:512, :400].copy()
    ds.Rows, ds.Columns = pixels.shape
    ds.compress(JPEG2000, pixels, j2k_cr=[15], generate_instance_uid=False)
    ds.save_as(tmp_path / "j2k.dcm")
    image, meta = load_xray(tmp_path / "j2k.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContainerMismatchWarning)
        write_xray(np.clip(image - EPS / 2, 0, 1), meta, tmp_path / "j2k.dcm", tmp_path / "out.dcm")

    def main_header(path):
        frame = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
        return frame[: frame.index(b"\xff\x90")]  # SOC to the first SOT

    assert main_header(tmp_path / "out.dcm") == main_header(tmp_path / "j2k.dcm")
    assert abs(os.path.getsize(tmp_path / "out.dcm") / os.path.getsize(tmp_path / "j2k.dcm") - 1) < 0.01


# --- other DICOM transfer syntaxes and intensity chains ---


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
        ("MR_small_RLE.dcm", RLELossless),
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


def test_write_stored_writes_what_write_xray_writes(tmp_path):
    """For MONAI Label's pred (stored values): the same file as write_xray, the source's header kept."""
    source = copy_testdata("MR_small.dcm", tmp_path)
    image, meta = load_xray(source)
    changed = np.clip(image - 0.02, 0, 1)
    by_image = write_xray(changed, meta, source, tmp_path / "a.dcm")
    stored = stored_values(changed, meta, source, source_image01=image)
    by_stored = write_stored(stored, meta, tmp_path / "b.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(by_stored).pixel_array, pydicom.dcmread(by_image).pixel_array)
    assert_same_elements(pydicom.dcmread(source), pydicom.dcmread(by_stored))
    with pytest.raises(XRayWriteError, match=r"c\.dcm: stored values float64 .* differ from the source's int16"):
        write_stored(changed.astype(np.float64), meta, tmp_path / "c.dcm")
    # derived: the file write_xray writes as a derived image, byte for byte (the new UID hashes source and pixels)
    derived_by_image = write_xray(changed, meta, source, tmp_path / "d.dcm", derived=True)
    derived_by_stored = write_stored(stored, meta, tmp_path / "e.dcm", derived=True)
    assert derived_by_stored.read_bytes() == derived_by_image.read_bytes() != by_stored.read_bytes()


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
        ("JPGExtended.dcm", "JPEG Extended"),  # 12-bit samples: Pillow's libjpeg is 8-bit
        ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless"),
    ],
)
def test_syntax_without_an_encoder_is_refused_not_changed(tmp_path, name, syntax):
    source = copy_testdata(name, tmp_path)
    image, meta = load_xray(source)
    with pytest.raises(XRayWriteError, match=rf"{name}: .*{syntax}"):
        write_xray(np.clip(image + 0.01, 0, 1), meta, source, tmp_path / "out" / name)
    assert not (tmp_path / "out" / name).exists()


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
    # one stored unit's largest effect, from pydicom's own chain over every stored value the header allows
    ds = pydicom.dcmread(source)
    stored = np.arange(0, 2**ds.BitsStored, dtype=ds.pixel_array.dtype)
    chain = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64) / 65535.0  # 16-bit LUT entries
    assert quantisation_step(meta) == pytest.approx(np.abs(np.diff(chain)).max(), abs=1e-9)
    assert quantisation_step(meta) >= np.diff(np.unique(image)).max() - 1e-6  # no level step is larger


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


@pytest.mark.parametrize(
    ("dtype", "options"),
    [
        (np.uint8, {"compress_level": 1}),
        (np.uint8, {"optimize": True}),
        (np.uint16, {"compress_level": 9}),
        (np.uint16, {"compress_level": 0}),  # stored blocks, as the phantoms are written
    ],
)
def test_png_unchanged_image_is_written_back_byte_for_byte(tmp_path, dtype, options):
    rng = np.random.default_rng(5)
    scale = 255 if dtype == np.uint8 else 4000
    pixels = np.clip(np.add.outer(np.arange(150), np.arange(130)) / 280 + rng.normal(0, 0.02, (150, 130)), 0, 1) * scale
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "site 7")
    info.add(b"sBIT", bytes([8 if dtype == np.uint8 else 12]))
    Image.fromarray(pixels.astype(dtype)).save(tmp_path / "x.png", pnginfo=info, dpi=(96, 96), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContainerMismatchWarning)
        reencode_like(tmp_path / "x.png", tmp_path / "out" / "x.png")
    assert (tmp_path / "out" / "x.png").read_bytes() == (tmp_path / "x.png").read_bytes()


def png_file(pixels: np.ndarray, idat: bytes, extra: list[tuple[bytes, bytes]], interlace: int = 0) -> bytes:
    """A grey 8-bit PNG made by hand: IHDR, ``extra`` chunks, the given zlib stream in 100-byte IDAT chunks, IEND."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 8, 0, 0, 0, interlace)
    chunks = [chunk(b"IHDR", ihdr)] + [chunk(k, v) for k, v in extra]
    chunks += [chunk(b"IDAT", idat[i : i + 100]) for i in range(0, len(idat), 100)] + [chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def test_interlaced_png_with_a_fixed_filter_is_reproduced(tmp_path):
    pixels = (np.add.outer(np.arange(37), np.arange(29)) * 3 % 251).astype(np.uint8)
    passes = [
        pixels[r::dr, c::dc]
        for r, c, dr, dc in (
            (0, 0, 8, 8),
            (0, 4, 8, 8),
            (4, 0, 8, 4),
            (0, 2, 4, 4),
            (2, 0, 4, 2),
            (0, 1, 2, 2),
            (1, 0, 2, 1),
        )
    ]
    raw = b"".join(
        bytes([2]) + (p[y].astype(int) - (p[y - 1] if y else 0)).astype(np.uint8).tobytes()
        for p in passes
        if p.size
        for y in range(p.shape[0])
    )  # filter "up" on every row
    data = png_file(pixels, zlib.compress(raw, 9), [(b"tIME", bytes(7)), (b"gAMA", struct.pack(">I", 45455))], 1)
    (tmp_path / "x.png").write_bytes(data)
    image, meta = load_xray(tmp_path / "x.png")
    np.testing.assert_array_equal(to_stored(image, meta), pixels)
    reencode_like(tmp_path / "x.png", tmp_path / "same.png")
    assert (tmp_path / "same.png").read_bytes() == data
    changed = np.clip(image + 0.02, 0, 1)
    write_xray(changed, meta, tmp_path / "x.png", tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as out:
        assert out.info.get("interlace") == 1
        np.testing.assert_array_equal(np.asarray(out), to_stored(changed, meta))


def test_png_deflate_that_zlib_cannot_reproduce_is_warned(tmp_path):
    pixels = (np.add.outer(np.arange(40), np.arange(30)) % 256).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    compressor = zlib.compressobj(9)
    stream = compressor.compress(raw[:600]) + compressor.flush(zlib.Z_FULL_FLUSH) + compressor.compress(raw[600:])
    (tmp_path / "x.png").write_bytes(png_file(pixels, stream + compressor.flush(), []))
    image, meta = load_xray(tmp_path / "x.png")
    with pytest.warns(ContainerMismatchWarning, match=r"no zlib setting reproduces the source's \(used level \d\)"):
        write_xray(np.clip(image + 0.1, 0, 1), meta, tmp_path / "x.png", tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes()[41:43] == (tmp_path / "x.png").read_bytes()[41:43]  # zlib header
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out.png")), to_stored(np.clip(image + 0.1, 0, 1), meta)
    )


def test_written_file_has_the_source_permissions_and_time(tmp_path):
    Image.fromarray(ASYMMETRIC.astype(np.uint8)).save(tmp_path / "x.png")
    os.chmod(tmp_path / "x.png", 0o640)
    os.utime(tmp_path / "x.png", (1.5e9, 1.5e9))
    image, meta = load_xray(tmp_path / "x.png")
    write_xray(np.clip(image + 0.1, 0, 1), meta, tmp_path / "x.png", tmp_path / "out" / "x.png")
    written = os.stat(tmp_path / "out" / "x.png")
    assert (oct(written.st_mode & 0o7777), written.st_mtime) == ("0o640", 1.5e9)


def test_equal_channel_rgb_png_stays_rgb(tmp_path):
    pixels = (ASYMMETRIC * 7).astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(tmp_path / "rgb.png")
    image, meta = load_xray(tmp_path / "rgb.png")
    write_xray(np.clip(image + 0.1, 0, 1), meta, tmp_path / "rgb.png", tmp_path / "out.png")
    written = np.asarray(Image.open(tmp_path / "out.png"))
    assert written.shape == (5, 7, 3)
    np.testing.assert_array_equal(written, np.stack([to_stored(np.clip(image + 0.1, 0, 1), meta)] * 3, axis=-1))
    assert load_xray(tmp_path / "out.png")[1].photometric == "RGB"


def jpeg_head(data: bytes) -> list[bytes]:
    """The segments of a JPEG stream from SOI up to its first SOS (exclusive)."""
    segments, i = [], 2
    while data[i + 1] != 0xDA:
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        segments.append(data[i : i + 2 + length])
        i += 2 + length
    return segments


def test_jpeg_is_rewritten_with_the_source_tables_and_reported_lossy(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.clip(np.add.outer(np.arange(96), np.arange(80)) + rng.normal(0, 4, (96, 80)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.jpg", quality=90)
    image, meta = load_xray(tmp_path / "x.jpg")
    assert is_lossy(meta)
    watermarked, benign, geometry = sign_watermark(image, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_watermark(tmp_path / "x.jpg", watermarked, benign, geometry, EPS, tmp_path / "out.jpg")
    assert report["lossy"] and report["format"] == "jpeg"
    assert report["budget_ok"] and report["max_stored_change"] <= 16  # kept within the budget, not only reported
    assert not [w for w in caught if "re-encoding" in str(w.message)]
    assert not [w for w in caught if issubclass(w.category, ContainerMismatchWarning)]
    source, written = (tmp_path / "x.jpg").read_bytes(), (tmp_path / "out.jpg").read_bytes()
    assert jpeg_head(written) == jpeg_head(source)  # JFIF, quantisation tables, frame header, Huffman tables
    with Image.open(tmp_path / "out.jpg") as out:
        assert (out.format, out.mode) == ("JPEG", "L")
        decoded = np.asarray(out).astype(int)
    wanted = expected_stored(tmp_path / "x.jpg", watermarked, benign, geometry).astype(int)
    assert np.abs(decoded - wanted).max() <= 12  # quality 90 once more
    assert report["max_abs_change01"] <= EPS + 12 / 255


def test_jpeg_header_segments_are_the_source_own(tmp_path):
    """EXIF, a comment, no JFIF segment, optimised Huffman tables, restart markers, 4:2:0: all as in the source."""
    rng = np.random.default_rng(3)
    grey = np.clip(np.add.outer(np.arange(120), np.arange(104)) + rng.normal(0, 6, (120, 104)), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x010F] = "Vendor X"  # Make
    buffer = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, -1)).save(
        buffer,
        format="JPEG",
        quality=80,
        subsampling="4:2:0",
        optimize=True,
        exif=exif,
        comment=b"site 7",
        restart_marker_blocks=6,
    )
    head = jpeg_head(buffer.getvalue())
    head = [segment for segment in head if not segment.startswith(b"\xff\xe0")]  # an encoder without JFIF
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8" + b"".join(head) + buffer.getvalue()[2 + sum(map(len, head)) + 18 :])
    assert jpeg_head((tmp_path / "x.jpg").read_bytes()) == head
    image, meta = load_xray(tmp_path / "x.jpg")
    assert meta.photometric == "RGB"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContainerMismatchWarning)
        write_xray(np.clip(image + 0.05, 0, 1), meta, tmp_path / "x.jpg", tmp_path / "out.jpg")
    written = jpeg_head((tmp_path / "out.jpg").read_bytes())
    huffman = [segment[:1] == b"\xff" and segment[1] == 0xC4 for segment in head]
    assert [s for s, h in zip(written, huffman, strict=True) if not h] == [
        s for s, h in zip(head, huffman, strict=True) if not h
    ]
    assert [s[:2] for s in written] == [s[:2] for s in head]  # same marker sequence, optimised tables in place
    with Image.open(tmp_path / "out.jpg") as out:
        assert out.info["comment"] == b"site 7" and out.getexif()[0x010F] == "Vendor X"
        decoded = np.asarray(out)
    assert np.abs(decoded[..., 0].astype(int) - to_stored(np.clip(image + 0.05, 0, 1), meta)).max() <= 16


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
    step = meta.rescale_slope / (meta.window_high - meta.window_low)
    assert change["quantisation_step01"] == pytest.approx(step)
    # one stored pixel raised by 37, inside the window before and after: 37 stored units, 37 steps in [0, 1]
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array.copy()
    modality = pixels.astype(np.float64) * meta.rescale_slope + meta.rescale_intercept
    margin = 50 * meta.rescale_slope
    inside = (modality > meta.window_low + margin) & (modality < meta.window_high - margin)
    row, col = np.argwhere(inside)[0]
    pixels[row, col] += 37
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "changed.dcm")
    changed = max_stored_change(source, tmp_path / "changed.dcm")
    assert changed["max_stored_change"] == 37.0
    assert changed["max_abs_change01"] == pytest.approx(37 * step, abs=1e-7)  # [0, 1] images are float32


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "MR_small_RLE.dcm", "image_dfl.dcm"])
def test_derived_dicom_gets_a_new_instance_uid_and_references_its_source(tmp_path, name):
    """derived=True (inference, MONAI Deploy): a new SOP Instance UID in the data set and the file meta, ImageType
    DERIVED, a Derivation Description and a Source Image Sequence naming the source; the pixels and every other
    element are those of the plain write (the release's, which keeps the UID); the UID is a valid one, the same for
    the same pixels and another for other pixels."""
    from pydicom.uid import UID

    from xmark_bundle.data.xray_writer import derived_instance_uid

    source = copy_testdata(name, tmp_path)
    if name == "RG1_UNCR.dcm":  # as a modality writes it (the test file says DERIVED already)
        ds = pydicom.dcmread(source)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.save_as(source)
    image, meta = load_xray(source)
    changed = image.copy()
    changed[::3, ::2] = np.clip(changed[::3, ::2] - 0.02, 0, 1)
    kept = write_xray(changed, meta, source, tmp_path / "kept" / name)
    derived = write_xray(changed, meta, source, tmp_path / "derived" / name, derived=True)
    again = write_xray(changed, meta, source, tmp_path / "again" / name, derived=True)
    original, plain, written = pydicom.dcmread(source), pydicom.dcmread(kept), pydicom.dcmread(derived)
    assert plain.SOPInstanceUID == original.SOPInstanceUID  # the release's write: the file replaces its source
    assert written.SOPInstanceUID != original.SOPInstanceUID and UID(written.SOPInstanceUID).is_valid
    assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
    assert written.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    source_type = list(original.get("ImageType", []))
    assert list(written.ImageType) == ["DERIVED", *source_type[1:]] if source_type else ["DERIVED", "SECONDARY"]
    assert written.DerivationDescription.startswith("X-Mark")
    (reference,) = written.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == original.SOPClassUID
    np.testing.assert_array_equal(written.pixel_array, plain.pixel_array)
    assert_same_elements(
        plain,
        written,
        ignore=("PixelData", "SOPInstanceUID", "ImageType", "DerivationDescription", "SourceImageSequence"),
    )
    assert derived.read_bytes() == again.read_bytes()  # deterministic: configs/inference.json and Deploy agree
    assert written.SOPInstanceUID == derived_instance_uid(original.SOPInstanceUID, plain.pixel_array)
    assert derived_instance_uid(original.SOPInstanceUID, original.pixel_array) != written.SOPInstanceUID
    # non-DICOM formats carry no instance identity: derived changes nothing there
    png = tmp_path / "x.png"
    Image.fromarray((np.arange(30 * 20).reshape(30, 20) * 50).astype(np.uint16)).save(png)
    png01, png_meta = load_xray(png)
    a = write_xray(np.clip(png01 + 0.01, 0, 1), png_meta, png, tmp_path / "a" / "x.png")
    b = write_xray(np.clip(png01 + 0.01, 0, 1), png_meta, png, tmp_path / "b" / "x.png", derived=True)
    assert a.read_bytes() == b.read_bytes()
