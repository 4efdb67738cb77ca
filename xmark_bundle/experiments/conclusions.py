"""Conclusions registered before the tables they read (``configs/experiments/conclusions.json``), checked on each
phantom family: holds on both, on one, on neither.

A conclusion is a plain statement and one claim on a published table cell: ``{"table": "table2", "row": "xmark",
"cell": "Malicious verified (calibrated)", "measure": "share", "op": ">=", "than": 0.5}``; ``than`` is a number or
another cell ``{"row": ..., "cell": ..., "plus": ...}`` of the same table (``plus``, default 0, added to it). An
optional ``"families": [...]`` limits a claim to the families that publish its table (removal, pruning and the
ablation run on the classic family only). Measures: ``share`` (k / n of a "k of n" cell), ``mean`` (of a cell's
per-seed values) and ``number`` (the first number of a cell's text, e.g. a KS p "0.42 (66)"); for a by-owner cell
("201: 0 of 22; 202: 4 of 22"), ``max_share`` (the largest owner's k / n) and ``min_number`` (the smallest owner's
first number, e.g. of "201: 0.28 (22); ..."): a claim on every owner at once.

A claim must not move once its numbers are known. When a declaration is first published, the ledger records the
hash of every conclusion that reads one of its parts (:func:`registered_hashes`); the page then marks each verdict
*registered before the results*, or *registered after them* (a conclusion added later, or reading a legacy table),
and refuses a conclusion whose claim changed after the results it reads were published: that needs a new id.

A choice (``choices`` in the same file) is a rule registered the same way that picks a method for a data owner: the
candidates that meet every requirement (a claim on the candidate's own row) on every family, ranked by the smallest
of their families' scores (a measure of one cell); the page shows each candidate on each family and the pick.
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
    "Choice",
    "ConclusionError",
    "check_unchanged",
    "evaluate",
    "evaluate_choice",
    "load_choices",
    "load_conclusions",
    "pick",
    "registered_hashes",
    "render_choices",
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


def _registered_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 of ``fields`` as canonical JSON (sorted keys): the ledger's record of a registered claim or rule."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Conclusion:
    """One registered statement and the claim that decides it on a family's published table."""

    id: str
    statement: str
    claim: Mapping[str, Any]

    @property
    def sha256(self) -> str:
        """Hash of the statement and the claim: what may not change once the results it reads are published."""
        return _registered_hash({"statement": self.statement, "claim": self.claim})

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables (a family's names for them) the claim reads."""
        return (self.claim["table"],)

    def reads(self, family: str) -> bool:
        """Whether the claim is decided on ``family`` (every family, unless the claim names its ``families``)."""
        return family in self.claim.get("families", (family,))


@dataclass(frozen=True)
class Choice:
    """A registered rule that picks a method: ``candidates`` (rows), ``requirements`` (claims without a row, each
    read on the candidate's row), ``rank_by`` (``table``, ``cell``, ``measure``: higher is better)."""

    id: str
    statement: str
    rule: Mapping[str, Any]

    @property
    def sha256(self) -> str:
        """Hash of the statement and the rule: what may not change once the results it reads are published."""
        return _registered_hash({"statement": self.statement, "rule": self.rule})

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables (a family's names for them) the rule reads."""
        names = [r["table"] for r in self.rule["requirements"]] + [self.rule["rank_by"]["table"]]
        return tuple(dict.fromkeys(names))


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
    limited = claim.get("families", [""])
    if not isinstance(limited, list) or not limited or not all(isinstance(f, str) for f in limited):
        raise ConclusionError(path, f"conclusion {cid!r}: 'families' must be a non-empty list of family names")


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
        conclusion = Conclusion(cid, entry["statement"], dict(entry["claim"]))
        unknown = sorted(set(conclusion.claim.get("families", [])) - set(families))
        if unknown:
            raise ConclusionError(path, f"conclusion {cid!r} names families {unknown}, which the file does not declare")
        for family, tables in families.items():
            if conclusion.reads(family) and conclusion.claim["table"] not in tables:
                raise ConclusionError(
                    path, f"conclusion {cid!r} reads table {entry['claim']['table']!r}, which {family} does not name"
                )
        conclusions.append(conclusion)
    return {name: dict(tables) for name, tables in families.items()}, conclusions


def load_choices(path: str | os.PathLike) -> list[Choice]:
    """The choices of a conclusions file (none where it declares none); every table they read must be a family's."""
    path = Path(path)
    families, conclusions = load_conclusions(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    choices, seen = [], {c.id for c in conclusions}
    for entry in raw.get("choices", []):
        cid, rule = entry.get("id"), entry.get("rule")
        if not isinstance(cid, str) or not cid or cid in seen:
            raise ConclusionError(path, f"every choice needs an id unique among conclusions and choices, got {cid!r}")
        seen.add(cid)
        if not isinstance(entry.get("statement"), str) or not isinstance(rule, Mapping):
            raise ConclusionError(path, f"choice {cid!r} needs a 'statement' and a 'rule'")
        candidates, requirements, rank_by = rule.get("candidates"), rule.get("requirements"), rule.get("rank_by")
        if not isinstance(candidates, list) or len(candidates) < 2 or not isinstance(requirements, list):
            raise ConclusionError(path, f"choice {cid!r} needs >= 2 'candidates' and a list of 'requirements'")
        if not isinstance(rank_by, Mapping) or {"table", "cell", "measure"} - set(rank_by):
            raise ConclusionError(path, f"choice {cid!r} needs 'rank_by': {{table, cell, measure}}")
        if not isinstance(rule.get("registered", ""), str):
            raise ConclusionError(path, f"choice {cid!r}: 'registered' must be a text")
        if rank_by["measure"] not in MEASURES:
            raise ConclusionError(path, f"choice {cid!r}: rank_by's measure must be one of {MEASURES}")
        for requirement in requirements:
            _check_claim(path, cid, {"row": None, **requirement})
            if not isinstance(requirement["than"], (int, float)):
                raise ConclusionError(path, f"choice {cid!r}: a requirement's 'than' must be a number")
        choice = Choice(cid, entry["statement"], dict(rule))
        for tables in families.values():
            unknown = [table for table in choice.tables if table not in tables]
            if unknown:
                raise ConclusionError(path, f"choice {cid!r} reads {unknown}, which a family does not name")
        choices.append(choice)
    return choices


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


def evaluate_choice(
    choice: Choice, family_tables: Mapping[str, str], published: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each candidate on one family: ``score`` (the rank_by measure), ``failed`` (the requirements it misses, in
    words) and ``missing`` (what could not be read: an unpublished part, a cell the table lacks)."""
    outcomes = {}
    for candidate in choice.rule["candidates"]:
        failed, missing = [], []
        for requirement in choice.rule["requirements"]:
            results = published.get(family_tables[requirement["table"]])
            if results is None:
                missing.append(f"{family_tables[requirement['table']]} not published")
                continue
            value = _measure(results["tables"], candidate, requirement["cell"], requirement["measure"])
            if value is None:
                missing.append(f"no '{requirement['cell']}' cell")
            elif not OPS[requirement["op"]](value, requirement["than"]):
                failed.append(f"{requirement['cell']} {value:.3g} not {requirement['op']} {requirement['than']:g}")
        rank_by = choice.rule["rank_by"]
        results = published.get(family_tables[rank_by["table"]])
        score = None if results is None else _measure(results["tables"], candidate, rank_by["cell"], rank_by["measure"])
        if results is None:
            missing.append(f"{family_tables[rank_by['table']]} not published")
        elif score is None:
            missing.append(f"no '{rank_by['cell']}' cell")
        outcomes[candidate] = {"score": score, "failed": failed, "missing": list(dict.fromkeys(missing))}
    return outcomes


def pick(per_family: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[list[str], float | None, list[str]]:
    """The candidates with the highest smallest-over-families score among those that meet every requirement on
    every family (ties: all of them), that score, and what is still missing (then nothing is picked)."""
    missing = sorted({f"{family}: {m}" for family, o in per_family.items() for c in o.values() for m in c["missing"]})
    if missing:
        return [], None, missing
    candidates = next(iter(per_family.values())).keys()
    eligible = {
        c: min(o[c]["score"] for o in per_family.values())
        for c in candidates
        if not any(o[c]["failed"] for o in per_family.values())
    }
    if not eligible:
        return [], None, []
    best = max(eligible.values())
    return [c for c, score in eligible.items() if score == best], best, []


def registered_hashes(
    families: Mapping[str, Mapping[str, str]], conclusions: Sequence[Conclusion | Choice], parts: Sequence[str]
) -> dict[str, str]:
    """{id: sha256} of the conclusions and choices that read one of ``parts`` (recorded in the ledger at first
    publication)."""
    read = {
        c.id: c
        for c in conclusions
        for family, tables in families.items()
        if (not isinstance(c, Conclusion) or c.reads(family)) and any(tables[t] in parts for t in c.tables)
    }
    return {cid: c.sha256 for cid, c in sorted(read.items())}


def check_unchanged(recorded: Mapping[str, str], conclusions: Sequence[Conclusion | Choice], path: Path) -> None:
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


def _registration(
    conclusion: Conclusion | Choice, part: str, ledger: Sequence[Mapping[str, Any]], seed: int, path: Path
) -> str:
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
    if len(per_family) == 1:
        (family,) = per_family
        return f"holds on {family} (the only family it reads)" if holds else f"does not hold on {family}"
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
            if not conclusion.reads(family):
                cells.append("not run on this family")
                continue
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


def render_choices(
    families: Mapping[str, Mapping[str, str]],
    choices: Sequence[Choice],
    published: Mapping[str, Mapping[str, Any]],
    ledger: Sequence[Mapping[str, Any]],
    path: Path,
) -> list[str]:
    """The page's section per choice: the rule in words, each candidate on each family, and the pick."""
    names, lines = list(families), []
    for choice in choices:
        rule, per_family = choice.rule, {}
        for family in names:
            per_family[family] = evaluate_choice(choice, families[family], published)
        rank_by = rule["rank_by"]
        needs = "; ".join(
            f"{MEASURE_WORDS.get(r['measure'], r['measure'])} of {r['cell']} ({r['table']}) {r['op']} {r['than']:g}"
            for r in rule["requirements"]
        )
        lines += [
            f"### {choice.statement}",
            "",
            f"Rule `{choice.id}` (registered in `{path.as_posix()}`): among {', '.join(rule['candidates'])}, those "
            f"that meet, on every family, {needs or 'no requirement'}; ranked by the smaller of their families' "
            f"{MEASURE_WORDS.get(rank_by['measure'], rank_by['measure'])} of {rank_by['cell']} ({rank_by['table']}).",
            "",
            *([f"Registered: {rule['registered']}", ""] if rule.get("registered") else []),
            "| candidate | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for candidate in rule["candidates"]:
            cells = []
            for family in names:
                outcome = per_family[family][candidate]
                if outcome["missing"]:
                    cells.append("not decided: " + "; ".join(outcome["missing"]))
                    continue
                verdict = "fails: " + "; ".join(outcome["failed"]) if outcome["failed"] else "meets every requirement"
                cells.append(f"{outcome['score']:.3g} ({verdict})")
            lines.append(f"| {candidate} | " + " | ".join(cells) + " |")
        picked, score, missing = pick(per_family)
        if missing:
            outcome = f"not yet decided ({'; '.join(missing[:3])}{'; ...' if len(missing) > 3 else ''})"
        elif not picked:
            outcome = "no candidate meets every requirement on every family"
        else:
            part = families[names[0]][rank_by["table"]]
            seed = published[part]["seeds"]["report"]
            when = _registration(choice, part, ledger, seed, path)
            outcome = f"**{', '.join(picked)}** (smallest family score {score:.3g}; registered {when} the results)"
        lines += ["", f"Pick: {outcome}.", ""]
    return lines
