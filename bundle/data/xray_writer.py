"""Write a [0, 1] X-ray back in its source file's own format, stored type, bit depth and intensity mapping.

The source file is the template: every header field is copied from it and only the pixel values change. Values go
through :func:`~bundle.data.xray_io.to_stored` with the source's :class:`~bundle.data.xray_io.XRayMeta`, except that
a pixel whose value equals the source's loaded value keeps its stored value bit for bit (``to_stored`` cannot recover
pixels clipped by a DICOM window or lying on a flat LUT run). Files appear atomically under their final name.

Per format:

- DICOM: every data element and file meta element is kept (UIDs included: the released file replaces the original,
  so SOP Instance UID is not regenerated; PhotometricInterpretation, window and rescale tags stay). Only Pixel Data
  changes, plus what follows from it: Smallest/Largest Image Pixel Value, when present, widen to hold the new
  pixels, a stale Extended Offset Table is dropped, and the transfer syntax changes where it must. Uncompressed
  syntaxes (implicit/explicit VR little endian, deflated, explicit VR big endian) are kept. RLE Lossless and JPEG 2000
  Lossless are re-encoded losslessly in the same syntax. JPEG 2000 (1.2.840.10008.1.2.4.91, usually lossy) is
  re-encoded as JPEG 2000 Lossless (1.2.840.10008.1.2.4.90): a lossy re-encoding would break the watermark budget.
  Every other compressed syntax (JPEG baseline/extended/lossless, JPEG-LS, HTJ2K, ...), or a lossless one whose
  encoder is not installed, is written uncompressed as Explicit VR Little Endian.
- PNG: 8/16-bit grey, or grey replicated into RGB when the source was an equal-channel RGB PNG; text chunks, dpi,
  ICC profile and EXIF are copied.
- JPEG: re-encoded at quality 100 with no chroma subsampling, keeping dpi, ICC profile and EXIF. JPEG is lossy, so the
  written pixels differ from the requested ones by a few grey levels (callers check and report the budget).
- NIfTI: the source header (affine, qform/sform, pixdim, scaling, extensions) with the data transposed back to
  ``[i, j]`` and the source's singleton dimensions restored; ``.nii.gz`` stays gzipped.
- MetaImage ``.mha`` / NRRD ``.nrrd`` (ITK): spacing, origin, direction and the metadata dictionary are copied from
  the source, and its compression is kept. Detached-header files (``.mhd``, ``.nhdr``) are refused: their two files
  cannot be replaced atomically.
- Float images (NIfTI/ITK) are windowed by their data range, so the pixels holding the source's minimum and maximum
  keep their values; otherwise the written file would load with a different mapping.
"""

from __future__ import annotations

import gzip
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, PngImagePlugin
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from pydicom.valuerep import VR

from ..fileio import atomic_path
from .xray_io import XRayMeta, _dicom_lut_table, load_xray, to_stored

__all__ = ["XRayWriteError", "check_output_path", "max_stored_change", "quantisation_step", "write_xray"]

Saver = Callable[[np.ndarray, Path], None]
"""Writes stored pixels (load_xray's ``[rows, columns]`` layout) as a complete file at the given path."""

_LOSSLESS_SYNTAX = {RLELossless: RLELossless, JPEG2000Lossless: JPEG2000Lossless, JPEG2000: JPEG2000Lossless}
_OFFSET_TABLE_TAGS = (0x7FE00001, 0x7FE00002)  # Extended Offset Table (Lengths): describe the old fragments
_DETACHED_HEADERS = (".mhd", ".nhdr")
_ITK_COMPRESSED = re.compile(rb"^\s*(CompressedData\s*=\s*True|encoding:\s*(gz|gzip|bz2|bzip2))\s*$", re.I | re.M)


class XRayWriteError(ValueError):
    """An X-ray that cannot be written as asked; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)


def _extension(path: Path) -> str:
    """Lower-case extension, with ``.nii.gz`` as one."""
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def check_output_path(source: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Refuse an output that is the source itself, changes the extension, or is a detached-header format."""
    source, out_path = Path(source), Path(out_path)
    if out_path.resolve() == source.resolve() or (out_path.exists() and os.path.samefile(out_path, source)):
        raise XRayWriteError(out_path, f"refusing to overwrite the source file {source}")
    if _extension(out_path) != _extension(source):
        raise XRayWriteError(out_path, f"must keep the source's extension {_extension(source)!r} ({source})")
    if _extension(source) in _DETACHED_HEADERS:
        raise XRayWriteError(source, f"detached-header {_extension(source)} files cannot be written atomically")


def _native_bytes(stored: np.ndarray, little_endian: bool) -> bytes:
    """Uncompressed Pixel Data bytes in the given byte order, padded to even length."""
    data = stored.astype(stored.dtype.newbyteorder("<" if little_endian else ">")).tobytes()
    return data + b"\x00" * (len(data) % 2)


def _set_dicom_pixels(ds: pydicom.Dataset, stored: np.ndarray) -> None:
    """Replace Pixel Data in the source's transfer syntax, or its lossless / uncompressed substitute."""
    for tag in _OFFSET_TABLE_TAGS:
        if tag in ds:
            del ds[tag]
    if ds.get("SmallestImagePixelValue") is not None:  # widened only when the new pixels leave the recorded bounds
        ds.SmallestImagePixelValue = int(min(ds.SmallestImagePixelValue, stored.min()))
    if ds.get("LargestImagePixelValue") is not None:
        ds.LargestImagePixelValue = int(max(ds.LargestImagePixelValue, stored.max()))
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        ds.PixelData = _native_bytes(stored, syntax.is_little_endian)
        return
    target = _LOSSLESS_SYNTAX.get(syntax)
    if target is not None and get_encoder(target).is_available:
        ds.compress(target, stored, generate_instance_uid=False)
        return
    ds.PixelData = _native_bytes(stored, little_endian=True)
    ds["PixelData"].VR = VR.OB if ds.BitsAllocated <= 8 else VR.OW
    ds["PixelData"].is_undefined_length = False
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _open_dicom(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored pixels of a DICOM file and a saver that keeps every other element."""
    ds = pydicom.dcmread(path)

    def save(stored: np.ndarray, target: Path) -> None:
        _set_dicom_pixels(ds, stored)
        ds.save_as(target)

    return ds.pixel_array, save


def _open_pil(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored pixels of a PNG/JPEG (first channel of an equal-channel RGB) and a saver in the same format."""
    with Image.open(path) as image:
        image.load()
        fmt, info, text = image.format, dict(image.info), dict(getattr(image, "text", {}))
        pixels = np.asarray(image)
    rgb = pixels.ndim == 3
    extras = {key: info[key] for key in ("dpi", "icc_profile", "exif") if key in info}

    def save(stored: np.ndarray, target: Path) -> None:
        out = Image.fromarray(np.repeat(stored[..., None], 3, axis=-1) if rgb else stored)
        if fmt == "PNG":
            pnginfo = PngImagePlugin.PngInfo()
            for key, value in text.items():
                pnginfo.add_text(key, value)
            out.save(target, format="PNG", pnginfo=pnginfo, **extras)
        else:
            out.save(target, format="JPEG", quality=100, subsampling=0, **extras)

    return (pixels[..., 0] if rgb else pixels), save


def _open_nifti(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored voxels of a NIfTI file as ``[j, i]`` and a saver that restores layout, header and scaling."""
    image = nib.load(path)
    raw = np.asarray(image.dataobj.get_unscaled())
    slope, intercept = image.dataobj.slope, image.dataobj.inter

    def save(stored: np.ndarray, target: Path) -> None:
        out = type(image)(stored.T.reshape(raw.shape), None, header=image.header)
        out.header.set_slope_inter(slope, intercept)  # nibabel resets the scaling on construction
        data = out.to_bytes()
        target.write_bytes(gzip.compress(data, compresslevel=1) if _extension(path) == ".nii.gz" else data)

    return np.squeeze(raw).T, save


def _open_itk(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored pixels of a MetaImage/NRRD file and a saver that copies geometry, metadata and compression."""
    image = itk.imread(str(path))
    raw = itk.array_from_image(image)
    with open(path, "rb") as header:
        compressed = _ITK_COMPRESSED.search(header.read(4096)) is not None

    def save(stored: np.ndarray, target: Path) -> None:
        out = itk.image_from_array(np.ascontiguousarray(stored.reshape(raw.shape)))
        out.CopyInformation(image)
        out.SetMetaDataDictionary(image.GetMetaDataDictionary())
        # ITK picks the file format from the extension, so write under the real one and move into place
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".itk-") as scratch:
            written = Path(scratch) / f"image{_extension(path)}"
            itk.imwrite(out, str(written), compression=compressed)
            os.replace(written, target)

    return np.squeeze(raw), save


_OPENERS: dict[str, Callable[[Path], tuple[np.ndarray, Saver]]] = {
    "dicom": _open_dicom,
    "png": _open_pil,
    "jpeg": _open_pil,
    "nifti": _open_nifti,
    "itk": _open_itk,
}


def write_xray(
    image01: np.ndarray,
    meta: XRayMeta,
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    source_image01: np.ndarray | None = None,
) -> Path:
    """Write ``image01`` (the source's ``H x W`` grid, [0, 1]) to ``out_path`` in the source's own format; atomic.

    ``meta`` is the source's XRayMeta; ``source_image01`` its loaded image (read again when not given), used to keep
    unchanged pixels bit for bit.
    """
    source, out_path = Path(source), Path(out_path)
    image01 = np.asarray(image01)
    if image01.shape != tuple(meta.shape):
        raise XRayWriteError(out_path, f"image shape {image01.shape} differs from the source's {tuple(meta.shape)}")
    check_output_path(source, out_path)
    stored_source, save = _OPENERS[meta.format](source)
    if stored_source.shape != image01.shape or stored_source.dtype.name != meta.stored_dtype:
        raise XRayWriteError(
            source,
            f"holds {stored_source.dtype.name} {stored_source.shape} pixels, but meta describes "
            f"{meta.stored_dtype} {tuple(meta.shape)} (meta of another file?)",
        )
    if source_image01 is None:
        source_image01 = load_xray(source)[0]
    keep = image01 == source_image01
    if meta.window_source == "data range":
        keep |= (source_image01 == 0.0) | (source_image01 == 1.0)
    stored = np.where(keep, stored_source, to_stored(image01, meta)).astype(np.dtype(meta.stored_dtype))
    with atomic_path(out_path) as tmp:
        save(stored, tmp)
    return out_path


def quantisation_step(meta: XRayMeta) -> float:
    """Largest [0, 1] change one stored unit can make under the file's intensity mapping (0 for float data)."""
    if not np.issubdtype(np.dtype(meta.stored_dtype), np.integer):
        return 0.0
    if meta.mapping == "lut":
        table = _dicom_lut_table(pydicom.dcmread(meta.source, stop_before_pixels=True), meta)[1]
        return float(np.abs(np.diff(table)).max())
    # linear: slope / window width; the DICOM sigmoid's steepest slope (at its centre) is the same
    return abs(meta.rescale_slope) / (meta.window_high - meta.window_low)


def max_stored_change(source: str | os.PathLike, written: str | os.PathLike) -> dict[str, float]:
    """Largest pixel change between two files of one image, in stored units and in [0, 1] as load_xray reads them.

    A file from :func:`write_xray` keeps the source's intensity mapping, so both [0, 1] images share one scale. Also
    returns the source's :func:`quantisation_step`, the rounding slack of a budget stated in [0, 1].
    """
    source01, meta = load_xray(source)
    written01, written_meta = load_xray(written)
    if written01.shape != source01.shape:
        raise XRayWriteError(written, f"shape {written01.shape} differs from the source's {source01.shape} ({source})")
    stored_source = _OPENERS[meta.format](Path(source))[0].astype(np.float64)
    stored_written = _OPENERS[written_meta.format](Path(written))[0].astype(np.float64)
    return {
        "max_stored_change": float(np.abs(stored_written - stored_source).max()),
        "max_abs_change01": float(np.abs(written01.astype(np.float64) - source01).max()),
        "quantisation_step01": quantisation_step(meta),
    }
