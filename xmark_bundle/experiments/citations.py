"""Check that the figures the README and model cards quote from a published experiment are its published numbers.

A paragraph (a block between blank lines, or one list item; fenced code is skipped) that names a published
experiment in backticks, e.g. `stealthmark_v1`, cites it. Every decimal figure and every "k of N" count in that
paragraph must then be one of the cited experiments' numbers in ``docs/experiments/<name>/results.json``: a cell, a
seed's value or the mean, least or greatest of a cell's seeds, how many of a p column's seeds are under 0.05, a
wall time in seconds, minutes or hours, or a figure that its reading, notes or description state. A decimal
matches a number that rounds to it at the digits written. Version strings, arXiv identifiers and DICOM UIDs are not
figures. Aggregates that no table holds belong in the experiment's reading, where they are published with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PublishedNumbers", "Uncited", "published_numbers", "uncited_figures"]

#: the significance level at which the docs count a p column's seeds ("significant on k of N")
ALPHA = 0.05
#: a decimal figure (not part of a dotted version or UID, an identifier or an arXiv number), or a mantissa with
#: an exponent
_FIGURE = re.compile(r"(?<![\w.:/-])(\d+\.\d+|\d+(?:\.\d+)?e[-+]?\d+)(?![\w.]|\.\d)")
_COUNT = re.compile(r"\b(\d+) of (\d+)\b")
_ITEM = re.compile(r"^\s*(?:[-*]|\d+\.)\s", re.MULTILINE)


@dataclass
class PublishedNumbers:
    """What one results.json publishes: its numbers (values, not strings) and its "k of N" counts."""

    values: list[float] = field(default_factory=list)
    counts: set[tuple[int, int]] = field(default_factory=set)

    def __ior__(self, other: PublishedNumbers) -> PublishedNumbers:
        self.values.extend(other.values)
        self.counts |= other.counts
        return self


@dataclass(frozen=True)
class Uncited:
    """A figure in a paragraph that cites ``experiments`` and that none of them publishes."""

    figure: str
    experiments: tuple[str, ...]
    paragraph: str

    def __str__(self) -> str:
        where = " ".join(self.paragraph.split())[:160]
        return f"'{self.figure}' is in no results.json of {', '.join(self.experiments)} (paragraph: {where}...)"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _from_text(text: str, found: PublishedNumbers) -> None:
    found.counts.update((int(k), int(n)) for k, n in _COUNT.findall(text))
    found.values.extend(float(figure) for figure in _FIGURE.findall(text))


def _walk(node: Any, key: str, found: PublishedNumbers) -> None:
    if isinstance(node, Mapping):
        for name, value in node.items():  # a cell's seeds keep its column's name
            _walk(value, key if name in ("per_seed", "value") else str(name), found)
    elif isinstance(node, list | tuple):
        numbers = [float(v) for v in node if _is_number(v)]
        if numbers and len(numbers) == len(node):
            found.values.extend([*numbers, sum(numbers) / len(numbers), min(numbers), max(numbers)])
            if key == "p" or key.startswith(("p ", "p(")):
                found.counts.add((sum(v < ALPHA for v in numbers), len(numbers)))
        for value in node:
            _walk(value, key, found)
    elif _is_number(node):
        found.values.append(float(node))
    elif isinstance(node, str):
        _from_text(node, found)


def published_numbers(results: Mapping[str, Any]) -> PublishedNumbers:
    """Every number a results.json publishes (see the module's docstring for what counts)."""
    found = PublishedNumbers()
    for table in results.get("tables", []):  # a cell's seeds sit under its column's name
        for row in table.get("rows", []):
            for column, cell in row.get("cells", {}).items():
                _walk(cell, column, found)
        _walk(table.get("notes", ""), "notes", found)
    for key, value in results.items():
        if key != "tables":
            _walk(value, key, found)
    for seconds in (v for v in (results.get("wall_time_s") or {}).values() if _is_number(v)):
        found.values.extend([seconds / 60, seconds / 3600])
    return found


def _paragraphs(text: str) -> Iterable[str]:
    """Blocks between blank lines, each list item on its own, fenced code left out."""
    prose = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    for block in re.split(r"\n\s*\n", prose):
        starts = [m.start() for m in _ITEM.finditer(block)] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        yield from (block[a:b] for a, b in zip(starts, [*starts[1:], len(block)], strict=True) if block[a:b].strip())


def _matches(figure: str, values: Sequence[float]) -> bool:
    """Whether some value rounds to ``figure`` at the digits it is written with."""
    mantissa, _, exponent = figure.partition("e")
    digits = len(mantissa.partition(".")[2])
    target = float(figure)
    tolerance = 0.5 * 10.0 ** (-digits) * 10.0 ** int(exponent or 0) * (1 + 1e-9)
    return any(abs(abs(v) - target) <= tolerance for v in values)


def uncited_figures(text: str, published: Mapping[str, PublishedNumbers]) -> list[Uncited]:
    """Figures in ``text`` that the experiments their paragraph cites do not publish (empty when all are)."""
    problems = []
    for paragraph in _paragraphs(text):
        cited = tuple(name for name in sorted(published) if f"`{name}`" in paragraph)
        if not cited:
            continue
        numbers = PublishedNumbers()
        for name in cited:
            numbers |= published[name]
        for figure in _FIGURE.findall(paragraph):
            if not _matches(figure, numbers.values):
                problems.append(Uncited(figure, cited, paragraph))
        for k, n in _COUNT.findall(paragraph):
            if (int(k), int(n)) not in numbers.counts:
                problems.append(Uncited(f"{k} of {n}", cited, paragraph))
    return problems
