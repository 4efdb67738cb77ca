"""The ledger of report seeds (``docs/experiments/ledger.json``): a report seed is spent once per declaration.

Each publication records the report seed, the declaration's name, the SHA-256 of its canonical JSON (keys sorted,
no whitespace; ``title`` and ``description`` left out, they are prose and do not change what runs) and the commit.
Publishing the same declaration unchanged on its seed again is allowed (the commit is added); publishing it changed
on a seed it was already published on is refused: a change needs a new report seed (DESIGN.md §5). The seeds of the
ledger and the report seeds of current declarations are reserved: tests and development never use them
(tests/test_experiment_protocol.py scans for them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xmark_bundle.fileio import write_json

__all__ = ["LEDGER_FORMAT", "LedgerError", "check_publication", "declaration_sha256", "read_ledger", "record"]

LEDGER_FORMAT = 1
#: Keys of a declaration that are prose: a change to them does not change what runs.
PROSE_KEYS = ("title", "description")


class LedgerError(ValueError):
    """A publication the ledger refuses, or a ledger that cannot be read; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")


def declaration_sha256(raw: Mapping[str, Any]) -> str:
    """SHA-256 of a declaration's canonical JSON (sorted keys, no whitespace, prose keys left out)."""
    canonical = json.dumps({k: v for k, v in raw.items() if k not in PROSE_KEYS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def read_ledger(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ledger's entries (none yet: an empty list); a clear error for a file that is not a ledger."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LedgerError(path, f"cannot be read as JSON ({err})") from err
    if (
        not isinstance(ledger, Mapping)
        or ledger.get("format") != LEDGER_FORMAT
        or not isinstance(ledger.get("published"), list)
    ):
        raise LedgerError(path, f"is not a ledger of format {LEDGER_FORMAT} (a 'published' list)")
    for entry in ledger["published"]:
        missing = {"report_seed", "declaration", "sha256", "commits"} - set(entry)
        if missing:
            raise LedgerError(path, f"an entry lacks {sorted(missing)}: {entry}")
    return list(ledger["published"])


def check_publication(path: str | os.PathLike, seed: int, name: str, sha256: str) -> dict[str, Any] | None:
    """The ledger's entry of ``name`` on ``seed`` when it holds this very declaration (a republication), None when
    the pair is new; a :class:`LedgerError` when ``name`` was published on ``seed`` with another declaration."""
    for entry in read_ledger(path):
        if entry["report_seed"] == seed and entry["declaration"] == name:
            if entry["sha256"] != sha256:
                raise LedgerError(
                    path,
                    f"declaration {name!r} was published on report seed {seed} as {entry['sha256'][:12]} (commit "
                    f"{entry['commits'][0]}) and has changed since ({sha256[:12]}): a change needs a new report seed",
                )
            return entry
    return None


def record(
    path: str | os.PathLike,
    seed: int,
    name: str,
    sha256: str,
    commit: str,
    parts: Sequence[str],
    conclusions: Mapping[str, str] | None = None,
) -> None:
    """Record a publication (after :func:`check_publication` allowed it), written atomically. ``conclusions``: {id:
    hash} of the registered conclusions that read its parts, kept from the first publication only (a conclusion added
    before a republication was still registered after the results)."""
    check_publication(path, seed, name, sha256)
    entries = read_ledger(path)
    entry = next((e for e in entries if e["report_seed"] == seed and e["declaration"] == name), None)
    if entry is None:
        entries.append({"report_seed": seed, "declaration": name, "sha256": sha256, "commits": [commit]})
        entry = entries[-1]
        if conclusions:
            entry["conclusions"] = dict(conclusions)
    elif commit not in entry["commits"]:
        entry["commits"].append(commit)
    entry["parts"] = sorted(set(entry.get("parts", [])) | set(parts))
    write_json(path, {"format": LEDGER_FORMAT, "published": entries}, indent=4)  # the zoo's pretty-format-json
