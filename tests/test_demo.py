"""`scripts/demo.py --quick` runs the whole pipeline (the same stages as `make demo`) and resumes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "scripts/demo.py", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"malicious", "ind_m", "ind_w"}
    for row in summary.values():
        assert set(row) == {"p_value", "delta_p", "wsr", "verdict", "n"}
        assert 0.0 <= row["p_value"] <= 1.0 and row["n"] == 8
    for name in summary:
        assert (out / "verification" / name / "verification.png").stat().st_size > 0
    accuracy = json.loads((out / "balanced_accuracy.json").read_text())
    assert set(accuracy) == {"surrogate", "benign", "malicious"} and all(0 <= v <= 1 for v in accuracy.values())
    checked = json.loads((out / "criteria.json").read_text())
    criteria = {row["criterion"]: row for row in checked["criteria"] + checked["also"]}
    assert len(criteria) == 6 and all(isinstance(row["met"], bool) for row in criteria.values())
    assert criteria["Malicious p < 0.01"]["met"] == (summary["malicious"]["p_value"] < 0.01)
    assert criteria["Malicious WSR >= 0.9 at 0.5 (verification)"]["value"] == summary["malicious"]["wsr"]
    assert criteria["Ind-M p >= 0.05"]["met"] == (summary["ind_m"]["p_value"] >= 0.05)
    gap = criteria["BA malicious - benign within 2 points"]
    assert abs(gap["value"] - 100 * (accuracy["malicious"] - accuracy["benign"])) < 1e-9
    assert gap["met"] == (abs(gap["value"]) <= 2.0)
    manifest = json.loads((out / "models" / "release_manifest.json").read_text())
    assert manifest["marked"] and all(m["budget_ok"] for m in manifest["marked"])
    assert manifest["method"] == "xmark" and not manifest["decoys"]  # the paper's method is the default
    infos = [
        json.loads((out / "models" / g / "training_info.json").read_text())
        for g in ("generator", "generator_independent")
    ]
    assert [info["method"] for info in infos] == ["xmark", "xmark"] and infos[0]["seed"] != infos[1]["seed"]
    assert not (out / "models" / "key_vetting.json").exists()  # no key to vet
    assert "Ind-W: the malicious model queried with an independent owner's" in first.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # everything done: every stage skipped
    assert again.returncode == 0 and again.stdout.count(": already done (") == 14, again.stdout[-2000:]
