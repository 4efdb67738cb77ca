"""How a config run reports bad input: one clear line and exit status 1, not MONAI's wrapped traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["exit_on_bad_input"]

logger = logging.getLogger(__name__)


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
