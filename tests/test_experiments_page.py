"""docs/experiments.md is generated from docs/experiments/<name>/results.json; --check catches any disagreement."""

import copy
import json
import sys
from pathlib import Path

import pytest

from xmark_bundle.experiments import ResultsError, load_results, read_all_results, render_page

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import experiments_page  # noqa: E402

RESULTS = {
    "format": 1,
    "name": "table1",
    "title": "Table 1: watermark methods on the report seed",
    "description": "Two methods, three suspect seeds.",
    "commands": ["python scripts/experiment.py run table1"],
    "commit": "abc1234",
    "seeds": {"development": 0, "report": 7, "suspects": [1, 2, 3]},
    "wall_time_s": {"phantoms": 360, "suspects": 1800},
    "tables": [
        {
            "title": "Malicious",
            "columns": ["BA", "WSR at 0.5", "verdict"],
            "rows": [
                {"label": "xmark", "cells": {"BA": {"per_seed": [0.7, 0.8, 0.9]}, "verdict": {"value": "verified"}}},
                {"label": "sscl_bw", "cells": {"WSR at 0.5": {"per_seed": [0.25]}}},
            ],
            "notes": "n = 100 queries per seed.",
        }
    ],
    "figures": ["wsr.png"],
    "reading": "X-Mark is verified on every seed.",
}


def _docs(tmp_path: Path, results: dict) -> Path:
    folder = tmp_path / "docs" / "experiments" / "table1"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "wsr.png").write_bytes(b"\x89PNG")
    return tmp_path / "docs"


def test_page_shows_mean_sd_and_every_seed_and_check_catches_a_change(tmp_path, capsys):
    docs = _docs(tmp_path, RESULTS)
    assert experiments_page.main(["--docs", str(docs), "--check"]) == 1  # no page yet
    assert experiments_page.main(["--docs", str(docs)]) == 0
    page = (docs / "experiments.md").read_text()
    assert "| xmark | 0.800 ± 0.100 (0.700, 0.800, 0.900) |  | verified |" in page  # sd with n - 1
    assert "| sscl_bw |  | 0.250 |  |" in page  # one seed: the value alone
    assert "seeds: development 0, report 7, suspects [1, 2, 3]" in page and "phantoms 6 min, suspects 30 min" in page
    assert "![table1: wsr.png](experiments/table1/wsr.png)" in page and "Reading: X-Mark is verified" in page
    assert experiments_page.main(["--docs", str(docs), "--check"]) == 0

    changed = copy.deepcopy(RESULTS)
    changed["tables"][0]["rows"][0]["cells"]["BA"]["per_seed"][2] = 0.6
    (docs / "experiments" / "table1" / "results.json").write_text(json.dumps(changed))
    assert experiments_page.main(["--docs", str(docs), "--check"]) == 1
    assert "does not match" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda r: r["seeds"].update(report=0), "the report seed equals the development seed"),
        (lambda r: r.update(name="table2"), "names experiment 'table2' but lies in folder 'table1'"),
        (lambda r: r.update(figures=["missing.png"]), "figure 'missing.png' is listed but missing"),
        (lambda r: r["tables"][0]["rows"][0]["cells"].update(AUROC={"value": 1}), r"unknown columns \['AUROC'\]"),
        (lambda r: r["tables"][0]["rows"][0]["cells"].update(BA={"per_seed": [float("nan")]}), "not a finite"),
        (lambda r: r.pop("reading"), r"lacks \['reading'\]"),
    ],
)
def test_bad_results_are_refused_with_the_file_named(tmp_path, edit, problem):
    results = copy.deepcopy(RESULTS)
    edit(results)
    docs = _docs(tmp_path, results)
    with pytest.raises(ResultsError, match=rf"table1/results\.json: .*{problem}"):
        read_all_results(docs / "experiments")
    assert experiments_page.main(["--docs", str(docs), "--check"]) == 1


def test_the_committed_page_matches_the_committed_results():
    assert experiments_page.main(["--check"]) == 0
    published = [load_results(p) for p in sorted((ROOT / "docs" / "experiments").glob("*/results.json"))]
    conclusions = experiments_page.conclusions_section(ROOT / "docs", published)
    assert conclusions and render_page(published, conclusions) == (ROOT / "docs" / "experiments.md").read_text()


def test_published_wall_times_add_up_by_kind_of_stage():
    import experiment  # scripts/experiment.py

    times = {
        "phantoms": 70.0,
        "classifier 'surrogate'": 100.0,
        "evaluation 'surrogate'": 10.0,
        "xmark watermark 'watermark'": 150.0,
        "xmark release": 10.0,
        "xmark verification malicious 'suspect_seed1'": 5.0,
        "xmark detectability": 30.0,
        "xmark suspect_seed1 pruning at 0.3": 4.0,
        "datalist": 2.0,
    }
    assert experiment.wall_times(times) == {
        "classifier": 100.0,
        "detectability": 30.0,
        "evaluation": 10.0,
        "other": 2.0,
        "pruning": 4.0,
        "phantoms": 70.0,
        "release": 10.0,
        "verification": 5.0,
        "watermark": 150.0,
        "all stages": 381.0,
    }


def test_a_published_part_carries_the_figures_of_its_tables_that_were_drawn(tmp_path):
    import experiment  # scripts/experiment.py

    for name in ("scenarios.png", "removal.png"):  # variants.png was not drawn (one kind of suspect)
        (tmp_path / name).write_bytes(b"png")
    titles = ["Table 1: methods", "Table 2: verification scenarios", "Removal: the malicious suspects fine-tuned"]
    tables = [{"title": title} for title in titles]
    assert experiment._figures(tables, tmp_path) == ["scenarios.png", "removal.png"]
    assert experiment._figures(tables[:1], tmp_path) == []
    assert experiment._figures(tables[2:], tmp_path) == ["removal.png"]
