"""Data-layer throughput on this machine: phantom generation, X-ray loading, classifier training at 224 px.

One run, images/s printed for each, plus the load-to-train ratio (how many loader processes keep one trainer busy).
Example: ``python scripts/bench_data.py --n 12``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.data import get_testdata_file  # noqa: E402

from xmark_bundle.data import find_xray_files, load_xray  # noqa: E402
from xmark_bundle.data.phantoms import write_phantom_dataset  # noqa: E402
from xmark_bundle.losses.classification import MaskedBCEWithLogitsLoss  # noqa: E402
from xmark_bundle.networks.classifier import build_classifier  # noqa: E402
from xmark_bundle.transforms import letterbox, letterbox_geometry  # noqa: E402


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:7.2f} images/s ({count} in {seconds:.1f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12, help="phantoms to generate and load")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (batch 32)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_phantom_dataset(tmp, n=args.n, seed=0, min_size=1024, max_size=3000, workers=1)
        gen = time.perf_counter() - start
        print(f"phantom generation (1024-3000 px, 1 process): {rate(args.n, gen)}")

        files = find_xray_files(tmp)
        start = time.perf_counter()
        pixels = 0
        for path in files:
            image, _ = load_xray(path)
            pixels += image.size
            letterbox(torch.from_numpy(image)[None], letterbox_geometry(image.shape, 224))
        load = time.perf_counter() - start
        print(f"phantom load + letterbox to 224 ({pixels / len(files) / 1e6:.1f} MP avg): {rate(len(files), load)}")

    cr = get_testdata_file("RG1_UNCR.dcm")
    j2k = get_testdata_file("RG1_J2KR.dcm")
    for name, path in (("uncompressed", cr), ("JPEG 2000", j2k)):
        start = time.perf_counter()
        for _ in range(5):
            load_xray(path)
        print(f"DICOM CR 1955x1841 {name} load: {rate(5, time.perf_counter() - start)}")

    model = build_classifier("resnet18")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = MaskedBCEWithLogitsLoss()
    x, y = torch.rand(32, 1, 224, 224), torch.randint(0, 2, (32, 6)).float()
    model.train()
    for step in range(args.steps + 1):
        if step == 1:  # first step is warm-up
            start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    train = time.perf_counter() - start
    train_rate = 32 * args.steps / train
    print(f"ResNet18 training at 224 px, batch 32: {rate(32 * args.steps, train)}")
    print(f"ratio phantom load rate / training rate: {len(files) / load / train_rate:.2f}")


if __name__ == "__main__":
    main()
