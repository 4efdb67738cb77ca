"""What the generator's validation shows: a TensorBoard image grid and a JSON metrics history file."""

from __future__ import annotations

import os
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from xmark_bundle.fileio import write_json


def watermark_grid(image: torch.Tensor, watermarked: torch.Tensor, saliency: torch.Tensor, gain: float = 10.0):
    """3 x H x (4 W) RGB panel rows: benign, watermarked, ``gain`` x residual around grey, saliency over the image.

    Inputs are N x 1 x H x W in [0, 1]; returns a 3 x H' x W' tensor for ``SummaryWriter.add_image``.
    """
    grey = lambda t: t.clamp(0, 1).repeat(1, 3, 1, 1)  # noqa: E731
    residual = (0.5 + gain * (watermarked - image)).clamp(0, 1)
    heat = torch.cat([saliency, torch.zeros_like(saliency), 1 - saliency], dim=1)  # red = salient, blue = not
    overlay = 0.6 * grey(image) + 0.4 * heat
    rows = torch.stack([grey(image), grey(watermarked), grey(residual), overlay], dim=1)  # N x 4 x 3 x H x W
    return make_grid(rows.flatten(0, 1), nrow=4, padding=2, pad_value=1.0)


def watermark_grid_output(output: Any, max_samples: int = 4) -> list[torch.Tensor]:
    """``[watermark_grid(...)]`` of an evaluator output (a batch dict, or decollated per-sample dicts): the
    ``output_transform`` with which MONAI's ``TensorBoardImageHandler`` logs it as one RGB image."""
    if isinstance(output, list):
        output = {k: torch.stack([o[k] for o in output[:max_samples]]) for k in ("image", "pred", "saliency")}
    return [watermark_grid(*(output[k][:max_samples].detach().float().cpu() for k in ("image", "pred", "saliency")))]


class WatermarkGridHandler:
    """After each validation epoch, log :func:`watermark_grid` of the last batch's first ``max_samples`` samples.

    Not MONAI's ``TensorBoardImageHandler`` (which :func:`watermark_grid_output` would feed): that opens its event
    file when it is built, so under DDP (configs/multi_gpu_train.json) every rank would write one; this handler opens
    it at its first write, which only rank 0's evaluator reaches.
    """

    def __init__(self, log_dir: str | os.PathLike, max_samples: int = 4, tag: str = "watermark") -> None:
        self.log_dir = str(log_dir)
        self.max_samples = max_samples
        self.tag = tag
        self._writer: SummaryWriter | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        (grid,) = watermark_grid_output(engine.state.output, self.max_samples)
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(self.tag, grid, global_step=engine.state.epoch)
        self._writer.flush()


class MetricsFileWriter:
    """After each epoch, rewrite ``path`` (atomically) with ``info`` and the history of the engine's scalar metrics.

    Not MONAI's ``MetricsSaver``: that writes the latest values as CSV, while this file keeps every epoch, the best
    epoch and the run's ``info`` in one JSON document that the demo and the docs read.

    The ``info`` dict carries what a reader needs to judge the numbers, e.g. ``lpips_backbone: untrained``.
    For an evaluator run by ``ValidationHandler``, ``engine.state.epoch`` is the trainer's epoch.
    """

    def __init__(self, path: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.info = dict(info or {})
        self.history: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, torch.Tensor))}
        self.history.append({"epoch": engine.state.epoch, **metrics})
        best = {"metric": engine.state.best_metric, "epoch": engine.state.best_metric_epoch}
        write_json(self.path, {**self.info, "best": best, "history": self.history})
