"""How a config run reports bad input: one clear line and exit status 1, not MONAI's wrapped traceback."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

__all__ = ["PACKAGE_CHECK", "exit_on_bad_input", "require_checkpoint"]

logger = logging.getLogger(__name__)

#: The first ``initialize`` expression of every runnable config, written without the package (it is what it checks).
#: MONAI's config parser imports ``$import xmark_bundle`` through ``optional_import``, which fails silently; a folder
#: holding only ``configs/`` and ``models/`` then stops at the first component with "Cannot locate ...". This check
#: ends such a run at once (exit status 1) on one line naming the package and what to do.
PACKAGE_CHECK = (
    "$__import__('importlib.util').util.find_spec('xmark_bundle') or __import__('sys').exit('cannot run this bundle: "
    "its Python package xmark_bundle is not importable from ' + __import__('os').getcwd() + '; run python -m "
    "monai.bundle from the bundle root (the folder holding configs/, models/ and xmark_bundle/), put that folder on "
    "PYTHONPATH, or pip install it (the package installs as xmark-bundle): configs/ and models/ alone cannot run')"
)


def exit_on_bad_input(function: Callable[..., Any], what: str, **kwargs: Any) -> Any:
    """Call ``function(**kwargs)`` for a config run; bad input ends the run (exit status 1) on one clear line.

    ``ValueError``/``OSError`` (missing files, unreachable endpoint, wrong output shape, NaN outputs) would otherwise
    reach the user wrapped in MONAI's "Failed to evaluate" error with the config text as its last line.
    """
    try:
        return function(**kwargs)
    except (ValueError, OSError) as err:
        logger.debug("%s failed", what, exc_info=True)
        raise SystemExit(f"{what} failed: {type(err).__name__}: {err}") from err


def require_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming ``checkpoint`` (the generator's ``model.pt``) when it is not a file.

    A bundle folder may hold only ``models/model.ts`` (what MONAI Deploy and the model zoo take; MONAI Label counts it
    as a model): the message then says that the TorchScript export cannot stand in for the checkpoint, whose record
    (method, budget, key, target label) the configs read.
    """
    path = os.fspath(checkpoint)
    if os.path.isfile(path):
        return
    problem = f"generator checkpoint not found: {path} (train it with configs/train.json, or give --ckpt_path)"
    export = os.path.join(os.path.dirname(path) or ".", "model.ts")
    if os.path.basename(path) != "model.ts" and os.path.isfile(export):
        problem += (
            f"; {export} beside it is a TorchScript export (for MONAI Deploy and the model zoo) without the "
            "watermark's record: inference, release and verification need the checkpoint model.pt itself"
        )
    raise FileNotFoundError(problem)
