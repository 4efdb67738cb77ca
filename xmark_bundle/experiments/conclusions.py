"""Conclusions registered before the tables they read (``configs/experiments/conclusions.json``), checked on each
phantom family: holds on both, on one, on neither.

A conclusion is a plain statement and one claim on a published table cell: ``{"table": "table2", "row": "xmark",
"cell": "Malicious verified (calibrated)", "measure": "share", "op": ">=", "than": 0.5}``; ``than`` is a number or
another cell ``{"row": ..., "cell": ..., "plus": ...}`` of the same table (``plus``, default 0, added to it).
Measures: ``share`` (k / n of a "k of n" cell), ``mean`` (of a cell's per-seed values) and ``number`` (the first
number of a cell's text, e.g. a KS p "0.42 (66)"); for a by-owner cell ("201: 0 of 22; 202: 4 of 22"), ``max_share``
(the largest owner's k / n) and ``min_number`` (the smallest owner's first number, e.g. of "201: 0.28 (22); ..."):
a claim on every owner at once.

A claim must not move once its numbers are known. When a declaration is first published, the ledger records the
hash of every conclusion that reads one of its parts (:func:`registered_hashes`); the page then marks each verdict
*registered before the results*, or *registered after them* (a conclusion added later, or reading a legacy table),
and refuses a conclusion whose claim changed after the results it reads were published: that needs a new id.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Conclusion",
    "ConclusionError",
    "check_unchanged",
    "evaluate",
    "load_conclusions",
    "registered_hashes",
    "render_conclusions",
]

CONCLUSIONS_FORMAT = 1
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
MEASURES = ("share", "mean", "number", "max_share", "min_number")
#: How the page names each measure.
MEASURE_WORDS = {"max_share": "largest owner's share", "min_number": "smallest owner's number"}
_COUNT = re.compile(r"^\s*(\d+) of (\d+)\s*$")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


class ConclusionError(ValueError):
    """A conclusions file that cannot be read, or a claim changed after its results were published."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")


@dataclass(frozen=True)
class Conclusion:
    """One registered statement and the claim that decides it on a family's published table."""

    id: str
    statement: str
    claim: Mapping[str, Any]

    @property
    def sha256(self) -> str:
        """Hash of the statement and the claim: what may not change once the results it reads are published."""
        canonical = json.dumps({"statement": self.statement, "claim": self.claim}, sort_keys=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_claim(path: Path, cid: str, claim: Mapping[str, Any]) -> None:
    missing = {"table", "row", "cell", "measure", "op", "than"} - set(claim)
    if missing:
        raise ConclusionError(path, f"conclusion {cid!r} lacks {sorted(missing)}")
    if claim["measure"] not in MEASURES:
        raise ConclusionError(path, f"conclusion {cid!r}: measure must be one of {MEASURES}, got {claim['measure']!r}")
    if claim["op"] not in OPS:
        raise ConclusionError(path, f"conclusion {cid!r}: op must be one of {sorted(OPS)}, got {claim['op']!r}")
    than = claim["than"]
    if not (isinstance(than, (int, float)) or (isinstance(than, Mapping) and {"row", "cell"} <= set(than))):
        raise ConclusionError(path, f"conclusion {cid!r}: 'than' must be a number or {{'row': ..., 'cell': ...}}")


def load_conclusions(path: str | os.PathLike) -> tuple[dict[str, dict[str, str]], list[Conclusion]]:
    """The families (family name -> {table name -> published part}) and the conclusions of a conclusions file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConclusionError(path, f"cannot be read as JSON ({err})") from err
    if not isinstance(raw, Mapping) or raw.get("format") != CONCLUSIONS_FORMAT:
        raise ConclusionError(path, f"is not a conclusions file of format {CONCLUSIONS_FORMAT}")
    families = raw.get("families")
    if not isinstance(families, Mapping) or not families:
        raise ConclusionError(path, "needs 'families': {family: {table: published part}}")
    conclusions, seen = [], set()
    for entry in raw.get("conclusions", []):
        cid = entry.get("id")
        if not isinstance(cid, str) or not cid or cid in seen:
            raise ConclusionError(path, f"every conclusion needs a unique id, got {cid!r}")
        seen.add(cid)
        if not isinstance(entry.get("statement"), str) or not isinstance(entry.get("claim"), Mapping):
            raise ConclusionError(path, f"conclusion {cid!r} needs a 'statement' and a 'claim'")
        _check_claim(path, cid, entry["claim"])
        for tables in families.values():
            if entry["claim"]["table"] not in tables:
                raise ConclusionError(
                    path, f"conclusion {cid!r} reads table {entry['claim']['table']!r}, which a family does not name"
                )
        conclusions.append(Conclusion(cid, entry["statement"], dict(entry["claim"])))
    return {name: dict(tables) for name, tables in families.items()}, conclusions


def _row(table: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The table's row of a method (its label is the name, or the name and a parenthesis)."""
    return next((r for r in table["rows"] if r["label"] == name or r["label"].startswith(f"{name} (")), None)


def _measure(tables: Sequence[Mapping[str, Any]], row: str, cell: str, measure: str) -> float | None:
    """A cell's number by ``measure`` (from the first of the part's tables with that row and cell); None where the
    row, the cell or its number is absent."""
    found = (_row(table, row) for table in tables)
    value = next((r["cells"][cell] for r in found if r is not None and cell in r["cells"]), None)
    if value is None:
        return None
    if measure == "mean":
        seeds = value.get("per_seed", [value.get("value")])
        return statistics.fmean(seeds) if all(isinstance(v, (int, float)) for v in seeds) else None
    text = str(value.get("value", ""))
    if measure in ("max_share", "min_number"):
        by_owner = [part.split(":", 1)[1] for part in text.split(";") if ":" in part]
        owners = [_measure_text(part, measure.split("_")[1]) for part in by_owner]
        if not owners or any(v is None for v in owners):
            return None
        return max(owners) if measure == "max_share" else min(owners)
    return _measure_text(text, measure)


def _measure_text(text: str, measure: str) -> float | None:
    """``share`` (k / n of "k of n") or ``number`` (the first number) of a cell's text; None where absent."""
    if measure == "share":
        count = _COUNT.match(text)
        return int(count[1]) / int(count[2]) if count and int(count[2]) > 0 else None
    number = _NUMBER.search(text)
    return float(number[0]) if number else None


def evaluate(conclusion: Conclusion, results: Mapping[str, Any] | None) -> dict[str, Any]:
    """The claim on one family's published results: ``holds`` True/False, or None where it cannot be read."""
    claim = conclusion.claim
    if results is None:
        return {"holds": None, "why": "not published"}
    tables = results["tables"]
    left = _measure(tables, claim["row"], claim["cell"], claim["measure"])
    than = claim["than"]
    right = than if isinstance(than, (int, float)) else _measure(tables, than["row"], than["cell"], claim["measure"])
    if right is not None and isinstance(than, Mapping):
        right += float(than.get("plus", 0.0))
    if left is None or right is None:
        return {"holds": None, "why": "not measured in this table", "report_seed": results["seeds"]["report"]}
    return {
        "holds": bool(OPS[claim["op"]](left, right)),
        "left": left,
        "right": float(right),
        "report_seed": results["seeds"]["report"],
    }


def registered_hashes(
    families: Mapping[str, Mapping[str, str]], conclusions: Sequence[Conclusion], parts: Sequence[str]
) -> dict[str, str]:
    """{id: sha256} of the conclusions that read one of ``parts`` (recorded in the ledger at first publication)."""
    read = {c.id: c for c in conclusions for tables in families.values() if tables[c.claim["table"]] in parts}
    return {cid: c.sha256 for cid, c in sorted(read.items())}


def check_unchanged(recorded: Mapping[str, str], conclusions: Sequence[Conclusion], path: Path) -> None:
    """Refuse (:class:`ConclusionError`) when a conclusion the ledger recorded has changed or gone."""
    current = {c.id: c.sha256 for c in conclusions}
    for cid, sha256 in recorded.items():
        if current.get(cid) != sha256:
            what = "was removed" if cid not in current else "changed"
            raise ConclusionError(
                path,
                f"conclusion {cid!r} {what} after the results it reads were published: a claim cannot move once its "
                "numbers are known; keep it and register a new id instead",
            )


def _registration(conclusion: Conclusion, part: str, ledger: Sequence[Mapping[str, Any]], seed: int, path: Path) -> str:
    """ "before" when the ledger's first publication of ``part`` on ``seed`` recorded this very claim, "after" when it
    did not record it; a :class:`ConclusionError` when it recorded another claim under this id."""
    for entry in ledger:
        if entry["report_seed"] == seed and part in entry.get("parts", []):
            recorded = entry.get("conclusions", {}).get(conclusion.id)
            if recorded is None:
                return "after"
            if recorded != conclusion.sha256:
                raise ConclusionError(
                    path,
                    f"conclusion {conclusion.id!r} changed after the results it reads ({part}, report seed {seed}) "
                    "were published: a claim cannot move once its numbers are known; register a new id instead",
                )
            return "before"
    return "after"


def _phrase(per_family: Mapping[str, Mapping[str, Any]]) -> str:
    """The verdict over families: holds on both / on one only / on neither, or what is still missing."""
    missing = [f"{family}: {outcome['why']}" for family, outcome in per_family.items() if outcome["holds"] is None]
    holds = [family for family, outcome in per_family.items() if outcome["holds"] is True]
    if missing:
        decided = f"holds on {', '.join(holds)}; " if holds else ""
        return f"{decided}not yet decided ({'; '.join(missing)})"
    if len(holds) == len(per_family):
        return "holds on both" if len(per_family) == 2 else "holds on all"
    return f"holds on {', '.join(holds)} only" if holds else "holds on neither"


def render_conclusions(
    families: Mapping[str, Mapping[str, str]],
    conclusions: Sequence[Conclusion],
    published: Mapping[str, Mapping[str, Any]],
    ledger: Sequence[Mapping[str, Any]],
    path: Path,
) -> list[str]:
    """The page's section: one row per conclusion with each family's measured numbers and the verdict."""
    names = list(families)
    lines = [
        "## Conclusions on each phantom family",
        "",
        f"Registered in `{path.as_posix()}` before the tables they read; each is a claim on one published cell, "
        "decided on each family's table. *after*: registered after those results were published (a legacy table, "
        "or a conclusion added later), so read it as exploratory.",
        "",
        "| conclusion | claim | " + " | ".join(names) + " | verdict |",
        "|---" * (len(names) + 3) + "|",
    ]
    for conclusion in conclusions:
        claim, per_family, cells = conclusion.claim, {}, []
        for family in names:
            part = families[family][claim["table"]]
            outcome = evaluate(conclusion, published.get(part))
            per_family[family] = outcome
            if outcome["holds"] is None:
                cells.append(outcome["why"])
                continue
            when = _registration(conclusion, part, ledger, outcome["report_seed"], path)
            mark = "yes" if outcome["holds"] else "no"
            cells.append(
                f"{mark}: {outcome['left']:.3g} {claim['op']} {outcome['right']:.3g} "
                f"(seed {outcome['report_seed']}, {when})"
            )
        than = claim["than"]
        right = f"{than:g}" if isinstance(than, (int, float)) else f"{than['row']}'s {than['cell']}"
        if isinstance(than, Mapping) and than.get("plus"):
            right += f" {float(than['plus']):+g}"
        measure = MEASURE_WORDS.get(claim["measure"], claim["measure"])
        text = f"{measure} of {claim['row']}'s {claim['cell']} ({claim['table']}) {claim['op']} {right}"
        lines.append(f"| {conclusion.statement} | {text} | " + " | ".join(cells) + f" | {_phrase(per_family)} |")
    return [*lines, ""]
