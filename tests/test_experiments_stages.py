"""A stage runs its printed command line: forked from the preloaded runner (or as a subprocess), with the same
argv, working folder and exit code, and nothing it changes reaches the next stage."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STAGE = """
import json, os, sys
preloaded = "monai.bundle" in sys.modules
import xmark_bundle.experiments.stages as stages
seen = {"argv": sys.argv[1:], "cwd": os.getcwd(), "name": __name__, "leak": os.environ.get("XMARK_TEST_LEAK"),
        "attribute": getattr(stages, "leaked", None), "preloaded": preloaded}
os.environ["XMARK_TEST_LEAK"] = "set by a stage"
stages.leaked = "set by a stage"
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(seen) + "\\n")
if sys.argv[2] == "exit":
    sys.exit(3)
if sys.argv[2] == "raise":
    raise ValueError("a stage that fails")
"""

DRIVER = """
import json, sys
from pathlib import Path
from xmark_bundle.experiments.stages import run_command
script, log, cwd = sys.argv[1:4]
codes = [run_command([sys.executable, script, log, how], Path(cwd)) for how in ("ok", "ok", "exit", "raise")]
codes.append(run_command([sys.executable, "-m", "json.tool", "--bogus-option"], Path(cwd)))
codes.append(run_command(["false"], Path(cwd)))
print(json.dumps(codes))
"""


@pytest.mark.parametrize("isolation", ["fork", "subprocess"])
def test_a_stage_runs_its_command_line_and_changes_nothing_for_the_next(tmp_path, isolation):
    script, log, cwd = tmp_path / "stage.py", tmp_path / "seen.jsonl", tmp_path / "work"
    script.write_text(textwrap.dedent(STAGE))
    cwd.mkdir()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    if isolation == "subprocess":
        env["XMARK_STAGE_SUBPROCESS"] = "1"
    cmd = [sys.executable, "-c", DRIVER, str(script), str(log), str(cwd)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 0, 3, 1, 2, 1]
    assert "ValueError: a stage that fails" in done.stderr and "--bogus-option" in done.stderr
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["argv"] for s in seen] == [[str(log), how] for how in ("ok", "ok", "exit", "raise")]
    assert {s["preloaded"] for s in seen} == {isolation == "fork"}  # forked from the runner that imported MONAI
    assert {s["cwd"] for s in seen} == {str(cwd)} and {s["name"] for s in seen} == {"__main__"}
    # the second stage sees neither the environment nor the module state the first one changed
    assert {s["leak"] for s in seen} == {None} and {s["attribute"] for s in seen} == {None}


def test_a_run_reports_the_times_of_the_stages_it_visited_only(tmp_path):
    """Two experiments sharing a folder's common stages: each reports the stages it ran or found done, not the
    other's, and the commits they ran at."""
    from xmark_bundle.experiments.stages import UNRECORDED, Stages, tree_commit

    (tmp_path / "stage_times.json").write_text(json.dumps({"data": 12.0, "other experiment's stage": 99.0}))
    (tmp_path / "data").touch()
    stages = Stages(ROOT, tmp_path, "test")
    stages.run("data", ["false"], tmp_path / "data")  # done before: skipped, its recorded time kept
    stages.run("new", ["touch", str(tmp_path / "new")], tmp_path / "new")
    times = stages.run_times()
    assert list(times) == ["data", "new"] and times["data"] == 12.0 and times["new"] >= 0
    recorded = json.loads((tmp_path / "stage_times.json").read_text())
    assert set(recorded) == {"data", "other experiment's stage", "new"}  # the folder keeps every stage's time
    # the commit each stage ran at: the new one at this checkout, the old one before commits were recorded
    commit = tree_commit(ROOT)
    assert commit != "unknown" and json.loads((tmp_path / "stage_commits.json").read_text()) == {"new": commit}
    assert stages.run_commits() == dict(sorted({commit: 1, UNRECORDED: 1}.items()))


def test_a_stage_asked_for_twice_is_visited_once_and_two_different_stages_may_not_share_a_name(tmp_path):
    from xmark_bundle.experiments.stages import Stages

    stages = Stages(ROOT, tmp_path, "test")
    stages.run("shared data", ["touch", str(tmp_path / "data")], tmp_path / "data")
    stages.run("shared data", ["touch", str(tmp_path / "data")], tmp_path / "data")  # the same stage again
    assert stages.visited == ["shared data"] and stages.count == 1
    with pytest.raises(ValueError, match="two different stages of test are both named 'shared data'"):
        stages.run("shared data", ["touch", str(tmp_path / "other")], tmp_path / "other")
    dry = Stages(ROOT, tmp_path / "dry", "test", dry_run=True)
    dry.run("new", ["touch", str(tmp_path / "dry" / "new")], tmp_path / "dry" / "new")
    assert dry.planned == [("new", ["touch", str(tmp_path / "dry" / "new")])] and not (tmp_path / "dry").exists()


def test_the_plan_estimates_the_time_left_from_the_recorded_stages(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import experiment  # scripts/experiment.py

    assert experiment.remaining_time({"classifier": 2}, tmp_path / "stage_times.json") is None
    times = {"classifier 'a'": 100.0, "classifier 'b'": 200.0, "xmark watermark 'w'": 60.0}
    (tmp_path / "stage_times.json").write_text(json.dumps(times))
    left = {"classifier": 36, "watermark": 60, "verification": 5}  # 36 x 150 s + 60 x 60 s = 2.5 h
    estimate = experiment.remaining_time(left, tmp_path / "stage_times.json")
    assert estimate.startswith("about 2.5 h left") and estimate.endswith("plus verification (none recorded yet)")
    # a fine-tuning is its own kind, not a classifier's training (it is much shorter)
    finetune = "classifier 'xmark owner201/suspect_seed401 fine-tuned (head, 1 epochs, last kept)'"
    assert experiment.stage_kind(finetune) == "fine-tuned" and experiment.stage_kind("classifier 'a'") == "classifier"
    assert experiment.stage_kind("StealthMark segmenter segresnet patch owner 101 fine-tuned 10 epochs") == "fine-tuned"
    assert experiment.stage_kind("xmark verification malicious_owner201_suspect_seed401_finetuned_head_1") == (
        "verification"
    )
    assert experiment.wall_times({finetune: 10.0, "classifier 'a'": 100.0}) == {
        "classifier": 100.0,
        "fine-tuned": 10.0,
        "all stages": 110.0,
    }


def test_an_output_made_by_another_command_is_refused_naming_the_change(tmp_path):
    """A stage whose output exists is skipped only when the recorded command is this run's: a setting changed after
    it ran (or another declaration in the folder disagreeing on a shared stage) stops the run, naming the stage and
    the change. The record is the same from another worktree or after the folder moved."""
    import shutil

    from xmark_bundle.experiments.stages import StageChanged, Stages

    out = tmp_path / "run"
    out.mkdir()
    first = Stages(ROOT, out, "test")
    cmd = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(out / "model"), "--max_epochs", "12"]
    first.run("classifier", cmd, out / "model")
    recorded = json.loads((out / "stage_commands.json").read_text())
    assert recorded == {"classifier": ["python", *cmd[1:3], "<out>/model", "--max_epochs", "12"]}

    Stages(ROOT, out, "test").run("classifier", cmd, out / "model")  # the same command: already done
    changed = [*cmd[:-1], "10"]
    with pytest.raises(StageChanged) as refused:
        Stages(ROOT, out, "test").run("classifier", changed, out / "model")
    message = str(refused.value)
    assert message.startswith("stage 'classifier': its output model was made by another command than this run's")
    assert "(--max_epochs 12 -> --max_epochs 10)" in message and "run into a new output folder" in message

    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    moved_cmd = [arg.replace(str(out), str(moved)) for arg in cmd]
    Stages(ROOT, moved, "test").run("classifier", moved_cmd, moved / "model")  # the same command, moved: done
    inserted = [*moved_cmd, "--seed", "3"]
    with pytest.raises(StageChanged, match=r"\(12 -> 12 --seed 3\)"):
        Stages(ROOT, moved, "test").run("classifier", inserted, moved / "model")

    (out / "legacy").touch()  # done before commands were recorded: nothing to compare, taken as done
    Stages(ROOT, out, "test").run("legacy", ["false"], out / "legacy")


def test_plan_names_a_stage_whose_output_another_command_made(tmp_path):
    """``experiment.py plan`` (a dry run) finds the changed stage before a run would: exit 1, the stage named."""
    out = tmp_path / "demo"
    (out / "phantoms").mkdir(parents=True)
    (out / "phantoms" / "valid.csv").touch()
    old = ["python", "scripts/make_phantoms.py", "--out", "<out>/phantoms", "--n", "300", "--seed", "0"]
    (out / "stage_commands.json").write_text(json.dumps({"phantoms": old}))
    cmd = [sys.executable, "scripts/experiment.py", "plan", "demo", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[demo] stage 'phantoms': its output phantoms/valid.csv was made by another command" in done.stderr
    assert "--n 300 -> --n 600" in done.stderr


def test_runners_sharing_a_folder_keep_each_others_records(tmp_path):
    """Two runners that opened the folder before either ran anything: each stage's time, commit and command is kept."""
    from xmark_bundle.experiments.stages import Stages

    first, second = Stages(ROOT, tmp_path, "first"), Stages(ROOT, tmp_path, "second")
    first.run("a", ["touch", str(tmp_path / "a")], tmp_path / "a")
    second.run("b", ["touch", str(tmp_path / "b")], tmp_path / "b")
    for name in ("stage_times.json", "stage_commits.json", "stage_commands.json"):
        assert set(json.loads((tmp_path / name).read_text())) == {"a", "b"}, name


RUNNER = """
import sys
from pathlib import Path
from xmark_bundle.experiments.stages import Stages
root, out, label, log = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
write = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10))"
wait = "import os, sys, time" + chr(10) + "while not os.path.exists(sys.argv[3]): time.sleep(0.05)" + chr(10)
stages = Stages(root, out, label)
cleared = lambda: open(log, "a").write("prepared by " + label + chr(10))
done, go = out / "shared", str(out.parent / "go")
shared = [sys.executable, "-c", wait + write + "; open(sys.argv[4], 'w')", log, "shared", go, str(done)]
stages.run("shared", shared, done, cleared)
stages.run(label, [sys.executable, "-c", write, log, label + " own"], out / label)
"""


def test_a_stage_another_runner_is_running_is_waited_for_not_run_twice(tmp_path):
    """A second runner reaching a stage the first is running waits, then finds it done: the command and its
    ``prepare`` (e.g. removing an interrupted run's files) run once, by the runner that holds the stage."""
    import time

    out, log = tmp_path / "run", tmp_path / "log.txt"
    out.mkdir()
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "XMARK_STAGE_SUBPROCESS": "1"}
    runner = [sys.executable, "-c", RUNNER, str(ROOT), str(out)]
    first = subprocess.Popen([*runner, "first", str(log)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    for _ in range(1200):  # until the first runner holds the stage (its prepare ran); its command waits for "go"
        if log.exists() and "prepared by first" in log.read_text():
            break
        time.sleep(0.05)
    second = subprocess.Popen([*runner, "second", str(log)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    seen = ""
    while "waiting" not in seen and second.poll() is None:  # the stage's command line, then the wait
        seen += second.stdout.readline()
    assert f"[second 1] shared: another runner of {out} is running it; waiting" in seen, seen
    (tmp_path / "go").touch()
    assert first.wait(timeout=120) == 0 and second.wait(timeout=120) == 0
    assert "[second 1] shared: done by another runner (shared)" in second.stdout.read()
    lines = log.read_text().splitlines()
    assert lines[:2] == ["prepared by first", "shared"] and sorted(lines[2:]) == ["first own", "second own"]
    assert set(json.loads((out / "stage_commands.json").read_text())) == {"shared", "first", "second"}


def test_an_output_an_interrupted_run_left_runs_the_stage_again(tmp_path):
    """A release writes its manifest first with ``"complete": false``: with ``finished``, such an output is not taken
    as done (a release stopped by a full disk is resumed, not trained on); a finished one is."""
    from xmark_bundle.experiments.runner import _complete_release
    from xmark_bundle.experiments.stages import Stages

    out = tmp_path / "run"
    out.mkdir()
    manifest, log = out / "release_manifest.json", out / "ran.txt"
    manifest.write_text(json.dumps({"complete": False}))
    script = "import json, sys; open(sys.argv[2], 'a').write('ran\\n'); "
    script += "json.dump({'complete': True}, open(sys.argv[1], 'w'))"
    cmd = [sys.executable, "-c", script, str(manifest), str(log)]
    Stages(ROOT, out, "test").run("release", cmd, manifest, finished=_complete_release)
    assert log.read_text() == "ran\n" and _complete_release(manifest)
    Stages(ROOT, out, "test").run("release", cmd, manifest, finished=_complete_release)  # finished: skipped
    assert log.read_text() == "ran\n"
    manifest.write_text("{torn")
    assert not _complete_release(manifest)


def test_a_stage_does_not_start_on_a_disk_below_the_free_space_floor(tmp_path):
    """A stage that fills the disk midway leaves half-written output: below ``min_free_gb`` the run stops before
    the stage, naming it, the free space and the floor; nothing runs and nothing is recorded."""
    import shutil

    from xmark_bundle.experiments.stages import StageFailed, Stages

    out = tmp_path / "run"
    out.mkdir()
    cmd = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(out / "model")]
    floor = shutil.disk_usage(out).free / 1e9 + 1000  # more than this disk has free
    with pytest.raises(StageFailed) as stopped:
        Stages(ROOT, out, "test", min_free_gb=floor).run("classifier", cmd, out / "model")
    assert str(stopped.value).startswith("stage 'classifier' not started: ") and f"--min-free-gb {floor:g}" in str(
        stopped.value
    )
    assert not (out / "model").exists() and not (out / "stage_commands.json").exists()
    Stages(ROOT, out, "test", min_free_gb=0).run("classifier", cmd, out / "model")
    assert (out / "model").is_file()
