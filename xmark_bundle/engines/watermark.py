"""Ignite engines for the watermark generator: one training step of X-Mark and its validation pass.

Both engines hold a frozen surrogate classifier and an EigenCAM over it. Per batch: saliency of the benign image
(no gradients), generator forward, surrogate logits of the watermarked image; the trainer then applies the four-part
loss, the evaluator reports per-sample quality and watermark-success figures for the metric handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn

from xmark_bundle.losses.watermark import LaplacianPyramidLoss


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with gradients off (the surrogate is fixed while G learns)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _batch_to(engine: Any, batchdata: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (B x 1 x S x S) and boolean ``is_target`` (B,) of a generator batch, on the engine's device."""
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    image = torch.as_tensor(batchdata[Keys.IMAGE]).to(engine.state.device, non_blocking=engine.non_blocking)
    is_target = torch.as_tensor(batchdata["is_target"]).to(engine.state.device).reshape(-1) > 0.5
    return image, is_target


class WatermarkTrainer(SupervisedTrainer):
    """SupervisedTrainer whose step trains the generator ``network`` against a frozen ``surrogate``.

    ``saliency`` maps a benign batch to B x 1 x S x S maps in [0, 1] (EigenCAM of the surrogate) and is evaluated
    under ``no_grad``; ``loss_function`` is :class:`xmark_bundle.losses.watermark.XMarkLoss` and returns a dict of
    terms, all of which go into ``engine.state.output`` for logging.
    """

    def __init__(self, *args: Any, surrogate: nn.Module, saliency: Callable[[torch.Tensor], torch.Tensor], **kwargs):
        super().__init__(*args, **kwargs)
        self.surrogate = freeze(surrogate)
        self.saliency = saliency

    def _iteration(self, engine: WatermarkTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        image, is_target = _batch_to(engine, batchdata)
        with torch.no_grad():
            cam = engine.saliency(image)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(device_type=image.device.type, enabled=engine.amp, **engine.amp_kwargs):
            watermarked = engine.network(image, cam)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            logits = engine.surrogate(watermarked)
            terms = engine.loss_function(image, watermarked, logits, is_target)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(terms["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            terms["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        output = {k: v.detach() for k, v in terms.items()}
        output.update({Keys.IMAGE: image, Keys.PRED: watermarked.detach(), "saliency": cam, Keys.LOSS: output["loss"]})
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates engine.state.output here
        return engine.state.output


class WatermarkEvaluator(SupervisedEvaluator):
    """Validation of the generator on held-out samples: per-sample figures for the metric handlers.

    Output keys: ``image``, ``pred`` (watermarked), ``saliency``, ``is_target`` (1/0), ``target_prob`` (surrogate
    probability of label ``target_index`` on the watermarked image, for the WSR), ``linf`` (max |x_hat - x|),
    ``lpips`` and ``lap`` (Laplacian-pyramid L1), each per sample.
    """

    def __init__(
        self,
        *args: Any,
        surrogate: nn.Module,
        saliency: Callable[[torch.Tensor], torch.Tensor],
        lpips: nn.Module,
        target_index: int,
        laplacian_levels: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.surrogate = freeze(surrogate)
        self.saliency = saliency
        self.lpips = lpips
        self.target_index = target_index
        self.laplacian = LaplacianPyramidLoss(levels=laplacian_levels, reduction="none")

    def _iteration(self, engine: WatermarkEvaluator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        image, is_target = _batch_to(engine, batchdata)
        engine.network.eval()
        with torch.no_grad(), torch.autocast(device_type=image.device.type, enabled=engine.amp):
            cam = engine.saliency(image)
            watermarked = engine.network(image, cam).float()
            logits = engine.surrogate(watermarked).float()
            engine.state.output = {
                Keys.IMAGE: image,
                Keys.PRED: watermarked,
                "saliency": cam,
                "is_target": is_target.float(),
                "target_prob": torch.sigmoid(logits[:, engine.target_index]),
                "linf": (watermarked - image).abs().flatten(1).amax(1),
                "lpips": engine.lpips(watermarked, image).reshape(-1),
                "lap": engine.laplacian(watermarked, image).reshape(-1),
            }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
