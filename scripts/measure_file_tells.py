"""Measure the file-level tells of a release: can a data user separate marked from unmarked files by file size,
compressibility, time stamps or inode numbers? One homogeneous folder per format.

The built-in phantoms (CheXpert layout) are re-saved in one format per data set (PNG at Pillow's default zlib level,
JPEG quality 90, DICOM uncompressed, deflated, RLE and JPEG 2000 lossless), each released at gamma 0.5 by a
generator, and :func:`~xmark_bundle.experiments.detectability.file_level_tells` gives, per format, the AUROC of marked
against unmarked target-class files for bytes per pixel, compressibility (zlib level 9 of the stored pixels over their
raw size), modification / access / change time and inode number (0.5: chance; 0 or 1: complete separation).

Without ``--checkpoint`` the generator is the tests' stand-in: a random X-Mark generator whose weights are scaled up so
that its residual uses the whole budget (an upper bound on what a trained G's residual adds to a file's entropy).

Example: ``python scripts/measure_file_tells.py --out /tmp/file_tells`` (300 phantoms of 320 px per format, about
eight minutes on two cores); ``--no-normalise --reencode mismatch`` measures the release as it was written before.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from xmark_bundle.data.chexpert import prepare_datalist  # noqa: E402
from xmark_bundle.data.phantoms import write_phantom_dataset  # noqa: E402
from xmark_bundle.experiments.detectability import file_level_tells  # noqa: E402
from xmark_bundle.fileio import write_json  # noqa: E402
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark  # noqa: E402
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier  # noqa: E402
from xmark_bundle.networks.generator import XMarkGenerator  # noqa: E402
from xmark_bundle.networks.pipeline import WatermarkPipeline  # noqa: E402
from xmark_bundle.release import watermark_release  # noqa: E402

FORMATS = ("png", "jpeg", "dcm_native", "dcm_deflated", "dcm_rle", "dcm_j2k_lossless")
_SUFFIX = {"png": ".png", "jpeg": ".jpg"}


def _dicom(pixels: np.ndarray, syntax) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.set_pixel_data(pixels, "MONOCHROME2", pixels.dtype.itemsize * 8)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def convert(phantoms: Path, out: Path, fmt: str) -> None:
    """A copy of the phantom data set with every image re-saved as ``fmt`` and the CSVs pointing at the new names."""
    suffix = _SUFFIX.get(fmt, ".dcm")
    for png in sorted(phantoms.rglob("*.png")):
        target = out / png.relative_to(phantoms).with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(png) as image:
            pixels = np.asarray(image)
        if fmt == "png":
            Image.fromarray(pixels).save(target)  # Pillow's default zlib level 6
        elif fmt == "jpeg":
            eight = pixels if pixels.dtype == np.uint8 else (pixels >> 8).astype(np.uint8)
            Image.fromarray(eight).save(target, quality=90)
        else:
            syntax = {
                "dcm_native": ExplicitVRLittleEndian,
                "dcm_deflated": DeflatedExplicitVRLittleEndian,
                "dcm_rle": RLELossless,
                "dcm_j2k_lossless": JPEG2000Lossless,
            }[fmt]
            _dicom(pixels, syntax).save_as(target, enforce_file_format=True)
    for csv in ("train.csv", "valid.csv"):
        (out / csv).write_text((phantoms / csv).read_text().replace(".png", suffix))
    prepare_datalist(out / "train.csv", out / "datalist.json", test_csv=out / "valid.csv")


def stand_in_generator(path: Path, eps: float) -> Path:
    """A random X-Mark generator whose residual uses the whole budget (the release tests' stand-in)."""
    torch.manual_seed(0)
    generator = XMarkGenerator([4, 8, 16, 32, 64], eps=eps)
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(5.0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), 64)
    save_watermark(WatermarkPipeline(generator, surrogate, "classifier.layer4", 64), path)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working folder (emptied) and where tells.json goes")
    parser.add_argument("--n", type=int, default=300, help="phantoms per data set")
    parser.add_argument("--size", type=int, default=320, help="phantom side (one size: bytes per pixel compare)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--checkpoint", help="a trained generator (load_watermark) instead of the stand-in")
    parser.add_argument("--reencode", default="auto", choices=("mismatch", "auto", "all"))
    parser.add_argument("--no-normalise", action="store_true", help="keep file-system entries as written")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    phantoms = out / "phantoms"
    size = {"min_size": args.size, "max_size": args.size}
    write_phantom_dataset(phantoms, n=args.n, seed=args.seed, dicom_fraction=0.0, **size)
    ckpt = Path(args.checkpoint) if args.checkpoint else stand_in_generator(out / "generator.pt", 16 / 255)
    results = {}
    for fmt in args.formats:
        data = out / f"data_{fmt}"
        convert(phantoms, data, fmt)
        manifest_file = out / f"manifest_{fmt}.json"
        manifest = watermark_release(
            load_watermark(ckpt),
            ckpt,
            data,
            data / "datalist.json",
            out / f"release_{fmt}",
            manifest_file,
            gamma=args.gamma,
            progress=False,
            reencode=args.reencode,
            normalise_files=not args.no_normalise,
        )
        tells = file_level_tells(out / f"release_{fmt}", manifest_file)
        for kind, row in tells.items():
            results[f"{fmt} ({kind})"] = {
                **row,
                "reencoded": manifest["counts"]["reencoded"],
                "max_change_of_range": manifest["max_change_of_range"],
                "budget_ok": manifest["budget_ok"],
            }
    report = {"settings": vars(args), "generator": "stand-in" if not args.checkpoint else str(ckpt), "tells": results}
    write_json(out / "tells.json", report)
    columns = ("bytes_per_pixel", "compressibility", "mtime", "atime", "ctime", "inode")
    print(f"{'format':40s} {'marked':>6s} {'other':>6s} " + " ".join(f"{c[:9]:>9s}" for c in columns))
    for name, row in results.items():
        aurocs = " ".join(f"{row[f'{c}_auroc']:9.2f}" for c in columns)
        print(f"{name:40s} {row['n_marked']:6d} {row['n_unmarked']:6d} {aurocs}")
    print(json.dumps({"written": str(out / "tells.json")}))
    return report


if __name__ == "__main__":
    main()
