"""Write a [0, 1] X-ray back in its source file's own format, stored type, bit depth, intensity mapping and codec.

The source file is the template: every header field is copied from it and only the pixel values change. Values go
through :func:`~xmark_bundle.data.xray_io.to_stored` with the source's :class:`~xmark_bundle.data.xray_io.XRayMeta`,
except that a pixel whose value equals the source's loaded value keeps its stored value bit for bit (``to_stored``
cannot recover pixels clipped by a DICOM window or lying on a flat LUT run). Files appear atomically under their final
name, with the source's permission bits and modification time (as a byte-for-byte copy made with ``shutil.copy2`` has
them).

A released file that was written here must not stand out from the files copied byte for byte beside it (DESIGN.md
section 6): same container, transfer syntax and codec parameters as its source. So the encoders are driven by what
the source file itself says about how it was encoded:

- PNG: written by this module, not by Pillow. IHDR and every other chunk except IDAT are copied byte for byte in the
  source's order (text, pHYs, sBIT, gAMA, iCCP, eXIf, tIME, private chunks ...); interlacing is kept (Adam7). The row
  filters follow the source's policy, recognised by replaying it on the source's own pixels: one fixed filter, the
  adaptive choice of Pillow (none/up/sub/paeth, plus average with ``optimize``) or of libpng (none/sub/up/average/
  paeth, minimum sum of absolute values). The deflate settings (level, strategy, memLevel, window) are those that
  reproduce the source's IDAT stream byte for byte with zlib (an uncompressed, level 0 stream keeps the source's
  stored-block lengths); the IDAT chunking is the source's (one chunk, however long the new stream, for a source
  written as one chunk, except a Pillow-filtered one that fits Pillow's block: Pillow would split a longer one).
  Unchanged pixels therefore give back the source file exactly. A stream that no zlib setting reproduces (another
  deflate implementation) gets the zlib setting of the same FLEVEL class whose output size is closest, with a
  :class:`ContainerMismatchWarning`.
- JPEG (also JPEG baseline / 8-bit extended inside DICOM): re-encoded by Pillow (libjpeg) with the source's
  quantisation tables, sampling factors, restart interval and progressive mode, with standard Huffman tables when the
  source has them and optimised ones otherwise. The header is then the source's own: every APPn/COM segment (JFIF,
  EXIF, ICC, Adobe, comments), DQT, SOF, DRI and SOS segment is copied byte for byte in the source's order, and only
  the entropy-coded data (and optimised Huffman tables, emitted in the source's DHT grouping) are new. What cannot be
  reproduced (12-bit or arithmetic-coded, lossless or hierarchical JPEG) is refused with an XRayWriteError.
- DICOM: every data element and file meta element is kept (UIDs included: a released file replaces the original in
  a published copy of the data set, so SOP Instance UID is not regenerated there; PhotometricInterpretation, window,
  rescale and Lossy Image Compression tags stay). With ``derived`` (the default of inference and the MONAI Deploy app,
  whose output may go back to the PACS that holds the original) the file is written as a derived image instead:
  :func:`derive_dicom` gives it a new SOP Instance UID, ImageType DERIVED, a Derivation Description and a Source
  Image Sequence referencing the original. Otherwise only Pixel Data changes, plus what follows from it:
  Smallest/Largest Image Pixel Value, when present, widen to hold the new pixels, and an Extended Offset Table is
  recomputed. The transfer syntax never changes. Uncompressed
  syntaxes are written as pydicom writes them (an unchanged dataset round-trips byte for byte); a Deflated Explicit
  VR Little Endian file gets its data set deflated with the zlib level, memLevel and strategy that reproduce the
  source's stream (pydicom alone always deflates at level 6). Compressed syntaxes are
  re-encoded in the same syntax and encapsulated like the source (Basic Offset Table present or empty, fragment
  size): JPEG 2000 lossless and RLE with pydicom's encoders, JPEG 2000 (1.2.840.10008.1.2.4.91, lossy) with
  OpenJPEG at the source's own compression ratio (codestream bytes per stored bit), so the file size stays that of
  the source, and the codestream's COM segments copied from the source; JPEG baseline / 8-bit extended as for JPEG
  files above. A syntax without an installed encoder (JPEG lossless, 12-bit JPEG, JPEG-LS without pyjpegls, HTJ2K,
  ...) is refused with an XRayWriteError naming it. OpenJPEG fixes some codestream parameters (two guard bits, its
  own quantisation step sizes): a JPEG 2000 source from another encoder (e.g. Kakadu) keeps its COD and COM segments
  but not its QCD, and a :class:`ContainerMismatchWarning` says so.
- NIfTI: the source header (affine, qform/sform, pixdim, scaling, extensions) with the data transposed back to
  ``[i, j]`` and the source's singleton dimensions restored; ``.nii.gz`` stays gzipped.
- MetaImage ``.mha`` / NRRD ``.nrrd`` (ITK): spacing, origin, direction and the metadata dictionary are copied from
  the source, and its compression is kept. Detached-header files (``.mhd``, ``.nhdr``) are refused: their two files
  cannot be replaced atomically.
- Float images (NIfTI/ITK) are windowed by their data range, so the pixels holding the source's minimum and maximum
  keep their values; otherwise the written file would load with a different mapping.

Lossy codecs (JPEG, JPEG 2000 lossy, JPEG baseline DICOM) change more pixels than the requested ones:
:func:`is_lossy` tells a caller to check the budget on the written file (:func:`stored_change` per pixel;
:func:`~xmark_bundle.transforms.watermark.apply_watermark` then shrinks the residual where it is exceeded and writes
again, and never leaves a file over the budget). Where the source's codec
parameters cannot all be reproduced, the release can instead send every file of that kind through the same writer:
:func:`reencode_like` writes an unchanged image exactly as a marked one is written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pydicom
from PIL import Image, JpegImagePlugin
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import as_pixel_options, get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    generate_uid,
)
from pydicom.valuerep import VR

from ..fileio import atomic_path
from .xray_io import XRayMeta, _dicom_lut_table, load_xray, reference_range, to_stored

__all__ = [
    "ContainerMismatchWarning",
    "XRayWriteError",
    "check_output_path",
    "derive_dicom",
    "derived_instance_uid",
    "is_lossy",
    "max_stored_change",
    "quantisation_step",
    "reencode_like",
    "stored_budget",
    "stored_change",
    "stored_values",
    "write_xray",
]

#: Writes stored pixels (load_xray's ``[rows, columns]`` layout) as a complete file at the given path; returns what
#: of the source's container or codec parameters it could not reproduce (empty when the file matches its source).
Saver = Callable[[np.ndarray, Path], list[str]]

_LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless, HTJ2K}
_PILLOW_JPEG_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit}  # with 8-bit samples only
_DETACHED_HEADERS = (".mhd", ".nhdr")
_ITK_COMPRESSED = re.compile(rb"^\s*(CompressedData\s*=\s*True|encoding:\s*(gz|gzip|bz2|bzip2))\s*$", re.I | re.M)


class XRayWriteError(ValueError):
    """An X-ray that cannot be written as asked; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path, self.problem = os.fspath(path), problem


class ContainerMismatchWarning(UserWarning):
    """A written file whose container or codec parameters differ from its source's in a way a data user could see."""


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


def is_lossy(meta: XRayMeta) -> bool:
    """Whether writing this file re-encodes it with a lossy codec (JPEG, lossy JPEG 2000, JPEG-LS near-lossless)."""
    return meta.format == "jpeg" or (meta.format == "dicom" and UID(meta.transfer_syntax) in _LOSSY_SYNTAXES)


def _load(path: str | os.PathLike) -> tuple[np.ndarray, XRayMeta]:
    """load_xray for a file the caller already chose to write: whatever its DICOM Modality."""
    return load_xray(path, allow_any_modality=True)


# --- PNG: an encoder that replays the source's filters, deflate settings and chunk layout ---

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
# adaptive filter choices: the filters tried, in the order that wins ties (minimum sum of |signed byte|)
_PNG_ADAPTIVE = {"Pillow": (0, 2, 1, 4), "Pillow optimize": (0, 2, 1, 3, 4), "libpng": (0, 1, 2, 3, 4)}
_PNG_PILLOW_IDAT = 65536  # Pillow's IDAT chunk size (ImageFile.MAXBLOCK), or 4 x width when that is larger
_PNG_ONE_IDAT = 2**31 - 1  # the largest chunk PNG allows: the whole stream in one IDAT
_PNG_ROW_BLOCK = 256  # rows filtered at once (bounds the memory of the five filtered copies)


@dataclass(frozen=True)
class _PngSource:
    chunks: list[tuple[bytes, bytes]]  # (type, whole chunk: length, type, data, CRC), in file order
    width: int
    height: int
    depth: int
    colour: int  # 0 grey, 2 RGB
    interlace: int
    filters: tuple[int, ...]  # one fixed filter, or an adaptive order from _PNG_ADAPTIVE
    filters_exact: bool  # the policy reproduces the source's filter bytes
    zlib: tuple[int, int, int, int]  # level, method window bits, memLevel, strategy
    zlib_exact: bool  # the settings reproduce the source's IDAT stream
    idat_size: int  # largest IDAT chunk
    stored_blocks: tuple[tuple[int, int], ...] = ()  # (header byte, length) of an uncompressed (level 0) stream


def _png_chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG file as (type, raw chunk bytes)."""
    if not data.startswith(_PNG_SIGNATURE):
        raise XRayWriteError(path, "not a PNG file")
    chunks, i = [], len(_PNG_SIGNATURE)
    while i + 12 <= len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        chunks.append((kind, data[i : i + 12 + length]))
        i += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_passes(pixels: np.ndarray, interlace: int) -> list[np.ndarray]:
    """The sub-images that are filtered separately: the image, or its non-empty Adam7 passes."""
    if not interlace:
        return [pixels]
    passes = [pixels[r::dr, c::dc] for r, c, dr, dc in _ADAM7]
    return [p for p in passes if p.shape[0] and p.shape[1]]


def _png_rows(stored: np.ndarray, src: _PngSource) -> tuple[list[np.ndarray], int]:
    """Scanline bytes of each pass (``rows x bytes`` uint8) and the filter's bytes per pixel."""
    pixels = np.repeat(stored[..., None], 3, axis=-1) if src.colour == 2 else stored[..., None]
    pixels = pixels.astype(">u2" if src.depth == 16 else np.uint8)
    bpp = pixels.shape[-1] * pixels.dtype.itemsize
    rows = [np.ascontiguousarray(p).view(np.uint8).reshape(p.shape[0], -1) for p in _png_passes(pixels, src.interlace)]
    return rows, bpp


def _png_filter(rows: np.ndarray, bpp: int, order: tuple[int, ...]) -> np.ndarray:
    """Filtered scanlines (filter byte first) choosing per row the first filter in ``order`` with the least sum of
    absolute signed bytes (one entry: that filter on every row)."""
    height, width = rows.shape
    out = np.empty((height, width + 1), np.uint8)
    for start in range(0, height, _PNG_ROW_BLOCK):
        x = rows[start : start + _PNG_ROW_BLOCK].astype(np.int16)
        above = rows[start - 1 : start - 1 + len(x)] if start else np.vstack([np.zeros((1, width)), rows[: len(x) - 1]])
        b = above.astype(np.int16)
        a = np.pad(x[:, :-bpp], ((0, 0), (bpp, 0)))
        c = np.pad(b[:, :-bpp], ((0, 0), (bpp, 0)))
        candidates = []
        for kind in order:
            if kind == 0:
                predicted = 0
            elif kind == 1:
                predicted = a
            elif kind == 2:
                predicted = b
            elif kind == 3:
                predicted = (a + b) // 2
            else:
                pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
                predicted = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
            candidates.append((x - predicted) & 0xFF)
        if len(order) == 1:
            choice = np.zeros(len(x), np.intp)
        else:
            costs = np.stack([np.minimum(f, 256 - f).sum(axis=1, dtype=np.int64) for f in candidates], axis=1)
            choice = costs.argmin(axis=1)  # the first minimum: the tie order of the encoder
        out[start : start + len(x), 0] = np.asarray(order, np.uint8)[choice]
        out[start : start + len(x), 1:] = np.choose(choice[:, None], candidates)
    return out


def _png_stream(rows: list[np.ndarray], bpp: int, order: tuple[int, ...]) -> bytes:
    return b"".join(_png_filter(r, bpp, order).tobytes() for r in rows)


def _zlib(raw: bytes, settings: tuple[int, int, int, int], limit: int | None = None) -> bytes:
    level, wbits, mem_level, strategy = settings
    compressor = zlib.compressobj(level, zlib.DEFLATED, wbits, mem_level, strategy)
    if limit is not None:
        return compressor.compress(raw[:limit])  # what zlib emits for a prefix: a prefix of the full stream
    return compressor.compress(raw) + compressor.flush()


def _zlib_settings(stream: bytes, raw: bytes) -> tuple[tuple[int, int, int, int], bool]:
    """zlib settings that reproduce ``stream`` (a zlib stream of ``raw``), or the closest in size of its FLEVEL."""
    cmf, flg = stream[0], stream[1]
    wbits, flevel = (cmf >> 4) + 8, flg >> 6
    if cmf & 0x0F != 8 or flg & 0x20:
        return (6, 15, 8, zlib.Z_DEFAULT_STRATEGY), False  # not plain deflate, or a preset dictionary
    levels = {0: (0, 1), 1: (2, 3, 4, 5), 2: (6,), 3: (7, 8, 9)}[flevel]
    candidates = [(lv, wbits, mem, st) for st in (1, 0) for mem in (9, 8) for lv in levels]
    if flevel == 0:  # zlib also writes FLEVEL 0 for the Huffman-only, RLE and fixed strategies at any level
        candidates += [(lv, wbits, mem, st) for st in (2, 3, 4) for mem in (9, 8) for lv in range(10)]
    prefix = 1 << 18
    if len(raw) > prefix:  # the settings whose output for a prefix starts the stream; at most 12 tried in full
        survivors = [c for c in candidates if stream.startswith(_zlib(raw, c, prefix))][:12]
    else:
        survivors = candidates
    for settings in survivors:
        if _zlib(raw, settings) == stream:
            return settings, True
    sample = raw[: 1 << 20]
    target = len(stream) * len(sample) / max(len(raw), 1)
    plain = [c for c in candidates if c[3] in (0, 1)]
    return min(plain, key=lambda c: abs(len(_zlib(sample, c)) - target)), False


def _stored_blocks(stream: bytes) -> tuple[tuple[int, int], ...]:
    """(header byte, length) of each block of a zlib stream made only of stored blocks (level 0); else empty.

    How zlib cuts stored blocks depends on its caller's buffers, so they are replayed rather than recompressed.
    """
    blocks, i = [], 2
    while i + 5 <= len(stream) - 4:
        head = stream[i]
        length, complement = struct.unpack("<HH", stream[i + 1 : i + 5])
        if head & 0x06 or length ^ complement != 0xFFFF:
            return ()
        blocks.append((head, length))
        i += 5 + length
        if head & 1:
            return tuple(blocks) if i == len(stream) - 4 else ()
    return ()


def _stored_stream(raw: bytes, header: bytes, blocks: tuple[tuple[int, int], ...]) -> bytes:
    """``raw`` as a zlib stream of stored blocks laid out as ``blocks``."""
    out, i = [header], 0
    for head, length in blocks:
        out += [bytes([head]), struct.pack("<HH", length, length ^ 0xFFFF), raw[i : i + length]]
        i += length
    return b"".join(out) + struct.pack(">I", zlib.adler32(raw))


def _png_source(path: Path) -> tuple[np.ndarray, _PngSource]:
    """Stored pixels of a PNG (as load_xray reads them) and how the file was encoded."""
    data = path.read_bytes()
    chunks = _png_chunks(data, path)
    if not chunks or chunks[0][0] != b"IHDR":
        raise XRayWriteError(path, "PNG without IHDR")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1][8:21])
    if colour not in (0, 2) or depth not in (8, 16) or (colour == 2 and depth != 8):
        raise XRayWriteError(
            path, f"PNG colour type {colour} at bit depth {depth} cannot be written (need 8/16-bit grey or 8-bit RGB)"
        )
    if any(kind in (b"acTL", b"fcTL", b"fdAT") for kind, _ in chunks):
        raise XRayWriteError(path, "animated PNG cannot be written")
    idat = [chunk[8:-4] for kind, chunk in chunks if kind == b"IDAT"]
    stream = b"".join(idat)
    raw = zlib.decompress(stream)
    with Image.open(path) as image:
        image.load()
        pixels = np.asarray(image)
    stored = (pixels[..., 0] if pixels.ndim == 3 else pixels).astype(np.uint16 if depth == 16 else np.uint8)
    probe = _PngSource(chunks, width, height, depth, colour, interlace, (0,), False, (6, 15, 8, 0), False, 0)
    rows, bpp = _png_rows(stored, probe)
    used, offset = [], 0  # the source's filter byte of every scanline
    for r in rows:
        line = r.shape[1] + 1
        used.append(np.frombuffer(raw, np.uint8, count=line * len(r), offset=offset).reshape(len(r), line)[:, 0])
        offset += line * len(r)
    used_all = np.concatenate(used)
    policies = [(int(used_all[0]),)] if np.all(used_all == used_all[0]) else list(_PNG_ADAPTIVE.values())
    agreement = []
    for order in policies:
        chosen = np.concatenate([_png_filter(r, bpp, order)[:, 0] for r in rows])
        agreement.append(float(np.mean(chosen == used_all)))
        if agreement[-1] == 1.0:
            break
    best = int(np.argmax(agreement))
    blocks = _stored_blocks(stream)
    if blocks and sum(length for _, length in blocks) == len(raw):
        settings, exact = (0, (stream[0] >> 4) + 8, 8, zlib.Z_DEFAULT_STRATEGY), True
    else:
        blocks, (settings, exact) = (), _zlib_settings(stream, raw)
    pillow_block = max(_PNG_PILLOW_IDAT, 4 * width)
    if len(idat) > 1:
        idat_size = max(len(c) for c in idat)
    elif policies[best] in (_PNG_ADAPTIVE["Pillow"], _PNG_ADAPTIVE["Pillow optimize"]) and len(stream) <= pillow_block:
        idat_size = pillow_block  # Pillow's filters and a stream that fits its block: Pillow would split a longer one
    else:
        idat_size = _PNG_ONE_IDAT  # a writer that puts the whole stream in one chunk, however long

    source = _PngSource(
        chunks,
        width,
        height,
        depth,
        colour,
        interlace,
        policies[best],
        agreement[best] == 1.0,
        settings,
        exact,
        idat_size,
        blocks,
    )
    return stored, source


def _png_encode(stored: np.ndarray, src: _PngSource) -> tuple[bytes, list[str]]:
    """A PNG of ``stored`` laid out and compressed as the source was; what could not be matched."""
    rows, bpp = _png_rows(stored, src)
    raw = _png_stream(rows, bpp, src.filters)
    if src.stored_blocks:  # the same length as the source's: same size, depth and interlacing
        header = next(chunk[8:10] for kind, chunk in src.chunks if kind == b"IDAT")
        stream = _stored_stream(raw, header, src.stored_blocks)
    else:
        stream = _zlib(raw, src.zlib)
    idat = b"".join(
        _png_chunk(b"IDAT", stream[i : i + src.idat_size]) for i in range(0, max(len(stream), 1), src.idat_size)
    )
    out, placed = [_PNG_SIGNATURE], False
    for kind, chunk in src.chunks:
        if kind != b"IDAT":
            out.append(chunk)
        elif not placed:
            out.append(idat)
            placed = True
    problems = []
    if not src.filters_exact:
        problems.append(f"PNG row filters: no known policy reproduces the source's (used {src.filters})")
    if not src.zlib_exact:
        problems.append(f"PNG deflate stream: no zlib setting reproduces the source's (used level {src.zlib[0]})")
    return b"".join(out), problems


# --- JPEG: libjpeg with the source's tables and sampling, under the source's own header ---

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xDA)}


@dataclass
class _Jpeg:
    head: list[tuple[int, bytes]]  # (marker, whole segment) after SOI up to the first SOS
    scans: bytes  # from the first SOS up to and including EOI
    trailing: bytes  # anything after EOI

    def segments(self, marker: int) -> list[bytes]:
        return [segment for m, segment in self.head if m == marker]

    def sof(self) -> tuple[int, bytes]:
        for marker, segment in self.head:
            if marker in _JPEG_SOF:
                return marker, segment
        raise ValueError("no SOF segment")


def _jpeg_parse(data: bytes) -> _Jpeg:
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("not a JPEG stream (no SOI)")
    head, i = [], 2
    while i < len(data):
        while data[i] == 0xFF and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if data[i] != 0xFF:
            raise ValueError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xDA:
            break
        length = 0 if marker in _JPEG_NO_LENGTH else struct.unpack(">H", data[i + 2 : i + 4])[0]
        head.append((marker, data[i : i + 2 + length]))
        i += 2 + length
    end = data.rfind(b"\xff\xd9")
    if end < i:
        raise ValueError("JPEG stream without scan data or EOI")
    return _Jpeg(head, data[i : end + 2], data[end + 2 :])


def _jpeg_tables(segments: list[bytes], kind: int) -> dict[int, bytes]:
    """DQT (kind 0xDB) or DHT (0xC4) tables by id (DHT: class << 4 | id) as their bytes, from the segments."""
    tables = {}
    for segment in segments:
        payload, j = segment[4:], 0
        while j < len(payload):
            if kind == 0xDB:
                size = 1 + 64 * (2 if payload[j] >> 4 else 1)
                tables[payload[j] & 0x0F] = payload[j : j + size]
            else:
                size = 17 + sum(payload[j + 1 : j + 17])
                tables[payload[j]] = payload[j : j + size]
            j += size
    return tables


def _jpeg_scan_headers(scans: bytes) -> list[bytes]:
    """The SOS segments of the scan part (one per scan)."""
    headers, i = [], 0
    while (i := scans.find(b"\xff\xda", i)) >= 0:
        length = struct.unpack(">H", scans[i + 2 : i + 4])[0]
        headers.append(scans[i : i + 2 + length])
        i += 2 + length
    return headers


def _jpeg_encode(pixels: np.ndarray, source: bytes, where: Path, keep_trailing: bool = True) -> tuple[bytes, list[str]]:
    """Re-encode ``pixels`` (``H x W`` grey or ``H x W x 3``) as the JPEG stream ``source`` was encoded.

    Bytes after the source's EOI are kept with ``keep_trailing`` (not for a DICOM frame: they pad its item).
    """
    try:
        src = _jpeg_parse(source)
        sof_marker, sof = src.sof()
    except ValueError as err:
        raise XRayWriteError(where, f"cannot parse the source's JPEG stream ({err})") from err
    if sof_marker not in (0xC0, 0xC1, 0xC2) or sof[4] != 8:
        raise XRayWriteError(
            where,
            f"JPEG process SOF{sof_marker - 0xC0} with {sof[4]}-bit samples cannot be re-encoded (only 8-bit "
            "baseline, extended and progressive Huffman JPEG can)",
        )
    with Image.open(io.BytesIO(source)) as image:
        qtables = image.quantization
        subsampling = JpegImagePlugin.get_sampling(image)
        adobe = image.info.get("adobe_transform")
    dri = src.segments(0xDD)
    options = {
        "qtables": [qtables[key] for key in sorted(qtables)],
        "subsampling": subsampling,
        "progressive": sof_marker == 0xC2,
        "restart_marker_blocks": struct.unpack(">H", dri[0][4:6])[0] if dri else 0,
        "keep_rgb": adobe == 0,
    }
    src_huffman = _jpeg_tables(src.segments(0xC4), 0xC4)
    image = Image.fromarray(pixels)
    for optimize in (False, True):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", optimize=optimize, **options)
        ours = _jpeg_parse(buffer.getvalue())
        huffman = _jpeg_tables(ours.segments(0xC4), 0xC4)
        if huffman == src_huffman or options["progressive"]:
            break
    # the source's DQT, SOF and DRI segments are kept byte for byte, so ours must say the same
    fatal = []
    if _jpeg_tables(ours.segments(0xDB), 0xDB) != _jpeg_tables(src.segments(0xDB), 0xDB):
        fatal.append("quantisation tables")
    if ours.sof()[1][2:] != sof[2:]:
        fatal.append("frame header (sampling factors or table selectors)")
    if ours.segments(0xDD) != dri:
        fatal.append("restart interval")
    if fatal:
        raise XRayWriteError(where, f"cannot reproduce the source's JPEG {' and '.join(fatal)}")
    problems = []
    if _jpeg_scan_headers(ours.scans) != _jpeg_scan_headers(src.scans):
        problems.append("JPEG scan headers (progression or table selectors)")
    if not options["progressive"] and set(huffman) != set(src_huffman):
        problems.append("JPEG Huffman table set")
    # the source's header; only the Huffman tables are ours where they differ, in the source's DHT grouping
    head, ours_dht, placed = [b"\xff\xd8"], ours.segments(0xC4), False
    for marker, segment in src.head:
        if marker != 0xC4 or huffman == src_huffman:
            head.append(segment)
        elif set(huffman) == set(src_huffman) and not options["progressive"]:
            payload = b"".join(huffman[t] for t in _jpeg_tables([segment], 0xC4))
            head.append(b"\xff\xc4" + struct.pack(">H", 2 + len(payload)) + payload)
            placed = True
        elif not placed:
            head.extend(ours_dht)
            placed = True
    if huffman != src_huffman and not placed:  # the source defines no table before its first scan
        head.extend(ours_dht)
    return b"".join(head) + ours.scans + (src.trailing if keep_trailing else b""), problems


# --- JPEG 2000 codestreams (inside DICOM) ---


def _j2k_main_header(codestream: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Marker segments between SOC and the first SOT, and where the first SOT starts."""
    if not codestream.startswith(b"\xff\x4f"):
        raise ValueError("not a JPEG 2000 codestream (no SOC)")
    segments, i = [], 2
    while i + 4 <= len(codestream):
        (marker,) = struct.unpack(">H", codestream[i : i + 2])
        if marker == 0xFF90:  # SOT
            return segments, i
        (length,) = struct.unpack(">H", codestream[i + 2 : i + 4])
        segments.append((marker, codestream[i : i + 2 + length]))
        i += 2 + length
    raise ValueError("JPEG 2000 codestream without a tile")


def _j2k_like(ours: bytes, source: bytes) -> tuple[bytes, list[str]]:
    """Our codestream with the source's main-header order and COM segments; the segments that still differ."""
    src_head, _ = _j2k_main_header(source)
    our_head, sot = _j2k_main_header(ours)
    remaining = list(our_head)
    head = []
    for marker, segment in src_head:
        if marker == 0xFF64:  # COM: says which encoder made the file
            head.append(segment)
            continue
        match = next((i for i, (m, _) in enumerate(remaining) if m == marker), None)
        if match is not None:
            head.append(remaining.pop(match)[1])
    head += [segment for marker, segment in remaining if marker != 0xFF64]
    differing = sorted(
        {f"JPEG 2000 {_J2K_NAMES.get(m, hex(m))} segment" for m, s in src_head if m != 0xFF64 and s not in head}
    )
    return source[:2] + b"".join(head) + ours[sot:], differing


_J2K_NAMES = {
    0xFF51: "SIZ",
    0xFF52: "COD",
    0xFF53: "COC",
    0xFF5C: "QCD",
    0xFF5D: "QCC",
    0xFF5E: "RGN",
    0xFF5F: "POC",
    0xFF55: "TLM",
    0xFF57: "PLM",
    0xFF60: "PPM",
    0xFF63: "CRG",
}


def _j2k_layers(codestream: bytes) -> int:
    cod = next(s for m, s in _j2k_main_header(codestream)[0] if m == 0xFF52)
    return struct.unpack(">H", cod[6:8])[0]


# --- DICOM ---


def _items(pixel_data: bytes) -> list[bytes]:
    """The items of encapsulated Pixel Data (the Basic Offset Table first), little endian."""
    items, i = [], 0
    while i + 8 <= len(pixel_data):
        group, element, length = struct.unpack("<HHI", pixel_data[i : i + 8])
        if (group, element) != (0xFFFE, 0xE000):
            break
        items.append(pixel_data[i + 8 : i + 8 + length])
        i += 8 + length
    return items


def _encapsulate_like(frame: bytes, source_items: list[bytes]) -> bytes:
    """One encoded frame encapsulated as the source's was: Basic Offset Table present or empty, fragment size."""
    frame += b"\x00" * (len(frame) % 2)
    fragments = source_items[1:]
    size = len(fragments[0]) if len(fragments) > 1 else len(frame)
    size += size % 2
    bot = struct.pack("<I", 0) if source_items and source_items[0] else b""
    items = [bot] + [frame[i : i + size] for i in range(0, len(frame), max(size, 2))]
    # no Sequence Delimitation Item: pydicom writes it after undefined-length Pixel Data
    return b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item for item in items)


def _native_bytes(stored: np.ndarray, little_endian: bool) -> bytes:
    """Uncompressed Pixel Data bytes in the given byte order, padded to even length."""
    data = stored.astype(stored.dtype.newbyteorder("<" if little_endian else ">")).tobytes()
    return data + b"\x00" * (len(data) % 2)


def _encode_dicom_frame(ds: pydicom.Dataset, stored: np.ndarray, source: bytes, where: Path) -> tuple[bytes, list[str]]:
    """``stored`` encoded in the dataset's (compressed) transfer syntax, like the source's frame ``source``."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax in _PILLOW_JPEG_SYNTAXES:
        try:
            return _jpeg_encode(stored, source, where, keep_trailing=False)
        except XRayWriteError as err:
            raise XRayWriteError(where, f"transfer syntax {syntax.name} ({syntax}): {err.problem}") from err
    try:
        encoder = get_encoder(syntax)
    except NotImplementedError:  # pydicom has no encoder of this syntax at all
        encoder = None
    if encoder is None or not encoder.is_available:
        raise XRayWriteError(
            where,
            f"no encoder for its transfer syntax {syntax.name} ({syntax}) is installed; writing it in another "
            "syntax would set the file apart from the rest of the release",
        )
    options = as_pixel_options(ds)
    if syntax == JPEG2000:
        # OpenJPEG's rate is stored bits per codestream byte: the source's own ratio gives the source's size
        ratio = stored.size * int(ds.BitsStored) / 8 / len(source)
        layers = _j2k_layers(source)
        options["j2k_cr"] = [ratio * 2.0 ** (layers - 1 - k) for k in range(layers)]
    try:
        encoded = encoder.encode(stored, **options)
    except Exception as err:
        raise XRayWriteError(where, f"cannot encode as {syntax.name} ({type(err).__name__}: {err})") from err
    if syntax.name.startswith("JPEG 2000"):
        return _j2k_like(encoded, source)
    return encoded, []


def _set_dicom_pixels(ds: pydicom.Dataset, stored: np.ndarray, where: Path) -> list[str]:
    """Replace Pixel Data in the source's transfer syntax and encapsulation; what could not be matched."""
    if ds.get("SmallestImagePixelValue") is not None:  # widened only when the new pixels leave the recorded bounds
        ds.SmallestImagePixelValue = int(min(ds.SmallestImagePixelValue, stored.min()))
    if ds.get("LargestImagePixelValue") is not None:
        ds.LargestImagePixelValue = int(max(ds.LargestImagePixelValue, stored.max()))
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_compressed:
        ds.PixelData = _native_bytes(stored, syntax.is_little_endian)
        return []
    source_items = _items(ds.PixelData)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    encoded, problems = _encode_dicom_frame(ds, stored, frame, where)
    ds.PixelData = _encapsulate_like(encoded, source_items)
    ds["PixelData"].VR = VR.OB
    ds["PixelData"].is_undefined_length = True
    if 0x7FE00001 in ds:
        ds.ExtendedOffsetTable = struct.pack("<Q", 0)
        ds.ExtendedOffsetTableLengths = struct.pack("<Q", len(encoded) + len(encoded) % 2)
    return problems


def _dicom_meta_end(data: bytes) -> int | None:
    """Where the file meta information of a DICOM file (preamble, ``DICM``, group 0002) ends, from its group length;
    None when the file has no preamble or no File Meta Information Group Length first."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return None
    return 144 + struct.unpack("<I", data[140:144])[0]


def _deflate_settings(data: bytes) -> tuple[tuple[int, int, int, int], bool]:
    """The zlib settings (raw deflate) that reproduce a deflated DICOM's data set stream, and whether they do."""
    end = _dicom_meta_end(data)
    default = (6, -15, 8, zlib.Z_DEFAULT_STRATEGY)  # what pydicom writes
    if end is None:
        return default, False
    inflater = zlib.decompressobj(-15)
    raw = inflater.decompress(data[end:])
    stream = data[end : len(data) - len(inflater.unused_data)]
    candidates = [(level, -15, mem, st) for st in (0, 1) for mem in (8, 9) for level in range(10)]
    prefix = 1 << 18
    if len(raw) > prefix:
        candidates = [c for c in candidates if stream.startswith(_zlib(raw, c, prefix))]
    return next(((c, True) for c in candidates if _zlib(raw, c) == stream), (default, False))


def _deflate_like(data: bytes, settings: tuple[int, int, int, int]) -> bytes:
    """A deflated DICOM file as pydicom wrote it, its data set recompressed with ``settings`` (padded to even)."""
    end = _dicom_meta_end(data)
    stream = _zlib(zlib.decompressobj(-15).decompress(data[end:]), settings)
    return data[:end] + stream + b"\x00" * (len(stream) % 2)


def _open_dicom(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored pixels of a DICOM file and a saver that keeps every other element (and a deflated file's zlib level)."""
    ds = pydicom.dcmread(path)

    def save(stored: np.ndarray, target: Path, derived: bool = False) -> list[str]:
        problems = _set_dicom_pixels(ds, stored, path)
        if derived:
            derive_dicom(ds, stored)
        if ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
            ds.save_as(target)
            return problems
        settings, exact = _deflate_settings(path.read_bytes())
        buffer = io.BytesIO()
        ds.save_as(buffer)
        if _dicom_meta_end(buffer.getvalue()) is None:  # pydicom always writes the group length; never expected
            raise XRayWriteError(path, "cannot find the end of the file meta information pydicom wrote")
        target.write_bytes(_deflate_like(buffer.getvalue(), settings))
        if not exact:
            problems.append(f"deflated data set: no zlib setting reproduces the source's (used level {settings[0]})")
        return problems

    return ds.pixel_array, save


#: Derivation Description of a derived (marked) image.
DERIVATION_DESCRIPTION = "X-Mark dataset ownership watermark added to the pixel data of the source image"


def derived_instance_uid(source_uid: str, stored: np.ndarray) -> UID:
    """The SOP Instance UID of the derived image with pixels ``stored`` made from the instance ``source_uid``.

    pydicom's :func:`~pydicom.uid.generate_uid` under its own root, with the source's UID and the SHA-256 of the
    stored pixels as entropy (a one-way hash): the same marked pixels of the same source get the same UID in every
    run and every tool (configs/inference.json and the MONAI Deploy app write the same bytes), other pixels or
    another source a different one, and the UID tells nothing about the watermark.
    """
    digest = hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()
    return generate_uid(entropy_srcs=["xmark derived image", str(source_uid), digest])


def derive_dicom(ds: pydicom.Dataset, stored: np.ndarray) -> UID:
    """Make ``ds`` (the source's dataset, its Pixel Data already ``stored``) a derived image; return its new UID.

    DICOM requires a new SOP Instance UID for an image whose pixels were changed; without one, a marked image sent
    to the PACS that holds its source collides with it (the PACS keeps one of the two, or rejects the second).
    Changed: SOP Instance UID and Media Storage SOP Instance UID (:func:`derived_instance_uid`), ImageType's first
    value DERIVED (``DERIVED\\SECONDARY`` when the source has none), Derivation Description, and a Source Image
    Sequence holding the source's SOP Class and Instance UIDs. Study and series stay the source's.
    """
    source_uid = ds.get("SOPInstanceUID")
    uid = derived_instance_uid(source_uid or "", stored)
    if source_uid:
        reference = Dataset()
        if ds.get("SOPClassUID"):
            reference.ReferencedSOPClassUID = ds.SOPClassUID
        reference.ReferencedSOPInstanceUID = source_uid
        ds.SourceImageSequence = Sequence([reference])
    image_type = ds.get("ImageType")
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    ds.ImageType = ["DERIVED", *values[1:]] if values else ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = DERIVATION_DESCRIPTION
    ds.SOPInstanceUID = uid
    if hasattr(ds, "file_meta"):
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    return uid


def _open_pil(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored pixels of a PNG/JPEG (first channel of an equal-channel RGB) and a saver in the same encoding."""
    if _pil_format(path) == "PNG":
        stored, png = _png_source(path)

        def save_png(stored: np.ndarray, target: Path) -> list[str]:
            data, problems = _png_encode(stored, png)
            target.write_bytes(data)
            return problems

        return stored, save_png
    source = path.read_bytes()
    with Image.open(io.BytesIO(source)) as image:
        image.load()
        pixels = np.asarray(image)
    rgb = pixels.ndim == 3

    def save_jpeg(stored: np.ndarray, target: Path) -> list[str]:
        data, problems = _jpeg_encode(np.repeat(stored[..., None], 3, axis=-1) if rgb else stored, source, path)
        target.write_bytes(data)
        return problems

    return (pixels[..., 0] if rgb else pixels), save_jpeg


def _pil_format(path: Path) -> str:
    """Pillow's name of the file's format."""
    with Image.open(path) as image:
        return str(image.format)


def _open_nifti(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored voxels of a NIfTI file as ``[j, i]`` and a saver that restores layout, header and scaling."""
    image = nib.load(path)
    raw = np.asarray(image.dataobj.get_unscaled())
    slope, intercept = image.dataobj.slope, image.dataobj.inter

    def save(stored: np.ndarray, target: Path) -> list[str]:
        out = type(image)(stored.T.reshape(raw.shape), None, header=image.header)
        out.header.set_slope_inter(slope, intercept)  # nibabel resets the scaling on construction
        data = out.to_bytes()
        target.write_bytes(gzip.compress(data, compresslevel=1) if _extension(path) == ".nii.gz" else data)
        return []

    return np.squeeze(raw).T, save


def _open_itk(path: Path) -> tuple[np.ndarray, Saver]:
    """Stored pixels of a MetaImage/NRRD file and a saver that copies geometry, metadata and compression."""
    image = itk.imread(str(path))
    raw = itk.array_from_image(image)
    with open(path, "rb") as header:
        compressed = _ITK_COMPRESSED.search(header.read(4096)) is not None

    def save(stored: np.ndarray, target: Path) -> list[str]:
        out = itk.image_from_array(np.ascontiguousarray(stored.reshape(raw.shape)))
        out.CopyInformation(image)
        out.SetMetaDataDictionary(image.GetMetaDataDictionary())
        # ITK picks the file format from the extension, so write under the real one and move into place
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".itk-") as scratch:
            written = Path(scratch) / f"image{_extension(path)}"
            itk.imwrite(out, str(written), compression=compressed)
            os.replace(written, target)
        return []

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
    epsilon: float | None = None,
    derived: bool = False,
) -> Path:
    """Write ``image01`` (the source's ``H x W`` grid, [0, 1]) to ``out_path`` in the source's own format; atomic.

    ``meta`` is the source's XRayMeta; ``source_image01`` its loaded image (read again when not given), used to keep
    unchanged pixels bit for bit. With ``epsilon`` (an L-inf budget) no stored value moves by more than
    :func:`stored_budget` units, ``epsilon`` of the data's reference range: a pixel clipped by a narrow window or in
    the flat tail of a sigmoid VOI function would otherwise jump far in stored units for a small change in [0, 1].
    The file gets the source's codec parameters (module docstring); what of them cannot be reproduced is named in a
    :class:`ContainerMismatchWarning`, and a codec that cannot be written at all raises an XRayWriteError. The
    written file has the source's permission bits and modification time. With ``derived`` a DICOM is written as a
    derived image (:func:`derive_dicom`: a new SOP Instance UID and the references to its source); other formats
    carry no instance identity and are written alike either way.
    """
    source, out_path = Path(source), Path(out_path)
    check_output_path(source, out_path)
    stored, save = _stored_values(image01, meta, source, source_image01, out_path, epsilon)
    return _save(stored, save, source, out_path, derived=derived and meta.format == "dicom")


def write_stored(stored: np.ndarray, meta: XRayMeta, out_path: str | os.PathLike, derived: bool = False) -> Path:
    """Write pixel values already in the source's stored form (``H x W``, its dtype: :func:`stored_values`) to
    ``out_path`` in the container of ``meta.source``, exactly as :func:`write_xray` writes them; atomic.

    For a caller that holds the stored values (MONAI Label's ``pred``) and returns a file: a DICOM keeps the source's
    header, its Photometric Interpretation and Bits Stored included; with ``derived`` it is a derived image with a
    new SOP Instance UID (:func:`derive_dicom`), as :func:`write_xray` writes it.
    """
    source, out_path = Path(meta.source), Path(out_path)
    check_output_path(source, out_path)
    stored = np.asarray(stored)
    stored_source, save = _OPENERS[meta.format](source)
    if stored.shape != stored_source.shape or stored.dtype != stored_source.dtype:
        raise XRayWriteError(
            out_path,
            f"stored values {stored.dtype.name} {stored.shape} differ from the source's {stored_source.dtype.name} "
            f"{stored_source.shape} ({source})",
        )
    return _save(stored, save, source, out_path, derived=derived and meta.format == "dicom")


def _save(stored: np.ndarray, save: Saver, source: Path, out_path: Path, derived: bool = False) -> Path:
    """Write ``stored`` with the source format's saver atomically, with the source's file status; warn on what of
    the source's codec parameters could not be kept. ``derived``: DICOM's saver makes it a derived image."""
    with atomic_path(out_path) as tmp:
        problems = save(stored, tmp, derived=True) if derived else save(stored, tmp)
        shutil.copystat(source, tmp)  # as shutil.copy2 leaves the files copied beside it
    if problems:
        warnings.warn(
            f"{out_path}: differs from its source {source} in {'; '.join(problems)}; a data user could tell it from "
            "the files copied byte for byte (write every file of this kind with reencode_like instead)",
            ContainerMismatchWarning,
            stacklevel=3,  # the caller of write_xray / write_stored
        )
    return out_path


def stored_values(
    image01: np.ndarray,
    meta: XRayMeta,
    source: str | os.PathLike,
    *,
    source_image01: np.ndarray | None = None,
    epsilon: float | None = None,
) -> np.ndarray:
    """The stored pixel values (the source's dtype, ``H x W``) that :func:`write_xray` writes for ``image01``.

    For a caller that hands the watermarked image on, in the file's own values, instead of writing a file (MONAI
    Label's ``pred``): a pixel whose value equals the source's keeps its stored value bit for bit, the others go
    through :func:`~xmark_bundle.data.xray_io.to_stored`; with ``epsilon`` none moves by more than
    :func:`stored_budget` units.
    """
    return _stored_values(image01, meta, Path(source), source_image01, Path(source), epsilon)[0]


def stored_budget(meta: XRayMeta, epsilon: float) -> float:
    """Largest change in stored units a budget ``epsilon`` allows: ``epsilon`` of the data's reference range
    (:func:`~xmark_bundle.data.xray_io.reference_range`), rounded down to whole units for integer data."""
    limit = epsilon * reference_range(meta)
    return float(np.floor(limit + 1e-9)) if np.issubdtype(np.dtype(meta.stored_dtype), np.integer) else limit


def _stored_values(
    image01: np.ndarray,
    meta: XRayMeta,
    source: Path,
    source_image01: np.ndarray | None,
    where: Path,
    epsilon: float | None = None,
) -> tuple[np.ndarray, Saver]:
    """:func:`stored_values` and the source format's saver (``where`` names the file an error is about)."""
    image01 = np.asarray(image01)
    if image01.shape != tuple(meta.shape):
        raise XRayWriteError(where, f"image shape {image01.shape} differs from the source's {tuple(meta.shape)}")
    stored_source, save = _OPENERS[meta.format](source)
    if stored_source.shape != image01.shape or stored_source.dtype.name != meta.stored_dtype:
        raise XRayWriteError(
            source,
            f"holds {stored_source.dtype.name} {stored_source.shape} pixels, but meta describes "
            f"{meta.stored_dtype} {tuple(meta.shape)} (meta of another file?)",
        )
    if source_image01 is None:
        source_image01 = _load(source)[0]
    keep = image01 == source_image01
    if meta.window_source == "data range":
        keep |= (source_image01 == 0.0) | (source_image01 == 1.0)
    stored = to_stored(image01, meta)
    if epsilon is not None:
        limit = stored_budget(meta, epsilon)
        reference = stored_source.astype(np.float64)
        stored = np.clip(stored.astype(np.float64), reference - limit, reference + limit)
    return np.where(keep, stored_source, stored).astype(np.dtype(meta.stored_dtype)), save


def reencode_like(source: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the source's own image to ``out_path`` through exactly the path a marked file takes (:func:`write_xray`).

    For a release that cannot reproduce some files' codec parameters (a :class:`ContainerMismatchWarning`), every
    file of that kind, marked or not, can go through the same encoder, so that the marked ones do not stand out. For
    a lossless source whose parameters are reproduced the result equals the source byte for byte.
    """
    image01, meta = _load(source)
    return write_xray(image01, meta, source, out_path, source_image01=image01)


def quantisation_step(meta: XRayMeta) -> float:
    """Largest [0, 1] change one stored unit can make under the file's intensity mapping (0 for float data)."""
    if not np.issubdtype(np.dtype(meta.stored_dtype), np.integer):
        return 0.0
    if meta.mapping == "lut":
        table = _dicom_lut_table(pydicom.dcmread(meta.source, stop_before_pixels=True), meta)[1]
        return float(np.abs(np.diff(table)).max())
    # linear: slope / window width; the DICOM sigmoid's steepest slope (at its centre) is the same
    return abs(meta.rescale_slope) / (meta.window_high - meta.window_low)


def stored_change(source: str | os.PathLike, written: str | os.PathLike) -> np.ndarray:
    """``|written - source|`` per pixel in stored units (float64, ``H x W``), both files decoded as load_xray reads
    them: where a lossy re-encoding moved the pixels of a written file."""
    meta, written_meta = _load(source)[1], _load(written)[1]
    stored_source = _OPENERS[meta.format](Path(source))[0].astype(np.float64)
    stored_written = _OPENERS[written_meta.format](Path(written))[0].astype(np.float64)
    if stored_written.shape != stored_source.shape:
        raise XRayWriteError(
            written, f"shape {stored_written.shape} differs from the source's {stored_source.shape} ({source})"
        )
    return np.abs(stored_written - stored_source)


def max_stored_change(source: str | os.PathLike, written: str | os.PathLike) -> dict[str, float]:
    """Largest pixel change between two files of one image, in stored units and in [0, 1] as load_xray reads them.

    A file from :func:`write_xray` keeps the source's intensity mapping, so both [0, 1] images share one scale. Also
    returns the source's :func:`quantisation_step`, the rounding slack of a budget stated in [0, 1], the source's
    reference range in stored units (:func:`~xmark_bundle.data.xray_io.reference_range`: what the data occupy, not
    the window) and the stored change as a share of it, ``max_change_of_range``: the figure a budget epsilon bounds.
    """
    source01, meta = _load(source)
    written01, written_meta = _load(written)
    if written01.shape != source01.shape:
        raise XRayWriteError(written, f"shape {written01.shape} differs from the source's {source01.shape} ({source})")
    stored_source = _OPENERS[meta.format](Path(source))[0].astype(np.float64)
    stored_written = _OPENERS[written_meta.format](Path(written))[0].astype(np.float64)
    change = float(np.abs(stored_written - stored_source).max())
    reference = reference_range(meta)
    return {
        "max_stored_change": change,
        "max_abs_change01": float(np.abs(written01.astype(np.float64) - source01).max()),
        "quantisation_step01": quantisation_step(meta),
        "reference_range": reference,
        "data_bits": int(meta.data_bits),
        "max_change_of_range": change / reference,
    }
