"""Load chest X-rays as float images in [0, 1] and map such images back to the file's stored pixel values.

Supported inputs: DICOM (pydicom 3, compressed transfer syntaxes through its installed decoders), 8/16-bit grayscale
PNG and 8-bit JPEG (Pillow), NIfTI ``.nii``/``.nii.gz`` (nibabel) and MetaImage/NRRD ``.mha``/``.mhd``/``.nrrd``/
``.nhdr`` (ITK). A file with any other extension is read as DICOM when it carries the ``DICM`` preamble. A folder
holding exactly one file (a single-image DICOM series as MONAI Label downloads it) is read as that file.

Intensity chain, recorded in :class:`XRayMeta` so that :func:`to_stored` can invert it::

    stored -> modality (RescaleSlope/Intercept or Modality LUT Sequence)
           -> VOI (VOI LUT Sequence or Window Center/Width, else the full output range of the modality stage)
           -> [0, 1] -> 1 - y for MONOCHROME1

so the image is always "bright = attenuating" (bone bright, lungs dark). The window is fixed per file (never the
image min/max of integer data), hence invertible. ``XRayMeta.mapping`` names the shape of the chain:

- ``"linear"``: ``y = clip((stored * slope + intercept - window_low) / (window_high - window_low), 0, 1)``; DICOM
  ``LINEAR`` windows are converted to ``window_low/high`` exactly as PS3.3 C.11.2.1.2.1 (and pydicom) apply them.
- ``"sigmoid"``: DICOM ``SIGMOID`` VOI function with centre ``(low + high) / 2`` and width ``high - low``.
- ``"lut"``: a Modality or VOI LUT Sequence is involved; the chain is pydicom's ``apply_voi_lut(apply_modality_lut())``
  tabulated over every stored value and normalised by ``window_low/high``. :func:`to_stored` re-reads the LUTs from
  ``XRayMeta.source`` (header only) and inverts the monotone table by interpolation; on flat runs of the LUT it returns
  the first stored value of the run.

Pixels clipped by the window (below ``window_low`` or above ``window_high``, or on a flat LUT run) cannot be
recovered by :func:`to_stored`; all other pixels round-trip to within one stored unit.

Axis convention: the returned array is ``[rows, columns]`` of the stored pixel grid, never flipped or reoriented.
DICOM: ``(Rows, Columns)`` as in PixelData. PNG/JPEG: as stored (EXIF orientation ignored). ITK: the array of
``itk.GetArrayFromImage``, i.e. row ``r``, column ``c`` is voxel index ``(i=c, j=r)``. NIfTI: nibabel's data array
is ``[i, j]``, so it is transposed to ``[j, i]`` -- the same convention as ITK (affine and direction ignored). Both
accept 3-D/4-D arrays whose extra dimensions are singletons.

PNG/JPEG are read as MONOCHROME2. An RGB PNG/JPEG is accepted only when its three channels are identical (some
public sets ship grey images as RGB); it is then recorded with ``photometric="RGB"`` so that a writer can replicate
the channel. Integer PNG/JPEG/NIfTI/ITK data use the full range of their dtype (after NIfTI ``scl_slope/scl_inter``),
float data use the data min/max, recorded as the window. A PNG whose ``sBIT`` chunk declares fewer significant bits
than its depth (12-bit data in a 16-bit PNG) uses that many bits, like DICOM Bits Stored, when every value fits in them
(values stored shifted up to the full depth, as the PNG standard recommends, keep the full range).

The budget's reference range (:func:`reference_range`) is what the stored values really occupy, not the window:
``2**data_bits - 1`` stored units, where ``data_bits`` (:func:`occupied_bits`) is the declared depth (DICOM Bits
Stored, PNG sBIT, the dtype's) narrowed to the smallest common radiograph depth (8, 10, 12, 14 or 16 bits) that holds
every stored value. 12-bit data in a 16-bit PNG without sBIT, or in a DICOM that declares Bits Stored 16, thus have a
range of 4095, and a budget epsilon allows ``epsilon * 4095`` stored units there, whatever window maps them to [0, 1].

Only chest radiographs are read by default (the bundle's scope): a DICOM whose Modality is not in
:data:`CHEST_MODALITIES` (CT, MR, PT, NM, US, RTDOSE, SEG, ...: slices, dose grids or colour images that would load as
flat grey; MG, XA, RF, DF, PX, IO: projection images of other body parts) is refused unless ``allow_modalities`` names
it, and so is one whose BodyPartExamined is not in :data:`CHEST_BODY_PARTS` (a CR extremity film) unless
``allow_body_parts`` names it; ``allow_any_modality=True`` reads any file. A missing or empty Modality or
BodyPartExamined is accepted (PNG, JPEG and NIfTI files carry neither), but a DICOM whose Modality is missing, empty
or OT must then be of a radiograph SOP class (:data:`RADIOGRAPH_SOP_CLASSES`): a CT slice relabelled so is refused.

Hostile files: every failure is an :class:`XRayLoadError` naming the file; an image whose header claims more than
:data:`MAX_PIXELS` pixels, or (uncompressed NIfTI) more data than the file holds, is refused before any pixel is read.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import itk
import nibabel as nib
import numpy as np
import pydicom
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage, LoadImaged, Transform
from monai.utils import ensure_tuple
from PIL import Image
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

__all__ = [
    "CHEST_BODY_PARTS",
    "CHEST_MODALITIES",
    "MAX_PIXELS",
    "PROJECTION_MODALITIES",
    "RADIOGRAPH_DEPTHS",
    "RADIOGRAPH_SOP_CLASSES",
    "XRayLoadError",
    "XRayMeta",
    "load_xray",
    "occupied_bits",
    "reference_range",
    "to_stored",
    "LoadXRay",
    "LoadXRayd",
    "XRayReader",
]

#: Largest image (pixels over all dimensions) that load_xray reads; checked on the header, before any pixel is read.
#: 8192 x 8192: above any chest detector (43 cm at 100 um is 4300 px) and a film digitised at 50 um (7000 x 8600);
#: a 320 KB PNG claiming 13000 x 13000 would otherwise cost about 4 GB to decode.
MAX_PIXELS = 2**26
#: Pixels load_xray maps through the window at a time (float64 temporaries of this size, 8 MB each).
_BLOCK_PIXELS = 2**20
#: DICOM Modality values read by default: projection X-ray (computed/digital radiography, film, mammography,
#: angiography, fluoroscopy, dental) and OT (secondary captures, e.g. digitised films).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "RG", "MG", "XA", "RF", "DF", "PX", "IO", "OT"})
#: DICOM Modality values of a chest radiograph, read by default: computed/digital radiography, film and OT.
CHEST_MODALITIES = frozenset({"CR", "DX", "RG", "OT"})
#: DICOM BodyPartExamined values (defined terms, upper case) of a chest radiograph, read by default.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "HEART", "RIB", "STERNUM", "CHESTABDOMEN", "CHESTABDPELVIS"})
#: SOP classes of a radiograph (CR, DX for presentation and for processing, secondary capture): what a DICOM without a
#: telling Modality (missing, empty or OT) must be to be read by default.
RADIOGRAPH_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.7",
    }
)
#: What load_xray reads of a DICOM: its accepted Modality values and BodyPartExamined values.
_Scope = tuple[frozenset[str], frozenset[str]]

_EXTENSIONS: dict[str, str] = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".mha": "itk",
    ".mhd": "itk",
    ".nrrd": "itk",
    ".nhdr": "itk",
}
_GREY_MODES: dict[str, str] = {"L": "uint8", "I;16": "uint16", "I;16L": "uint16", "I;16B": "uint16"}
_SIGMOID_EPS = 1e-12


class XRayLoadError(ValueError):
    """An X-ray file that cannot be read or mapped to [0, 1]; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)


@dataclass(frozen=True)
class XRayMeta:
    """What is needed to map a loaded [0, 1] image back to the file's stored values; plain JSON-serialisable fields."""

    format: str  # "dicom" | "png" | "jpeg" | "nifti" | "itk"
    source: str  # the path that was read
    shape: tuple[int, int]  # (rows, columns) of the stored pixel grid, i.e. of the loaded image
    stored_dtype: str  # numpy dtype name of the stored values, e.g. "uint16"
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str  # "MONOCHROME1" | "MONOCHROME2" | "RGB" (grey PNG/JPEG stored with three equal channels)
    transfer_syntax: str  # DICOM Transfer Syntax UID, "" for other formats
    rescale_slope: float  # DICOM RescaleSlope / NIfTI scl_slope (1 when absent or when a Modality LUT is used)
    rescale_intercept: float  # DICOM RescaleIntercept / NIfTI scl_inter (0 when absent)
    mapping: str  # "linear" | "sigmoid" | "lut", see the module docstring
    window_low: float  # value after the modality stage ("lut": after the VOI stage) that maps to 0
    window_high: float  # ... and the one that maps to 1 (before MONOCHROME1 inversion)
    window_source: str  # "VOI LUT Sequence" | "Window Center/Width" | "stored range" | "data range"
    data_bits: int = 0  # bits the stored values occupy (:func:`occupied_bits`); 0: not known (float data)


#: Bit depths of radiographs: the declared depth of integer data narrows to the smallest of these holding every value.
RADIOGRAPH_DEPTHS = (8, 10, 12, 14, 16)


def occupied_bits(stored: np.ndarray, declared: int, signed: bool) -> int:
    """The bit depth the stored integer values really occupy: the declared one (Bits Stored, sBIT, the dtype's),
    narrowed to the smallest of :data:`RADIOGRAPH_DEPTHS` that holds every value (12-bit data in a 16-bit PNG
    without sBIT, or in a DICOM whose Bits Stored says 16, occupy 12 bits). Never wider than declared, never below
    8 bits unless declared so: an 8-bit image that happens to be dark is still 8-bit data."""
    if stored.size == 0:
        return declared
    low, high = int(stored.min()), int(stored.max())
    needed = max(high.bit_length(), (-low - 1).bit_length() if low < 0 else 0) + (1 if signed else 0)
    depth = next((d for d in RADIOGRAPH_DEPTHS if d >= needed), declared)
    return min(declared, depth)


def reference_range(meta: XRayMeta) -> float:
    """The budget's reference range in stored units: what the data really occupy, ``2**data_bits - 1`` for integer
    data (:func:`occupied_bits`), the data range over the rescale slope for float data (its window). An L-inf
    budget epsilon allows a change of ``epsilon * reference_range(meta)`` stored units."""
    if np.issubdtype(np.dtype(meta.stored_dtype), np.integer):
        return float(2 ** (meta.data_bits or meta.bits_stored) - 1)
    return abs(meta.window_high - meta.window_low) / abs(meta.rescale_slope or 1.0)


@contextmanager
def _failure(path: Path, what: str) -> Iterator[None]:
    """Re-raise any library error inside the block as an XRayLoadError that says what was being done."""
    try:
        yield
    except XRayLoadError:
        raise
    except Exception as err:
        raise XRayLoadError(path, f"{what} ({type(err).__name__}: {err})") from err


def _integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest value representable with `bits` bits."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _squeeze_2d(path: Path, array: np.ndarray) -> np.ndarray:
    """Drop singleton dimensions, insisting that a 2-D image remains."""
    squeezed = np.squeeze(array)
    if squeezed.ndim != 2:
        raise XRayLoadError(path, f"expected a 2-D image (extra dimensions of size 1 allowed), got shape {array.shape}")
    return squeezed


def _has_window(ds: pydicom.Dataset) -> bool:
    """Whether Window Center and Window Width both hold a value (empty elements count as absent)."""
    return all(keyword in ds and ds[keyword].VM > 0 for keyword in ("WindowCenter", "WindowWidth"))


def _linear_window(ds: pydicom.Dataset, path: Path) -> tuple[str, float, float]:
    """Mapping kind and (low, high) of the first Window Center/Width item, as PS3.3 C.11.2.1 applies it."""
    center = float(ds["WindowCenter"].value[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter)
    width = float(ds["WindowWidth"].value[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    elif function not in ("LINEAR_EXACT", "SIGMOID"):
        raise XRayLoadError(path, f"unsupported VOI LUT Function {function!r}")
    if width <= 0:
        raise XRayLoadError(path, f"window width {ds.WindowWidth} is too small to be inverted ({function})")
    return ("sigmoid" if function == "SIGMOID" else "linear"), center - width / 2, center + width / 2


def _dicom_lut_table(ds: pydicom.Dataset, meta: XRayMeta) -> tuple[np.ndarray, np.ndarray]:
    """Every stored value and its [0, 1] image (before MONOCHROME1 inversion) under the file's LUT chain."""
    low, high = _integer_range(meta.bits_stored, meta.signed)
    stored = np.arange(low, high + 1, dtype=np.dtype(meta.stored_dtype))
    values = apply_voi_lut(apply_modality_lut(stored, ds), ds).astype(np.float64)
    return stored, (values - meta.window_low) / (meta.window_high - meta.window_low)


def _dicom_lut_window(ds: pydicom.Dataset, bits_stored: int, signed: bool) -> tuple[float, float, str]:
    """Output range of pydicom's LUT chain (the VOI LUT's nominal range, pydicom's window range, or the LUT's range)."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1), "VOI LUT Sequence"
    if _has_window(ds):  # in "lut" mode without a VOI LUT, the Modality LUT sets pydicom's window output range
        return 0.0, float(2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1), "Window Center/Width"
    low, high = _integer_range(bits_stored, signed)
    table = apply_modality_lut(np.arange(low, high + 1), ds)
    return float(table.min()), float(table.max()), "stored range"


def _check_pixels(path: Path, shape: Iterable[int]) -> None:
    """Refuse an image whose header claims more than MAX_PIXELS pixels, before its data are read."""
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) > MAX_PIXELS:
        raise XRayLoadError(
            path, f"header claims an image of shape {shape}, more than the limit of {MAX_PIXELS} pixels (MAX_PIXELS)"
        )
    if sum(n > 1 for n in shape) > 2:
        raise XRayLoadError(path, f"expected a 2-D image (extra dimensions of size 1 allowed), got shape {shape}")


def _read_dicom(path: Path, scope: _Scope | None) -> tuple[np.ndarray, XRayMeta]:
    """Stored pixels of a single-frame grayscale DICOM and the intensity chain its tags define."""
    with _failure(path, "not a readable DICOM file"), warnings.catch_warnings():
        # pydicom turns a premature end of file into a warning and returns what it read; treat it as the error it is
        warnings.filterwarnings("error", message="End of file reached", category=UserWarning)
        ds = pydicom.dcmread(path)
    with _failure(path, "invalid DICOM header value"):  # pydicom converts raw values lazily, on first access
        return _dicom_image(path, ds, scope)


def _check_scope(path: Path, ds: pydicom.Dataset, scope: _Scope) -> None:
    """Refuse a DICOM outside ``scope``: its Modality or BodyPartExamined (when given) not among the accepted ones."""
    modalities, body_parts = scope
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality and modality not in modalities:
        kind = "a chest radiograph" if modality in PROJECTION_MODALITIES else "a projection radiograph"
        raise XRayLoadError(
            path,
            f"Modality {modality} is not {kind} (accepted: {', '.join(sorted(modalities))}); "
            "pass allow_modalities or allow_any_modality=True to read it anyway",
        )
    sop_class = str(ds.get("SOPClassUID") or "").strip()
    if modality in ("", "OT") and sop_class and sop_class not in RADIOGRAPH_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name
        raise XRayLoadError(
            path,
            f"Modality {modality or '(none)'} with SOP Class {name}: not a radiograph (accepted without a Modality "
            "that says so: CR, DX and secondary-capture images); pass allow_any_modality=True to read it anyway",
        )
    body_part = str(ds.get("BodyPartExamined") or "").strip().upper()
    if body_part and body_part not in body_parts:
        raise XRayLoadError(
            path,
            f"BodyPartExamined {body_part} is not a chest (accepted: {', '.join(sorted(body_parts))}); the bundle "
            "marks and reads chest radiographs only; pass allow_body_parts to read it anyway",
        )


def _dicom_image(path: Path, ds: pydicom.Dataset, scope: _Scope | None) -> tuple[np.ndarray, XRayMeta]:
    """The body of :func:`_read_dicom` once the file is parsed; ``scope`` None accepts any Modality and body part."""
    if scope is not None:
        _check_scope(path, ds, scope)
    if "PixelData" not in ds:
        raise XRayLoadError(path, "no Pixel Data (7FE0,0010): not an image object, or the file is truncated")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise XRayLoadError(path, f"multi-frame DICOM ({ds.NumberOfFrames} frames); only single images are supported")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise XRayLoadError(
            path, f"colour DICOM (SamplesPerPixel={ds.get('SamplesPerPixel')}, Photometric={photometric!r})"
        )
    if ds.get("BitsAllocated") not in (8, 16, 32):
        raise XRayLoadError(path, f"unsupported Bits Allocated {ds.get('BitsAllocated')} (need 8, 16 or 32)")
    _check_pixels(path, (ds.get("Rows") or 0, ds.get("Columns") or 0))
    syntax = ds.file_meta.get("TransferSyntaxUID")
    syntax_text = f"{syntax.name} ({syntax})" if syntax else "missing Transfer Syntax UID"
    with _failure(path, f"cannot decode Pixel Data with transfer syntax {syntax_text}"):
        stored = ds.pixel_array
    if stored.shape != (ds.Rows, ds.Columns):
        raise XRayLoadError(path, f"decoded pixels have shape {stored.shape}, not (Rows, Columns)")

    bits_stored, signed = int(ds.BitsStored), bool(ds.PixelRepresentation)
    uses_lut = bool(ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"))
    slope, intercept = float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)
    if ds.get("ModalityLUTSequence"):
        slope, intercept = 1.0, 0.0
    if uses_lut:
        if bits_stored > 16:
            raise XRayLoadError(path, f"LUT Sequence with Bits Stored {bits_stored} > 16 is not supported")
        mapping = "lut"
        low, high, source = _dicom_lut_window(ds, bits_stored, signed)
    elif _has_window(ds):
        source = "Window Center/Width"
        mapping, low, high = _linear_window(ds, path)
    else:
        mapping, source = "linear", "stored range"
        low, high = sorted(v * slope + intercept for v in _integer_range(bits_stored, signed))
    meta = XRayMeta(
        format="dicom",
        source=str(path),
        shape=(int(ds.Rows), int(ds.Columns)),
        stored_dtype=stored.dtype.name,
        bits_allocated=int(ds.BitsAllocated),
        bits_stored=bits_stored,
        signed=signed,
        photometric=photometric,
        transfer_syntax=str(syntax or ""),
        rescale_slope=slope,
        rescale_intercept=intercept,
        mapping=mapping,
        window_low=float(low),
        window_high=float(high),
        window_source=source,
        data_bits=occupied_bits(stored, bits_stored, signed),
    )
    if mapping == "lut":
        with _failure(path, "cannot apply the file's Modality/VOI LUT"):
            table_stored, table_y = _dicom_lut_table(ds, meta)
        return table_y[stored.astype(np.int64) - int(table_stored[0])], meta
    return stored, meta


def _png_significant_bits(path: Path) -> int | None:
    """Significant bits of the grey (or first colour) channel from the PNG ``sBIT`` chunk; None without one."""
    with open(path, "rb") as stream:
        stream.seek(8)  # the PNG signature
        while len(head := stream.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                return stream.read(length)[0] if length else None
            if kind in (b"IDAT", b"IEND"):  # sBIT must come before the image data
                return None
            stream.seek(length + 4, os.SEEK_CUR)  # data and CRC
    return None


def _read_pil(path: Path, fmt: str) -> tuple[np.ndarray, XRayMeta]:
    """Stored pixels of an 8/16-bit grayscale (or equal-channel RGB) PNG or JPEG."""
    with _failure(path, f"not a readable {fmt.upper()} file"), Image.open(path) as image:
        _check_pixels(path, image.size[::-1])
        image.load()
        mode, content = image.mode, str(image.format).lower()
        pixels = np.asarray(image)
    if content != fmt:
        raise XRayLoadError(path, f"file content is {content.upper()}, not {fmt.upper()} as its extension says")
    photometric = "MONOCHROME2"
    if mode == "RGB":
        if not (np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])):
            raise XRayLoadError(path, "colour image (RGB with unequal channels); a grayscale X-ray is required")
        pixels, photometric, mode = pixels[..., 0], "RGB", "L"
    if mode not in _GREY_MODES:
        raise XRayLoadError(path, f"unsupported image mode {mode!r}; need 8/16-bit grayscale (or RGB, equal channels)")
    stored = pixels.astype(_GREY_MODES[mode])
    bits = None
    if fmt == "png":
        with _failure(path, "cannot read the PNG chunks"):
            bits = _png_significant_bits(path)
        if not (bits and bits < stored.dtype.itemsize * 8 and stored.max() < 2**bits):
            bits = None  # absent, or the values are scaled up to the full depth: keep the full range
    return stored, _plain_meta(path, fmt, stored, photometric, 1.0, 0.0, bits)


def _read_nifti(path: Path) -> tuple[np.ndarray, XRayMeta]:
    """Stored voxels of a 2-D NIfTI image, transposed from nibabel's [i, j] to [j, i] (rows, columns)."""
    with _failure(path, "not a readable NIfTI file"):
        image = nib.load(path)
        shape, dtype = image.header.get_data_shape(), image.header.get_data_dtype()
        needed = int(image.dataobj.offset) + math.prod(shape) * dtype.itemsize
    _check_pixels(path, shape)
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz") and needed > size:
        raise XRayLoadError(
            path, f"header claims {shape} voxels of {dtype}, {needed} bytes with the header, but the file has {size}"
        )
    with _failure(path, "not a readable NIfTI file"):
        raw = np.asarray(image.dataobj.get_unscaled())
        slope, intercept = float(image.dataobj.slope), float(image.dataobj.inter)
    if raw.dtype.fields is not None:
        raise XRayLoadError(path, f"colour NIfTI (dtype {raw.dtype}); a grayscale X-ray is required")
    stored = np.ascontiguousarray(_squeeze_2d(path, raw).T)
    return stored, _plain_meta(path, "nifti", stored, "MONOCHROME2", slope, intercept)


def _read_itk(path: Path) -> tuple[np.ndarray, XRayMeta]:
    """Stored pixels of a 2-D MetaImage/NRRD image as ITK's [j, i] array (rows, columns)."""
    with _failure(path, "not a readable ITK (MetaImage/NRRD) file"):
        io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise XRayLoadError(path, "not a readable ITK (MetaImage/NRRD) file (no ITK reader recognises it)")
        io.SetFileName(str(path))
        io.ReadImageInformation()
        shape = [io.GetDimensions(axis) for axis in range(io.GetNumberOfDimensions())][::-1]
    _check_pixels(path, shape)
    with _failure(path, "not a readable ITK (MetaImage/NRRD) file"):
        image = itk.imread(str(path))
        components = image.GetNumberOfComponentsPerPixel()
        raw = itk.array_from_image(image)
    if components != 1:
        raise XRayLoadError(path, f"colour/vector image ({components} components); a grayscale X-ray is required")
    stored = np.ascontiguousarray(_squeeze_2d(path, raw))
    return stored, _plain_meta(path, "itk", stored, "MONOCHROME2", 1.0, 0.0)


def _plain_meta(
    path: Path,
    fmt: str,
    stored: np.ndarray,
    photometric: str,
    slope: float,
    intercept: float,
    significant_bits: int | None = None,
) -> XRayMeta:
    """Linear chain of a non-DICOM image: the range of ``significant_bits`` (default: the dtype's) for integers,
    the data range for floats."""
    bits_stored = significant_bits
    if np.issubdtype(stored.dtype, np.integer):
        bits, signed = stored.dtype.itemsize * 8, bool(np.issubdtype(stored.dtype, np.signedinteger))
        bits_stored = bits_stored or bits
        low, high = sorted(v * slope + intercept for v in _integer_range(bits_stored, signed))
        source = "stored range"
    elif np.issubdtype(stored.dtype, np.floating):
        bits, signed = stored.dtype.itemsize * 8, True
        values = stored.astype(np.float64) * slope + intercept
        if not np.isfinite(values).all():
            raise XRayLoadError(path, "image contains NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        high = high if high > low else low + 1.0  # a constant image maps to 0
        source = "data range"
    else:
        raise XRayLoadError(path, f"unsupported pixel type {stored.dtype}")
    return XRayMeta(
        format=fmt,
        source=str(path),
        shape=(int(stored.shape[0]), int(stored.shape[1])),
        stored_dtype=stored.dtype.name,
        bits_allocated=bits,
        bits_stored=bits_stored or bits,
        signed=signed,
        photometric=photometric,
        transfer_syntax="",
        rescale_slope=slope,
        rescale_intercept=intercept,
        mapping="linear",
        window_low=float(low),
        window_high=float(high),
        window_source=source,
        data_bits=occupied_bits(stored, bits_stored or bits, signed) if source == "stored range" else 0,
    )


def _format_of(path: Path) -> str:
    """The reader for `path`, from its extension, else from the DICOM preamble."""
    extension = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()
    if extension in _EXTENSIONS:
        return _EXTENSIONS[extension]
    if is_dicom(path):
        return "dicom"
    raise XRayLoadError(
        path, f"unknown file extension {path.suffix!r} (supported: {', '.join(_EXTENSIONS)}, or DICOM with preamble)"
    )


def find_xray_files(root: str | os.PathLike) -> list[Path]:
    """Every file under ``root`` (recursively, sorted) whose extension :func:`load_xray` reads; hidden files skipped."""
    root = Path(root)
    if not root.is_dir():
        raise XRayLoadError(root, "input folder not found")
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (".nii.gz" if p.name.lower().endswith(".nii.gz") else p.suffix.lower()) in _EXTENSIONS
    )


def _upper_set(values: Iterable[str] | str) -> set[str]:
    """``values`` (one string or several) stripped and upper-cased, as DICOM code strings compare."""
    return {str(value).strip().upper() for value in ([values] if isinstance(values, str) else values)}


def _accepted_scope(
    allow_modalities: Iterable[str], allow_any_modality: bool, allow_body_parts: Iterable[str] = ()
) -> _Scope | None:
    """The DICOM Modality and BodyPartExamined values to read (None: any file)."""
    if allow_any_modality:
        return None
    return (
        frozenset(CHEST_MODALITIES | _upper_set(allow_modalities)),
        frozenset(CHEST_BODY_PARTS | _upper_set(allow_body_parts)),
    )


def series_file(path: str | os.PathLike) -> Path:
    """The image file that ``path`` names: ``path`` itself, or the only file of a series folder.

    MONAI Label's DICOMweb datastore (without its NIfTI conversion) hands a task the folder it downloaded a series
    into, one ``<SOPInstanceUID>.dcm`` per instance. A radiograph series holds one image, so a folder holding exactly
    one file (hidden files aside) is read as that file; any other folder is an :class:`XRayLoadError` naming it and
    what it holds (a CT series, several views, nothing).
    """
    path = Path(path)
    if not path.is_dir():
        return path
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    if len(entries) == 1 and files:
        return files[0]
    raise XRayLoadError(
        path,
        f"is a directory holding {len(files)} files and {len(entries) - len(files)} folders, not an image file: a "
        "series folder is read only when it holds exactly one image file (one radiograph)",
    )


def load_xray(
    path: str | os.PathLike,
    *,
    allow_modalities: Iterable[str] = (),
    allow_any_modality: bool = False,
    allow_body_parts: Iterable[str] = (),
) -> tuple[np.ndarray, XRayMeta]:
    """Read an X-ray as a float32 [rows, columns] image in [0, 1] (bright = attenuating) plus how to write it back.

    A DICOM outside the bundle's scope is refused: Modality beyond :data:`CHEST_MODALITIES` unless listed in
    ``allow_modalities``, BodyPartExamined beyond :data:`CHEST_BODY_PARTS` unless listed in ``allow_body_parts``;
    ``allow_any_modality`` reads any file. Every failure is an :class:`XRayLoadError` naming the file and the problem.
    """
    path = series_file(path)
    scope = _accepted_scope(allow_modalities, allow_any_modality, allow_body_parts)
    if not path.exists():
        raise XRayLoadError(path, "file not found")
    if not path.is_file():
        raise XRayLoadError(path, "not a regular file")
    with _failure(path, "cannot read the file"):  # the readers name their problems; this catches any they miss
        if path.stat().st_size == 0:
            raise XRayLoadError(path, "file is empty")
        fmt = _format_of(path)
        if fmt == "dicom":
            values, meta = _read_dicom(path, scope)
        elif fmt == "nifti":
            values, meta = _read_nifti(path)
        elif fmt == "itk":
            values, meta = _read_itk(path)
        else:
            values, meta = _read_pil(path, fmt)
    if meta.mapping == "lut":  # the LUT chain gave [0, 1] values already
        values = 1.0 - values if meta.photometric == "MONOCHROME1" else values
        return values.astype(np.float32), meta
    # the window in float64, a block of rows at a time into the float32 result: the same numbers as over the whole
    # image at once, with float64 temporaries of one block (a large image costs 4 bytes a pixel here, not 24)
    out = np.empty(values.shape, np.float32)
    rows = max(1, _BLOCK_PIXELS // max(1, math.prod(values.shape[1:])))
    for first in range(0, values.shape[0], rows):
        modality = values[first : first + rows].astype(np.float64) * meta.rescale_slope + meta.rescale_intercept
        if meta.mapping == "sigmoid":
            centre, width = (meta.window_low + meta.window_high) / 2, meta.window_high - meta.window_low
            block = 1.0 / (1.0 + np.exp(-4.0 * (modality - centre) / width))
        else:
            block = np.clip((modality - meta.window_low) / (meta.window_high - meta.window_low), 0.0, 1.0)
        if meta.photometric == "MONOCHROME1":
            block = 1.0 - block
        out[first : first + rows] = block
    return out, meta


def to_stored(image01: np.ndarray, meta: XRayMeta) -> np.ndarray:
    """Map a [0, 1] image back to the file's stored values (inverse of load_xray's chain, rounded and clipped)."""
    y = np.clip(np.asarray(image01, dtype=np.float64), 0.0, 1.0)
    if meta.photometric == "MONOCHROME1":
        y = 1.0 - y
    dtype = np.dtype(meta.stored_dtype)
    if meta.mapping == "lut":
        with _failure(Path(meta.source), "cannot re-read the LUTs needed to invert the intensity mapping"):
            ds = pydicom.dcmread(meta.source, stop_before_pixels=True)
        table_stored, table_y = _dicom_lut_table(ds, meta)
        if table_y[-1] < table_y[0]:
            table_stored, table_y = table_stored[::-1], table_y[::-1]
        if np.any(np.diff(table_y) < 0):
            raise XRayLoadError(meta.source, "the LUT chain is not monotone and cannot be inverted")
        table_y, first = np.unique(table_y, return_index=True)
        stored = np.interp(y, table_y, table_stored[first].astype(np.float64))
    else:
        if meta.mapping == "sigmoid":
            centre, width = (meta.window_low + meta.window_high) / 2, meta.window_high - meta.window_low
            y = np.clip(y, _SIGMOID_EPS, 1.0 - _SIGMOID_EPS)
            modality = centre - width / 4.0 * np.log(1.0 / y - 1.0)
        else:
            modality = meta.window_low + y * (meta.window_high - meta.window_low)
        stored = (modality - meta.rescale_intercept) / meta.rescale_slope
    if not np.issubdtype(dtype, np.integer):
        return stored.astype(dtype)
    low, high = _integer_range(meta.bits_stored, meta.signed)
    return np.clip(np.rint(stored), low, high).astype(dtype)


class XRayReader(ImageReader):
    """MONAI ``ImageReader`` over :func:`load_xray`: ``LoadImage``/``LoadImaged`` with it give the 1 x H x W float32
    MetaTensor in [0, 1], with the file's :class:`XRayMeta` (as a dict) in ``meta["xray"]``.

    One file at a time (a radiograph is one image). ``allow_modalities`` / ``allow_body_parts`` /
    ``allow_any_modality``: DICOM files read beyond chest radiographs (:func:`load_xray`).
    """

    def __init__(
        self,
        allow_modalities: Iterable[str] = (),
        allow_any_modality: bool = False,
        allow_body_parts: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.allow_modalities = tuple([allow_modalities] if isinstance(allow_modalities, str) else allow_modalities)
        self.allow_any_modality = allow_any_modality
        self.allow_body_parts = tuple([allow_body_parts] if isinstance(allow_body_parts, str) else allow_body_parts)

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """Whether every file has an X-ray extension this reader knows (DICOM also without one)."""
        try:
            return all(_format_of(Path(f)) for f in ensure_tuple(filename))
        except (XRayLoadError, OSError):
            return False

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> tuple[np.ndarray, XRayMeta]:
        """The [0, 1] image and metadata of one file."""
        paths = ensure_tuple(data)
        if len(paths) != 1:
            raise ValueError(f"XRayReader reads one X-ray file at a time, got {len(paths)}: {list(paths)[:3]}")
        return load_xray(
            paths[0],
            allow_modalities=self.allow_modalities,
            allow_any_modality=self.allow_any_modality,
            allow_body_parts=self.allow_body_parts,
        )

    def get_data(self, img: tuple[np.ndarray, XRayMeta]) -> tuple[np.ndarray, dict]:
        """The H x W image (no channel yet: ``ensure_channel_first`` adds it) and its metadata.

        ``spatial_shape`` is the file's size in MONAI's (x, y) order, ``(W, H)``, as MONAI's own readers report it and
        MONAI Label's ``Restored`` compares it with a ``pred`` in that order (:class:`RestoreWatermarkedd`); the
        array itself is rows x columns, like ``meta["xray"]["shape"]``.
        """
        image, meta = img
        size = tuple(meta.shape[::-1])
        return image, {"xray": asdict(meta), "spatial_shape": size, "original_channel_dim": "no_channel"}


@contextmanager
def _default_readers_quiet() -> Iterator[None]:
    """``LoadImage`` also builds MONAI's default readers (never used here: the runtime reader is ours); one of them
    warns on every machine without nvImageCodec."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
        yield


class LoadXRay(Transform):
    """Load an X-ray file as a 1 x H x W float32 MetaTensor in [0, 1] (``LoadImage`` with :class:`XRayReader`)."""

    def __init__(
        self,
        allow_modalities: Iterable[str] = (),
        allow_any_modality: bool = False,
        allow_body_parts: Iterable[str] = (),
    ) -> None:
        self.reader = XRayReader(allow_modalities, allow_any_modality, allow_body_parts)
        with _default_readers_quiet():
            self.loader = LoadImage(reader=self.reader, image_only=True, ensure_channel_first=True)

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        # the runtime reader: its errors (XRayLoadError naming the file) reach the caller unwrapped
        return self.loader(str(series_file(path)), reader=self.reader)


class LoadXRayd(LoadImaged):
    """Dictionary version of :class:`LoadXRay`: ``LoadImaged`` with :class:`XRayReader`.

    An in-memory image (a MetaTensor, as MONAI Deploy's inference operator hands its preprocessing) passes through
    when its meta is the reader's (``meta["xray"]``: loaded by :class:`XRayReader`, e.g. by a Deploy loader
    operator); it gains a channel when it has none. Its pixels must be the [0, 1] image of the file named in
    ``filename_or_obj``, because the release and the postprocessing map the watermark back through that file's own
    intensity chain; any other in-memory image is refused with an error saying so.
    """

    def __init__(
        self,
        keys: KeysCollection,
        allow_missing_keys: bool = False,
        allow_modalities: Iterable[str] = (),
        allow_any_modality: bool = False,
        allow_body_parts: Iterable[str] = (),
    ) -> None:
        self.reader = XRayReader(allow_modalities, allow_any_modality, allow_body_parts)
        with _default_readers_quiet():
            super().__init__(
                keys,
                reader=self.reader,
                image_only=True,
                ensure_channel_first=True,
                allow_missing_keys=allow_missing_keys,
            )

    def __call__(self, data: Mapping[Hashable, Any], reader: ImageReader | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        in_memory = [key for key in keys if not isinstance(d[key], (str, os.PathLike))]
        if not in_memory:  # LoadImaged itself (MONAI Label sets image_only=False on it, for one)
            # a series folder's one file, so that filename_or_obj (where the release is written from) names it
            d.update({key: str(series_file(d[key])) for key in keys})
            return super().__call__(d, reader=reader or self.reader)
        if len(in_memory) < len(keys):
            raise ValueError(f"LoadXRayd: {in_memory} are loaded images and the other keys paths; give one kind")
        return {**d, **{key: _loaded_image(d[key], key) for key in in_memory}}


def _loaded_image(image: Any, key: Hashable) -> MetaTensor:
    """A 1 x H x W float32 MetaTensor of an image already loaded by :class:`XRayReader` (its meta kept)."""
    meta = getattr(image, "meta", None)
    if not isinstance(meta, Mapping) or "xray" not in meta or "filename_or_obj" not in meta:
        raise ValueError(
            f"LoadXRayd: the in-memory '{key}' has no X-ray metadata (meta['xray'] and filename_or_obj, as XRayReader "
            "writes them); load the file with XRayReader (or give its path), since the watermark is mapped back "
            "through that file's own intensity chain"
        )
    rows, cols = (int(n) for n in meta["xray"]["shape"])
    array = image.as_tensor().float()
    if tuple(array.shape) == (rows, cols):
        array = array[None]
    if tuple(array.shape) != (1, rows, cols):
        raise ValueError(
            f"LoadXRayd: the in-memory '{key}' of {meta['filename_or_obj']} has shape {tuple(image.shape)}; its file "
            f"is {rows} x {cols} (rows x columns), expected that or 1 x {rows} x {cols}"
        )
    if array.numel() and (float(array.min()) < 0.0 or float(array.max()) > 1.0):
        raise ValueError(
            f"LoadXRayd: the in-memory '{key}' of {meta['filename_or_obj']} has values outside [0, 1]; give the "
            "XRayReader's [0, 1] image, not the stored pixel values"
        )
    out = MetaTensor(array, meta=dict(meta))
    out.meta["original_channel_dim"] = "no_channel"
    return out
