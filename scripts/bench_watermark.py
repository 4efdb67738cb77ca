"""Watermarking throughput of a release on full-size X-rays, against plain reading and writing of the same files.

Files: copies of pydicom-data's RG1_UNCR.dcm (a real CR chest film, 1955 x 1841, MONOCHROME1, 15 bit) and
phantoms of about 2500 px (DICOM). "plain" is ``load_xray`` + ``write_xray`` of the unchanged image; "release" is
:func:`xmark_bundle.release.watermark_release` marking every file (load, letterbox, G at the model resolution, residual
mapped back, write, re-read for the budget check, SHA-256 of source and output). G is a randomly initialised X-Mark
pipeline of the default width (channels 64..1024, ResNet18 surrogate): its speed does not depend on training.

    nice .venv/bin/python scripts/bench_watermark.py [--copies 8] [--phantoms 3] [--sizes 512 1024]
        [--max-files 11 6] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script
from xmark_bundle.data.labels import LABELS  # noqa: E402
from xmark_bundle.data.phantoms import write_phantom_dataset  # noqa: E402
from xmark_bundle.data.xray_io import find_xray_files, load_xray  # noqa: E402
from xmark_bundle.data.xray_writer import write_xray  # noqa: E402
from xmark_bundle.fileio import write_json  # noqa: E402
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier  # noqa: E402
from xmark_bundle.networks.generator import XMarkGenerator  # noqa: E402
from xmark_bundle.networks.pipeline import WatermarkPipeline  # noqa: E402
from xmark_bundle.release import watermark_release  # noqa: E402


def make_dataset(root: Path, copies: int, phantoms: int) -> list[str]:
    """Write the benchmark files under ``root / "data"`` and a datalist (all target class) beside it; return paths."""
    data = root / "data"
    cr = Path(get_testdata_file("RG1_UNCR.dcm"))
    for i in range(copies):
        target = data / "cr" / f"patient{i:05d}" / "view1_frontal.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cr, target)
    if phantoms:
        write_phantom_dataset(data / "phantoms", n=phantoms, seed=0, dicom_fraction=1.0, min_size=2400, max_size=2600)
    images = [p.relative_to(data).as_posix() for p in find_xray_files(data)]
    target = [1.0] + [0.0] * (len(LABELS) - 1)
    training = [{"image": image, "label": target, "patient": f"p{i}"} for i, image in enumerate(images)]
    write_json(root / "datalist.json", {"labels": list(LABELS), "training": training, "validation": [], "test": []})
    return images


def plain_read_write(data: Path, images: list[str], out: Path) -> float:
    """Seconds to load and write back every image unchanged."""
    start = time.perf_counter()
    for image in images:
        image01, meta = load_xray(data / image)
        write_xray(image01, meta, data / image, out / image, source_image01=image01)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="copies of RG1_UNCR.dcm (1955 x 1841)")
    parser.add_argument("--phantoms", type=int, default=3, help="phantom DICOM files of about 2500 px")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="model resolutions")
    parser.add_argument("--max-files", type=int, nargs="+", default=[11, 6], help="files marked per size")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    if len(args.max_files) != len(args.sizes):
        parser.error("give one --max-files value per --sizes value")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {args.batch_size}")

    with tempfile.TemporaryDirectory(prefix="bench_watermark-") as scratch:
        root = Path(scratch)
        images = make_dataset(root, args.copies, args.phantoms)
        shapes = sorted({load_xray(root / "data" / image)[1].shape for image in images})
        print(f"{len(images)} DICOM files, shapes {shapes}")
        plain = len(images) / plain_read_write(root / "data", images, root / "plain")
        print(f"\nplain load_xray + write_xray: {plain:.3f} images/s ({len(images)} files)")
        rows = []
        for size, max_files in zip(args.sizes, args.max_files, strict=True):
            torch.manual_seed(0)
            network = WatermarkPipeline(
                XMarkGenerator(), ResizedClassifier(build_classifier("resnet18"), 224), "classifier.layer4"
            )
            checkpoint = root / f"model{size}.pt"
            torch.save(network.state_dict(), checkpoint)
            with torch.no_grad():
                network.eval()(torch.rand(1, 1, size, size))  # warm-up, untimed
                start = time.perf_counter()
                network(torch.rand(1, 1, size, size))
                g_seconds = time.perf_counter() - start
            manifest = watermark_release(
                network,
                checkpoint,
                root / "data",
                root / "datalist.json",
                root / f"release{size}",
                root / f"manifest{size}.json",
                epsilon=16 / 255,
                image_size=size,
                gamma=1.0,
                batch_size=args.batch_size,
                max_marked=max_files,
                progress=False,
            )
            n, seconds = manifest["counts"]["marked_now"], manifest["timings"]["mark_s"]
            rate = n / seconds
            rows.append(f"{size:>5} {n:>5} {g_seconds:>8.2f} {rate:>14.3f} {plain / rate:>16.1f}")
    print(f"\n{'size':>5} {'files':>5} {'G s/img':>8} {'release img/s':>14} {'plain / release':>16}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
