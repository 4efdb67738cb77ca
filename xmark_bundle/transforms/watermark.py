"""Release watermarked X-rays at full resolution: map a model-resolution residual onto the original file.

The generator works on the letterboxed ``S x S`` image. The released file is made from the ORIGINAL full-resolution
image, never from a resampled copy: ``delta = watermarked - benign`` at model resolution, padding removed and resized
to the stored grid (:func:`~xmark_bundle.transforms.geometry.unletterbox`), added in [0, 1] intensity, re-quantised to
the file's stored type by :func:`~xmark_bundle.data.xray_writer.write_xray`, and the budget checked on the written file.

The budget epsilon is a share of the range the data really occupy (:func:`~xmark_bundle.data.xray_io.reference_range`,
e.g. 4095 stored units for 12-bit data, whatever their container or window), not of the window that maps the file to
[0, 1]. Where that window is wider than the data's range (12-bit data in a 16-bit PNG without sBIT or a DICOM whose
Bits Stored says 16, a window wider than the bit range), the residual is scaled by ``range / window width``
(:func:`budget_scale`), so that the pattern keeps its shape at ``epsilon`` of the data's range; and the writer clamps
every stored change to ``epsilon`` of that range (:func:`~xmark_bundle.data.xray_writer.stored_budget`), which bounds
the pixels a narrow window clips or a sigmoid VOI function flattens. The report measures the change in stored units
against that range (``max_change_of_range``), so a violated budget is reported as such.

A lossy codec (JPEG, lossy JPEG 2000) moves pixels beyond the requested change when it re-encodes them: a residual
that uses the whole budget comes back a few stored units over it, and another decoder may read the file and its source
one unit apart each. :func:`apply_watermark` therefore reads the written file back and, in the blocks where it
exceeds the budget less :data:`LOSSY_DECODER_SLACK` stored units, shrinks the residual toward the source and writes
again (:data:`LOSSY_REWRITES` times at most, the last time without residual in those blocks); a file still over then
is removed and an XRayWriteError raised, so the file is released or left unmarked and listed, never written over the
budget.

DICOM instance identity: a released file replaces its source in a published copy of the data set and keeps its SOP
Instance UID (``sop_instance_uid="release"``, what :mod:`~xmark_bundle.release` uses: the release must not set marked
files apart). Inference and the MONAI Deploy app write a marked image that may be sent back to the PACS holding its
source: there it is written as a derived image with a new SOP Instance UID (``"new"``, the default;
:func:`~xmark_bundle.data.xray_writer.derive_dicom`); ``"keep"`` keeps the source's UID with a warning.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor, ensure_tuple_rep
from pydicom.uid import UID

from ..data.xray_io import XRayMeta, load_xray, reference_range
from ..data.xray_writer import (
    ContainerMismatchWarning,
    XRayWriteError,
    check_output_path,
    is_lossy,
    max_stored_change,
    stored_change,
    stored_values,
    write_xray,
)
from .geometry import GEOMETRY_KEY, unletterbox

__all__ = [
    "KeptInstanceUIDWarning",
    "LOSSY_REWRITES",
    "SOP_INSTANCE_UID_MODES",
    "RestoreWatermarkedd",
    "SaveWatermarkedd",
    "apply_watermark",
    "budget_scale",
    "full_resolution_residual",
    "watermark_source",
    "watermarked_path",
]

#: Slack of the budget check for float32 arithmetic on images in [0, 1].
_FLOAT_TOLERANCE = 1e-6
#: Writes of a lossy file at most: the first, then rewrites with the residual shrunk where the budget is exceeded.
LOSSY_REWRITES = 6
#: Stored units a lossy file stays below the budget under this machine's decoder. JPEG's compliance test (ISO/IEC
#: 10918-2) lets a conforming decoder's output differ by one unit per pixel, in the marked file and in its source
#: alike, so a change within ``budget - 2`` here is within the budget under any conforming decoder (Pillow's libjpeg
#: and pydicom's pylibjpeg already differ by one unit on one file); JPEG 2000 decoders are held to the same slack.
LOSSY_DECODER_SLACK = 2
#: Side of the square blocks in which a lossy rewrite shrinks the residual: a JPEG MCU (8 x 8 blocks, 16 x 16 with
#: subsampled chroma) keeps a change inside it; a JPEG 2000 wavelet spreads one further, so it gets larger blocks.
_LOSSY_BLOCK = {"jpeg": 16, "wavelet": 64}
#: What SaveWatermarkedd does with a DICOM's SOP Instance UID (module docstring).
SOP_INSTANCE_UID_MODES = ("new", "keep", "release")


class KeptInstanceUIDWarning(UserWarning):
    """A marked DICOM written outside a release that keeps its source's SOP Instance UID (``sop_instance_uid="keep"``):
    sent to the PACS that holds the source, the two would collide."""


def _channel_first(image: torch.Tensor, name: str) -> torch.Tensor:
    """A plain float32 CPU ``1 x S x S`` tensor from ``S x S`` or ``1 x S x S``."""
    image = convert_to_tensor(image, track_meta=False).detach().to("cpu", torch.float32)
    image = image[None] if image.ndim == 2 else image
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"apply_watermark expects {name} of shape S x S or 1 x S x S, got {tuple(image.shape)}.")
    return image


def full_resolution_residual(
    watermarked: torch.Tensor, benign: torch.Tensor, geometry: Mapping[str, Any], epsilon: float
) -> torch.Tensor:
    """The release's mapping of G's change ``watermarked - benign`` (``(B x) C x S x S``) to the file's own grid:
    padding removed, resized bilinearly to ``geometry["original_shape"]`` and clamped to ``[-epsilon, epsilon]``."""
    return unletterbox(watermarked - benign, geometry).clamp(-epsilon, epsilon)


def budget_scale(meta: XRayMeta) -> float:
    """Factor on a [0, 1] residual that keeps a change of epsilon in [0, 1] within epsilon of the data's reference
    range (:func:`~xmark_bundle.data.xray_io.reference_range`): ``range / window width`` where the window (linear or
    sigmoid, in modality units) is wider than the range, else 1. A LUT chain gets 1 (the writer's clamp bounds it)."""
    if meta.mapping == "lut":
        return 1.0
    width = abs(meta.window_high - meta.window_low)
    data_range = reference_range(meta) * abs(meta.rescale_slope)
    return float(min(1.0, data_range / width)) if width > 0 else 1.0


def watermark_source(
    source_path: str | os.PathLike,
    watermarked: torch.Tensor,
    benign: torch.Tensor,
    geometry: Mapping[str, Any],
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray, XRayMeta]:
    """The full-resolution watermarked image of ``source_path`` in [0, 1], the source's own [0, 1] image, and its
    metadata: the model-resolution residual ``watermarked - benign`` mapped onto the file's grid, scaled by
    :func:`budget_scale` (1 for a window that spans the data's range) and added."""
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be in (0, 1] (an L-inf budget in [0, 1] intensity), got {epsilon}.")
    watermarked, benign = _channel_first(watermarked, "watermarked"), _channel_first(benign, "benign")
    if watermarked.shape != benign.shape:
        raise ValueError(f"watermarked {tuple(watermarked.shape)} and benign {tuple(benign.shape)} shapes differ.")
    image01, meta = load_xray(source_path, allow_any_modality=True)  # read by LoadXRayd first, within its scope
    expected = tuple(int(s) for s in geometry["original_shape"])
    if expected != tuple(meta.shape):
        raise XRayWriteError(source_path, f"is {meta.shape[0]}x{meta.shape[1]}, but the geometry is for {expected}")
    residual = full_resolution_residual(watermarked, benign, geometry, epsilon)[0].numpy() * budget_scale(meta)
    return np.clip(image01 + residual, 0.0, 1.0), image01, meta


def _budget_problem(change: Mapping[str, float], epsilon: float, slack: int = 0) -> str | None:
    """Why a written file's change (:func:`~xmark_bundle.data.xray_writer.max_stored_change`) breaks the budget
    ``epsilon``, or None: ``max |written - source| <= epsilon + one quantisation step`` in [0, 1], and the change in
    stored units ``<= epsilon`` of the data's reference range (``max_change_of_range``), each with ``slack`` stored
    units to spare (:data:`LOSSY_DECODER_SLACK` for a lossy file)."""
    step = change["quantisation_step01"]
    budget = epsilon + step + _FLOAT_TOLERANCE
    in_range = change["max_change_of_range"] + slack / change["reference_range"] <= epsilon + _FLOAT_TOLERANCE
    if change["max_abs_change01"] + slack * step <= budget and in_range:
        return None
    spare = f", with {slack} stored units kept for other decoders" if slack else ""
    return (
        f"max |change| {change['max_abs_change01']:.6g} in [0, 1] (budget {budget:.6g}), "
        f"{change['max_stored_change']:.6g} stored units = {change['max_change_of_range']:.4g} of the data's range "
        f"of {change['reference_range']:.6g} ({change['data_bits']} bits) exceeds epsilon {epsilon:.6g}{spare}"
    )


def _block_max(values: np.ndarray, block: int) -> np.ndarray:
    """Maximum of each ``block x block`` block of ``values`` (blocks from the top left; the last ones partial)."""
    rows, cols = -(-values.shape[0] // block), -(-values.shape[1] // block)
    padded = np.zeros((rows * block, cols * block), values.dtype)
    padded[: values.shape[0], : values.shape[1]] = values
    return padded.reshape(rows, block, cols, block).max(axis=(1, 3))


def _shrink_over_budget(
    factor: np.ndarray, change: np.ndarray, limit: float, block: int, last: bool
) -> tuple[np.ndarray, int]:
    """The residual's per-block factor after one lossy write whose stored ``change`` exceeds ``limit`` somewhere: each
    block holding such a pixel gets its factor times ``min(0.8, limit / its largest change)``, 0 on the ``last``
    rewrite. Returns the new factor (per block) and how many blocks it shrank."""
    worst = _block_max(change, block)
    over = worst > limit
    step = np.zeros_like(worst) if last else np.minimum(0.8, limit / np.maximum(worst, 1e-12))
    return np.where(over, factor * step, factor), int(over.sum())


def apply_watermark(
    source_path: str | os.PathLike,
    watermarked: torch.Tensor,
    benign: torch.Tensor,
    geometry: Mapping[str, Any],
    epsilon: float,
    out_path: str | os.PathLike,
    derived: bool = False,
) -> dict[str, Any]:
    """Add the model-resolution watermark residual to the full-resolution source and write it to ``out_path``.

    ``geometry`` is the source's letterbox geometry (``meta["xmark_geometry"]``). The residual is clamped to
    ``[-epsilon, epsilon]`` after resizing as a guard only: bilinear resizing, antialiased or not, forms convex
    combinations (non-negative weights summing to one), so it cannot leave the input range. The written file is read
    back and two bounds checked: ``max |written - source| <= epsilon + one quantisation step`` in [0, 1], and the
    change in stored units ``<= epsilon`` of the data's reference range (``max_change_of_range``, module docstring).
    A file re-encoded with a lossy codec (JPEG, lossy JPEG 2000 or JPEG baseline DICOM, written like its source:
    :func:`~xmark_bundle.data.xray_writer.is_lossy`) is held :data:`LOSSY_DECODER_SLACK` stored units inside the
    budget (another decoder may read it and its source one unit apart each); one that fails is written again with the
    residual shrunk toward the source in the blocks over it (:data:`LOSSY_REWRITES` writes at most, the last without
    residual there).
    A file that still fails, lossless or lossy, is deleted and an XRayWriteError raised: never written over budget.
    ``derived``: a DICOM is written as a derived image with a new SOP Instance UID
    (:func:`~xmark_bundle.data.xray_writer.derive_dicom`). Returns a JSON-able report (``decoder_slack_units``: the
    units kept to spare; ``lossy_rewrites``: the writes after the first; ``residual_shrunk_blocks``: blocks whose
    residual was shrunk).
    """
    source, out_path = Path(source_path), Path(out_path)
    check_output_path(source, out_path)
    marked01, image01, meta = watermark_source(source, watermarked, benign, geometry, epsilon)
    lossy = is_lossy(meta)
    write_xray(marked01, meta, source, out_path, source_image01=image01, epsilon=epsilon, derived=derived)
    slack = LOSSY_DECODER_SLACK if lossy else 0
    change = max_stored_change(source, out_path)
    problem = _budget_problem(change, epsilon, slack)
    rewrites, shrunk = 0, np.zeros((0, 0), bool)
    if problem is not None and lossy:
        limit = epsilon * change["reference_range"] * (1 + _FLOAT_TOLERANCE) - slack
        block = _LOSSY_BLOCK["jpeg" if meta.format == "jpeg" or "JPEG 2000" not in _codec(meta) else "wavelet"]
        residual = marked01 - image01
        factor = np.ones(_block_max(np.zeros(meta.shape, np.uint8), block).shape)
        while problem is not None and rewrites < LOSSY_REWRITES - 1:
            rewrites += 1
            factor, _ = _shrink_over_budget(
                factor, stored_change(source, out_path), limit, block, last=rewrites == LOSSY_REWRITES - 1
            )
            pixel_factor = np.kron(factor, np.ones((block, block)))[: meta.shape[0], : meta.shape[1]]
            shrunk01 = np.where(pixel_factor == 1.0, marked01, image01 + pixel_factor * residual)
            with warnings.catch_warnings():  # the source's codec parameters: warned about by the first write
                warnings.simplefilter("ignore", ContainerMismatchWarning)
                write_xray(shrunk01, meta, source, out_path, source_image01=image01, epsilon=epsilon, derived=derived)
            change = max_stored_change(source, out_path)
            problem = _budget_problem(change, epsilon, slack)
        shrunk = factor < 1.0
    if problem is not None:
        out_path.unlink()
        if lossy:
            problem += (
                f" after lossy {_codec(meta)} re-encoding, even with the residual removed where it was exceeded "
                f"({LOSSY_REWRITES} writes); the file is not marked"
            )
        raise XRayWriteError(out_path, f"{problem}; the file was removed")
    return {
        "source": str(source),
        "path": str(out_path),
        "format": meta.format,
        "shape": list(meta.shape),
        "epsilon": float(epsilon),
        **change,
        "budget_ok": True,
        "lossy": lossy,
        "decoder_slack_units": slack,
        "lossy_rewrites": rewrites,
        "residual_shrunk_blocks": int(shrunk.sum()),
    }


def _codec(meta: XRayMeta) -> str:
    """The lossy codec's name for a message: JPEG, or the DICOM transfer syntax's name."""
    return "JPEG" if meta.format == "jpeg" else UID(meta.transfer_syntax).name


def _letterboxed(data: Mapping[Hashable, Any], key: Hashable, transform: MapTransform) -> MetaTensor:
    """The benign letterboxed input under ``key``: a MetaTensor whose meta carry the letterbox geometry."""
    benign = data[key]
    if not isinstance(benign, MetaTensor) or GEOMETRY_KEY not in benign.meta:
        name = type(transform).__name__
        raise ValueError(f"{name} needs '{key}' as a MetaTensor with meta['{GEOMETRY_KEY}'] (from ResizeLongestPadd).")
    return benign


def watermarked_path(source: str | os.PathLike, dataset_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Where the watermarked copy of ``source`` goes: ``output_dir / (source relative to dataset_dir)``, or, for a
    source outside ``dataset_dir`` (an image MONAI Label hands over from its datastore), ``output_dir / external /
    <12 hex digits of its folder's path> / name``: two sources of one name in different folders (every CheXpert image
    is ``view1_frontal``) never overwrite each other's copy."""
    absolute, root = Path(os.path.abspath(source)), Path(os.path.abspath(dataset_dir))
    if absolute.is_relative_to(root):
        return Path(output_dir) / absolute.relative_to(root)
    folder = hashlib.sha256(os.fsencode(absolute.parent)).hexdigest()[:12]
    return Path(output_dir) / "external" / folder / absolute.name


class SaveWatermarkedd(MapTransform):
    """Postprocessing: write each watermarked prediction as a full-resolution file mirroring its source's path.

    ``keys`` hold the generator outputs (``1 x S x S``), ``image_keys`` the benign letterboxed inputs whose meta carry
    ``filename_or_obj`` and ``xmark_geometry``. The output goes to :func:`watermarked_path` (the source's relative
    path under ``output_dir``, or a folder per source folder for a source outside ``dataset_dir``), with the
    source's name and format; the report of :func:`apply_watermark` is stored under ``output_keys``. With
    ``skip_unwritable`` a file that reads but cannot be written back (no encoder here for its DICOM transfer syntax)
    is not written and its report is ``{"source", "unwritable": reason}`` instead of stopping a folder's run.

    ``sop_instance_uid`` (DICOM; module docstring): ``"new"`` writes a derived image with a new SOP Instance UID, for
    output that may go back to the PACS holding the source (inference, MONAI Deploy); ``"keep"`` keeps the source's
    UID and warns (:class:`KeptInstanceUIDWarning`) for each file; ``"release"`` keeps it silently, for a release,
    whose files replace their sources in a published copy of the data set.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        dataset_dir: str | os.PathLike,
        epsilon: float,
        image_keys: KeysCollection = "image",
        output_keys: KeysCollection = "watermark",
        allow_missing_keys: bool = False,
        skip_unwritable: bool = False,
        sop_instance_uid: str = "new",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if sop_instance_uid not in SOP_INSTANCE_UID_MODES:
            raise ValueError(
                f"sop_instance_uid must be one of {', '.join(SOP_INSTANCE_UID_MODES)}, got {sop_instance_uid!r}"
            )
        self.sop_instance_uid = sop_instance_uid
        self.skip_unwritable = skip_unwritable
        self.output_dir = Path(output_dir)
        self.dataset_dir = Path(os.path.abspath(dataset_dir))
        self.epsilon = epsilon
        self.image_keys = ensure_tuple_rep(image_keys, len(self.keys))
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, image_key, output_key in self.key_iterator(d, self.image_keys, self.output_keys):
            benign = _letterboxed(d, image_key, self)
            source = Path(benign.meta["filename_or_obj"])
            out_path = watermarked_path(source, self.dataset_dir, self.output_dir)
            try:
                d[output_key] = apply_watermark(
                    source,
                    d[key],
                    benign,
                    benign.meta[GEOMETRY_KEY],
                    self.epsilon,
                    out_path,
                    derived=self.sop_instance_uid == "new",
                )
            except XRayWriteError as err:
                if not self.skip_unwritable:
                    raise
                d[output_key] = {"source": str(source), "unwritable": str(err).splitlines()[0]}
                continue
            if self.sop_instance_uid == "keep" and d[output_key]["format"] == "dicom":
                warnings.warn(
                    f"{out_path}: keeps the SOP Instance UID of its source {source} (sop_instance_uid 'keep'); sent to "
                    "the PACS that holds the source it collides with the original: 'new' writes a derived image",
                    KeptInstanceUIDWarning,
                    stacklevel=2,
                )
        return d


class RestoreWatermarkedd(MapTransform):
    """Postprocessing: replace each generator output by the watermarked image on its source's grid, in the source's
    stored values and type, the pixels that :class:`SaveWatermarkedd` writes.

    For a caller that writes or shows the result itself (MONAI Label): not the ``S x S`` letterboxed output stretched
    to the source's shape, padding included. The result is the file's pixel array in MONAI's (x, y) order, ``W x H``,
    without a channel dimension, as MONAI Label's ``Restored`` (which keeps it: its shape is the image's
    ``spatial_shape``) and its ITK writer (which transposes it back to rows x columns) take it. The meta of the
    benign image (``image_keys``) goes to ``<key>_meta_dict``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        epsilon: float,
        image_keys: KeysCollection = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.epsilon = epsilon
        self.image_keys = ensure_tuple_rep(image_keys, len(self.keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, image_key in self.key_iterator(d, self.image_keys):
            benign = _letterboxed(d, image_key, self)
            source = benign.meta["filename_or_obj"]
            marked01, image01, meta = watermark_source(source, d[key], benign, benign.meta[GEOMETRY_KEY], self.epsilon)
            stored = stored_values(marked01, meta, source, source_image01=image01, epsilon=self.epsilon)
            d[key] = np.ascontiguousarray(stored.T)
            d[f"{key}_meta_dict"] = dict(benign.meta)
        return d
