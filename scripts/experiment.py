"""Run a declared experiment (configs/experiments/NAME.json) as monai.bundle runs, resumably, and report it.

`python scripts/experiment.py run demo` is `make demo`. Every stage prints a progress line and is skipped when its
output exists, so a rerun resumes. `--publish` also writes docs/experiments/NAME/results.json and regenerates
docs/experiments.md (refused when the run's data seed is the development seed: tables come from fresh data).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.data.phantoms import FAMILIES  # noqa: E402
from xmark_bundle.experiments import (  # noqa: E402
    Experiment,
    ExperimentError,
    load_experiment,
    plain_words,
    run_experiment,
    tables,
)
from xmark_bundle.experiments.figures import FIGURES  # noqa: E402
from xmark_bundle.experiments.results import RESULTS_FORMAT, load_results  # noqa: E402
from xmark_bundle.experiments.stages import StageFailed  # noqa: E402
from xmark_bundle.fileio import write_json  # noqa: E402


def _commit() -> str:
    """The checked-out commit, marked ``-dirty`` when the working tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def _print_summary(collected: dict, out: Path) -> None:
    for table in tables(collected):
        print(f"\n  {table['title']}")
        for row in table["rows"]:
            cells = []
            for column in table["columns"]:
                cell = row["cells"].get(column)
                if cell is None:
                    continue
                values = cell.get("per_seed", [cell.get("value")])
                shown = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values)
                cells.append(f"{column} {shown}")
            print(f"    {row['label']}: " + "; ".join(cells))
    print()
    for line in plain_words(collected):
        print(f"  {line}")
    figures = ", ".join(str(out / name) for name in FIGURES if (out / name).is_file())
    print(f"\n  every number: {out / 'collected.json'}; figures: {figures}; reports under {out / 'verification'}")


#: Kinds of stage, by a word of the stage's name, for the wall-time breakdown (first match wins).
STAGE_KINDS = (
    "verification",
    "evaluation",
    "detectability",
    "pruning",
    "classifier",
    "watermark",
    "release",
    "phantoms",
)


def wall_times(stage_times: dict[str, float]) -> dict[str, float]:
    """Seconds per kind of stage (classifiers, evaluations, verifications, ...) and in all, on this machine."""
    kinds: dict[str, float] = {}
    for name, seconds in stage_times.items():
        kind = next((k for k in STAGE_KINDS if k in name), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    return {**{k: round(v, 1) for k, v in sorted(kinds.items())}, "all stages": round(sum(stage_times.values()), 1)}


def _figures(published: list[dict], out: Path) -> list[str]:
    """The run's figures that show one of the ``published`` tables (by the start of its title)."""
    titles = [table["title"] for table in published]
    return [
        name
        for name, (_, table) in FIGURES.items()
        if (out / name).is_file() and any(title.startswith(table) for title in titles)
    ]


def publish(experiment: Experiment, collected: dict, out: Path, argv: list[str]) -> None:
    """Write docs/experiments/<name>/results.json for each published part of the experiment, then the page."""
    all_tables = tables(collected)
    parts = experiment.publish or {experiment.name: tuple(range(len(all_tables)))}
    # once for all parts, the commit before the first part is written: every part names the tree it was published from
    commit, wall_time_s = _commit(), wall_times(collected["stage_times_s"])
    for name, indexes in parts.items():
        folder = ROOT / "docs" / "experiments" / name
        part = [all_tables[i] for i in indexes]
        results = {
            "format": RESULTS_FORMAT,
            "name": name,
            "title": f"{experiment.title}: {', '.join(table['title'].split(':')[0] for table in part)}",
            "description": experiment.description,
            "commands": [shlex.join(["python", "scripts/experiment.py", *argv])],
            "commit": commit,
            "seeds": {
                "development": int(experiment.seeds["development"]),
                "report": experiment.data_seed,
                "suspects": list(experiment.seeds["suspects"]),
            },
            "wall_time_s": wall_time_s,
            "tables": part,
            "figures": _figures(part, out),
            "reading": "(not yet written: the tables are new)",
        }
        for figure in results["figures"]:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / figure, folder / figure)
        write_json(folder / "results.json", results)
        load_results(folder / "results.json")
    subprocess.run([sys.executable, "scripts/experiments_page.py"], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) an experiment")
    run.add_argument("name", help="the experiment: configs/experiments/NAME.json")
    run.add_argument("--out", type=Path, help="output folder (default outputs/experiments/NAME)")
    run.add_argument("--method", action="append", help="run only this declared method (repeatable)")
    run.add_argument("--publish", action="store_true", help="write docs/experiments/NAME/results.json and the page")
    run.add_argument("--family", choices=FAMILIES, help="phantom family instead of the declared one (not published)")
    args = parser.parse_args(argv)

    try:
        experiment = load_experiment(ROOT / "configs" / "experiments" / f"{args.name}.json")
        experiment = experiment.only(args.method)
    except ExperimentError as err:
        print(f"experiment: {err}", file=sys.stderr)
        return 2
    if args.family:
        if args.publish:
            print("experiment: --family is for trying a run; declare phantoms.family to publish", file=sys.stderr)
            return 2
        experiment = dataclasses.replace(experiment, phantoms={**experiment.phantoms, "family": args.family})
    if args.publish and experiment.data_seed == int(experiment.seeds["development"]):
        print(f"experiment: {args.name} runs on the development seed; its tables cannot be published", file=sys.stderr)
        return 2
    family = experiment.phantoms.get("family", "classic")
    default_out = Path("outputs") / "experiments" / (args.name if family == "classic" else f"{args.name}_{family}")
    out = (args.out or default_out).resolve()
    start = time.perf_counter()
    try:
        collected = run_experiment(experiment, ROOT, out)
    except StageFailed as err:
        print(f"[{args.name}] {err}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - start) / 60
    print(f"\n[{args.name}] finished in {minutes:.1f} min (stages already done were skipped)")
    _print_summary(collected, out)
    if args.publish:
        publish(experiment, collected, out, argv or sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
