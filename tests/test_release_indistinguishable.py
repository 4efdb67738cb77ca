"""A released marked file cannot be told from an unmarked one by anything but its pixel values (DESIGN.md section 6).

A small mixed data set is built the way an archive holds it (one encoder setting per format, varied smooth
X-ray-like content): 8-bit PNG at a non-default zlib level with text and pHYs chunks, 12-bit data in 16-bit PNG with
an sBIT chunk, grey JPEG at quality 85 and equal-channel RGB JPEG with 4:2:0 subsampling, and DICOM CR images
uncompressed, RLE, JPEG 2000 lossless, JPEG 2000 lossy (fixed compression ratio) and JPEG baseline. Half of each
group is marked through the release's writer path (:func:`~xmark_bundle.transforms.watermark.apply_watermark`, with a
bounded smooth residual standing in for G's), the other half copied byte for byte as the release copies
(``shutil.copy2``). A data user's view of each file is then reduced to container features, computed here with parsers
independent of the writer:

- categorical (must be identical for every file of a group): PNG chunk order, IHDR fields, ancillary chunk
  payloads, zlib header, IDAT chunk size, first deflate block type, filter types used; JPEG marker sequence, DQT,
  SOF (without the image size), DRI, SOS headers, whether the Huffman tables are libjpeg's standard ones, APP0;
  DICOM transfer syntax, the set of (tag, VR) in file meta and data set, preamble, encapsulation (Basic Offset Table
  empty or not, fragments per frame), and inside the frame the JPEG features above or the JPEG 2000 main header
  (SIZ without the size, COD, QCD, COM); file permission bits.
- numeric (a detector must do no better than chance): bytes per pixel over the group's median, the file's
  modification time, and the share of each PNG row filter type.

For every group and numeric feature the AUROC of marked against unmarked files (Mann-Whitney U, ties counted half)
must satisfy ``max |AUROC - 0.5|`` over the group's features below the 99th percentile of the same statistic under
2000 random relabellings (a permutation test of "no feature separates the two halves" at the 1 % level; the
relabelled halves have the real sizes, so the bound accounts for the small groups and the number of features).
"""

import io
import os
import shutil
import struct
import warnings
import zlib
from copy import deepcopy
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from scipy.ndimage import gaussian_filter

from xmark_bundle.data.chexpert import prepare_datalist
from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.release import watermark_release
from xmark_bundle.transforms import apply_watermark, letterbox, letterbox_geometry

EPS = 16 / 255
PER_GROUP = 16  # files per format group, half of them marked
MODEL_SIZE = 64
PERMUTATIONS = 2000
GROUPS = ("png8", "png16", "jpeg_grey", "jpeg_rgb420", "dcm_native", "dcm_rle", "dcm_j2k", "dcm_j2k_lossy", "dcm_jpeg")


# --- the data set ---


def _xray_like(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A smooth chest-like image in [0, 1]: two dark lungs in a bright body, a gradient, smoothed noise, grain."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] / np.array(shape).reshape(2, 1, 1)
    body = np.exp(-(((cols - 0.5) / 0.45) ** 4))
    lungs = sum(
        np.exp(-(((cols - cx) / 0.16) ** 2 + ((rows - 0.45) / 0.3) ** 2)) for cx in (0.3 + rng.normal(0, 0.02), 0.7)
    )
    image = 0.2 + 0.6 * body - 0.35 * lungs + rng.uniform(-0.1, 0.1) * rows
    image += gaussian_filter(rng.normal(size=shape), rng.uniform(2, 6)) * rng.uniform(0.3, 0.8)
    image += rng.normal(0, 0.01, shape)
    return np.clip(image, 0, 1)


def _dicom(template: pydicom.Dataset, pixels: np.ndarray, bits_stored: int, syntax, index: int) -> pydicom.Dataset:
    """A CR dataset holding ``pixels`` in ``syntax`` (compressed by pydicom's encoders, or Pillow for JPEG)."""
    ds = deepcopy(template)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = pixels.dtype.itemsize * 8, bits_stored, bits_stored - 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits_stored - 1), 2**bits_stored
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.999.{index}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if pixels.dtype.itemsize == 1 else "OW"
    if syntax == JPEGBaseline8Bit:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        ds.PixelData = encapsulate([buffer.getvalue()], has_bot=False)
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    elif syntax == JPEG2000:
        ds.compress(JPEG2000, pixels, j2k_cr=[12], generate_instance_uid=False)
        ds.LossyImageCompression = "01"
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, pixels, generate_instance_uid=False)
    return ds


def _write_source(group: str, index: int, rng: np.random.Generator, folder: Path, template: pydicom.Dataset) -> Path:
    image = _xray_like(rng, (int(rng.integers(176, 256)), int(rng.integers(160, 240))))
    to8, to12 = np.round(image * 255).astype(np.uint8), np.round(image * 4095).astype(np.uint16)
    if group == "png8":
        info = PngImagePlugin.PngInfo()
        info.add_text("Source", "site 3, CR room 2")
        path = folder / f"{group}_{index:02d}.png"
        Image.fromarray(to8).save(path, compress_level=3, pnginfo=info, dpi=(150, 150))
    elif group == "png16":
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([12]))
        path = folder / f"{group}_{index:02d}.png"
        Image.fromarray(to12).save(path, pnginfo=info)
    elif group == "jpeg_grey":
        path = folder / f"{group}_{index:02d}.jpg"
        Image.fromarray(to8).save(path, quality=85)
    elif group == "jpeg_rgb420":
        path = folder / f"{group}_{index:02d}.jpg"
        Image.fromarray(np.repeat(to8[..., None], 3, axis=-1)).save(path, quality=85, subsampling="4:2:0")
    else:
        syntax, pixels, bits = {
            "dcm_native": (ExplicitVRLittleEndian, to12, 12),
            "dcm_rle": (RLELossless, to12, 12),
            "dcm_j2k": (JPEG2000Lossless, to12, 12),
            "dcm_j2k_lossy": (JPEG2000, to12, 12),
            "dcm_jpeg": (JPEGBaseline8Bit, to8, 8),
        }[group]
        path = folder / f"{group}_{index:02d}.dcm"
        _dicom(template, pixels, bits, syntax, index).save_as(path, enforce_file_format=True)
    os.chmod(path, 0o644)
    stamp = 1.6e9 + rng.uniform(0, 3e7)  # an archive's files were written over months
    os.utime(path, (stamp, stamp))
    return path


def _mark(source: Path, target: Path, seed: int) -> dict:
    """Mark ``source`` as the release does: a bounded smooth model-resolution residual through apply_watermark."""
    image = load_xray(source)[0]
    geometry = letterbox_geometry(image.shape, MODEL_SIZE)
    benign = letterbox(torch.from_numpy(image)[None], geometry)
    rng = np.random.default_rng(seed)
    residual = np.tanh(gaussian_filter(rng.normal(size=(MODEL_SIZE, MODEL_SIZE)), 2) * 8) * EPS
    watermarked = (benign + torch.from_numpy(residual).float()[None]).clamp(0, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = apply_watermark(source, watermarked, benign, geometry, EPS, target)
        except Exception as err:  # reported by every test of the group, so the other groups still run
            return {"error": f"{type(err).__name__}: {err}"}
    report["warnings"] = [str(w.message) for w in caught]
    return report


def _group(release: dict, group: str) -> list[tuple[Path, bool, dict | None]]:
    """The group's files, failing the test when one of them could not be marked."""
    errors = [report["error"] for _, _, report in release[group] if report and "error" in report]
    if errors:
        pytest.fail(f"{group}: {len(errors)} file(s) could not be marked, e.g. {errors[0]}")
    return release[group]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """{group: [(released path, marked?, report)]} for the mixed data set."""
    root = tmp_path_factory.mktemp("indistinguishable")
    sources, released = root / "sources", root / "release"
    sources.mkdir()
    released.mkdir()
    template = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    rng = np.random.default_rng(20240611)
    out = {}
    for group in GROUPS:
        marked = set(rng.permutation(PER_GROUP)[: PER_GROUP // 2].tolist())
        out[group] = []
        for index in range(PER_GROUP):
            source = _write_source(group, index, rng, sources, template)
            target = released / source.name
            if index in marked:
                out[group].append((target, True, _mark(source, target, seed=index)))
            else:
                shutil.copy2(source, target)  # as xmark_bundle.release copies
                out[group].append((target, False, None))
    return out


# --- what a data user can see without looking at pixel values ---


def _png_features(data: bytes) -> tuple[dict, dict]:
    chunks, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        chunks.append((data[i + 4 : i + 8], data[i + 8 : i + 8 + length]))
        i += 12 + length
    kinds = [k.decode() for k, _ in chunks]
    collapsed = [k for j, k in enumerate(kinds) if k != "IDAT" or kinds[j - 1] != "IDAT"]
    idat = [payload for kind, payload in chunks if kind == b"IDAT"]
    stream = b"".join(idat)
    ihdr = chunks[0][1]
    width, height, depth, colour = struct.unpack(">IIBB", ihdr[:10])
    raw = np.frombuffer(zlib.decompress(stream), np.uint8)
    row = width * (3 if colour == 2 else 1) * depth // 8 + 1
    filters = raw.reshape(height, row)[:, 0]
    categorical = {
        "chunks": tuple(collapsed),
        "ihdr": ihdr[8:],
        "ancillary": tuple((k, p) for k, p in chunks if k not in (b"IHDR", b"IDAT", b"IEND")),
        "zlib_header": stream[:2],
        "first_block_type": (stream[2] >> 1) & 3,
        # the encoder's IDAT chunk size shows only in files that need more than one chunk: checked group-wide
        "idat_split": (frozenset(len(c) for c in idat[:-1]), len(idat[-1])),
    }
    numeric = {f"filter_{f}_share": float(np.mean(filters == f)) for f in range(5)}
    return categorical, numeric


_STANDARD_HUFFMAN = None


def _jpeg_features(data: bytes) -> dict:
    global _STANDARD_HUFFMAN
    if _STANDARD_HUFFMAN is None:  # libjpeg's standard (Annex K) tables, as Pillow writes them without optimize
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, format="JPEG")
        _STANDARD_HUFFMAN = set(_jpeg_segments(buffer.getvalue())[1].get(0xC4, []))
    markers, segments = _jpeg_segments(data)
    sof = next(s for m, s in segments.items() if m in (0xC0, 0xC1, 0xC2))[0]
    return {
        "markers": tuple(markers),
        "dqt": tuple(segments.get(0xDB, [])),
        "sof": sof[:1] + sof[5:],  # precision and components, not the image size
        "dri": tuple(segments.get(0xDD, [])),
        "sos": tuple(segments.get(0xDA, [])),
        "standard_huffman": set(segments.get(0xC4, [])) <= _STANDARD_HUFFMAN,
        "app": tuple(s for m, ss in segments.items() if 0xE0 <= m <= 0xEF or m == 0xFE for s in ss),
        "trailing": data[data.rfind(b"\xff\xd9") + 2 :],
    }


def _jpeg_segments(data: bytes) -> tuple[list[int], dict[int, list[bytes]]]:
    """Marker codes up to the first SOS and the payload of each header segment (and of every SOS)."""
    markers, segments, i = [], {}, 2
    while True:
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        markers.append(marker)
        segments.setdefault(marker, []).append(data[i + 4 : i + 2 + length])
        i += 2 + length
        if marker == 0xDA:
            break
    while (i := data.find(b"\xff\xda", i)) >= 0:  # further scans (progressive)
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        segments[0xDA].append(data[i + 4 : i + 2 + length])
        i += 2 + length
    return markers, segments


def _j2k_features(codestream: bytes) -> dict:
    segments, i = {}, 2
    while True:
        marker, length = struct.unpack(">HH", codestream[i : i + 4])
        if marker == 0xFF90:
            break
        segments.setdefault(marker, []).append(codestream[i + 4 : i + 2 + length])
        i += 2 + length
    siz = segments[0xFF51][0]
    return {
        "markers": tuple(segments),
        "siz": siz[:2] + siz[34:],  # capabilities and components, not the sizes
        "cod": tuple(segments[0xFF52]),
        "qcd": tuple(segments[0xFF5C]),
        "com": tuple(segments.get(0xFF64, [])),
    }


def _dicom_features(path: Path) -> dict:
    ds = pydicom.dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    features = {
        "syntax": str(syntax),
        "meta_elements": tuple((e.tag, e.VR) for e in ds.file_meta),
        "elements": tuple((e.tag, e.VR) for e in ds.iterall()),
        "preamble": ds.preamble,
        "pixel_vr": (ds["PixelData"].VR, ds["PixelData"].is_undefined_length),
        "lossy_tags": (ds.get("LossyImageCompression"), ds.get("LossyImageCompressionRatio")),
    }
    if syntax.is_compressed:
        raw = ds.PixelData
        items, i = [], 0
        while i + 8 <= len(raw):
            _, _, length = struct.unpack("<HHI", raw[i : i + 8])
            items.append(raw[i + 8 : i + 8 + length])
            i += 8 + length
        features["bot_empty"] = len(items[0]) == 0
        features["fragments"] = len(items) - 1
        frame = next(generate_frames(raw, number_of_frames=1))
        if frame[:2] == b"\xff\xd8":
            inner = _jpeg_features(frame)
            inner["trailing"] = inner["trailing"].rstrip(b"\x00")  # the item's padding to even length
        elif frame[:2] == b"\xff\x4f":
            inner = _j2k_features(frame)
        else:  # RLE: the header's segment count
            inner = {"rle_segments": struct.unpack("<I", frame[:4])[0]}
        features.update({f"frame_{key}": value for key, value in inner.items()})
    return features


def _features(path: Path) -> tuple[dict, dict]:
    data = path.read_bytes()
    info = path.stat()
    if path.suffix == ".png":
        categorical, numeric = _png_features(data)
        with Image.open(path) as image:
            pixels = image.size[0] * image.size[1]
    elif path.suffix == ".jpg":
        categorical, numeric = _jpeg_features(data), {}
        with Image.open(path) as image:
            pixels = image.size[0] * image.size[1]
    else:
        categorical, numeric = _dicom_features(path), {}
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        pixels = ds.Rows * ds.Columns
    categorical["mode"] = oct(info.st_mode & 0o7777)
    numeric["bytes_per_pixel"] = len(data) / pixels
    numeric["mtime"] = info.st_mtime
    return categorical, numeric


def _aurocs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of ``scores`` (n) for each row of boolean ``labels`` (k x n); ties count half."""
    wins = (scores[:, None] > scores[None, :]) + 0.5 * (scores[:, None] == scores[None, :])
    positive = labels.astype(np.float64)
    pairs = positive.sum(axis=1) * (1 - positive).sum(axis=1)
    return ((positive @ wins) * (1 - positive)).sum(axis=1) / pairs


def _separation(matrix: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The largest |AUROC - 0.5| over the columns (features) of ``matrix``, for each row of ``labels``."""
    return np.max([np.abs(_aurocs(matrix[:, j], labels) - 0.5) for j in range(matrix.shape[1])], axis=0)


# --- the tests ---


@pytest.mark.parametrize("group", GROUPS)
def test_categorical_container_features_are_identical(release, group):
    files = _group(release, group)
    features = [(_features(path)[0], marked) for path, marked, _ in files]
    if "idat_split" in features[0][0]:  # every chunk but the last has one size, and single chunks are not larger
        splits = [categorical.pop("idat_split") for categorical, _ in features]
        sizes = frozenset().union(*(split for split, _ in splits))
        assert len(sizes) <= 1, f"IDAT chunk sizes {sorted(sizes)}"
        assert all(last <= max(sizes, default=last) for _, last in splits)
    reference = features[0][0]
    for (categorical, marked), (path, _, _) in zip(features, files, strict=True):
        differing = sorted(key for key in reference if categorical.get(key) != reference[key])
        assert not differing, f"{path.name} ({'marked' if marked else 'copied'}) differs in {differing}"


@pytest.mark.parametrize("group", GROUPS)
def test_numeric_container_features_do_not_separate_marked_files(release, group):
    files = _group(release, group)
    rows = [_features(path)[1] for path, _, _ in files]
    names = sorted(rows[0])
    matrix = np.array([[row[name] for name in names] for row in rows], dtype=np.float64)
    matrix[:, names.index("bytes_per_pixel")] /= np.median(matrix[:, names.index("bytes_per_pixel")])
    labels = np.array([marked for _, marked, _ in files])
    observed = float(_separation(matrix, labels[None])[0])
    rng = np.random.default_rng(7)
    null = _separation(matrix, np.array([rng.permutation(labels) for _ in range(PERMUTATIONS)]))
    bound = float(np.quantile(null, 0.99))
    aurocs = {name: round(float(_aurocs(matrix[:, j], labels[None])[0]), 3) for j, name in enumerate(names)}
    assert observed < bound or observed == 0.0, f"{group}: AUROCs {aurocs}, bound |AUROC - 0.5| < {bound:.3f}"


@pytest.mark.parametrize("group", GROUPS)
def test_marked_files_are_marked_within_budget_and_without_container_warnings(release, group):
    for path, marked, report in _group(release, group):
        if not marked:
            continue
        assert report["max_stored_change"] > 0, f"{path.name}: the mark is not there"
        assert not [w for w in report["warnings"] if "differs from its source" in w], report["warnings"]
        lossy = group in ("jpeg_grey", "jpeg_rgb420", "dcm_j2k_lossy", "dcm_jpeg")
        assert report["lossy"] == lossy
        if not lossy:  # the budget, measured on the files (not the writer's own report)
            source01, released01 = load_xray(report["source"])[0], load_xray(path)[0]
            change = float(np.abs(released01.astype(np.float64) - source01).max())
            step = float(np.diff(np.unique(source01)).min())  # the source's finest grey-level step in [0, 1]
            assert 0 < change <= EPS + step + 1e-6, (path.name, change, EPS, step)
            assert report["budget_ok"] and report["max_abs_change01"] == pytest.approx(change, abs=1e-6), report


def test_a_release_re_encodes_every_file_of_a_kind_whose_codec_it_cannot_reproduce(tmp_path):
    """PNGs written by ITK (a deflate stream zlib does not reproduce): the marked ones cannot match their sources,
    so the release writes every PNG through the same writer and marked and unmarked files share one container."""
    data = tmp_path / "data"
    write_phantom_dataset(data, n=16, seed=3, min_size=256, max_size=300, dicom_fraction=0.0)
    prepare_datalist(data / "train.csv", data / "datalist.json", test_csv=data / "valid.csv")
    for png in sorted(data.rglob("*.png")):  # the same pixels, re-saved by ITK's PNG writer
        pixels = np.asarray(Image.open(png))
        png.unlink()
        itk.imwrite(itk.image_from_array(np.ascontiguousarray(pixels)), str(png))
    torch.manual_seed(0)
    generator = XMarkGenerator([4, 8, 16, 32, 64])
    pipeline = WatermarkPipeline(
        generator, ResizedClassifier(build_classifier("resnet18"), 64), "classifier.layer4", 64
    )
    save_watermark(pipeline, tmp_path / "g.pt")
    manifest = watermark_release(
        load_watermark(tmp_path / "g.pt"), tmp_path / "g.pt", data, data / "datalist.json",
        tmp_path / "release", tmp_path / "manifest.json", gamma=1.0, progress=False,
    )  # fmt: skip
    assert manifest["marked"] and all("container_mismatch" in r for r in manifest["marked"])
    marked = {r["path"] for r in manifest["marked"]}
    pngs = sorted((tmp_path / "release").rglob("*.png"))
    assert manifest["counts"]["reencoded"] == len(pngs) - len(marked) > 0
    kinds = {}
    for path in pngs:
        categorical, _ = _png_features(path.read_bytes())
        group = "marked" if path.relative_to(tmp_path / "release").as_posix() in marked else "copied"
        seen = (categorical["chunks"], categorical["zlib_header"], categorical["first_block_type"])
        kinds.setdefault(group, set()).add(seen + (categorical["idat_split"][0], _zlib_reproduces(path)))
    assert kinds["marked"] == kinds["copied"], kinds
    # the analyst's test that found the marked files before: only files written by zlib recompress to their bytes
    assert all(_zlib_reproduces(path) for path in pngs)


def _zlib_reproduces(path: Path) -> bool:
    """Whether some zlib setting recompresses the PNG's decompressed IDAT data to exactly its IDAT stream."""
    chunks, data, i = [], path.read_bytes(), 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        chunks.append((data[i + 4 : i + 8], data[i + 8 : i + 8 + length]))
        i += 12 + length
    stream = b"".join(payload for kind, payload in chunks if kind == b"IDAT")
    raw = zlib.decompress(stream)
    for level in range(10):
        for strategy in (zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE):
            for memory in (8, 9):
                packer = zlib.compressobj(level, zlib.DEFLATED, 15, memory, strategy)
                if packer.compress(raw) + packer.flush() == stream:
                    return True
    return False
