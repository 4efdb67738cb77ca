"""The verification's control and the "specific" rule: is the suspect's reaction evidence of *our* watermark?

The control queries carry a perturbation of the watermark's size that is not ours: for an unkeyed watermark its
per-pixel magnitudes with random signs, for a keyed one our generator with other owners' keys. A verdict is specific
only when the control does not trigger the suspect and our watermark beats the control by the same margin tau that
it must beat the benign queries by.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from xmark_bundle.networks.pipeline import is_keyed, watermark_generator
from xmark_bundle.verification.ttest import ownership_test

__all__ = ["control_comparison", "control_description", "control_queries", "other_key_control", "unkeyed_control"]


def control_description(keyed: bool) -> str:
    """What the control queries hold, for the report."""
    if keyed:
        return "same samples, our generator with random other keys of its kind (other owners' keys)"
    return "same samples, the watermark's per-pixel magnitudes with random signs (no key)"


def unkeyed_control(image: torch.Tensor, watermarked: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The watermark's per-pixel magnitudes with random signs: a perturbation of the same size that holds no key.

    A suspect that reacts to this as strongly as to the watermark has learned "perturbed" rather than this
    generator's watermark (another owner's generator would trigger it too).
    """
    sign = torch.randint(0, 2, image.shape, generator=generator).to(image) * 2 - 1
    return torch.clamp(image + (watermarked - image).abs() * sign, 0.0, 1.0)


def other_key_control(generator: nn.Module, image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """``image`` watermarked by ``generator`` (a keyed pipeline or generator) with a random other key of its kind.

    Same network, same sample-specific magnitudes, another owner's key (one draw from ``rng`` per call): a suspect
    that reacts to it as to our watermark has learned keyed watermarks in general, not ours.
    """
    core = watermark_generator(generator)
    with core.using_key(core.other_key(int(torch.randint(2**31 - 1, (1,), generator=rng)))):
        return generator(image)


def control_queries(
    generator: nn.Module, image: torch.Tensor, watermarked: torch.Tensor, rng: torch.Generator
) -> torch.Tensor:
    """The control version of ``image`` for ``generator``: other keys when it is keyed, random signs otherwise."""
    if is_keyed(generator):
        return other_key_control(generator, image, rng)
    return unkeyed_control(image, watermarked, rng)


def control_comparison(
    pb: np.ndarray, pv: np.ndarray, pc: np.ndarray, tau: float, alpha: float, source: str, keyed: bool
) -> dict[str, Any]:
    """The control's block of the report: does the suspect react to the control, and does our watermark beat it?

    ``p_value`` is the ownership test of the control queries ``Pc`` against ``Pb`` (same tau);
    ``p_value_vs_watermark`` the same test of ``Pv`` against ``Pc`` (``Pc + tau < Pv``). Without that margin, a
    clean model that reacts to any strong perturbation, ours a little more than others, would be called specific.
    """
    reaction = ownership_test(pb, pc, tau=tau, alpha=alpha, source=f"{source} (control queries)")
    versus = ownership_test(pc, pv, tau=tau, alpha=alpha, source=f"{source} (control against watermark)")
    return {
        "description": control_description(keyed),
        "mean_pc": reaction["mean_pv"],
        "delta_p": reaction["delta_p"],
        "p_value": reaction["p_value"],
        "reacts": reaction["owned"],
        "p_value_vs_watermark": versus["p_value"],
        "specific": not reaction["owned"] and versus["owned"],
    }
