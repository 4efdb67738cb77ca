"""The suspect's answers to each family member's queries, kept beside the member so that no suspect is asked twice.

Asking the suspect for every member's queries is most of a calibrated verification's time. Owners drawn from one
trained pool share the pool's members (:func:`~.family.make_generator_family`), so the same suspect verified for
another owner, or verified again, would be asked the same member queries again. An answer is kept only where it is a
function of what its key records: a local model file (its SHA-256, how its output is read, the device), the
member's queries (SHA-256 of their float16 values), the target label and the batch the queries went in (a batch's
answers are the same only for the same batch). Models behind an HTTP endpoint or built from a bundle's config are
always asked: their file's hash does not fix what they answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from xmark_bundle.fileio import atomic_path
from xmark_bundle.verification.blackbox import SuspectModel, TorchSuspect
from xmark_bundle.verification.family import WatermarkFamily

__all__ = ["ANSWERS_DIR", "ask_family", "member_answers_dir", "suspect_identity"]

logger = logging.getLogger(__name__)

#: The folder of kept answers beside each member's checkpoint (a key family's beside the owner's).
ANSWERS_DIR = "suspect_answers"
#: Suspect kinds whose answers follow from their model file alone.
_KEPT_KINDS = ("classifier-checkpoint", "torchscript", "monai-bundle-torchscript")


def member_answers_dir(family: WatermarkFamily, index: int) -> Path:
    """Where the answers to member ``index``'s queries are kept: beside the checkpoint that makes its watermark."""
    folder = family.path.parent if family.kind == "keys" else family.checkpoint(index).parent
    return folder / ANSWERS_DIR


def suspect_identity(suspect: SuspectModel) -> dict[str, Any] | None:
    """What fixes a suspect's answers (its description and device), or None when its answers are not kept."""
    if not isinstance(suspect, TorchSuspect) or suspect.sha256 is None or suspect.kind not in _KEPT_KINDS:
        return None
    return {**suspect.describe(), "device": suspect.device.type}


def _answers_file(folder: Path, identity: dict[str, Any], label: str, batch_size: int, queries: torch.Tensor) -> Path:
    digest = hashlib.sha256(queries.contiguous().numpy().tobytes()).hexdigest()
    key = json.dumps([identity, label, batch_size, list(queries.shape), digest], sort_keys=True)
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"


def _read(path: Path, n: int) -> np.ndarray | None:
    try:
        answers = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # absent, or cut short by a crash elsewhere: ask again
    return answers if answers.shape == (n,) and answers.dtype == np.float64 else None


def _keep(path: Path, answers: np.ndarray) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as stream:
            np.save(stream, answers, allow_pickle=False)
    except OSError as err:  # a read-only pool still verifies; it only asks again next time
        logger.warning("cannot keep the suspect's answers in %s (%s); they will be asked again", path.parent, err)


def ask_family(
    suspect: SuspectModel,
    queries: torch.Tensor,
    family: WatermarkFamily,
    label: str,
    batch_size: int,
    progress: bool = True,
) -> tuple[np.ndarray, int]:
    """The suspect's P(``label``) for every member's queries ((m + 1) x n) and how many members' answers were kept.

    ``queries`` are :func:`~.family.family_queries`' (m + 1) x n x 1 x q x q float16 tensor; each member's queries
    go to the suspect in batches of ``batch_size``, as they would without kept answers.
    """
    identity = suspect_identity(suspect)
    answers = np.empty(queries.shape[:2])
    kept = 0
    with tqdm(total=answers.size, desc="querying suspect (family)", unit="img", disable=not progress) as bar:
        for j, member in enumerate(queries):
            path = None
            if identity is not None:
                path = _answers_file(member_answers_dir(family, j), identity, label, batch_size, member)
                known = _read(path, member.shape[0])
                if known is not None:
                    answers[j], kept = known, kept + 1
                    bar.update(member.shape[0])
                    continue
            for first in range(0, member.shape[0], batch_size):
                images = member[first : first + batch_size].float()
                answers[j, first : first + len(images)] = suspect.label_probability(images, label)
                bar.update(len(images))
            if path is not None:
                _keep(path, answers[j])
    return answers, kept
