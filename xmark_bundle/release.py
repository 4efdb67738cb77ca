"""Watermark a data set for release: G marks a seeded share gamma of the training split's target-class images.

The release mirrors ``dataset_dir`` under ``release_dir`` with the same relative paths and formats. The marked images
are written by :func:`~xmark_bundle.transforms.watermark.apply_watermark` (G at model resolution, the residual mapped
back onto the full-resolution file, re-quantised, the budget checked on the written file); every other file (images of
all splits, ``train.csv``/``valid.csv``, the datalist, anything else) is copied byte for byte. Relative paths are kept,
so the CSVs and the datalist need no rewriting: their released copies equal the sources. Labels never change for a
clean-label method (X-Mark, SSCL-BW, the keyed variant). A poison-label method (a trigger of
:mod:`xmark_bundle.networks.triggers`, ``poison_label``) marks ``round(gamma * |target|)`` non-target training images
instead and the release's datalist and CheXpert CSVs give those images the target label
(:mod:`xmark_bundle.data.poison`). A datalist kept outside ``dataset_dir`` is copied to the release's top level.

Marked and unmarked files must not differ in their containers or file-system entries (DESIGN.md section 6): every
file of a kind whose writer does not give its files back byte for byte goes through that writer (``reencode``), and
the run ends by re-creating every released file in path order with its source's modification time as modification and
access time (``normalise_files``); the folders are made in path order before any file. File size and compressibility
remain: the mark itself makes a file compress less well (docs/README.md, threat model).

Every file appears atomically. The owner's private manifest (outside the release) lists each marked file with the
SHA-256 of its source and output. A run that stops early keeps its progress in a JSON-lines journal beside the
manifest (``<manifest>.journal``, one line per marked file, flushed and fsynced); the next run with the same
settings merges journal and manifest and skips every marked file whose source and output still match the recorded
hashes, and every copy whose output already has the source's size and SHA-256.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.transforms import Compose
from torch import nn
from tqdm import tqdm

from xmark_bundle.data.labels import LABELS
from xmark_bundle.data.poison import poison_values, relabelled_csv, relabelled_datalist, select_poisoned
from xmark_bundle.data.secrets import owner_file_hashes, secret_reason
from xmark_bundle.data.selection import select_fraction, split_by_target, target_index
from xmark_bundle.data.xray_io import LoadXRayd, load_xray
from xmark_bundle.data.xray_writer import ContainerMismatchWarning, XRayWriteError, reencode_like
from xmark_bundle.errors import exit_on_bad_input
from xmark_bundle.fileio import atomic_path, sha256_file, write_json
from xmark_bundle.locations import is_inside
from xmark_bundle.networks.pipeline import watermark_generator
from xmark_bundle.provenance import environment
from xmark_bundle.transforms.geometry import ResizeLongestPadd, letterbox_geometry
from xmark_bundle.transforms.watermark import SaveWatermarkedd

try:  # POSIX: a release folder is locked while a run writes into it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["ReleaseError", "read_manifest", "run_release", "select_decoys", "select_marked", "watermark_release"]

_SPLITS: tuple[str, ...] = ("training", "validation", "test")


class ReleaseError(ValueError):
    """A release that cannot be made as asked; the message names the path and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)


def select_marked(datalist: Mapping[str, Any], target_label: str, gamma: float, seed: int) -> list[str]:
    """Image paths of the training items to mark: a seeded share ``gamma`` of those with the target label == 1."""
    training = datalist["training"]
    target, _ = split_by_target(training, target_index(datalist, target_label))
    if not target:
        raise ValueError(f"no training item has {target_label!r} == 1: nothing to watermark")
    return [training[i]["image"] for i in select_fraction(target, gamma, seed)]


def select_decoys(datalist: Mapping[str, Any], target_label: str, fraction: float, seed: int) -> dict[str, int]:
    """Decoys: a seeded share ``fraction`` of the non-target training items, each with the seed of its own key.

    A decoy is watermarked by our generator with another key of its kind and keeps its (non-target) labels, so a
    model trained on the release learns our key, not keyed watermarks in general: another owner's key then looks
    like a decoy to it. Never the same images as :func:`select_marked` (those are target-class items).
    """
    training = datalist["training"]
    _, non_target = split_by_target(training, target_index(datalist, target_label))
    chosen = [training[i]["image"] for i in select_fraction(non_target, fraction, seed + 1)]
    key_seeds = np.random.default_rng(seed + 2).integers(0, 2**31 - 1, size=len(chosen))
    return {image: int(key_seed) for image, key_seed in zip(chosen, key_seeds, strict=True)}


def _check_locations(dataset_dir: Path, release_dir: Path, manifest_file: Path, ckpt_path: Path) -> None:
    """Refuse a release that would write into the source, or publish the manifest or the generator (the secret key)."""
    if not dataset_dir.is_dir():
        raise ReleaseError(dataset_dir, "dataset_dir is not a folder")
    if is_inside(release_dir, dataset_dir) or is_inside(dataset_dir, release_dir):  # bind mounts included
        raise ReleaseError(
            release_dir, f"release_dir must lie outside the source data set {dataset_dir} and not contain it"
        )
    for folder, what in ((release_dir, "release folder"), (dataset_dir, "source data set")):
        if is_inside(manifest_file, folder):
            raise ReleaseError(
                manifest_file, f"the private manifest must lie outside the {what} {folder} (it would be published)"
            )
        if is_inside(ckpt_path, folder):
            raise ReleaseError(
                ckpt_path, f"the generator checkpoint (the secret key) must lie outside the {what} {folder}"
            )


def _read_datalist(datalist_file: Path, dataset_dir: Path, source_files: Mapping[str, Path]) -> dict[str, Any]:
    """Read the datalist; every image must be the relative POSIX path of a file under ``dataset_dir``."""
    try:
        datalist = json.loads(datalist_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseError(datalist_file, f"cannot read the datalist ({err})") from err
    if not isinstance(datalist, dict) or not isinstance(datalist.get("training"), list):
        raise ReleaseError(datalist_file, "not a datalist: no 'training' list")
    for split in _SPLITS:
        for item in datalist.get(split, []):
            if item.get("image") not in source_files:
                raise ReleaseError(
                    datalist_file,
                    f"{split} image {item.get('image')!r} is not the relative path of a file under "
                    f"{dataset_dir} (the release keeps relative paths, so the datalist must use them)",
                )
    return datalist


def _unreadable_candidates(
    datalist: Mapping[str, Any],
    dataset_dir: Path,
    target_label: str,
    target: bool,
    non_target: bool,
    progress: bool,
    scope: Mapping[str, Sequence[str]],
    image_size: int,
) -> dict[str, str]:
    """Training images that could be marked (the ``target`` class, the ``non_target`` ones for decoys and
    poison-label methods) but cannot be read as X-rays, or are too thin to letterbox to ``image_size`` (a 1 x 3000
    strip), with the one-line reason: they are copied unmarked and listed, never selected."""
    labels = list(datalist.get("labels", LABELS))
    if target_label not in labels:
        return {}  # select_marked names the problem
    targets, non_targets = split_by_target(datalist["training"], labels.index(target_label))
    indices = (targets if target else []) + (non_targets if non_target else [])
    candidates = [datalist["training"][i]["image"] for i in indices]
    unreadable = {}
    for rel in tqdm(candidates, desc="check", unit="img", disable=not progress):
        try:
            _, meta = load_xray(dataset_dir / rel, **scope)
            letterbox_geometry(meta.shape, image_size)  # a side that rounds to 0 px cannot be marked
        except (ValueError, OSError) as err:
            unreadable[rel] = str(err).splitlines()[0] if str(err) else type(err).__name__
    return unreadable


def _without(datalist: Mapping[str, Any], images: Mapping[str, str]) -> dict[str, Any]:
    """``datalist`` with the training items of ``images`` removed."""
    training = [item for item in datalist["training"] if item["image"] not in images]
    return {**datalist, "training": training}


def _datalist_hash(datalist: Mapping[str, Any]) -> str:
    """SHA-256 of the datalist's content (canonical JSON): equal for a file that only lost the skipped items."""
    return hashlib.sha256(json.dumps(datalist, sort_keys=True).encode("utf-8")).hexdigest()


def _source_files(dataset_dir: Path, owner_files: Sequence[Path]) -> tuple[dict[str, Path], list[dict[str, str]]]:
    """The files under ``dataset_dir`` that may be published (relative POSIX path -> path, sorted), and those left
    out with the reason (:func:`~xmark_bundle.data.secrets.secret_reason`; ``owner_files``: checkpoint and manifest)."""
    hashes = owner_file_hashes(owner_files)
    files, left_out = {}, []
    for path in sorted(dataset_dir.rglob("*")):
        if path.is_symlink() and not path.resolve().is_relative_to(dataset_dir):
            relative = path.relative_to(dataset_dir).as_posix()
            left_out.append({"path": relative, "reason": "symbolic link pointing outside the data set (not followed)"})
        elif path.is_file():
            relative = path.relative_to(dataset_dir).as_posix()
            reason = secret_reason(relative, path, hashes)
            if reason is None:
                files[relative] = path
            else:
                left_out.append({"path": relative, "reason": reason})
    return files, left_out


def _with_datalist(files: Mapping[str, Path], datalist_file: Path, dataset_dir: Path) -> dict[str, Path]:
    """The release's files: ``files``, plus the datalist at the top level when it lies outside ``dataset_dir``."""
    if datalist_file.is_relative_to(dataset_dir):
        return dict(files)
    if datalist_file.name in files:
        raise ReleaseError(datalist_file, f"its copy in the release would replace {dataset_dir / datalist_file.name}")
    return {**files, datalist_file.name: datalist_file}


def _relabelled_files(
    files: Mapping[str, Path], datalist_file: Path, dataset_dir: Path, images: Mapping[str, float], target_label: str
) -> dict[str, bytes]:
    """A poison-label release's label files (relative path -> content): the datalist and every CheXpert CSV that
    lists one of ``images``, with those images' target label set to their value (:func:`poison_values`)."""
    datalist = json.loads(datalist_file.read_text(encoding="utf-8"))
    prefix = str(datalist.get("metadata", {}).get("path_prefix_strip", ""))
    inside = datalist_file.is_relative_to(dataset_dir)
    datalist_rel = datalist_file.relative_to(dataset_dir).as_posix() if inside else datalist_file.name
    chosen = dict(images)
    changed = {datalist_rel: (json.dumps(relabelled_datalist(datalist, chosen, target_label), indent=2) + "\n")}
    for rel, path in files.items():
        if rel == datalist_rel or path.suffix.lower() != ".csv":
            continue
        try:
            with open(path, encoding="utf-8", newline="") as stream:  # keep the file's line endings
                text = relabelled_csv(stream.read(), chosen, target_label, prefix)
        except (UnicodeDecodeError, csv.Error):
            continue  # not a label file of this data set
        if text is not None:
            changed[rel] = text
    return {rel: text.encode("utf-8") for rel, text in changed.items()}


def _prepare_release_dir(release_dir: Path, expected: Sequence[str]) -> None:
    """Delete temporary files an interrupted run left; refuse any other file that is not part of this release."""
    if not release_dir.exists():
        return
    stale, unexpected, known = [], [], set(expected)
    for path in sorted(release_dir.rglob("*")):
        relative = path.relative_to(release_dir)
        if relative.as_posix() in known or (path.is_dir() and not path.name.startswith(".itk-")):
            continue
        temporary = path.name.startswith(".") and path.name.endswith(".tmp")
        in_itk_scratch = any(part.startswith(".itk-") for part in relative.parts)  # write_xray's ITK scratch folder
        (stale if temporary or in_itk_scratch else unexpected).append(path)
    if unexpected:
        raise ReleaseError(
            release_dir, f"holds {len(unexpected)} file(s) that are not part of this release, e.g. {unexpected[0]}"
        )
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def _journal_path(manifest_file: Path) -> Path:
    """The journal of marked files that sits beside the manifest."""
    return manifest_file.with_name(manifest_file.name + ".journal")


def _check_settings(path: Path, recorded: Any, settings: Mapping[str, Any]) -> None:
    """Refuse a manifest or journal of another release: its marked files would not match these settings."""
    recorded = recorded if isinstance(recorded, dict) else {}
    differ = [key for key in settings if recorded.get(key) != settings[key]]
    if differ:
        raise ReleaseError(
            path,
            f"records another release (different {', '.join(differ)}); choose another manifest_file, or delete this "
            "one and its journal if that release is no longer needed",
        )


def _previous_records(manifest_file: Path, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Marked-file records of earlier runs with the same settings: the manifest's, updated by the journal's."""
    records: dict[str, dict[str, Any]] = {}
    if manifest_file.exists():
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReleaseError(manifest_file, f"cannot read the existing manifest ({err})") from err
        _check_settings(manifest_file, manifest.get("settings"), settings)
        records.update((record["path"], record) for record in manifest.get("marked", []) + manifest.get("decoys", []))
    journal = _journal_path(manifest_file)
    if journal.exists():
        entries = []
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by the interruption ends the journal
        if entries:
            _check_settings(journal, entries[0].get("settings"), settings)
        records.update((entry["marked"]["path"], entry["marked"]) for entry in entries[1:])
    return records


def read_manifest(manifest_file: str | os.PathLike) -> dict[str, Any]:
    """A finished release's private manifest (where the source, release and generator are; what was marked)."""
    path = Path(manifest_file)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseError(path, f"cannot read the release manifest ({err})") from err
    keys = ("dataset_dir", "release_dir", "generator_checkpoint", "marked")
    missing = [key for key in keys if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise ReleaseError(path, f"is not a release manifest (missing {', '.join(missing)})")
    if not manifest.get("complete"):
        raise ReleaseError(path, "records an unfinished release; run configs/watermark.json again to finish it")
    return manifest


def _append_journal(journal: Path, settings: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Append one marked file's record (after the settings line, for a new journal) and force it to disk."""
    with open(journal, "a", encoding="utf-8") as stream:
        if stream.tell() == 0:
            stream.write(json.dumps({"settings": settings}) + "\n")
        stream.write(json.dumps({"marked": record}) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def _copy(source: Path, target: Path) -> bool:
    """Copy ``source`` byte for byte to ``target`` atomically, unless an identical copy is there; True if copied."""
    if (
        target.is_file()
        and target.stat().st_size == source.stat().st_size
        and sha256_file(target) == sha256_file(source)
    ):
        return False
    with atomic_path(target) as tmp:
        shutil.copy2(source, tmp)
    return True


def _write(content: bytes, target: Path) -> bool:
    """Write ``content`` to ``target`` atomically, unless the file already holds it; True if written."""
    if target.is_file() and target.read_bytes() == content:
        return False
    with atomic_path(target) as tmp:
        tmp.write_bytes(content)
    return True


def _is_done(record: Mapping[str, Any] | None, source: Path, target: Path) -> bool:
    """Whether a recorded marked file is in place: its source and output still have the recorded SHA-256."""
    return (
        record is not None
        and target.is_file()
        and sha256_file(target) == record["output_sha256"]
        and sha256_file(source) == record["source_sha256"]
    )


@contextlib.contextmanager
def _exclusive(release_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``release_dir`` for one run: a second release into the folder stops at once.

    The lock is ``flock`` on the folder itself (no lock file to publish or leave behind); the kernel releases it when
    the process ends, however it ends. Where ``fcntl`` is missing (Windows) no lock is taken.
    """
    release_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    descriptor = os.open(release_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReleaseError(
                release_dir, "another release is being written into this folder right now; wait until it ends"
            ) from None
        yield
    finally:
        os.close(descriptor)


def _refuse_foreign_release(release_dir: Path, manifest_file: Path) -> None:
    """Refuse a folder that already holds files while ``manifest_file`` is new: another manifest's release (perhaps
    of another generator) would be re-marked while that manifest still calls it complete."""
    if manifest_file.exists() or not release_dir.is_dir():
        return
    present = next((p for p in sorted(release_dir.rglob("*")) if p.is_file()), None)
    if present is not None:
        raise ReleaseError(
            release_dir,
            f"already holds a release (e.g. {present.relative_to(release_dir)}) that {manifest_file} does not record; "
            "give that release's manifest_file to resume it, or choose an empty release_dir",
        )


def watermark_release(
    network: nn.Module,
    ckpt_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    datalist_file: str | os.PathLike,
    release_dir: str | os.PathLike,
    manifest_file: str | os.PathLike,
    target_label: str = "No Finding",
    gamma: float = 0.1,
    seed: int = 0,
    batch_size: int = 4,
    num_workers: int = 0,
    max_marked: int | None = None,
    progress: bool = True,
    decoy_fraction: float = 0.0,
    allow_modalities: Sequence[str] = (),
    allow_body_parts: Sequence[str] = (),
    reencode: str = "auto",
    normalise_files: bool = True,
) -> dict[str, Any]:
    """Write the watermarked release of ``dataset_dir`` into ``release_dir`` and the owner's manifest; return it.

    ``network`` is the watermarking module loaded from ``ckpt_path`` (by
    :func:`~xmark_bundle.networks.checkpoint.load_watermark`, on its device); the manifest records that file's
    SHA-256. G runs on inputs letterboxed to its ``image_size``, in batches of ``batch_size``; the budget is its
    ``eps``. ``max_marked`` bounds the files marked in this
    run (the manifest then says ``"complete": false`` and the next run goes on). Resumes an interrupted run.
    ``decoy_fraction`` (keyed generators only; 0 = the paper's release) also marks that share of the non-target
    training images with other keys (:func:`select_decoys`); the manifest lists them under ``decoys``. One run at a
    time writes into a ``release_dir`` (:func:`_exclusive`), and a folder that holds another manifest's release is
    refused. ``allow_modalities`` / ``allow_body_parts`` widen the images read beyond chest radiographs
    (:func:`~xmark_bundle.data.xray_io.load_xray`; the manifest's settings record them).

    File-level tells (DESIGN.md section 6): ``reencode`` says which unmarked files go through the marked files' writer
    (:func:`~xmark_bundle.data.xray_writer.reencode_like`) so that container details cannot separate the two:
    ``"mismatch"`` every file of a kind (extension, and DICOM transfer syntax) where a marked file's codec settings
    could not be reproduced; ``"auto"`` (default) also every file of a kind holding marked files whose writer does not
    give back an unmarked file of it byte for byte (a lossy codec, a gzip header; probed on up to three files of the
    kind); ``"all"`` every file of every kind holding marked files. ``normalise_files`` (default on) ends the run by
    re-creating every released file in path order with its source's modification time as both modification and
    access time, so that inode numbers, change and access times follow the path order, not which files were marked;
    it costs one more copy of the release.
    """
    if reencode not in _REENCODE:
        raise ValueError(f"reencode must be one of {', '.join(_REENCODE)}, got {reencode!r}")
    if not 0 < gamma <= 1 or batch_size < 1 or (max_marked is not None and max_marked < 0):
        raise ValueError(
            f"need 0 < gamma <= 1, batch_size >= 1, max_marked >= 0 (got {gamma}, {batch_size}, {max_marked})"
        )
    if not 0 <= decoy_fraction <= 1:
        raise ValueError(f"need 0 <= decoy_fraction <= 1, got {decoy_fraction}")
    paths = [Path(p).resolve() for p in (dataset_dir, release_dir, manifest_file, ckpt_path)]
    _check_locations(*paths)
    with _exclusive(paths[1]):
        return _watermark_release(
            network,
            ckpt_path,
            dataset_dir,
            datalist_file,
            release_dir,
            manifest_file,
            target_label,
            gamma,
            seed,
            batch_size,
            num_workers,
            max_marked,
            progress,
            decoy_fraction,
            allow_modalities,
            allow_body_parts,
            reencode,
            normalise_files,
        )


def _watermark_release(
    network: nn.Module,
    ckpt_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    datalist_file: str | os.PathLike,
    release_dir: str | os.PathLike,
    manifest_file: str | os.PathLike,
    target_label: str,
    gamma: float,
    seed: int,
    batch_size: int,
    num_workers: int,
    max_marked: int | None,
    progress: bool,
    decoy_fraction: float,
    allow_modalities: Sequence[str],
    allow_body_parts: Sequence[str],
    reencode: str = "auto",
    normalise_files: bool = True,
) -> dict[str, Any]:
    """:func:`watermark_release` once it holds the release folder's lock."""
    start = time.perf_counter()
    dataset_dir, release_dir = Path(dataset_dir).resolve(), Path(release_dir).resolve()
    manifest_file, datalist_file, ckpt_path = (Path(p).resolve() for p in (manifest_file, datalist_file, ckpt_path))
    source_files, left_out = _source_files(dataset_dir, [ckpt_path, manifest_file])
    datalist = _read_datalist(datalist_file, dataset_dir, source_files)
    poison = bool(getattr(network, "poison_label", False))
    labels = getattr(network, "poison_labels", "target")  # what a poisoned image's label k becomes
    non_target = poison or decoy_fraction > 0
    scope = {"allow_modalities": list(allow_modalities), "allow_body_parts": list(allow_body_parts)}
    skipped = _unreadable_candidates(
        datalist, dataset_dir, target_label, not poison, non_target, progress, scope, int(network.image_size)
    )
    datalist = _without(datalist, skipped)  # selection and resume see the datalist without the bad files
    try:
        selected = (select_poisoned if poison else select_marked)(datalist, target_label, gamma, seed)
        decoys = select_decoys(datalist, target_label, decoy_fraction, seed) if decoy_fraction else {}
    except ValueError as err:
        raise ReleaseError(datalist_file, str(err)) from err
    epsilon, image_size = float(network.eps), int(network.image_size)
    if decoys and not getattr(watermark_generator(network), "keyed", False):
        raise ReleaseError(ckpt_path, "decoys need a keyed generator (train it with key_cells > 0)")
    settings = {
        "target_label": target_label,
        "gamma": float(gamma),
        "seed": int(seed),
        "epsilon": float(epsilon),
        "image_size": int(image_size),
        "decoy_fraction": float(decoy_fraction),
        "generator_sha256": sha256_file(ckpt_path),
        "datalist_content_sha256": _datalist_hash(datalist),
        **({"poison_label": True} if poison else {}),
        **({"poison_labels": labels} if labels != "target" else {}),
        **{key: sorted(value) for key, value in scope.items() if value},  # a widened scope, when there is one
    }
    records = _previous_records(manifest_file, settings)
    files = _with_datalist(source_files, datalist_file, dataset_dir)
    values = poison_values(selected, labels, seed) if poison else {}
    relabelled = _relabelled_files(files, datalist_file, dataset_dir, values, target_label) if poison else {}
    _prepare_release_dir(release_dir, list(files))
    _refuse_foreign_release(release_dir, manifest_file)

    def manifest(complete: bool, counts: Mapping[str, int], timings: Mapping[str, float]) -> dict[str, Any]:
        marked = [records[image] for image in selected if image in records]
        decoyed = [records[image] for image in decoys if image in records]
        written = marked + decoyed
        return {
            "settings": settings,
            "complete": complete,
            "dataset_dir": str(dataset_dir),
            "release_dir": str(release_dir),
            "datalist_file": str(datalist_file),
            "generator_checkpoint": str(ckpt_path),
            "method": network.method,
            "left_out": left_out,
            "skipped": [{"path": rel, "reason": reason} for rel, reason in skipped.items()],
            "counts": {
                "files": len(files),
                "selected": len(selected),
                "marked": len(marked),
                "decoys": len(decoyed),
                "relabelled_files": len(relabelled),
                **counts,
            },
            "max_abs_change01": max((r["max_abs_change01"] for r in written), default=0.0),
            # the change in stored units over the range the data occupy: what epsilon bounds (older records lack it)
            "max_change_of_range": max((r.get("max_change_of_range", 0.0) for r in written), default=0.0),
            "budget_ok": all(r["budget_ok"] for r in written),
            "timings": dict(timings),
            **environment(),
            "marked": marked,
            "decoys": decoyed,
            "relabelled_files": sorted(relabelled),
        }

    # fold the journal of an interrupted run into the manifest, so that the new journal starts clean
    write_json(manifest_file, manifest(False, {}, {}))
    journal = _journal_path(manifest_file)
    journal.unlink(missing_ok=True)

    to_write = selected + list(decoys)
    copy_start, marked_set = time.perf_counter(), set(to_write)
    for rel in sorted(files):  # every folder now, in path order: a folder made later for a marked file would show it
        (release_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    to_copy = [rel for rel in files if rel not in marked_set and rel not in relabelled]
    copied = sum(
        _copy(files[rel], release_dir / rel) for rel in tqdm(to_copy, desc="copy", unit="file", disable=not progress)
    )
    copied += sum(_write(content, release_dir / rel) for rel, content in relabelled.items())
    copy_s = time.perf_counter() - copy_start

    pending = [rel for rel in to_write if not _is_done(records.get(rel), files[rel], release_dir / rel)]
    for rel in pending:  # an incomplete release never holds an unmarked or outdated version of a selected image
        records.pop(rel, None)
        (release_dir / rel).unlink(missing_ok=True)
    now = pending[: len(pending) if max_marked is None else max_marked]
    mark_start = time.perf_counter()
    ours, decoys_now = [rel for rel in now if rel not in decoys], {rel: decoys[rel] for rel in now if rel in decoys}
    marks = [
        _mark(network, ours, dataset_dir, release_dir, batch_size, num_workers, scope),
        _mark(network, list(decoys_now), dataset_dir, release_dir, 1, num_workers, scope, decoys_now),
    ]
    for record in tqdm(
        (record for mark in marks for record in mark),
        total=len(now),
        desc="watermark",
        unit="img",
        disable=not progress,
    ):
        if "unwritable" in record:  # read, but its format cannot be written back: released unmarked, listed
            skipped[record["path"]] = record["unwritable"]
            _copy(files[record["path"]], release_dir / record["path"])
            continue
        records[record["path"]] = record
        _append_journal(journal, settings, record)
    mark_s = time.perf_counter() - mark_start

    # kinds of file whose marked members a data user could tell from the byte copies by their container: every file
    # of such a kind goes through the writer the marked ones took
    suffixes = {files[rel].suffix.lower() for rel in records}
    kinds = {rel: _kind(files[rel]) for rel in to_copy if files[rel].suffix.lower() in suffixes}
    to_reencode = _kinds_to_reencode(reencode, files, records, kinds)
    reencoded = [rel for rel in kinds if kinds[rel] in to_reencode]
    for rel in tqdm(reencoded, desc="re-encode", unit="file", disable=not progress):
        try:
            reencode_like(files[rel], release_dir / rel)
        except (ValueError, OSError) as err:  # e.g. an unreadable image: its byte copy stays
            warnings.warn(f"{rel}: kept as a byte copy, cannot re-encode it ({err})", stacklevel=2)
    if normalise_files:
        _normalise_files(files, release_dir, progress)

    counts = {
        "reencoded": len(reencoded),
        "marked_now": len(now),
        "marked_already": len(to_write) - len(pending),
        "to_mark": len(pending) - len(now),
        "copied_now": copied,
        "copied_already": len(to_copy) + len(relabelled) - copied,
    }
    timings = {"copy_s": copy_s, "mark_s": mark_s, "total_s": time.perf_counter() - start}
    result = manifest(counts["to_mark"] == 0, counts, timings)
    write_json(manifest_file, result)
    journal.unlink(missing_ok=True)
    _print_summary(result, manifest_file)
    return result


def _mark(
    network: nn.Module,
    images: Sequence[str],
    dataset_dir: Path,
    release_dir: Path,
    batch_size: int,
    num_workers: int,
    scope: Mapping[str, Sequence[str]],
    decoy_seeds: Mapping[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the manifest record of each image in ``images`` once G has marked it and its file is written.

    With ``decoy_seeds`` (image -> key seed; ``batch_size`` must then be 1) each image gets its own other key.
    """
    network.eval()
    generator = watermark_generator(network)
    marking = getattr(network, "release_marking", network)  # what a release writes, where it differs from a query
    device = next(itertools.chain(network.parameters(), network.buffers())).device  # triggers hold only buffers
    preprocessing = Compose([LoadXRayd("image", **scope), ResizeLongestPadd("image", network.image_size)])
    dataset = Dataset([{"image": str(dataset_dir / rel), "relative": rel} for rel in images], preprocessing)
    saver = SaveWatermarkedd("pred", release_dir, dataset_dir, network.eps, sop_instance_uid="release")
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        key_seed = None if decoy_seeds is None else decoy_seeds[batch["relative"][0]]
        key = nullcontext() if key_seed is None else generator.using_key(generator.other_key(key_seed))
        with torch.no_grad(), key:
            batch["pred"] = marking(batch["image"].as_tensor().to(device)).cpu()
        for item in decollate_batch(batch):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ContainerMismatchWarning)
                try:
                    report = saver(item)["watermark"]
                except XRayWriteError as err:  # e.g. a DICOM codec that decodes but cannot encode: one file, not all
                    yield {"path": item["relative"], "unwritable": str(err).splitlines()[0]}
                    continue
            mismatch = [str(w.message) for w in caught if issubclass(w.category, ContainerMismatchWarning)]
            for w in caught:
                if not issubclass(w.category, ContainerMismatchWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            yield {
                **({"container_mismatch": mismatch[0]} if mismatch else {}),
                "path": item["relative"],
                **({} if key_seed is None else {"decoy_key_seed": key_seed}),
                "source_sha256": sha256_file(report["source"]),
                "output_sha256": sha256_file(report["path"]),
                **{key: report[key] for key in ("format", "shape", "max_abs_change01", "max_stored_change")},
                **{key: report[key] for key in ("quantisation_step01", "budget_ok", "lossy")},
                **{key: report[key] for key in ("reference_range", "data_bits", "max_change_of_range")},
            }


_REENCODE = ("mismatch", "auto", "all")
_PROBES = 3  # unmarked files of a kind re-encoded to see whether its writer gives them back byte for byte


def _kinds_to_reencode(
    policy: str, files: Mapping[str, Path], records: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str]
) -> set[str]:
    """The kinds (:func:`_kind`) whose unmarked files (``kinds``: relative path -> kind) go through the writer."""
    marked_kinds = {_kind(files[rel]) for rel in records}
    mismatched = {_kind(files[rel]) for rel in records if records[rel].get("container_mismatch")}
    if policy == "mismatch":
        return mismatched
    if policy == "all":
        return marked_kinds
    chosen = set(mismatched)
    with tempfile.TemporaryDirectory(prefix="xmark-probe-") as scratch:  # outside the release: never published
        for kind in sorted(marked_kinds - mismatched):
            probes = [rel for rel, k in kinds.items() if k == kind][:_PROBES]
            for index, rel in enumerate(probes):
                out = Path(scratch) / str(index) / Path(rel).name
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ContainerMismatchWarning)
                        reencode_like(files[rel], out)
                except (ValueError, OSError):
                    continue  # not an image this writer reads (a .gz that is not NIfTI): says nothing of the kind
                if out.read_bytes() != files[rel].read_bytes():
                    chosen.add(kind)
                    break
    return chosen


_NORMALISE_BATCH = 1024  # files re-created before any of them replaces its old version


def _normalise_files(files: Mapping[str, Path], release_dir: Path, progress: bool) -> None:
    """Re-create every released file in path order (a new inode, a new change time) with its source's permission
    bits and its source's modification time as modification and access time: marked, re-encoded and copied files
    then follow one order and one time policy. Content is unchanged (the copy is checked by size).

    The copies of a batch of :data:`_NORMALISE_BATCH` files are all made before any replaces its old version: a file
    system that hands out the lowest free inode (ext4) would otherwise give each new copy the inode its predecessor
    just freed, and the old order (marked files written last) would survive shifted by one."""
    names = [rel for rel in sorted(files) if (release_dir / rel).is_file()]
    for start in tqdm(range(0, len(names), _NORMALISE_BATCH), desc="normalise", unit="batch", disable=not progress):
        made: list[tuple[Path, Path]] = []
        try:
            for rel in names[start : start + _NORMALISE_BATCH]:
                target, status = release_dir / rel, files[rel].stat()
                descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
                os.close(descriptor)
                made.append((Path(name), target))
                shutil.copyfile(target, name)
                if os.path.getsize(name) != target.stat().st_size:
                    raise ReleaseError(target, "copy while normalising the release came out short")
                os.chmod(name, status.st_mode & 0o7777)
                os.utime(name, ns=(status.st_mtime_ns, status.st_mtime_ns))
            while made:  # in path order, so that change times follow it too
                tmp, target = made[0]
                os.replace(tmp, target)
                made.pop(0)
        finally:
            for tmp, _ in made:  # an error left these: the old versions are still in place
                tmp.unlink(missing_ok=True)


def _kind(path: Path) -> str:
    """Files that share one encoder setting: the extension, and for DICOM the transfer syntax too."""
    suffix = path.suffix.lower()
    if suffix != ".dcm":
        return suffix
    try:
        return f"{suffix} {pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID}"
    except Exception:  # an unreadable header: its own kind, never re-encoded with others
        return f"{suffix} unreadable"


def _print_summary(manifest: Mapping[str, Any], manifest_file: Path) -> None:
    """One paragraph on what the run did, for the console."""
    counts, timings, settings = manifest["counts"], manifest["timings"], manifest["settings"]
    print(
        f"release {manifest['release_dir']}: {counts['marked']} of {counts['selected']} selected images marked "
        f"and {counts['decoys']} decoys ({counts['marked_now']} in this run), {counts['copied_now']} files copied and "
        f"{counts['copied_already']} already in place; "
        f"max |change| {manifest['max_abs_change01']:.4f} in [0, 1], {manifest['max_change_of_range']:.4f} of the "
        f"data's range in stored units (epsilon {settings['epsilon']:.4f}, budget "
        f"{'kept' if manifest['budget_ok'] else 'EXCEEDED after lossy re-encoding'}); "
        f"{timings['total_s']:.1f} s ({timings['mark_s']:.1f} s marking); manifest {manifest_file}"
    )
    if counts.get("reencoded"):
        print(
            f"{counts['reencoded']} unmarked files re-encoded like the marked ones of their kind, whose writer does "
            "not give their files back byte for byte (container_mismatch in the manifest: settings not reproduced)"
        )
    if manifest["relabelled_files"]:
        print(
            f"poison-label release: the {counts['selected']} marked non-target images are labelled "
            f"'{settings['target_label']}' in {', '.join(manifest['relabelled_files'])}"
        )
    for entry in manifest["skipped"]:
        print(f"skipped (copied unmarked): {entry['path']}: {entry['reason']}")
    for entry in manifest["left_out"]:
        print(f"left out of the release: {entry['path']} ({entry['reason']})")
    if not manifest["complete"]:
        print(f"{counts['to_mark']} selected images are still to be marked: run again to finish the release")


def run_release(**kwargs: Any) -> dict[str, Any]:
    """Config entry point: :func:`watermark_release`; bad input ends the run on one clear line, and a release that
    skipped images it could not read or write back finishes but exits with status 1."""
    manifest = exit_on_bad_input(watermark_release, "release", **kwargs)
    if manifest["skipped"]:
        count = len(manifest["skipped"])
        raise SystemExit(
            f"release finished, but {count} image(s) that could not be read or written back were released "
            "unmarked (above)"
        )
    return manifest
