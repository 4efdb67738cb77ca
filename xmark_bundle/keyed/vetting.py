"""Key vetting: choose a secret key that clean models do not already read as the target label (before training G).

A keyed watermark's signs are the owner's key (:func:`xmark_bundle.keyed.keys.secret_key`), and a trained keyed
generator's output is close to the flat head ``x + eps * m * K * [x > 0]`` (m = ``key_magnitude``). Some keys look
like a finding, or its absence, to a model that never saw a watermark: such a key would get a clean model falsely
verified (Ind-M). Vetting watermarks clean samples with the flat head of candidate
keys and keeps the first key whose mean rise of P(k) stays below ``max_reaction`` for every clean reference model
(the surrogate and further classifiers trained on the clean data with other seeds).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from xmark_bundle.errors import exit_on_bad_input
from xmark_bundle.fileio import write_json
from xmark_bundle.keyed.keys import flat_keyed_watermark, secret_key
from xmark_bundle.networks.generator import DEFAULT_EPS
from xmark_bundle.provenance import environment
from xmark_bundle.transforms.geometry import resize_square
from xmark_bundle.verification.blackbox import SuspectModel, open_suspect
from xmark_bundle.verification.queries import QuerySettings, load_letterboxed, query_samples
from xmark_bundle.verification.report import save_key_vetting_figure

__all__ = ["key_reactions", "mean_target_probabilities", "run_key_vetting", "vet_key"]


def mean_target_probabilities(
    references: Mapping[str, SuspectModel], images: torch.Tensor, target_label: str, query_size: int, batch_size: int
) -> dict[str, float]:
    """Each reference model's mean P(``target_label``) over ``images`` (B x 1 x S x S), queried at ``query_size``."""
    queries = resize_square(images, query_size)
    means = {}
    for name, model in references.items():
        total = 0.0
        for first in range(0, len(queries), batch_size):
            total += float(model.label_probability(queries[first : first + batch_size], target_label).sum())
        means[name] = total / len(queries)
    return means


def key_reactions(
    references: Mapping[str, SuspectModel],
    images: torch.Tensor,
    key: torch.Tensor,
    target_label: str,
    eps: float = DEFAULT_EPS,
    magnitude: float = 0.5,
    query_size: int = 224,
    batch_size: int = 8,
    benign: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Rise of each reference model's mean P(``target_label``) when ``images`` (B x 1 x S x S, letterboxed non-target
    samples) carry ``key`` by the flat head. ``benign`` holds the models' means on the unmarked images (computed
    when omitted)."""
    marked = flat_keyed_watermark(images, key.to(images.device), eps, magnitude)
    if benign is None:
        benign = mean_target_probabilities(references, images, target_label, query_size, batch_size)
    after = mean_target_probabilities(references, marked, target_label, query_size, batch_size)
    return {name: after[name] - benign[name] for name in references}


def vet_key(
    references: Sequence[str | os.PathLike],
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    output_file: str | os.PathLike,
    queries: QuerySettings = QuerySettings(data_list_key="validation", n_samples=64),
    dataset_dir: str | os.PathLike | None = None,
    image_size: int = 1024,
    key_cells: int = 256,
    key_pattern: str = "grating",
    key_magnitude: float = 0.5,
    eps: float = DEFAULT_EPS,
    first_key_seed: int = 0,
    max_candidates: int = 32,
    max_reaction: float = 0.1,
    all_candidates: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Try key seeds ``first_key_seed``, ``first_key_seed + 1``, ... and return the report of the first whose flat
    watermark raises no reference model's mean P(k) on the ``queries`` (seeded non-target samples) by
    ``max_reaction`` or more; the report (every candidate's reactions, the chosen ``key_seed``) is written to
    ``output_file``, and a figure of it next to it (same name, ``.png``).

    ``references`` are clean classifiers (specs for :func:`open_suspect`: checkpoints, bundles, endpoints).
    With ``all_candidates`` every one of the ``max_candidates`` keys is measured (a screen) and the key with the
    smallest largest reaction is chosen instead of the first that passes. Raises ``ValueError`` when no candidate
    passes (the report is written all the same).
    """
    target_label, query_size, batch_size = queries.target_label, queries.query_size, queries.batch_size
    if not references:
        raise ValueError("key vetting needs at least one clean reference model (the surrogate)")
    if key_cells <= 0:
        raise ValueError(f"key vetting needs a keyed generator (key_cells > 0, e.g. --key_cells 256), got {key_cells}")
    if max_candidates < 1 or not 0.0 < max_reaction < 1.0:
        raise ValueError(f"need max_candidates >= 1 and 0 < max_reaction < 1, got {max_candidates} and {max_reaction}")
    device = torch.device(device)
    models = {os.fspath(spec): open_suspect(spec, device=device) for spec in references}
    items, chosen, where = query_samples(datalist, dataset_dir, queries)
    images = load_letterboxed(items, chosen, image_size).to(device)
    with torch.no_grad():
        benign = mean_target_probabilities(models, images, target_label, query_size, batch_size)

    candidates, key_seed = [], None
    seeds = range(first_key_seed, first_key_seed + max_candidates)
    for candidate in tqdm(seeds, desc="vetting keys", unit="key", disable=not progress):
        key = secret_key(key_cells, candidate, key_pattern)
        with torch.no_grad():
            rise = key_reactions(models, images, key, target_label, eps, key_magnitude, query_size, batch_size, benign)
        candidates.append({"key_seed": candidate, "reactions": rise, "max_reaction": max(rise.values())})
        if not all_candidates and candidates[-1]["max_reaction"] < max_reaction:
            break
    best = min(candidates, key=lambda row: row["max_reaction"])
    if best["max_reaction"] < max_reaction:
        key_seed = best["key_seed"]
    report = {
        "key_seed": key_seed,
        "max_reaction": max_reaction,
        "selection": "smallest largest reaction of all candidates"
        if all_candidates
        else "first candidate below the limit",
        "target_label": target_label,
        "key_cells": key_cells,
        "key_pattern": key_pattern,
        "key_magnitude": key_magnitude,
        "epsilon": eps,
        "image_size": image_size,
        "query_size": query_size,
        "n": len(chosen),
        "seed": queries.seed,
        "datalist": where,
        "references": [model.describe() for model in models.values()],
        "benign_mean_p": benign,
        "candidates": candidates,
        "environment": environment(),
    }
    write_json(output_file, report)
    save_key_vetting_figure(Path(output_file).with_suffix(".png"), report)
    for row in candidates:
        worst = max(row["reactions"], key=row["reactions"].get)
        print(f"key_seed {row['key_seed']:>4}: largest rise of P({target_label}) {row['max_reaction']:+.3f} ({worst})")
    if key_seed is None:
        raise ValueError(
            f"none of key seeds {seeds.start}..{seeds.stop - 1} keeps every reference model's rise of "
            f"P({target_label}) below {max_reaction} (report: {output_file}); try more candidates, another "
            "first_key_seed or a lower key_magnitude"
        )
    print(f"chosen key_seed {key_seed}; train the generator with --key_seed {key_seed} (report: {output_file})")
    return report


def run_key_vetting(**kwargs: Any) -> dict[str, Any]:
    """Config entry point: :func:`vet_key` through :func:`exit_on_bad_input` (also when no key passes)."""
    return exit_on_bad_input(vet_key, "key vetting", **kwargs)
