"""The ``results.json`` of an experiment: what it ran (commands, commit, seeds, wall times) and its tables.

A table has columns and rows; a row's cell is ``{"per_seed": [numbers]}`` (one value per suspect seed, the page
shows mean ± sd and every seed) or ``{"value": number or text}``. Seeds are recorded as chosen: settings come from the
``development`` phantom seed, the tables from the ``report`` seed (never used while choosing).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xmark_bundle.fileio import write_json

__all__ = ["RESULTS_FORMAT", "ResultsError", "load_results", "read_all_results", "write_results"]

RESULTS_FORMAT = 1
#: Indent of a published results.json: the model zoo's pre-commit ``pretty-format-json --indent=4`` leaves it as is.
RESULTS_INDENT = 4
_REQUIRED = ("format", "name", "title", "commands", "commit", "seeds", "wall_time_s", "tables", "reading")


class ResultsError(ValueError):
    """A results.json that cannot be shown; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def _check_cell(path: Path, where: str, cell: Any) -> None:
    if not isinstance(cell, Mapping) or len(cell) != 1 or not ({"per_seed", "value"} & set(cell)):
        raise ResultsError(path, f"{where}: a cell is {{'per_seed': [numbers]}} or {{'value': number or text}}")
    if "per_seed" in cell:
        values = cell["per_seed"]
        if not isinstance(values, list) or not values:
            raise ResultsError(path, f"{where}: per_seed must be a non-empty list")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ResultsError(path, f"{where}: per_seed holds {value!r}, not a finite number")
    elif not isinstance(cell["value"], str | int | float) or isinstance(cell["value"], bool):
        raise ResultsError(path, f"{where}: value {cell['value']!r} is neither a number nor text")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check one results.json (its folder must be named like the experiment; its figures must exist)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsError(path, f"cannot be read as JSON ({err})") from err
    if not isinstance(results, dict):
        raise ResultsError(path, "is not a JSON object")
    missing = [key for key in _REQUIRED if key not in results]
    if missing:
        raise ResultsError(path, f"lacks {missing}")
    if results["format"] != RESULTS_FORMAT:
        raise ResultsError(path, f"format {results['format']!r}, this version reads {RESULTS_FORMAT}")
    if results["name"] != path.parent.name:
        raise ResultsError(path, f"names experiment {results['name']!r} but lies in folder {path.parent.name!r}")
    seeds = results["seeds"]
    if not isinstance(seeds, Mapping) or not {"development", "report"} <= set(seeds):
        raise ResultsError(path, "seeds must record the 'development' and the 'report' phantom seed")
    if seeds["report"] == seeds["development"]:
        raise ResultsError(path, "the report seed equals the development seed: tables must come from fresh data")
    for t, table in enumerate(results["tables"]):
        columns = table.get("columns") if isinstance(table, Mapping) else None
        if not isinstance(columns, list) or not isinstance(table.get("rows"), list) or "title" not in table:
            raise ResultsError(path, f"table {t} needs 'title', 'columns' and 'rows'")
        for row in table["rows"]:
            cells = row.get("cells", {}) if isinstance(row, Mapping) else None
            if not isinstance(cells, Mapping) or "label" not in row:
                raise ResultsError(path, f"table {t}: each row needs 'label' and 'cells'")
            unknown = set(cells) - set(columns)
            if unknown:
                problem = f"table {t}, row {row['label']!r}: cells for unknown columns {sorted(unknown)}"
                raise ResultsError(path, problem)
            for column, cell in cells.items():
                _check_cell(path, f"table {t}, row {row['label']!r}, column {column!r}", cell)
    for figure in results.get("figures", []):
        if not (path.parent / figure).is_file():
            raise ResultsError(path, f"figure {figure!r} is listed but missing beside it")
    return results


def read_all_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``<folder>/<name>/results.json``, checked, in name order (none: an empty list)."""
    return [load_results(p) for p in sorted(Path(folder).glob("*/results.json"))]


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``results`` atomically as the zoo's JSON formatter would (indent 4, key order kept); check it back."""
    write_json(path, dict(results), indent=RESULTS_INDENT)
    return load_results(path)
