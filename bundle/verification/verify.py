"""Black-box ownership verification of a suspect model (X-Mark step 3), as one function the config and Python call.

Queries: n seeded non-target samples (label k == 0) of a datalist split are letterboxed to G's resolution S
(``LoadXRayd`` + ``ResizeLongestPadd``), watermarked by G, and both versions are resized (bilinear, antialiased) to
the suspect's input size before querying it for label k. The paired t-test of :mod:`.ttest` decides.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import Compose
from torch import nn
from tqdm import tqdm

from bundle.data import LoadXRayd
from bundle.data.labels import LABELS
from bundle.data.selection import select_fraction, split_by_target
from bundle.fileio import sha256_file, write_json
from bundle.networks.pipeline import load_pipeline, watermark_generator
from bundle.provenance import environment
from bundle.transforms import ResizeLongestPadd
from bundle.transforms.geometry import resize_square
from bundle.verification.blackbox import SuspectModel, SuspectModelError, open_suspect
from bundle.verification.report import save_verification_figure, summary_lines
from bundle.verification.ttest import ownership_test, watermark_success_rate

__all__ = ["exit_on_bad_input", "run_verification", "target_column", "verify_ownership"]

logger = logging.getLogger(__name__)

#: Example triplets shown in verification.png.
N_EXAMPLES = 3
CONTROL_DESCRIPTION = {
    False: "same samples, the watermark's per-pixel magnitudes with random signs (no key)",
    True: "same samples, our generator with random other keys of its kind (other owners' keys)",
}


def datalist_items(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]], key: str, base_dir: str | os.PathLike | None
) -> list[dict[str, Any]]:
    """Datalist items (``image``, ``label``) of split ``key`` from a JSON file, or the given items."""
    if isinstance(datalist, (str, os.PathLike)):
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist not found: {datalist} (make it with scripts/prepare_datalist.py)")
        try:
            return load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=key, base_dir=base_dir)
        except ValueError as err:
            raise ValueError(f"{datalist}: no usable '{key}' split ({err})") from err
    return list(datalist)


def choose_non_target(items: Sequence[Mapping[str, Any]], k: int, n: int, seed: int, where: str) -> list[int]:
    """Seeded choice of ``n`` non-target item indices (all of them, with a warning, when fewer exist)."""
    _, non_target = split_by_target(items, k)
    if len(non_target) < 2:
        raise ValueError(f"{where}: only {len(non_target)} non-target sample(s) for '{LABELS[k]}'; need at least 2")
    if len(non_target) < n:
        warnings.warn(
            f"{where}: only {len(non_target)} non-target samples for '{LABELS[k]}', fewer than n_samples = {n}; "
            "using all of them",
            stacklevel=4,
        )
        return list(non_target)
    return select_fraction(non_target, n / len(non_target), seed)


def query_samples(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    data_list_key: str,
    dataset_dir: str | os.PathLike | None,
    target_label: str,
    n_samples: int,
    seed: int,
) -> tuple[list[Mapping[str, Any]], list[int], str]:
    """The split's items, the seeded indices of ``n_samples`` non-target ones among them, and where they come from."""
    items = datalist_items(datalist, data_list_key, dataset_dir)
    where = f"{os.fspath(datalist)} [{data_list_key}]" if isinstance(datalist, (str, os.PathLike)) else "datalist"
    return items, choose_non_target(items, LABELS.index(target_label), n_samples, seed, where), where


def load_letterboxed(items: Sequence[Mapping[str, Any]], indices: Sequence[int], image_size: int) -> torch.Tensor:
    """The images of ``items[i]`` for ``i`` in ``indices``, read and letterboxed to B x 1 x ``image_size``²."""
    preprocess = Compose([LoadXRayd(keys="image"), ResizeLongestPadd(keys="image", spatial_size=image_size)])
    return torch.stack([preprocess({"image": items[i]["image"]})["image"].as_tensor() for i in indices])


def target_column(suspect: SuspectModel, target_label: str, width: int) -> int:
    """Column of ``target_label`` in the suspect's output (its own label order when it states one, else LABELS)."""
    if suspect.labels is None and width != len(LABELS):
        raise SuspectModelError(
            f"suspect model {suspect.location} returns {width} scores and names no labels; "
            f"without names only the {len(LABELS)} scores in the order {list(LABELS)} can be read"
        )
    labels = suspect.labels or LABELS
    if target_label not in labels:
        raise SuspectModelError(f"suspect model {suspect.location} has no label {target_label!r} (labels: {labels})")
    return list(labels).index(target_label)


def verify_ownership(
    generator: nn.Module,
    suspect: str | os.PathLike | SuspectModel,
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    generator_ckpt: str | os.PathLike | None = None,
    data_list_key: str = "test",
    dataset_dir: str | os.PathLike | None = None,
    target_label: str = "No Finding",
    image_size: int = 1024,
    n_samples: int = 100,
    seed: int = 0,
    tau: float = 0.25,
    alpha: float = 0.05,
    query_size: int = 224,
    wsr_threshold: float = 0.5,
    batch_size: int = 8,
    suspect_outputs: str = "logits",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Test whether ``suspect`` was trained on data watermarked by ``generator`` (G); write and return the report.

    ``generator`` maps B x 1 x S x S images in [0, 1] (S = ``image_size``) to their watermarked versions; its weights
    come from ``generator_ckpt`` when given. ``suspect`` is a :class:`SuspectModel` or a spec for
    :func:`open_suspect`. ``datalist`` is a MONAI datalist JSON (split ``data_list_key``, paths relative to
    ``dataset_dir``, default the file's folder) or its items. Writes ``verification.json`` and ``verification.png``
    to ``output_dir`` and prints a short summary.
    """
    if target_label not in LABELS:
        raise ValueError(f"unknown target_label {target_label!r}; choose one of {list(LABELS)}")
    if n_samples < 2 or batch_size < 1:
        raise ValueError(f"need n_samples >= 2 and batch_size >= 1, got {n_samples} and {batch_size}")
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock
        clock = now

    device = torch.device(device)
    if not isinstance(suspect, SuspectModel):
        suspect = open_suspect(suspect, outputs=suspect_outputs, device=device)
    if suspect.input_size is not None and suspect.input_size != query_size:
        logger.warning(
            "suspect %s was trained at %s px but is queried at %d px", suspect.location, suspect.input_size, query_size
        )
    probe = torch.full((1, 1, query_size, query_size), 0.5)  # fail now, not after watermarking every sample
    target_column(suspect, target_label, suspect.predict_proba(probe).shape[1])
    lap("open_suspect")
    generator_sha = None
    if generator_ckpt is not None:
        load_pipeline(generator, generator_ckpt)
        generator_sha = sha256_file(generator_ckpt)
    generator = generator.to(device).eval()
    key_cells = generator_key_cells(generator)
    keyed = key_cells > 0
    lap("load_generator")

    items, chosen, where = query_samples(datalist, data_list_key, dataset_dir, target_label, n_samples, seed)
    lap("select_samples")

    signs = torch.Generator().manual_seed(seed)  # the control's random signs, reproducible from the seed
    benign, marked, control, examples = [], [], [], []
    max_change = 0.0
    for first in range(0, len(chosen), batch_size):
        batch = load_letterboxed(items, chosen[first : first + batch_size], image_size).to(device)
        lap("load_and_letterbox")
        with torch.no_grad():
            batch_marked = generator(batch)
        max_change = max(max_change, float((batch_marked - batch).abs().max()))
        if len(examples) < N_EXAMPLES:
            examples.extend(zip(batch.cpu(), batch_marked.cpu(), strict=True))
        benign.append(resize_square(batch, query_size).cpu())
        marked.append(resize_square(batch_marked, query_size).cpu())
        with torch.no_grad():
            if keyed:
                batch_control = other_key_control(generator, batch, signs)
            else:
                batch_control = unkeyed_control(batch, batch_marked, signs)
        control.append(resize_square(batch_control, query_size).cpu())
        lap("watermark")
    queries = {"pb": torch.cat(benign), "pv": torch.cat(marked), "pc": torch.cat(control)}

    answers = {name: np.empty(len(chosen)) for name in queries}
    with tqdm(total=3 * len(chosen), desc="querying suspect", unit="img", disable=not progress) as bar:
        for first in range(0, len(chosen), batch_size):
            rows = slice(first, first + batch_size)
            for name, images in queries.items():
                probs = suspect.predict_proba(images[rows])
                answers[name][rows] = probs[:, target_column(suspect, target_label, probs.shape[1])]
                bar.update(len(images[rows]))
    pb, pv, pc = answers["pb"], answers["pv"], answers["pc"]
    lap("query")

    source = f"suspect model {suspect.location}"
    result = ownership_test(pb, pv, tau=tau, alpha=alpha, source=source)
    result["wsr"] = watermark_success_rate(pv, wsr_threshold, source=source)
    result["control"] = control_comparison(pb, pv, pc, tau=tau, alpha=alpha, source=source, keyed=keyed)
    lap("test")

    output_dir = Path(output_dir)
    report = {
        **result,
        "wsr_threshold": wsr_threshold,
        "target_label": target_label,
        "n_requested": n_samples,
        "seed": seed,
        "query_size": query_size,
        "suspect": suspect.describe(),
        "generator": {
            "checkpoint": None if generator_ckpt is None else os.fspath(generator_ckpt),
            "sha256": generator_sha,
            "image_size": image_size,
            "max_abs_perturbation": max_change,
            "key_cells": key_cells,
        },
        "datalist": {"source": where},
        "environment": environment(),
        "samples": [
            {"index": i, "image": os.fspath(items[i]["image"]), "pb": float(b), "pv": float(v), "pc": float(c)}
            for i, b, v, c in zip(chosen, pb, pv, pc, strict=True)
        ],
    }
    example_x, example_xw = (torch.stack(t) for t in zip(*examples[:N_EXAMPLES], strict=True))
    save_verification_figure(output_dir / "verification.png", pb, pv, result, example_x, example_xw, pc=pc)
    lap("figure")
    timings["total"] = time.perf_counter() - start
    report["timings_s"] = {stage: round(seconds, 4) for stage, seconds in timings.items()}
    write_json(output_dir / "verification.json", report)
    print("\n".join([*summary_lines(report), f"written: {output_dir / 'verification.json'}, verification.png"]))
    return report


def control_comparison(
    pb: np.ndarray, pv: np.ndarray, pc: np.ndarray, tau: float, alpha: float, source: str, keyed: bool
) -> dict[str, Any]:
    """The control's block of the report: does the suspect react to the control, and does our watermark beat it?

    ``p_value`` is the ownership test of the control queries ``Pc`` against ``Pb`` (same tau); ``p_value_vs_watermark``
    is the same test of ``Pv`` against ``Pc``: ``Pc + tau < Pv``. The verdict is ``specific`` to our generator only when
    the control does not trigger the suspect *and* our watermark beats the control by the same margin tau as it must
    beat the benign queries. Without that margin a clean model that reacts to any grating, ours a little more than
    others, was called specific (docs/results.md, "Control margin").
    """
    reaction = ownership_test(pb, pc, tau=tau, alpha=alpha, source=f"{source} (control queries)")
    versus = ownership_test(pc, pv, tau=tau, alpha=alpha, source=f"{source} (control against watermark)")
    return {
        "description": CONTROL_DESCRIPTION[keyed],
        "mean_pc": reaction["mean_pv"],
        "delta_p": reaction["delta_p"],
        "p_value": reaction["p_value"],
        "reacts": reaction["owned"],
        "p_value_vs_watermark": versus["p_value"],
        "specific": not reaction["owned"] and versus["owned"],
    }


def generator_key_cells(generator: nn.Module) -> int:
    """Side of the secret key grid of ``generator`` (a pipeline or a bare generator); 0 when it has no key."""
    key = getattr(watermark_generator(generator), "key", None)
    return int(key.shape[-1]) if isinstance(key, torch.Tensor) and key.numel() else 0


def unkeyed_control(image: torch.Tensor, watermarked: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The watermark's per-pixel magnitudes with random signs: a perturbation of the same size that holds no key.

    A suspect that reacts to this as strongly as to the watermark has learned "perturbed" rather than this generator's
    watermark (e.g. another owner's generator would trigger it too), so its verdict is not evidence of *our* data.
    The control of an unkeyed generator; keyed ones use :func:`other_key_control`.
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


def exit_on_bad_input(function: Callable[..., dict[str, Any]], what: str, **kwargs: Any) -> dict[str, Any]:
    """Call ``function(**kwargs)`` for a config run; bad input ends the run (exit status 1) on one clear line.

    ``ValueError``/``OSError`` (missing files, unreachable endpoint, wrong output shape, NaN outputs) would otherwise
    reach the user wrapped in MONAI's "Failed to evaluate" error with the config text as its last line.
    """
    try:
        return function(**kwargs)
    except (ValueError, OSError) as err:
        logger.debug("%s failed", what, exc_info=True)
        raise SystemExit(f"{what} failed: {type(err).__name__}: {err}") from err


def run_verification(**kwargs: Any) -> dict[str, Any]:
    """Config entry point: :func:`verify_ownership` through :func:`exit_on_bad_input`."""
    return exit_on_bad_input(verify_ownership, "verification", **kwargs)
