"""Write docs/experiments.md from docs/experiments/<name>/results.json, or check (--check) that it is up to date.

Both also check that every figure the README and the model cards quote in a paragraph naming a published experiment
is one of that experiment's published numbers (xmark_bundle/experiments/citations.py), and exit 1 naming any that
is not.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.experiments import ResultsError, read_all_results, render_page  # noqa: E402
from xmark_bundle.experiments.citations import published_numbers, uncited_figures  # noqa: E402
from xmark_bundle.experiments.conclusions import (  # noqa: E402
    ConclusionError,
    load_choices,
    load_conclusions,
    render_choices,
    render_conclusions,
)
from xmark_bundle.experiments.ledger import LedgerError, read_ledger  # noqa: E402
from xmark_bundle.fileio import atomic_path  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: the prose that quotes published experiments, relative to the docs folder's parent (the bundle root)
CITING_DOCS = ("README.md", "docs/README.md", "stealthmark/docs/README.md")


def uncited(root: Path, all_results: list[dict]) -> list[str]:
    """'FILE: problem' for each figure in CITING_DOCS that the experiments its paragraph names do not publish."""
    published = {results["name"]: published_numbers(results) for results in all_results}
    return [
        f"{name}: {problem}"
        for name in CITING_DOCS
        if (root / name).is_file()
        for problem in uncited_figures((root / name).read_text(encoding="utf-8"), published)
    ]


def conclusions_section(docs: Path, all_results: list[dict]) -> list[str]:
    """The registered conclusions (docs/experiments/conclusions.json) decided on each family, or nothing."""
    path = docs / "experiments" / "conclusions.json"
    if not path.is_file():
        return []
    families, conclusions = load_conclusions(path)
    published = {results["name"]: results for results in all_results}
    ledger = read_ledger(docs / "experiments" / "ledger.json")
    where = path.relative_to(docs.parent)
    lines = render_conclusions(families, conclusions, published, ledger, where)
    return lines + render_choices(families, load_choices(path), published, ledger, where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the page and the JSON files disagree")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the docs folder (default: the bundle's)")
    args = parser.parse_args(argv)
    try:
        all_results = read_all_results(args.docs / "experiments")
        page = render_page(all_results, conclusions_section(args.docs, all_results))
    except (ResultsError, ConclusionError, LedgerError) as err:
        print(f"experiments page: {err}", file=sys.stderr)
        return 1
    target = args.docs / "experiments.md"
    problems = uncited(args.docs.parent, all_results)
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.check:
        current = target.read_text(encoding="utf-8") if target.is_file() else None
        if current != page:
            print(
                f"{target} does not match docs/experiments/*/results.json "
                f"({'missing' if current is None else 'differs'}); regenerate it: python scripts/experiments_page.py",
                file=sys.stderr,
            )
            return 1
        print(f"{target}: up to date")
        return 1 if problems else 0
    with atomic_path(target) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"wrote {target}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
