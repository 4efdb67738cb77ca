"""File-level tells of a release: what a marked file's container and file-system entry say beyond its pixels.

Real files written and read back: a PNG whose whole image stream is one IDAT chunk keeps one chunk when marking makes
the stream longer; a deflated DICOM deflated at zlib level 1 comes back at level 1 (checked by recompressing its
inflated data set with zlib, independently of the writer); a release of phantoms re-encoded as JPEG goes through the
writer for every JPEG (``reencode="auto"``), and every released file, marked or not, ends with its source's
modification time as modification and access time, change times and inode numbers in path order.
"""

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian

from xmark_bundle.data.chexpert import prepare_datalist
from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.data.xray_writer import reencode_like, write_xray
from xmark_bundle.experiments.detectability import file_level_tells
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.release import watermark_release

EPS = 16 / 255


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _chunk_kinds(data: bytes) -> list[bytes]:
    kinds, i = [], 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i : i + 4])[0]
        kinds.append(data[i + 4 : i + 8])
        i += 12 + length
    return kinds


def _noise(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-EPS, EPS, size=shape)


def test_a_png_written_as_one_idat_chunk_keeps_one_chunk(tmp_path):
    rows, cols = np.mgrid[0:400, 0:400]
    pixels = (40 + (rows + cols) * 150 // 800).astype(np.uint8)  # smooth: its stream is short
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter none on every row
    ihdr = struct.pack(">IIBBBBB", 400, 400, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    source = tmp_path / "one.png"
    source.write_bytes(data)
    image, meta = load_xray(source)
    out = write_xray(np.clip(image + _noise(image.shape, 0), 0, 1), meta, source, tmp_path / "out" / "one.png")
    written = out.read_bytes()
    assert len(written) > 2 * 65536  # longer than Pillow's block: the old writer split it
    assert _chunk_kinds(written) == [b"IHDR", b"IDAT", b"IEND"]
    with Image.open(out) as check:  # a valid PNG of the marked pixels
        assert 0 < np.abs(np.asarray(check).astype(int) - pixels).max() <= 16


def _deflated_dicom(path: Path, pixels: np.ndarray, level: int) -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()  # pydicom deflates at level 6: deflate the data set again at ``level``
    end = 144 + struct.unpack("<I", data[140:144])[0]
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    stream = compressor.compress(zlib.decompress(data[end:], -15)) + compressor.flush()
    path.write_bytes(data[:end] + stream + b"\x00" * (len(stream) % 2))
    return path


def _deflate_level(path: Path) -> int | None:
    """The zlib level that reproduces the file's deflated data set, found here by brute force."""
    data = path.read_bytes()
    end = 144 + struct.unpack("<I", data[140:144])[0]
    inflater = zlib.decompressobj(-15)
    raw = inflater.decompress(data[end:])
    stream = data[end : len(data) - len(inflater.unused_data)]
    for level in range(10):
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
        if compressor.compress(raw) + compressor.flush() == stream:
            return level
    return None


def test_a_deflated_dicom_keeps_its_zlib_level(tmp_path):
    rows, cols = np.mgrid[0:200, 0:160]
    pixels = (1000 + 8 * rows + 5 * cols + np.random.default_rng(1).integers(0, 40, (200, 160))).astype(np.uint16)
    source = _deflated_dicom(tmp_path / "level1.dcm", pixels, 1)
    assert _deflate_level(source) == 1
    reencode_like(source, tmp_path / "same" / "level1.dcm")  # unchanged pixels: the source, byte for byte
    assert (tmp_path / "same" / "level1.dcm").read_bytes() == source.read_bytes()
    image, meta = load_xray(source, allow_any_modality=True)
    out = write_xray(np.clip(image + _noise(image.shape, 2), 0, 1), meta, source, tmp_path / "out" / "level1.dcm")
    assert _deflate_level(out) == 1
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert not np.array_equal(pydicom.dcmread(out).pixel_array, pixels)


@pytest.fixture(scope="module")
def jpeg_release(tmp_path_factory):
    """A release of 24 phantoms re-saved as JPEG (quality 90), half of the target class marked by a full-budget G."""
    root = tmp_path_factory.mktemp("tells")
    data = root / "data"
    write_phantom_dataset(data, n=24, seed=5, min_size=200, max_size=260, dicom_fraction=0.0)
    for png in sorted(data.rglob("*.png")):
        with Image.open(png) as image:
            pixels = np.asarray(image)
        if pixels.dtype != np.uint8:
            pixels = (pixels >> 8).astype(np.uint8)
        Image.fromarray(pixels).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    for csv in ("train.csv", "valid.csv"):
        (data / csv).write_text((data / csv).read_text().replace(".png", ".jpg"))
    prepare_datalist(data / "train.csv", data / "datalist.json", test_csv=data / "valid.csv")
    old = 1_600_000_000
    for index, path in enumerate(sorted(p for p in data.rglob("*") if p.is_file())):
        os.utime(path, (old + 7 * index, old + index))  # atime differs from mtime in every source
    files = sorted(p for p in data.rglob("*") if p.is_file())
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}
    torch.manual_seed(0)
    generator = XMarkGenerator([4, 8, 16, 32, 64], eps=EPS)
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(5.0)
    pipeline = WatermarkPipeline(
        generator, ResizedClassifier(build_classifier("resnet18"), 64), "classifier.layer4", 64
    )
    save_watermark(pipeline, root / "g.pt")
    manifest = watermark_release(
        load_watermark(root / "g.pt"),
        root / "g.pt",
        data,
        data / "datalist.json",
        root / "release",
        root / "manifest.json",
        gamma=0.5,
        progress=False,
    )
    # what the file system says right after the release, before a test reads a file (reading sets atime)
    released = sorted(p for p in (root / "release").rglob("*") if p.is_file())
    entries = {p: p.stat() for p in released}
    tells = file_level_tells(root / "release", root / "manifest.json")
    return manifest, data, root / "release", before, entries, tells


def test_every_jpeg_goes_through_the_writer_and_the_budget_is_reported_as_measured(jpeg_release):
    manifest, data, release, before, _, _ = jpeg_release
    jpegs = sorted(release.rglob("*.jpg"))
    assert manifest["marked"]
    # JPEG's own re-encoding error may exceed the budget; the manifest says so rather than calling it kept
    assert manifest["budget_ok"] == all(r["max_change_of_range"] <= EPS for r in manifest["marked"])
    assert manifest["max_change_of_range"] == max(r["max_change_of_range"] for r in manifest["marked"])
    assert manifest["counts"]["reencoded"] == len(jpegs) - len(manifest["marked"]) > 0
    differ = [p for p in jpegs if p.read_bytes() != (data / p.relative_to(release)).read_bytes()]
    assert len(differ) == len(jpegs)  # none is a byte copy that a double-compression test could tell apart
    for path, (digest, mtime_ns) in before.items():  # the source data set is untouched
        assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == (digest, mtime_ns)


def test_every_released_file_has_one_time_policy_and_path_order(jpeg_release):
    _, data, release, before, entries, tells = jpeg_release
    released = sorted(entries, key=lambda p: p.relative_to(release).as_posix())  # the release's path order
    for path in released:
        source = data / path.relative_to(release)
        status = entries[path]
        assert status.st_mtime_ns == status.st_atime_ns == before[source][1], path
    ctimes = [entries[p].st_ctime_ns for p in released]
    assert ctimes == sorted(ctimes)  # change times in path order, whichever files were marked
    # inode numbers are the file system's to give; the release creates every file anew in path order, a batch at a
    # time, so a file system that hands out the lowest free number (ext4) or a counter (tmpfs, btrfs) numbers them in
    # path order (other processes creating files meanwhile may leave gaps or take a freed number)
    inodes = [entries[p].st_ino for p in released]
    rank = np.argsort(np.argsort(inodes))
    assert np.corrcoef(rank, np.arange(len(inodes)))[0, 1] > 0.8


def test_file_level_tells_reports_size_and_compressibility(jpeg_release):
    tells = jpeg_release[-1]
    row = tells[".jpg"]
    assert row["n_marked"] > 0 and row["n_unmarked"] > 0
    for key in ("bytes_per_pixel_auroc", "compressibility_auroc"):
        assert 0.0 <= row[key] <= 1.0


def test_an_unknown_reencode_policy_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="reencode must be one of mismatch, auto, all"):
        watermark_release(
            None, tmp_path / "g.pt", tmp_path, tmp_path / "d.json", tmp_path / "r", tmp_path / "m.json", reencode="x"
        )
    assert not (tmp_path / "r").exists()
