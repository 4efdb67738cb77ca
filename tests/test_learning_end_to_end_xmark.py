"""End to end, with learning, for X-Mark itself (scripts/xmark_tiny_run.py): generator trained, release marked,
suspects of two seeds trained on the release and on the clean data, every model verified.

The run is the script's recipe at 96 px with generator seed 101 and suspect seeds 2 and 4 (neither the surrogate's).
Measured on this machine (2026-12-06) over generator seeds 101-103 with the same suspect seeds (a development
measurement, the script's docstring gives the command): malicious ΔP 0.79 and 0.96 (generator 101), 0.52 and 0.06
(102), 0.56 and 0.995 (103); benign ΔP -0.06 to 0.03, none verified; the mean learning effect (malicious minus
benign ΔP of the same suspect seed) 0.93, 0.33 and 0.76. One suspect of the six was not verified, and the
surrogate's own ΔP was 0.24, 0.31 and 0.54 (verified at 103): at this size G is an adversarial edit for its
surrogate, so a suspect that shared its seed could be "verified" without learning anything.

An earlier version asserted that one suspect's ΔP exceeded the surrogate's by 0.25. That held for generator 101
only, and a one-ulp change of the loader's arithmetic broke it: it asserted a draw, not a property. What held in
every draw is asserted here, with the paper's margin (0.25) as the bar for the learning effect. It fails when the
generator, the release, the training or the verification stops carrying X-Mark's watermark from the data to the
verdict.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.25  # the paper's margin tau, as configs/verify.json's


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("xmark_tiny")
    cmd = [sys.executable, "scripts/xmark_tiny_run.py", "--out", str(out), "--generator-seed", "101"]
    done = subprocess.run(
        [*cmd, "--suspect-seeds", "2,4"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "verdicts_g101.json").read_text())


@pytest.mark.slow
def test_the_paper_method_marks_a_release_within_its_budget(run):
    assert run["method"] == "xmark"  # the paper's method, not a variant
    assert run["release"]["budget_ok"] and run["release"]["marked"] > 0


@pytest.mark.slow
def test_suspects_trained_on_an_xmark_release_learnt_it(run):
    verdicts = run["verdicts"]
    assert run["mean_learning_effect"] > MARGIN, run["learning_effect"]
    assert any(verdicts[f"malicious_seed{s}"]["owned"] for s in run["suspect_seeds"]), verdicts


@pytest.mark.slow
def test_models_trained_on_the_clean_data_are_not_verified(run):
    for seed in run["suspect_seeds"]:
        benign = run["verdicts"][f"benign_seed{seed}"]
        assert not benign["owned"] and benign["delta_p"] < 0.1, (seed, benign)
