"""Black-box ownership verification of a suspect model (X-Mark step 3), as one function the config and Python call.

Follow a suspect from configs/verify.json: :mod:`.queries` picks and loads the samples, the watermark (loaded from
its checkpoint by :func:`xmark_bundle.networks.checkpoint.load_watermark`) marks them, :mod:`.blackbox` asks the
suspect, :mod:`.rank` gives the calibrated verdict (the owner's watermark ranked among its :mod:`.family`),
:mod:`.ttest` the paper's margin test beside it, :mod:`.controls` says whether the reaction is specific to our
watermark, and :mod:`.report` writes the figures and the summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from xmark_bundle.errors import exit_on_bad_input
from xmark_bundle.fileio import sha256_file, write_json
from xmark_bundle.networks.pipeline import is_keyed
from xmark_bundle.provenance import environment
from xmark_bundle.transforms.geometry import resize_square
from xmark_bundle.verification.answers import ask_family
from xmark_bundle.verification.blackbox import SuspectModel, open_suspect
from xmark_bundle.verification.controls import control_comparison, control_queries
from xmark_bundle.verification.family import FamilyError, family_queries, load_family
from xmark_bundle.verification.queries import QuerySettings, load_letterboxed, query_samples
from xmark_bundle.verification.rank import min_members, rank_test, reference_adjusted_rank
from xmark_bundle.verification.report import save_family_figure, save_verification_figure, summary_lines
from xmark_bundle.verification.ttest import ownership_test, watermark_success_rate

__all__ = ["FamilyError", "VerificationSettings", "run_verification", "verify_ownership"]

logger = logging.getLogger(__name__)

#: Example triplets shown in verification.png.
N_EXAMPLES = 3


@dataclass(frozen=True)
class VerificationSettings(QuerySettings):
    """The queries (:class:`~xmark_bundle.verification.queries.QuerySettings`) and the test: margin ``tau``, level
    ``alpha``, and the fixed threshold of the black-box WSR."""

    tau: float = 0.25
    alpha: float = 0.05
    wsr_threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.alpha < 1.0 or not 0.0 <= self.wsr_threshold <= 1.0:
            raise ValueError(f"need 0 < alpha < 1 and 0 <= wsr_threshold <= 1, got {self.alpha}, {self.wsr_threshold}")


def verify_ownership(
    generator: nn.Module,
    suspect: str | os.PathLike | SuspectModel,
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    settings: VerificationSettings = VerificationSettings(),
    generator_ckpt: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    suspect_options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    family: str | os.PathLike | None = None,
    reference_reports: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Test whether ``suspect`` was trained on data watermarked by ``generator`` (G); write and return the report.

    ``generator`` is the watermarking module (:func:`~xmark_bundle.networks.checkpoint.load_watermark` of
    ``generator_ckpt``, whose SHA-256 the report records): it maps B x 1 x S x S images in [0, 1] (S = its
    ``image_size``) to their watermarked versions. ``suspect`` is a :class:`SuspectModel` or a spec for
    :func:`open_suspect` (``suspect_options`` are passed to it). ``datalist`` is a MONAI datalist JSON (paths
    relative to ``dataset_dir``, default the file's folder) or its items. ``family`` is the owner's ``family.json``
    (:mod:`.family`): with it the calibrated verdict (:func:`~.rank.rank_test`) comes first; without it (or when the
    file does not exist) the report says why there is none. ``reference_reports`` (a research variant, not a verdict):
    the ``verification.json`` of clean reference models the owner trained, verified with the same family and queries;
    with them the report adds ``reference_adjusted`` (:func:`~.rank.reference_adjusted_rank`). Writes
    ``verification.json``, ``verification.png`` (and ``family.png``) to ``output_dir`` and prints a short summary.
    """
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - clock
        clock = now

    device, s = torch.device(device), settings
    if not isinstance(suspect, SuspectModel):
        suspect = open_suspect(suspect, device=device, **(suspect_options or {}))
    if suspect.input_size is not None and suspect.input_size != s.query_size:
        logger.warning(
            "suspect %s was trained at %s px but is queried at %d px",
            suspect.location,
            suspect.input_size,
            s.query_size,
        )
    probe = torch.full((1, 1, s.query_size, s.query_size), 0.5)  # fail now, not after watermarking every sample
    suspect.label_probability(probe, s.target_label)
    lap("open_suspect")
    generator = generator.to(device).eval()
    image_size, keyed = int(generator.image_size), is_keyed(generator)
    lap("load_generator")

    members = _open_family(family, generator, generator_ckpt, s.alpha)
    lap("open_family")
    items, chosen, where = query_samples(datalist, dataset_dir, s)
    references = None  # checked before any query: a wrong reference should not cost the suspect's answers
    if reference_reports and not isinstance(members, dict):
        images = [os.fspath(items[i]["image"]) for i in chosen]
        references = _reference_statistics(reference_reports, members.commitment, members.owner_index, images)
    lap("select_samples")

    signs = torch.Generator().manual_seed(s.seed)  # the control's random draws, reproducible from the seed
    benign, marked, control, examples = [], [], [], []
    max_change = 0.0
    for first in range(0, len(chosen), s.batch_size):
        batch = load_letterboxed(items, chosen[first : first + s.batch_size], image_size).to(device)
        lap("load_and_letterbox")
        with torch.no_grad():
            batch_marked = generator(batch)
            batch_control = control_queries(generator, batch, batch_marked, signs)
        max_change = max(max_change, float((batch_marked - batch).abs().max()))
        if len(examples) < N_EXAMPLES:
            examples.extend(zip(batch.cpu(), batch_marked.cpu(), strict=True))
        for queries, images in ((benign, batch), (marked, batch_marked), (control, batch_control)):
            queries.append(resize_square(images, s.query_size).cpu())
        lap("watermark")
    queries = {"pb": torch.cat(benign), "pv": torch.cat(marked), "pc": torch.cat(control)}

    answers = {name: np.empty(len(chosen)) for name in queries}
    with tqdm(total=3 * len(chosen), desc="querying suspect", unit="img", disable=not progress) as bar:
        for first in range(0, len(chosen), s.batch_size):
            rows = slice(first, first + s.batch_size)
            for name, images in queries.items():
                answers[name][rows] = suspect.label_probability(images[rows], s.target_label)
                bar.update(len(images[rows]))
    pb, pv, pc = answers["pb"], answers["pv"], answers["pc"]
    lap("query")

    source = f"suspect model {suspect.location}"
    calibrated: dict[str, Any] = members if isinstance(members, dict) else {}
    if not isinstance(members, dict):
        marked_by_member, cache, cached = family_queries(
            members, generator, items, chosen, s.query_size, s.batch_size, device, progress
        )
        lap("family_watermarks")
        member_probs, answers_kept = ask_family(
            suspect, marked_by_member, members, s.target_label, s.batch_size, progress
        )
        lap("family_query")
        calibrated = rank_test(pb, member_probs, members.owner_index, alpha=s.alpha, source=source)
        calibrated |= {"available": True, "family": members.describe(), "queries_cache": os.fspath(cache)}
        calibrated["queries_cached"] = cached
        calibrated["answers_kept"] = answers_kept
    result = ownership_test(pb, pv, tau=s.tau, alpha=s.alpha, source=source)
    result["wsr"] = watermark_success_rate(pv, s.wsr_threshold, source=source)
    result["control"] = control_comparison(pb, pv, pc, tau=s.tau, alpha=s.alpha, source=source, keyed=keyed)
    result["calibrated"] = calibrated
    if references is not None:
        adjusted = reference_adjusted_rank(
            calibrated["member_statistics"], references, calibrated["owner_index"], alpha=calibrated["alpha"]
        )
        result["reference_adjusted"] = {
            **adjusted,
            "reports": [os.fspath(p) for p in reference_reports],
            "research": True,
        }
    lap("test")

    output_dir = Path(output_dir)
    report = {
        **result,
        "wsr_threshold": s.wsr_threshold,
        "target_label": s.target_label,
        "data_list_key": s.data_list_key,
        "n_requested": s.n_samples,
        "seed": s.seed,
        "query_size": s.query_size,
        "suspect": suspect.describe(),
        "generator": {
            "checkpoint": None if generator_ckpt is None else os.fspath(generator_ckpt),
            "sha256": None if generator_ckpt is None else sha256_file(generator_ckpt),
            "method": getattr(generator, "method", None),
            "image_size": image_size,
            "max_abs_perturbation": max_change,
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
    if calibrated.get("available"):
        save_family_figure(output_dir / "family.png", calibrated)
    lap("figure")
    timings["total"] = time.perf_counter() - start
    report["timings_s"] = {stage: round(seconds, 4) for stage, seconds in timings.items()}
    write_json(output_dir / "verification.json", report)
    print("\n".join([*summary_lines(report), f"written: {output_dir / 'verification.json'}, verification.png"]))
    return report


def _reference_statistics(
    paths: Sequence[str | os.PathLike], commitment: str, owner_index: int, images: Sequence[str]
) -> list[list[float]]:
    """The member statistics of the reference models' reports, each checked to hold the same family (commitment and
    owner's place) and the same query images; a ValueError names the report and what differs."""
    references = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{os.fspath(path)}: cannot read a reference verification report ({err})") from err
        theirs = report.get("calibrated") or {}
        if not theirs.get("available"):
            raise ValueError(f"{os.fspath(path)}: a reference report without the calibrated verdict (no family)")
        if theirs["family"].get("commitment") != commitment:
            raise ValueError(f"{os.fspath(path)}: verified with another family (commitment differs): not a reference")
        if theirs.get("owner_index") != owner_index:
            raise ValueError(f"{os.fspath(path)}: the owner's place in its family differs: not a reference")
        if [sample["image"] for sample in report.get("samples", [])] != list(images):
            raise ValueError(
                f"{os.fspath(path)}: queried with other samples (n_samples, seed or data differ): not a reference"
            )
        references.append(theirs["member_statistics"])
    return references


def _open_family(
    family: str | os.PathLike | None, generator: nn.Module, generator_ckpt: str | os.PathLike | None, alpha: float
) -> Any:
    """The checked family, or the report's ``calibrated`` block saying why there is no calibrated verdict."""
    if family is None or not os.path.exists(family):
        where = "no family file given" if family is None else f"no family file at {os.fspath(family)}"
        return {
            "available": False,
            "reason": f"{where}: make the owner's family with scripts/make_family.py before the release "
            f"(at least {min_members(alpha)} other members for alpha = {alpha:g})",
        }
    members = load_family(family, check_members=False)  # the members' files are checked when their queries are made
    members.check_owner(generator, generator_ckpt)
    if members.m < min_members(alpha):
        logger.warning(
            "the family %s has %d other members: its rank p is at least 1/%d > alpha = %g, so it can never verify",
            family,
            members.m,
            members.m + 1,
            alpha,
        )
    return members


def run_verification(**kwargs: Any) -> dict[str, Any]:
    """Config entry point: :func:`verify_ownership` through :func:`~xmark_bundle.errors.exit_on_bad_input`."""
    return exit_on_bad_input(verify_ownership, "verification", **kwargs)
