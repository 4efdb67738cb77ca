"""StealthMark experiments through the runner: `scripts/experiment.py run stealthmark_quick` trains real MONAI
segmenters at toy size through the bundle's CLI stages, and the tables count what the reports say."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from xmark_bundle.experiments import ExperimentError, load_experiment, render_page, tables
from xmark_bundle.experiments.results import load_results, write_results
from xmark_bundle.experiments.segmentation import SegmentationExperiment

ROOT = Path(__file__).resolve().parents[1]
DECLARATIONS = ROOT / "configs" / "experiments"
sys.path.insert(0, str(ROOT / "scripts"))
import experiment  # noqa: E402  (scripts/experiment.py)


@pytest.mark.slow
def test_quick_segmentation_experiment_runs_every_stage_and_tabulates_the_reports(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/experiment.py", "run", "stealthmark_quick", "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    collected = json.loads((out / "collected.json").read_text())
    declared = json.loads((DECLARATIONS / "stealthmark_quick.json").read_text())
    seeds = declared["seeds"]
    assert collected["task"] == "segmentation" and collected["seed_roles"]["owners"] == seeds["owners"]

    # every watermarked and baseline model: trained with its owner's key and seed, evaluated and verified
    owners = dict(zip(seeds["owners"], seeds["owner_keys"], strict=True))
    expected = {
        f"{arch}/{trigger}/{method}/owner{owner}"
        for arch in declared["architectures"]
        for trigger in declared["triggers"]
        for method in ("stealthmark", *declared["baselines"])
        for owner in owners
    }
    assert set(collected["models"]) == expected
    for name, model in collected["models"].items():
        record = json.loads((out / "models" / name / "stealthmark_record.json").read_text())
        assert (record["method"], record["key"], record["seed"]) == (
            model["method"],
            owners[model["owner"]],
            model["owner"],
        )
        assert (out / "models" / name / "model.pt").stat().st_size > 0
        report = json.loads(Path(model["verification"]["report"]).read_text())
        assert report["suspect"]["location"].startswith(str(out / "models" / name))
        assert report["verdict"] in ("verified", "not verified") and report["trigger"] == model["trigger"]
        assert model["verification"]["owned"] == (report["verified"] is True)
        assert model["verification"]["p_value"] == report["test"]["p_ttest"]
        harm = json.loads((out / "harmlessness" / name / "harmlessness.json").read_text())
        assert model["harmlessness"]["dice_clean"] == harm["clean"]["dice"]["mean"]

    # benign models alternate over the architectures, carry no watermark and are verified with every owner's record
    benign = collected["benign"]
    archs = declared["architectures"]
    assert [(b["arch"], b["seed"]) for b in benign.values()] == [
        (archs[i % len(archs)], seed) for i, seed in enumerate(seeds["benign"])
    ]
    runs = []
    for name, entry in benign.items():
        record = json.loads(
            (out / "models" / entry["arch"] / f"benign_seed{entry['seed']}" / "stealthmark_record.json").read_text()
        )
        assert record["method"] == "none" and record["trigger_share"] == 0.0
        for trigger in declared["triggers"]:
            assert sorted(entry["verification"][trigger]) == sorted(map(str, owners))
            for owner, result in entry["verification"][trigger].items():
                report = json.loads(Path(result["report"]).read_text())
                assert Path(result["report"]).parent.name == name and f"owner{owner}" in result["report"]
                assert report["n_queries"] == min(
                    declared["verification"]["n_samples"],
                    len((out / "phantoms/valid.csv").read_text().splitlines()) - 1,
                )
                runs.append(result)
    assert len(runs) == len(seeds["benign"]) * len(owners) * len(declared["triggers"])

    # the tables: the results.json format, false accusations over every benign model x owner with Clopper-Pearson
    produced = tables(collected)
    assert [t["title"].split(" (")[0] for t in produced] == ["Harmlessness", "Verification", "Removal", "Sweeps"]
    rows = {row["label"]: row["cells"] for row in produced[1]["rows"]}
    trigger = declared["triggers"][0]
    overall = next(cells for label, cells in rows.items() if label.startswith(f"all benign models, {trigger}"))
    k = sum(r["owned"] for r in runs)
    interval = stats.binomtest(k, len(runs)).proportion_ci(method="exact")
    assert overall["verified"] == {"value": f"{k} of {len(runs)}"}
    assert overall["Clopper-Pearson 95 %"] == {"value": f"{interval.low:.3f}-{interval.high:.3f}"}
    assert len(overall["p (t, with margin)"]["per_seed"]) == len(runs)
    others = [label for label in rows if label.startswith("other keys")]
    assert len(others) == len(archs) * len(declared["triggers"])
    own = next(cells for label, cells in rows.items() if label.startswith(f"stealthmark, {archs[0]}, {trigger}"))
    assert len(own["p (t, with margin)"]["per_seed"]) == len(owners)
    assert "QR decodes the owner's ID" not in overall  # quick runs no QR explanation (stealthmark_v1 does)
    # the epsilon sweep: each owner's model trained at that epsilon, its record says so, benign models verified with it
    (tag,) = collected["sweeps"]
    swept = collected["sweeps"][tag]
    assert tag == "epsilon=0.2" and len(swept["models"]) == len(archs) * len(declared["triggers"]) * len(owners)
    for name, model in swept["models"].items():
        record = json.loads((out / "models/sweeps" / tag / name / "stealthmark_record.json").read_text())
        assert record["epsilon"] == 0.2 and record["key"] == owners[model["owner"]]
        assert json.loads(Path(model["verification"]["report"]).read_text())["epsilon"] == 0.2
    assert len(swept["benign"][trigger]) == len(seeds["benign"]) * len(owners)
    sweep_rows = {row["label"]: row["cells"] for row in produced[3]["rows"]}
    assert len(sweep_rows) == len(archs) * len(declared["triggers"])
    k = sum(r["owned"] for r in swept["benign"][trigger])
    assert all(cells["benign falsely verified"] == {"value": f"{k} of 8"} for cells in sweep_rows.values())
    # removal: each owner's watermarked model fine-tuned from its own weights on clean data, verified with its record
    removed = {tag: entry for tag, entry in collected["removal"].items() if "prune_rate" not in entry}
    pruned = {tag: entry for tag, entry in collected["removal"].items() if "prune_rate" in entry}
    assert len(removed) == len(pruned) == len(archs) * len(declared["triggers"]) * len(owners)
    # pruning: the owner's own weights with the declared share of the smallest set to zero, the rest unchanged
    (rate,) = declared["removal"]["prune_rates"]
    for tag, entry in pruned.items():
        assert tag == f"{entry['arch']}/{entry['trigger']}/stealthmark/owner{entry['owner']}_pruned{100 * rate:g}"
        weights = torch.load(out / "models" / tag / "model.pt", weights_only=True)
        start = torch.load(out / "models" / tag.rsplit("_pruned", 1)[0] / "model.pt", weights_only=True)
        assert weights.keys() == start.keys()  # a plain state dict like training's
        report = json.loads((out / "models" / tag / "pruning.json").read_text())
        assert (
            entry["zero_share"] == report["zero_share"] and abs(report["zero_share"] - rate) <= 1 / report["n_weights"]
        )
        assert sum(int((w == 0).sum()) for w in weights.values()) >= report["n_zero"]
        assert all(torch.equal(weights[k][weights[k] != 0], start[k][weights[k] != 0]) for k in weights)
        assert not (out / "models" / tag / "stealthmark_record.json").exists()
        verification = json.loads(Path(entry["verification"]["report"]).read_text())
        assert verification["suspect"]["location"].startswith(str(out / "models" / tag))
        harm = json.loads((out / "harmlessness" / tag / "harmlessness.json").read_text())
        assert entry["harmlessness"]["dice_clean"] == harm["clean"]["dice"]["mean"]
    for tag, entry in removed.items():
        record = json.loads((out / "models" / tag / "stealthmark_record.json").read_text())
        assert record["method"] == "none" and record["seed"] == seeds["finetune"][seeds["owners"].index(entry["owner"])]
        assert tag.startswith(f"{entry['arch']}/{entry['trigger']}/stealthmark/owner{entry['owner']}_finetuned1")
        report = json.loads(Path(entry["verification"]["report"]).read_text())
        assert report["suspect"]["location"].startswith(str(out / "models" / tag))
        # it started from the owner's weights: nearer to them than to another owner's model of the same network
        tuned, start = (
            torch.load(out / "models" / n / "model.pt", weights_only=True) for n in (tag, tag[: -len("_finetuned1")])
        )
        other_owner = next(o for o in owners if o != entry["owner"])
        other = torch.load(
            out / "models" / f"{entry['arch']}/{entry['trigger']}/stealthmark/owner{other_owner}/model.pt",
            weights_only=True,
        )
        assert _distance(tuned, start) < 0.5 * _distance(tuned, other)
    removal_rows = {row["label"]: row["cells"] for row in produced[2]["rows"]}
    assert produced[2]["title"].startswith("Removal") and len(removal_rows) == 2 * len(archs) * len(
        declared["triggers"]
    )
    for arch in archs:
        cells = removal_rows[
            f"{arch}, {trigger}, pruned {100 * rate:g} % (global L1 magnitude, no fine-tuning) (2 owners)"
        ]
        runs = [e for e in pruned.values() if e["arch"] == arch]
        assert cells["verified"] == {"value": f"{sum(e['verification']['owned'] for e in runs)} of 2"}
        assert cells["share of weights zeroed"] == {"per_seed": [e["zero_share"] for e in runs]}
        assert cells["Dice clean"] == {"per_seed": [e["harmlessness"]["dice_clean"] for e in runs]}
        assert len(cells["p (t, with margin)"]["per_seed"]) == 2 and "ASR" in cells
    results = {
        "format": 1,
        "name": "stealthmark_quick",
        "title": "t",
        "commands": ["python scripts/experiment.py run stealthmark_quick"],
        "commit": "c",
        "seeds": {"development": 0, "report": 1},  # the format check only; this run is not publishable
        "wall_time_s": {},
        "tables": produced,
        "reading": "-",
    }
    write_results(tmp_path / "stealthmark_quick" / "results.json", results)
    assert load_results(tmp_path / "stealthmark_quick" / "results.json")["tables"] == produced
    assert "Verification (StealthMark)" in render_page([results])

    # --publish dispatches to these tables and records the segmentation roles (a report-sized declaration of this
    # test's own seed, publishing this run's numbers into a temporary docs folder)
    seeds_v = {**seeds, "data": 5006, "owners": [11, 12, 13], "owner_keys": [2027, 2028, 2029]}
    seeds_v |= {"benign": list(range(60, 80)), "other_owners": [31, 32, 33], "other_keys": [3031, 3032, 3033]}
    seeds_v["finetune"] = [41, 42, 43]
    report_path = tmp_path / "stealthmark_quick.json"
    report_path.write_text(json.dumps({**declared, "seeds": seeds_v}))
    docs = tmp_path / "docs"
    experiment.publish(load_experiment(report_path), collected, out, ["run", "stealthmark_quick", "--publish"], docs)
    published = load_results(docs / "experiments" / "stealthmark_quick" / "results.json")
    assert published["seeds"]["report"] == 5006 and published["seeds"]["other_keys"] == [3031, 3032, 3033]
    assert published["tables"] == produced and "Verification (StealthMark)" in (docs / "experiments.md").read_text()
    # the floor figure is drawn by the run and published beside its Verification table
    assert (
        published["figures"] == ["floors.png"] and (docs / "experiments" / "stealthmark_quick" / "floors.png").is_file()
    )

    # a rerun resumes: every stage is found done
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0 and ": already done" in second.stdout and "done in" not in second.stdout

    # a training interrupted after saving model.pt but before its record runs again from scratch, alone
    unfinished = out / "models" / f"{archs[0]}/{trigger}/stealthmark/owner{seeds['owners'][0]}"
    (unfinished / "stealthmark_record.json").unlink()
    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert third.stdout.count("done in") == 1 and "an unfinished training's files are removed" in third.stdout
    assert json.loads((unfinished / "stealthmark_record.json").read_text())["key"] == seeds["owner_keys"][0]


def _distance(first: dict, second: dict) -> float:
    return sum(float((first[k].float() - second[k].float()).pow(2).sum()) for k in first) ** 0.5


def _declare(tmp_path: Path, name: str, **changes) -> Path:
    raw = json.loads((DECLARATIONS / "stealthmark_quick.json").read_text())
    raw["name"] = name
    for key, value in changes.items():
        if key in raw["seeds"]:
            raw["seeds"][key] = value
        else:
            raw[key] = value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"benign": [21, 12, 23, 24]}, r"owners and benign share \[12\]"),
        ({"other_keys": [2028]}, r"owner_keys and other_keys share \[2028\]"),
        ({"other_owners": [31, 24]}, r"benign and other_owners share \[24\]"),
        ({"owner_keys": [0, 5]}, r"development seed 0 is also in owner_keys"),
        ({"owner_keys": [2027]}, "one key per seed of seeds.owners"),
        ({"data": 999}, "report seed 999 < 1000"),
        ({"data": 1001}, r"needs >= 3 owners .* got \{'owners': 2, 'other_owners': 1, 'benign': 4\}"),
        (
            {"removal": {"finetune_epochs": [1], "prune_rates": [1.0]}},
            r"prune_rates must be distinct shares in \(0, 1\)",
        ),
        ({"removal": {"prune_rates": [0.3, 0.3]}}, r"prune_rates must be distinct shares in \(0, 1\)"),
        ({"removal": {"learning_rate": 0.1}}, "removal declares neither finetune_epochs nor prune_rates"),
        ({"removal": {"prune_epochs": 2, "prune_rates": [0.1]}}, r"removal: unknown keys \['prune_epochs'\]"),
        (
            {"removal": {"finetune_epochs": [1], "kept_checkpoint": "final"}},
            r"removal.kept_checkpoint must be 'best' or 'last', got 'final'",
        ),
        ({"finetune": [41]}, "seeds.finetune needs one seed per owner"),
        ({"finetune": [41, 11]}, r"owners and finetune share \[11\]"),
        ({"sweeps": {"epsilon": [0.1]}}, r"values in \(0, 1\) other than the declared 0.1"),
        ({"sweeps": {"margin": [0.1]}}, "sweeps may vary"),
        ({"triggers": ["stripes"]}, "architectures and triggers"),
        ({"triggers": ["patch"], "decoy_share": 0.25}, r"decoy_share: decoy_share 0.25 needs a keyed trigger"),
        ({"decoy_share": 0.6}, r"decoy_share: decoy_share must lie in \[0, 1 - trigger_share\] = \[0, 0.5\]"),
        ({"decoy_share": 0.25, "sweeps": {"trigger_share": [0.8]}}, r"= \[0, 0.2\], got 0.25"),
        ({"task": "detection"}, "task must be"),
    ],
)
def test_a_segmentation_declaration_with_overlapping_roles_or_missing_parts_is_refused(tmp_path, changes, problem):
    with pytest.raises(ExperimentError, match=problem):
        load_experiment(_declare(tmp_path, "seg", **changes))


def test_the_report_declaration_follows_the_protocol_and_plans_its_stages():
    declared = load_experiment(DECLARATIONS / "stealthmark_v1.json")
    assert isinstance(declared, SegmentationExperiment) and declared.seed_roles.report
    roles = declared.seed_roles
    assert len(roles.owners) >= 3 and len(roles.benign) >= 20 and len(roles.other_owners) >= 3
    assert len({arch for arch, _ in declared.benign_models()}) >= 2
    plan = subprocess.run(
        [sys.executable, "scripts/experiment.py", "plan", "stealthmark_v1", "--out", "/nonexistent/stealthmark_v1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr[-2000:]
    archs, triggers, owners = len(declared.architectures), len(declared.triggers), len(roles.owners)
    trained = archs * triggers * owners * (1 + len(declared.baselines))
    n_benign, n_other = len(roles.benign), len(roles.other_owners)
    stages = 1 + 3 * trained + n_benign * (1 + triggers + triggers * owners) + archs * triggers * n_other * (1 + owners)
    stages += 3 * archs * triggers * owners * len(declared.removal.get("finetune_epochs", []))
    stages += 3 * archs * triggers * owners * len(declared.removal.get("prune_rates", []))  # prune, evaluate, verify
    stages += sum(len(v) for v in declared.sweeps.values()) * 3 * archs * triggers * owners
    stages += len(declared.sweeps.get("epsilon", ())) * n_benign * triggers * owners
    assert f"] {stages} stages to run under" in plan.stdout
    # each owner's watermarked model is pruned at 10, 30 and 50 % (the bundle's prune.json), evaluated and verified
    assert declared.removal["prune_rates"] == [0.1, 0.3, 0.5]
    for rate in (10, 30, 50):
        for arch in declared.architectures:
            for owner in roles.owners:
                label = f"{arch} {declared.triggers[0]} owner {owner} pruned {rate} %"
                pruning = [line for line in plan.stdout.splitlines() if f"StealthMark segmenter {label}" in line]
                assert len(pruning) == 1, label
                assert f"StealthMark evaluation {label}" in plan.stdout
                assert f"StealthMark verification {label} (owner's record)" in plan.stdout
    assert plan.stdout.count("stealthmark/configs/prune.json") == archs * triggers * owners * 3


def test_the_verification_table_counts_the_qr_explanations_by_mode():
    """Each verification.json's QR block (qr_mode) becomes a count of decoded owner IDs, labelled by its mode."""
    from xmark_bundle.experiments.segmentation import _verification, _verification_row

    def report(decodes: bool, agreement: float, mode: str = "random_mask") -> dict:
        qr = {"mode": mode, "decodes_owner": decodes, "agreement_data": agreement, "model_dependent": True}
        return {"verdict": "not verified", "verified": False, "test": {"p_ttest": 0.5}, "qr": qr}

    runs = [_verification(report(d, a), Path("v.json")) for d, a in ((True, 1.0), (False, 0.5), (False, 0.48))]
    cells = _verification_row("benign", runs, True)["cells"]
    assert cells["QR decodes the owner's ID"] == {"value": "1 of 3 (random_mask)"}
    assert cells["QR data-module agreement"] == {"per_seed": [1.0, 0.5, 0.48]}
    mixed = [*runs, _verification(report(True, 1.0, "authors_grid"), Path("v.json"))]
    assert _verification_row("b", mixed, True)["cells"]["QR decodes the owner's ID"]["value"].endswith(
        "(authors_grid, random_mask)"
    )
    without = [*runs, _verification({"verified": False, "test": {}}, Path("v.json"))]
    assert "QR decodes the owner's ID" not in _verification_row("b", without, True)["cells"]


# ---------------------------------------------------------------- false accusations (the runner's option)


def _false_accusation_declaration(tmp_path: Path, name: str = "seg_fa", **changes) -> Path:
    """A toy declaration with the false-accusation option: one architecture at 32 px, two owners, two benign models,
    one other key, both QR explanations (few samples), markers seeded apart from every other role."""
    raw = json.loads((DECLARATIONS / "stealthmark_quick.json").read_text())
    raw |= {"name": name, "architectures": ["unet"], "baselines": [], "false_accusations": {"marker_share": 0.5}}
    raw["phantoms"] = {"n": 16, "min_size": 64, "max_size": 80, "valid_fraction": 0.5}  # >= 4 queries: the detector
    raw["training"] |= {"image_size": 32, "max_epochs": 1}
    raw["verification"] = {"n_samples": 4, "qr_mode": "both", "qr_samples": 1800}
    raw["seeds"] |= {"benign": [21, 22], "markers": [51, 52]}
    for key in ("sweeps", "removal"):
        raw.pop(key)
    raw["seeds"].pop("finetune")
    for key, value in changes.items():
        (raw["seeds"] if key == "markers" else raw)[key] = value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"markers": [51]}, r"false_accusations needs seeds.markers = \[training"),
        ({"markers": [51, 11]}, r"owners and markers share \[11\]"),
        ({"false_accusations": {"marker_share": 0}}, r"marker_share must lie in \(0, 1\]"),
        ({"false_accusations": {"queries": 3}}, "false_accusations may set"),
    ],
)
def test_a_false_accusation_declaration_needs_its_own_marker_seeds(tmp_path, change, problem):
    with pytest.raises(ExperimentError, match=problem):
        load_experiment(_false_accusation_declaration(tmp_path, **change))


def test_markers_without_the_false_accusation_option_are_refused(tmp_path):
    raw = json.loads(_false_accusation_declaration(tmp_path).read_text())
    raw.pop("false_accusations")
    (tmp_path / "seg_fa.json").write_text(json.dumps(raw))
    with pytest.raises(ExperimentError, match="false_accusations needs seeds.markers"):
        load_experiment(tmp_path / "seg_fa.json")


def test_the_false_accusation_option_trains_with_markers_and_verifies_again_with_marked_queries(tmp_path):
    """The dry run: every training gets the training markers' seed, and every verification of an owner's, a benign
    and an other-key model is planned a second time with the query markers' seed."""
    from xmark_bundle.experiments.runner import run_experiment

    x = load_experiment(_false_accusation_declaration(tmp_path))
    planned = run_experiment(x, ROOT, tmp_path / "run", dry_run=True)["planned_stages"]
    trainings = [cmd for name, cmd in planned if name.startswith("StealthMark segmenter")]
    assert len(trainings) == 2 + 2 + 1  # owners, benign, other key
    for cmd in trainings:
        assert cmd[cmd.index("--marker_seed") + 1] == "51" and cmd[cmd.index("--marker_share") + 1] == "0.5"
    marked = [(name, cmd) for name, cmd in planned if name.endswith("with markers on every query")]
    plain = [name for name, _ in planned if name.startswith("StealthMark verification") and "markers" not in name]
    assert len(plain) == len(marked) == 2 + 2 * 2 + 1 * 2  # own records, benign x owners, other key x owners
    for _, cmd in marked:
        assert (
            cmd[cmd.index("--query_markers") + 1] == "52"
            and "/verification/markers/" in cmd[cmd.index("--output_dir") + 1]
        )
    assert all("--query_markers" not in cmd for name, cmd in planned if name in plain)


@pytest.mark.slow
def test_the_false_accusation_option_counts_every_test_per_query_set(tmp_path):
    """A real toy run: the table's counts are the reports' verdicts, with exact intervals, for plain and marked
    queries; the marked queries carry markers (their floors differ from the plain ones'); the authors' grid QR decodes
    the owner's ID for every model whatever it learnt (it is not model-dependent)."""
    from xmark_bundle.experiments.runner import run_experiment

    x = load_experiment(_false_accusation_declaration(tmp_path))
    collected = run_experiment(x, ROOT, tmp_path / "run")
    (table,) = [t for t in tables(collected) if t["title"].startswith("False accusations")]
    rows = {row["label"]: row["cells"] for row in table["rows"]}
    benign_plain = [v for b in collected["benign"].values() for v in b["verification"]["noise"].values()]
    others_plain = [v for o in collected["other_keys"].values() for v in o["verification"].values()]
    for queries, where in (("plain", "queries as they are"), ("markers", "a burned-in marker on every query")):
        benign = [r if queries == "plain" else r["markers"] for r in benign_plain]
        others = [r if queries == "plain" else r["markers"] for r in others_plain]
        for label, runs in (("benign, all", benign), ("not the owner's (benign and other keys)", benign + others)):
            cells = rows[f"noise, {where}: {label}" + (" x every owner's record" if label == "benign, all" else "")]
            assert set(cells) == {"floor", "authors' detector", "qr_a", "qr_b", "qr_b_binomial"}
            reports = [json.loads(Path(r["report"]).read_text()) for r in runs]
            assert all(rep["query_markers"] == (52 if queries == "markers" else None) for rep in reports)
            k = sum(rep["verified"] is True for rep in reports)
            ci = stats.binomtest(k, len(runs)).proportion_ci(method="exact")
            assert cells["floor"] == {"value": f"{k} of {len(runs)} ({ci.low:.3f}-{ci.high:.3f})"}
            k = sum(rep["qr_all"]["random_mask"]["decodes_owner"] is True for rep in reports)
            assert cells["qr_b"]["value"].startswith(f"{k} of {len(runs)} (")
            k = sum(rep["qr_all"]["random_mask"]["p_binomial_data"] < 0.05 for rep in reports)
            assert cells["qr_b_binomial"]["value"].startswith(f"{k} of {len(runs)} (")
            assert cells["qr_a"]["value"].startswith(f"{len(runs)} of {len(runs)} (")  # the verifier's own pattern
    # a marked query set is the plain one with markers burned in: same images, other floors
    plain = json.loads(Path(benign_plain[0]["report"]).read_text())
    marked = json.loads(Path(benign_plain[0]["markers"]["report"]).read_text())
    assert plain["queries"] == marked["queries"] and plain["floor_clean"] != marked["floor_clean"]
    owners = rows["noise, queries as they are: owners' watermarked models, own record"]
    assert owners["floor"]["value"].startswith(
        f"{sum(m['verification']['owned'] for m in collected['models'].values())} of 2"
    )


def test_fine_tuning_that_keeps_the_last_epoch_is_its_own_stage(tmp_path):
    """removal.kept_checkpoint "last": the fine-tuner is told so and its model goes to its own folder, so a
    best-epoch fine-tune of the same length in the same output folder is never taken for it."""
    from xmark_bundle.experiments.segmentation import run_segmentation

    removal = {"finetune_epochs": [2], "kept_checkpoint": "last"}
    declared = load_experiment(_declare(tmp_path, "seg_last", removal=removal, finetune=[41, 42]))
    planned = run_segmentation(declared, ROOT, tmp_path / "out", dry_run=True)["planned_stages"]
    finetunes = [(name, cmd) for name, cmd in planned if "fine-tuned 2 epochs" in name and "segmenter" in name]
    assert finetunes and all(name.endswith(", last kept") for name, _ in finetunes)
    for _, cmd in finetunes:
        assert cmd[cmd.index("--kept_checkpoint") + 1] == "last"
        assert cmd[cmd.index("--ckpt_dir") + 1].endswith("_finetuned2_last")


def test_decoys_train_every_stealthmark_model_of_a_declaration_and_no_benign_one(tmp_path):
    """``decoy_share``: owners', other keys' and sweeps' StealthMark models train with decoys; benign models never;
    a declaration without it plans the commands it planned before (no ``--decoy_share``)."""
    from xmark_bundle.experiments.segmentation import run_segmentation

    sweeps = {"trigger_share": [0.25]}
    declared = load_experiment(_declare(tmp_path, "seg_decoys", decoy_share=0.25, sweeps=sweeps))
    planned = run_segmentation(declared, ROOT, tmp_path / "out", dry_run=True)["planned_stages"]
    trainings = {name: cmd for name, cmd in planned if name.startswith("StealthMark segmenter")}
    stealthmark = (" stealthmark owner ", " other key ", "trigger_share=0.25 ")
    watermarked = {name: cmd for name, cmd in trainings.items() if any(part in name for part in stealthmark)}
    others = {name: cmd for name, cmd in trainings.items() if name not in watermarked}
    assert len(watermarked) == 2 * (2 + 1 + 2)  # per architecture: owners, other key, the sweep's owners
    assert all(cmd[cmd.index("--decoy_share") + 1] == "0.25" for cmd in watermarked.values())
    # benign models, the badnet_seg baseline, fine-tuned and pruned models: no decoys
    assert {"benign", "badnet_seg", "fine-tuned", "pruned"} <= {w for name in others for w in name.split()}
    assert all("--decoy_share" not in cmd for cmd in others.values())
    plain = load_experiment(_declare(tmp_path, "seg_plain", sweeps=sweeps))
    before = run_segmentation(plain, ROOT, tmp_path / "plain", dry_run=True)["planned_stages"]
    assert all("--decoy_share" not in cmd for _, cmd in before)
