"""A figure the docs quote next to a published experiment's name must be one of that experiment's published numbers."""

import json
import sys
from pathlib import Path

from xmark_bundle.experiments.citations import published_numbers, uncited_figures

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import experiments_page  # noqa: E402

RESULTS = {
    "format": 1,
    "name": "runA",
    "title": "run A",
    "description": "Three owners.",
    "commands": ["python scripts/experiment.py run runA"],
    "commit": "abc1234",
    "seeds": {"development": 0, "report": 1234, "owners": [11, 12, 13]},
    "wall_time_s": {"training": 5400, "all stages": 7200},
    "tables": [
        {
            "title": "Verification",
            "columns": ["verified", "p (t, with margin)", "floor clean"],
            "rows": [
                {
                    "label": "owners",
                    "cells": {
                        "verified": {"value": "2 of 3"},
                        "p (t, with margin)": {"per_seed": [0.01, 0.2, 1.04e-5]},
                        "floor clean": {"per_seed": [0.0123, 0.05, 0.0311]},
                    },
                }
            ],
            "notes": "ε = 0.1 on half of the images.",
        }
    ],
    "figures": [],
    "reading": "Over both architectures 5 of 6 owners were verified.",
}


def _figures(text: str) -> list[str]:
    return [problem.figure for problem in uncited_figures(text, {"runA": published_numbers(RESULTS)})]


def test_figures_of_the_cited_experiment_pass():
    text = (
        "In `runA` the owners were verified 2 of 3 (floor 0.012 to 0.050, mean 0.031; p 1.0e-05 at ε = 0.1), "
        "the t-test is significant on 2 of 3, 5 of 6 over both architectures, in 1.5 h of training and 2.0 h in all."
    )
    assert _figures(text) == []


def test_a_figure_no_result_holds_is_named():
    assert _figures("`runA`: verified 3 of 3, floor 0.013, p 2e-05 and 0.3 h.") == ["0.013", "2e-05", "0.3", "3 of 3"]


def test_only_paragraphs_that_cite_a_published_experiment_are_checked():
    text = "\n".join(
        [
            "On development data 7 of 9 were verified (floor 0.777).",
            "",
            "- `runA`: verified 2 of 3.",
            "- the demo: 4 of 4 and 0.123 (not a published run).",
            "- `runA` again: 4 of 4.",
            "",
            "```bash",
            "python scripts/experiment.py run runA --rate 0.999  # `runA`",
            "```",
            "",
            "`runA` needs version 0.20.0 of the bundle (arXiv:2601.17107).",
        ]
    )
    problems = uncited_figures(text, {"runA": published_numbers(RESULTS)})
    assert [(p.figure, p.experiments) for p in problems] == [("4 of 4", ("runA",))]
    assert problems[0].paragraph.startswith("- `runA` again") and "runA" in str(problems[0])


def test_the_page_script_names_the_file_and_figure_that_no_result_holds(tmp_path, capsys):
    folder = tmp_path / "docs" / "experiments" / "runA"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(RESULTS))
    (tmp_path / "README.md").write_text("`runA` verified 2 of 3 owners.\n")
    docs = str(tmp_path / "docs")
    assert experiments_page.main(["--docs", docs]) == 0
    assert experiments_page.main(["--docs", docs, "--check"]) == 0

    (tmp_path / "docs" / "README.md").write_text("# Model card\n\n`runA` verified 3 of 3 owners.\n")
    assert experiments_page.main(["--docs", docs, "--check"]) == 1
    assert "docs/README.md: '3 of 3' is in no results.json of runA" in capsys.readouterr().err
