"""Cost of X-Mark's generator vs SSCL-BW's (parameters, MACs, CPU images/s) and of torch EigenCAM vs grad-cam's.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (MACs = FLOPs / 2, convolutions
and matrix products only); speed is measured on the CPU at batch 1 under ``torch.inference_mode``. Exits with status 1
when the MAC ratio X-Mark / SSCL-BW at the largest size exceeds 0.30 (the paper reports -72 %).

    nice python scripts/bench_generator.py [--sizes 256 512 1024] [--cam-batch 32] [--cam-size 224]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from pytorch_grad_cam import EigenCAM as GradCamEigenCAM
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xmark_bundle.networks.generator import SSCLBWGenerator, XMarkGenerator  # noqa: E402
from xmark_bundle.saliency import EigenCAM  # noqa: E402

GENERATORS: dict[str, Callable[[], nn.Module]] = {"X-Mark": XMarkGenerator, "SSCL-BW": SSCLBWGenerator}
MAX_MAC_RATIO = 0.30


def count_macs(make: Callable[[], nn.Module], size: int) -> tuple[int, float]:
    """Parameters and MACs of one forward pass at ``size`` x ``size`` (batch 1), counted on the meta device."""
    with torch.device("meta"):
        net = make()
        image = torch.empty(1, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        net(image, image)
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops() / 2


def seconds_per_call(call: Callable[[], object], repeats: int, warmup: bool) -> float:
    """Median wall time of ``repeats`` calls (after one untimed call when ``warmup``)."""
    if warmup:
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_generators(sizes: list[int]) -> float:
    """Print the generator table; return the MAC ratio X-Mark / SSCL-BW at the largest size."""
    print(f"{'size':>5} {'generator':<8} {'params (M)':>10} {'GMACs':>8} {'img/s (CPU)':>12}")
    ratio = float("nan")
    for size in sizes:
        rows = {}
        for name, make in GENERATORS.items():
            params, macs = count_macs(make, size)
            torch.manual_seed(0)
            net = make().eval()
            image = torch.rand(1, 1, size, size)
            repeats, warmup = (3, True) if size <= 256 else (2, True) if size <= 512 else (1, False)
            with torch.inference_mode():
                seconds = seconds_per_call(lambda net=net, image=image: net(image, image), repeats, warmup)
            rows[name] = (params, macs, 1.0 / seconds)
            print(f"{size:>5} {name:<8} {params / 1e6:>10.2f} {macs / 1e9:>8.2f} {1.0 / seconds:>12.3f}")
        (p_x, m_x, s_x), (p_s, m_s, s_s) = rows["X-Mark"], rows["SSCL-BW"]
        ratio = m_x / m_s
        print(f"{size:>5} {'ratio':<8} {p_x / p_s:>10.3f} {ratio:>8.3f} {s_x / s_s:>12.3f}")
    return ratio


def bench_eigencam(batch: int, size: int) -> None:
    """Print images/s of the batched torch EigenCAM and grad-cam's EigenCAM on a one-channel ResNet18."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.eval()
    images = torch.rand(batch, 1, size, size)
    ours = EigenCAM(model, "layer4")
    with GradCamEigenCAM(model, target_layers=[model.layer4]) as reference:
        t_ours = seconds_per_call(lambda: ours(images), repeats=3, warmup=True)
        t_ref = seconds_per_call(lambda: reference(input_tensor=images, targets=None), repeats=3, warmup=True)
        gap = (ours(images)[:, 0] - torch.from_numpy(reference(input_tensor=images, targets=None))).abs().amax()
    print(f"\nEigenCAM, ResNet18 layer4, batch {batch}, {size} px (CPU, forward pass included)")
    print(f"  torch (xmark_bundle.saliency): {batch / t_ours:8.1f} img/s")
    print(f"  grad-cam 1.5.7         : {batch / t_ref:8.1f} img/s")
    print(f"  speed-up {t_ref / t_ours:.2f}x; max |difference| {gap:.2e} (grad-cam's sign may be flipped)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--cam-batch", type=int, default=32)
    parser.add_argument("--cam-size", type=int, default=224)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    ratio = bench_generators(args.sizes)
    bench_eigencam(args.cam_batch, args.cam_size)
    verdict = "OK" if ratio <= MAX_MAC_RATIO else "FAILED"
    print(f"\nMAC ratio X-Mark / SSCL-BW at {args.sizes[-1]} px: {ratio:.3f} (<= {MAX_MAC_RATIO:.2f}: {verdict})")
    return 0 if ratio <= MAX_MAC_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
