"""Run a declared experiment (configs/experiments/NAME.json) as monai.bundle runs, resumably, and report it.

`python scripts/experiment.py run demo` is `make demo`. Every stage prints a progress line and is skipped when its
output exists, so a rerun resumes. `python scripts/experiment.py plan NAME` checks the declaration and prints its seeds
by role and every stage with its command, running none. `--publish` also writes docs/experiments/NAME/results.json,
records the report seed in docs/experiments/ledger.json and regenerates docs/experiments.md; it is refused when the
run's data seed is the development seed (tables come from fresh data), for a legacy declaration (published before the
seed-role protocol: its results stay as published) and for a declaration changed since it was published on its report
seed (a change needs a new report seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from xmark_bundle.experiments.compaction import compact_releases  # noqa: E402
from xmark_bundle.experiments.conclusions import (  # noqa: E402
    ConclusionError,
    check_unchanged,
    load_choices,
    load_conclusions,
    registered_hashes,
)
from xmark_bundle.experiments.figures import FIGURES  # noqa: E402
from xmark_bundle.experiments.ledger import (  # noqa: E402
    LedgerError,
    check_publication,
    declaration_sha256,
    read_ledger,
    record,
)
from xmark_bundle.experiments.protocol import published_parts  # noqa: E402
from xmark_bundle.experiments.results import RESULTS_FORMAT, ResultsError, load_results, write_results  # noqa: E402
from xmark_bundle.experiments.segmentation import SegmentationExperiment  # noqa: E402
from xmark_bundle.experiments.segmentation import seed_record as segmentation_seed_record  # noqa: E402
from xmark_bundle.experiments.stages import MIN_FREE_GB, StageFailed, tree_commit  # noqa: E402


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


#: Kinds of stage, by a word of the stage's name, for the wall-time breakdown (first match wins): a fine-tuning
#: (of a classifier or a segmenter) is its own kind, much shorter than a training.
STAGE_KINDS = (
    "verification",
    "evaluation",
    "detectability",
    "pruning",
    "fine-tuned",
    "classifier",
    "watermark",
    "release",
    "phantoms",
    "segmenter",
)


def stage_kind(name: str) -> str:
    """The kind of a stage (:data:`STAGE_KINDS`) from its name; "other" when no kind's word is in it."""
    return next((k for k in STAGE_KINDS if k in name), "other")


def wall_times(stage_times: dict[str, float]) -> dict[str, float]:
    """Seconds per kind of stage (classifiers, evaluations, verifications, ...) and in all, on this machine."""
    kinds: dict[str, float] = {}
    for name, seconds in stage_times.items():
        kind = stage_kind(name)
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


#: The ledger of published report seeds.
LEDGER = ROOT / "docs" / "experiments" / "ledger.json"


def declaration_hash(experiment: Experiment) -> str:
    """The SHA-256 of the declaration file's canonical JSON (:func:`declaration_sha256`)."""
    return declaration_sha256(json.loads(experiment.source.read_text(encoding="utf-8")))


def publication_refused(experiment: Experiment, ledger: Path = LEDGER) -> str | None:
    """Why ``experiment`` cannot be published (None: it can): development seed, legacy, or changed on its seed."""
    if experiment.data_seed == int(experiment.seeds["development"]):
        return f"{experiment.name} runs on the development seed; its tables cannot be published"
    if experiment.legacy:
        return (
            f"{experiment.name} is a legacy declaration (published before the seed-role protocol): its published "
            "results stay as they are; publish a declaration under the current protocol on a new report seed"
        )
    try:
        check_publication(ledger, experiment.data_seed, experiment.name, declaration_hash(experiment))
    except LedgerError as err:
        return str(err)
    return None


def seed_record(experiment: Experiment) -> dict:
    """The seeds a results.json records: the report and development seeds, the suspects, and every role (a
    segmentation experiment: its own roles)."""
    if isinstance(experiment, SegmentationExperiment):
        return segmentation_seed_record(experiment)
    roles = experiment.seed_roles
    seeds = {"development": roles.development, "report": roles.data, "suspects": list(roles.suspects)}
    if experiment.legacy:
        return seeds
    return seeds | {
        "surrogate": roles.surrogate,
        "owners": list(roles.owners),
        "independent_owners": list(roles.independent_owners),
        "independent_phantoms": roles.independent_phantoms,
        "benign": list(roles.benign),
    }


#: a new part's reading until someone writes it
NO_READING = "(not yet written: the tables are new)"


def _kept_reading(path: Path, tables: list[dict]) -> str:
    """The reading of the part already published at ``path`` when its tables are ``tables`` (a publication again
    that changes no number, e.g. for a new figure, keeps what was written about them); else :data:`NO_READING`."""
    try:
        published = load_results(path)
    except (OSError, ResultsError):
        return NO_READING
    return published["reading"] if published["tables"] == tables else NO_READING


def publish(experiment: Experiment, collected: dict, out: Path, argv: list[str], docs: Path = ROOT / "docs") -> int:
    """Write ``docs``/experiments/<name>/results.json for each published part of the experiment, record the report
    seed in its ledger, then the page; nothing is written when the publication is refused. Returns the page
    script's exit status: 1 when the README or a model card quotes a figure the published results do not hold."""
    ledger = docs / "experiments" / LEDGER.name
    refused = publication_refused(experiment, ledger)
    if refused:
        raise LedgerError(experiment.source, refused)
    registered = docs / "experiments" / "conclusions.json"
    families, claims = {}, []
    if registered.is_file():  # a broken or moved registration stops the publication before anything is written
        families, conclusions = load_conclusions(registered)
        claims = [*conclusions, *load_choices(registered)]
        for entry in read_ledger(ledger):
            check_unchanged(entry.get("conclusions", {}), claims, registered)
    all_tables = tables(collected)
    parts = experiment.publish or {experiment.name: tuple(range(len(all_tables)))}
    # once for all parts, the commit before the first part is written: every part names the tree it was published from
    commit, wall_time_s = tree_commit(ROOT), wall_times(collected["stage_times_s"])
    for name, indexes in parts.items():
        folder = docs / "experiments" / name
        part = [all_tables[i] for i in indexes]
        results = {
            "format": RESULTS_FORMAT,
            "name": name,
            "title": f"{experiment.title}: {', '.join(table['title'].split(':')[0] for table in part)}",
            "description": experiment.description,
            "commands": [shlex.join(["python", "scripts/experiment.py", *argv])],
            "commit": commit,
            "seeds": seed_record(experiment),
            "wall_time_s": wall_time_s,
            "stage_commits": collected.get("stage_commits", {}),
            "tables": part,
            "figures": _figures(part, out),
            "reading": _kept_reading(folder / "results.json", part),
        }
        for figure in results["figures"]:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / figure, folder / figure)
        write_results(folder / "results.json", results)
        load_results(folder / "results.json")
    sha256 = declaration_hash(experiment)
    names = published_parts(experiment.name, parts)
    hashes = registered_hashes(families, claims, names)
    record(ledger, experiment.data_seed, experiment.name, sha256, commit, names, hashes)
    return subprocess.run([sys.executable, "scripts/experiments_page.py", "--docs", str(docs)], cwd=ROOT).returncode


def print_compaction(experiment: Experiment, out: Path, with_detectability: bool, dry_run: bool) -> None:
    """Hard-link the unmarked files of the finished releases under ``out`` to their sources, a line per release."""
    rows = compact_releases(out, experiment.seed_roles.owners[0], with_detectability, dry_run)
    for row in rows:
        done = (
            f"skipped: {row['skipped']}"
            if "skipped" in row
            else f"{row['linked']} files, {row['freed'] / 2**30:.2f} GiB"
        )
        print(f"[{experiment.name}] {row['release']}: {done}")
    freed = sum(row.get("freed", 0) for row in rows) / 2**30
    print(
        f"[{experiment.name}] {'would free' if dry_run else 'freed'} {freed:.2f} GiB under {out} ({len(rows)} releases)"
    )


def print_plan(experiment: Experiment, out: Path) -> None:
    """The declaration's seeds by role and every stage a run would still run (a dry run of the runner)."""
    roles = experiment.seed_roles
    print(f"[{experiment.name}] protocol {'legacy' if experiment.legacy else 'current'}; seeds by role:")
    for role, seeds in {"data": (roles.data,), "development": (roles.development,), **roles.by_role()}.items():
        print(f"  {role}: {', '.join(map(str, seeds))}")
    if roles.independent_phantoms is not None:
        print(f"  independent_phantoms: {roles.independent_phantoms} (the last independent owner's phantom set)")
    planned = run_experiment(experiment, ROOT, out, dry_run=True)["planned_stages"]
    kinds: dict[str, int] = {}
    for name, _ in planned:
        kind = stage_kind(name)
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
    print(f"\n[{experiment.name}] {len(planned)} stages to run under {out} ({counts}); nothing was run")
    estimate = remaining_time(kinds, out / "stage_times.json")
    if estimate:
        print(f"[{experiment.name}] {estimate}")


def remaining_time(kinds: dict[str, int], times_file: Path) -> str | None:
    """An estimate of the stages still to run ({kind: count}) from the mean time of each kind already recorded in
    ``times_file`` (this folder, this machine); None when nothing is recorded yet."""
    if not times_file.is_file():
        return None
    by_kind: dict[str, list[float]] = {}
    for name, seconds in json.loads(times_file.read_text(encoding="utf-8")).items():
        by_kind.setdefault(stage_kind(name), []).append(float(seconds))
    known = {kind: sum(v) / len(v) for kind, v in by_kind.items()}
    seconds = sum(n * known[kind] for kind, n in kinds.items() if kind in known)
    unknown = sorted(kind for kind in kinds if kind not in known)
    text = f"about {seconds / 3600:.1f} h left at the mean recorded time of each kind of stage in {times_file.parent}"
    return text + (f", plus {', '.join(unknown)} (none recorded yet)" if unknown else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or resume) an experiment")
    run.add_argument("name", help="the experiment: configs/experiments/NAME.json")
    run.add_argument("--out", type=Path, help="output folder (default outputs/experiments/NAME)")
    run.add_argument("--method", action="append", help="run only this declared method (repeatable)")
    run.add_argument("--publish", action="store_true", help="write docs/experiments/NAME/results.json and the page")
    plan = commands.add_parser("plan", help="check a declaration and list its seeds and stages (a dry run)")
    plan.add_argument("name", help="the experiment: configs/experiments/NAME.json")
    plan.add_argument("--out", type=Path, help="output folder (default outputs/experiments/NAME)")
    plan.add_argument("--method", action="append", help="only this declared method (repeatable)")
    run.add_argument("--family", choices=FAMILIES, help="phantom family instead of the declared one (not published)")
    compact = commands.add_parser(
        "compact", help="hard-link unmarked release files to their sources: frees disk, changes no byte or number"
    )
    compact.add_argument("name", help="the experiment: configs/experiments/NAME.json")
    compact.add_argument("--out", type=Path, help="output folder (default outputs/experiments/NAME)")
    compact.add_argument("--method", action="append", help=argparse.SUPPRESS)
    compact.add_argument("--dry-run", action="store_true", help="count what would be linked, change nothing")
    compact.add_argument(
        "--without-detectability",
        action="store_true",
        help="also link the first owner's releases before their detectability.json exists (only when no declaration "
        "run in this folder measures detectability: it reads inode numbers and times, which a link changes)",
    )
    run.add_argument(
        "--min-free-gb",
        type=float,
        default=MIN_FREE_GB,
        help=f"stop before a stage when less disk is free under the output folder (default {MIN_FREE_GB:g}): a stage "
        "that fills the disk leaves half-written output; the run resumes once there is room",
    )
    run.add_argument(
        "--discard-tuned-models",
        action="store_true",
        help="replace each fine-tuned or pruned model.pt by model.pt.discarded.json (SHA-256, size) once its "
        "evaluation and verification are recorded: removal and pruning keep 45 MB per model otherwise",
    )
    args = parser.parse_args(argv)

    try:
        experiment = load_experiment(ROOT / "configs" / "experiments" / f"{args.name}.json")
        experiment = experiment.only(args.method)
    except ExperimentError as err:
        print(f"experiment: {err}", file=sys.stderr)
        return 2
    if getattr(args, "family", None):
        if args.publish:
            print("experiment: --family is for trying a run; declare phantoms.family to publish", file=sys.stderr)
            return 2
        pretrain = dict(experiment.pretrain)  # a pre-training set, when declared, is rendered by the same family
        if pretrain:
            pretrain["phantoms"] = {**pretrain["phantoms"], "family": args.family}
        phantoms = {**experiment.phantoms, "family": args.family}
        experiment = dataclasses.replace(experiment, phantoms=phantoms, pretrain=pretrain)
    family = experiment.phantoms.get("family", "classic")
    default_out = Path("outputs") / "experiments" / (args.name if family == "classic" else f"{args.name}_{family}")
    out = (args.out or default_out).resolve()
    if args.command == "compact":
        if isinstance(experiment, SegmentationExperiment):
            print("experiment: a segmentation experiment makes no release to compact", file=sys.stderr)
            return 2
        print_compaction(experiment, out, not args.without_detectability, args.dry_run)
        return 0
    if args.command == "plan":
        try:
            print_plan(experiment, out)
        except StageFailed as err:  # StageChanged: an output made by another command
            print(f"[{args.name}] {err}", file=sys.stderr)
            return 1
        return 0
    refused = publication_refused(experiment) if args.publish else None
    if refused:  # before any stage runs: hours of work would not be publishable
        print(f"experiment: {refused}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        collected = run_experiment(
            experiment, ROOT, out, discard_tuned=args.discard_tuned_models, min_free_gb=args.min_free_gb
        )
    except StageFailed as err:
        print(f"[{args.name}] {err}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - start) / 60
    print(f"\n[{args.name}] finished in {minutes:.1f} min (stages already done were skipped)")
    _print_summary(collected, out)
    if args.publish:
        try:
            page = publish(experiment, collected, out, argv or sys.argv[1:])
        except (LedgerError, ConclusionError) as err:
            print(f"experiment: not published: {err}", file=sys.stderr)
            return 2
        if page:
            print(
                f"experiment: {args.name} is published; the docs above quote figures it does not hold", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
