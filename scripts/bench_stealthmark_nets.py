"""Time one training step (forward, BCE, backward) of each StealthMark segmentation network, in ms per image.

Example: ``python scripts/bench_stealthmark_nets.py --sizes 128 256 --batch 2`` (prints parameters and ms/image).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.stealthmark.networks import SEGMENTATION_ARCHS, build_segmentation_network  # noqa: E402


def step_ms(net: torch.nn.Module, size: int, batch: int, repeats: int, device: torch.device) -> float:
    """Median wall time of a forward + BCE + backward step, per image, in milliseconds (after one warm-up step)."""
    x = torch.rand(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        net.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2] / batch


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print one line per architecture and size."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="+", default=list(SEGMENTATION_ARCHS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch threads {torch.get_num_threads()}, device {device}, batch {args.batch}")
    for arch in args.archs:
        for size in args.sizes:
            net = build_segmentation_network(arch, size).to(device).train()
            params = sum(p.numel() for p in net.parameters()) / 1e6
            ms = step_ms(net, size, args.batch, args.repeats, device)
            print(f"{arch:<14} {size:>4} px  {params:6.2f} M params  {ms:9.1f} ms/image (train step)", flush=True)


if __name__ == "__main__":
    main()
