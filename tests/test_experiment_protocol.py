"""The evaluation protocol, enforced: seeds by role and disjoint, fresh report seeds that tests and development never
use, legacy declarations only beside their published results, the ledger of published report seeds, and the runner's
plan (every owner x suspect, every independent owner, the surrogate as Ind-M, queries at each suspect's own size)."""

import copy
import json
import re
import sys
from pathlib import Path

import pytest

from xmark_bundle.experiments import ExperimentError, load_experiment, run_experiment
from xmark_bundle.experiments.ledger import LedgerError, check_publication, declaration_sha256, read_ledger, record
from xmark_bundle.experiments.protocol import MIN_FAMILY_POOL, MIN_REPORT_SEED

ROOT = Path(__file__).resolve().parents[1]
DECLARATIONS = ROOT / "configs" / "experiments"
LEDGER = ROOT / "docs" / "experiments" / "ledger.json"
sys.path.insert(0, str(ROOT / "scripts"))
import experiment  # noqa: E402  (scripts/experiment.py)

V2 = json.loads((DECLARATIONS / "comparison_v2.json").read_text())


def _declare(tmp_path: Path, raw: dict, name: str = "comparison_v2") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**raw, "name": name}))
    return path


def _with_seeds(**seeds) -> dict:
    raw = copy.deepcopy(V2)
    raw["seeds"] = {**raw["seeds"], **seeds}
    for key in [k for k, v in seeds.items() if v is None]:
        del raw["seeds"][key]
    return raw


def test_the_new_comparison_follows_the_protocol():
    declared = load_experiment(DECLARATIONS / "comparison_v2.json")
    roles = declared.seed_roles
    assert not declared.legacy and roles.report and roles.data >= MIN_REPORT_SEED
    assert len(roles.owners) >= 3 and len(roles.independent_owners) >= 3 and len(roles.suspects) >= 3
    assert roles.independent_phantoms not in (roles.data, roles.development)
    assert roles.phantoms_of(roles.independent_owners[-1]) == roles.independent_phantoms
    assert {roles.phantoms_of(seed) for seed in roles.independent_owners[:-1]} == {roles.data}
    assert len(declared.benign) >= 20 and len({arch for arch, _, _ in declared.benign}) >= 2
    assert set(declared.methods) == {"xmark", "sscl_bw", "keyed_grating", "keyed_carrier", "badnets", "blended",
                                     "wanet", "ubw_p", "label_consistent"}  # fmt: skip
    assert len(roles.family_pool) >= MIN_FAMILY_POOL  # each owner's family: its watermark and the pool
    all_seeds = [seed for seeds in roles.by_role().values() for seed in seeds]
    assert len(all_seeds) == len(set(all_seeds))  # disjoint roles, no seed twice


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (_with_seeds(suspects=[101, 402, 403]), r"surrogate and suspects share \[101\]"),
        (_with_seeds(owners=[201, 202, 505]), r"owners and benign share \[505\]"),
        (
            _with_seeds(independent_owners=[301, 401, 201]),
            r"owners and independent_owners share \[201\]; independent_owners and suspects share \[401\]",
        ),
        (_with_seeds(data=999), "report seed 999 < 1000"),
        (_with_seeds(data=1500, suspects=[1500, 402, 403]), r"report seed 1500 is also a model seed \(suspects\)"),
        (_with_seeds(owners=[201, 202]), r"needs >= 3 of each of \['owners'\]"),
        (_with_seeds(independent_phantoms=None), "needs seeds.independent_phantoms"),
        (_with_seeds(independent_phantoms=0), "independent_phantoms must differ from the data and development"),
        (_with_seeds(family_pool=list(range(601, 611))), r"needs seeds.family_pool with >= 19 seeds .* got 10"),
        (_with_seeds(family_pool=[*range(601, 619), 401]), r"suspects and family_pool share \[401\]"),
        (_with_seeds(owners=None), r"seeds lacks \['owners'\]: name every seed by its role"),
        (_with_seeds(owners=[201, 201, 202]), r"seeds.owners lists seeds \[201\] more than once"),
        (_with_seeds(keys=[1]), r"seeds: unknown roles \['keys'\]"),
        (_with_seeds(surrogate="101"), "seeds.surrogate must be an integer seed"),
        ({**V2, "protocol": "v1"}, "protocol must be 'legacy' or absent"),
        ({**V2, "benign": [{"arch": "resnet18", "seeds": [501, 501]}]}, r"same model more than once: \['resnet18"),
    ],
)
def test_a_declaration_that_breaks_the_protocol_names_the_file_the_seeds_and_the_roles(raw, problem, tmp_path):
    path = _declare(tmp_path, raw)
    with pytest.raises(ExperimentError, match=problem) as caught:
        load_experiment(path)
    assert str(path) in str(caught.value)


def test_a_development_declaration_may_have_one_owner_but_never_shared_seeds(tmp_path):
    quick = json.loads((DECLARATIONS / "quick.json").read_text())
    roles = load_experiment(DECLARATIONS / "quick.json").seed_roles
    assert not roles.report and roles.owners == (2,) and roles.surrogate == 0
    shared = {**quick, "seeds": {**quick["seeds"], "suspects": [2]}}
    with pytest.raises(ExperimentError, match=r"owners and suspects share \[2\]"):
        load_experiment(_declare(tmp_path, shared, "quick"))


def test_legacy_declarations_load_only_beside_their_published_results(tmp_path):
    legacy = sorted(p.stem for p in DECLARATIONS.glob("*.json") if load_experiment(p).legacy)
    assert legacy == ["ablation", "comparison", "evasion", "pretrained", "pruning", "removal", "scale", "transfer"]
    comparison = load_experiment(DECLARATIONS / "comparison.json")
    roles = comparison.seed_roles  # the implicit seeds it ran with, collisions included: what the tables measured
    assert (roles.surrogate, roles.owners, roles.independent_owners) == (1, (1,), (1001,)) and 1 in roles.suspects
    raw = json.loads((DECLARATIONS / "comparison.json").read_text())
    published = tmp_path / "published"
    with pytest.raises(ExperimentError, match=r"only for declarations already published, and .*table1/results.json"):
        load_experiment(_declare(tmp_path, raw, "comparison"), published)
    for part in ("table1", "table2", "detectability"):
        (published / part).mkdir(parents=True)
        (published / part / "results.json").write_text(json.dumps({"seeds": {"report": 1}}))
    assert load_experiment(_declare(tmp_path, raw, "comparison"), published).legacy
    (published / "table2" / "results.json").write_text(json.dumps({"seeds": {"report": 7}}))
    with pytest.raises(ExperimentError, match="table2/results.json was published on report seed 7, not 1"):
        load_experiment(_declare(tmp_path, raw, "comparison"), published)


def test_the_publisher_refuses_legacy_development_and_changed_declarations(tmp_path, capsys):
    assert experiment.main(["run", "comparison", "--publish"]) == 2  # refused before any stage runs
    assert "comparison is a legacy declaration" in capsys.readouterr().err
    assert "runs on the development seed" in experiment.publication_refused(load_experiment(DECLARATIONS / "demo.json"))
    declared = load_experiment(_declare(tmp_path, V2))
    ledger = tmp_path / "ledger.json"
    assert experiment.publication_refused(declared, ledger) is None
    record(ledger, declared.data_seed, "comparison_v2", experiment.declaration_hash(declared), "abc1234", ["table1"])
    assert experiment.publication_refused(declared, ledger) is None  # unchanged: may be published again
    changed = load_experiment(_declare(tmp_path, {**V2, "verification": {"n_samples": 50}}))
    assert "a change needs a new report seed" in experiment.publication_refused(changed, ledger)
    moved = load_experiment(_declare(tmp_path, {**V2, "verification": {"n_samples": 50}, "seeds": {
        **V2["seeds"], "data": 5003}}))  # fmt: skip
    assert experiment.publication_refused(moved, ledger) is None  # the change on a new report seed
    seeds = experiment.seed_record(declared)
    assert seeds["report"] == declared.data_seed and seeds["owners"] == V2["seeds"]["owners"]
    assert seeds["independent_phantoms"] == V2["seeds"]["independent_phantoms"] and len(seeds["benign"]) == 20


def test_the_ledger_records_each_seed_with_its_declaration_and_refuses_a_change(tmp_path):
    ledger = tmp_path / "ledger.json"
    assert read_ledger(ledger) == []
    raw = {"name": "x", "title": "X", "description": "d", "seeds": {"data": 5001}, "methods": {"a": 1}}
    sha = declaration_sha256(raw)
    assert sha == declaration_sha256(json.loads(json.dumps(raw, indent=4)))  # whitespace and key order do not count
    assert sha == declaration_sha256({**raw, "description": "clearer words", "title": "X again"})  # prose does not
    assert sha != declaration_sha256({**raw, "methods": {"a": 2}})
    assert check_publication(ledger, 5001, "x", sha) is None
    record(ledger, 5001, "x", sha, "c1", ["x"])
    record(ledger, 5001, "x", sha, "c2", ["x"])  # republished unchanged: the commit is added
    record(ledger, 5001, "y", declaration_sha256({**raw, "name": "y"}), "c3", ["y"])  # another declaration, same seed
    entries = read_ledger(ledger)
    assert [(e["report_seed"], e["declaration"], e["commits"]) for e in entries] == [
        (5001, "x", ["c1", "c2"]),
        (5001, "y", ["c3"]),
    ]
    changed = declaration_sha256({**raw, "methods": {"a": 2}})
    with pytest.raises(LedgerError, match=r"'x' was published on report seed 5001 .* a change needs a new report seed"):
        record(ledger, 5001, "x", changed, "c4", ["x"])
    assert read_ledger(ledger) == entries  # nothing written
    record(ledger, 5002, "x", changed, "c4", ["x"])  # the change on a new seed
    ledger.write_text(json.dumps({"published": {}}))
    with pytest.raises(LedgerError, match=r"ledger.json: is not a ledger of format 1"):
        read_ledger(ledger)


def _reserved_seeds() -> dict[int, str]:
    """Report seeds that tests and development must never use: the ledger's and the current report declarations'."""
    reserved = {entry["report_seed"]: f"ledger ({entry['declaration']})" for entry in read_ledger(LEDGER)}
    for path in DECLARATIONS.glob("*.json"):
        declared = load_experiment(path)
        if not declared.legacy and declared.seed_roles.report:
            reserved.setdefault(declared.data_seed, f"report seed of {path.name}")
    return reserved


def _declared_seeds(raw: dict) -> list[tuple[str, int]]:
    """Every (role, seed) a declaration uses, its phantom sets' seeds included."""
    used = []
    for role, value in raw["seeds"].items():
        used += [(role, seed) for seed in (value if isinstance(value, list) else [value])]
    used += [("benign", seed) for group in raw.get("benign", []) for seed in group["seeds"]]  # segmentation: in seeds
    if raw.get("pretrain"):
        used.append(("pretrain", raw["pretrain"]["seed"]))
    return used


def test_report_seeds_are_never_used_by_tests_or_in_another_role():
    reserved = _reserved_seeds()
    assert reserved and min(reserved) >= MIN_REPORT_SEED
    pattern = re.compile(r"(?<![\w.])(" + "|".join(map(str, reserved)) + r")(?![\w.])")
    for path in sorted((ROOT / "tests").rglob("*")):
        if path.suffix in (".py", ".json", ".csv", ".txt") and path.is_file():
            found = pattern.findall(path.read_text(encoding="utf-8", errors="ignore"))
            assert not found, f"{path.relative_to(ROOT)} uses report seed(s) {sorted(set(found))} ({reserved})"
    for path in sorted(DECLARATIONS.glob("*.json")):
        raw, declared = json.loads(path.read_text()), load_experiment(path)
        for role, seed in _declared_seeds(raw):
            report_use = role == "data" and not declared.legacy and declared.seed_roles.report
            assert seed not in reserved or report_use, f"{path.name} uses report seed {seed} as {role}"


def _plan(tmp_path: Path, raw: dict, name: str = "comparison_v2") -> dict:
    declared = load_experiment(_declare(tmp_path, raw, name), tmp_path / "published")
    return run_experiment(declared.only(["xmark"]), ROOT, tmp_path / "out", dry_run=True)


def test_the_runner_plans_every_owner_suspect_and_independent_owner_and_the_surrogate_as_ind_m(tmp_path, capsys):
    raw = {**V2, "suspect_variants": {"": {}, "224px": {"image_size": 224}}}
    collected = _plan(tmp_path, raw)
    planned = dict(collected["planned_stages"])
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    roles, xmark = V2["seeds"], collected["methods"]["xmark"]
    kinds = ("", "_224px")
    suspects = [f"owner{o}/suspect{v}_seed{s}" for o in roles["owners"] for v in kinds for s in roles["suspects"]]
    assert sorted(xmark["suspects"]) == sorted(suspects)
    assert {row["owner"] for row in xmark["suspects"].values()} == set(roles["owners"])
    for row in xmark["suspects"].values():
        assert sorted(row["ind_w_owners"]) == sorted(f"independent_owner{i}" for i in roles["independent_owners"])
    assert len(xmark["ind_m"]) == 3 * 20 and len(xmark["ind_m_seed_controls"]) == 3 * 2
    assert {key.split("/")[1] for key in xmark["ind_m_seed_controls"]} == {"surrogate", "resnet34_seed101"}
    # the surrogate-seeded benign model is trained with the surrogate's seed (ResNet34: not the surrogate again)
    assert "--seed 101" in " ".join(planned["classifier 'resnet34_seed101'"])
    # each owner: its own watermark (its seed) and release (marked images drawn with its seed)
    for owner in roles["owners"]:
        watermark = " ".join(planned[f"xmark watermark 'owner{owner}/watermark'"])
        assert f"--seed {owner} " in watermark and f"--surrogate_ckpt {tmp_path}/out/models/surrogate/" in watermark
        release = " ".join(planned[f"xmark owner {owner} release"])
        assert f"--seed {owner} " in release and f"--release_dir {tmp_path}/out/release/xmark/owner{owner}" in release
    # the last independent owner trains surrogate and watermark on the disjoint phantom set
    last = roles["independent_owners"][-1]
    phantoms = " ".join(planned["independent owners' phantoms"])
    assert f"--seed {roles['independent_phantoms']} " in phantoms
    assert "independent_phantoms/datalist.json" in " ".join(planned[f"classifier 'independent_owner{last} surrogate'"])
    assert "independent_phantoms" in " ".join(planned[f"xmark watermark 'independent_owner{last}/watermark'"])
    first = roles["independent_owners"][0]
    assert "independent_phantoms" not in " ".join(planned[f"xmark watermark 'independent_owner{first}/watermark'"])
    # every verification queries at the suspect's own size, from the files (the own-size override)
    verifications = {name: " ".join(cmd) for name, cmd in planned.items() if " verification " in name}
    assert len(verifications) == 3 * 6 * (1 + 3) + 3 * 22
    assert all("configs/verify_own_size.json" in cmd for cmd in verifications.values())
    big = verifications[f"xmark verification malicious_owner{roles['owners'][0]}_suspect_224px_seed401"]
    assert "--query_size 224" in big
    assert "(dry run)" in capsys.readouterr().out


def test_a_legacy_declaration_plans_the_stages_it_was_published_with(tmp_path):
    raw = json.loads((DECLARATIONS / "comparison.json").read_text())
    published = tmp_path / "published"
    for part in ("table1", "table2", "detectability"):
        (published / part).mkdir(parents=True)
        (published / part / "results.json").write_text(json.dumps({"seeds": {"report": 1}}))
    collected = _plan(tmp_path, raw, "comparison")
    planned = dict(collected["planned_stages"])
    xmark = collected["methods"]["xmark"]
    assert sorted(xmark["suspects"]) == ["suspect_seed1", "suspect_seed2", "suspect_seed3"]
    assert "ind_w" in xmark["suspects"]["suspect_seed1"] and "ind_m_seed_controls" not in xmark
    malicious = " ".join(planned["xmark verification malicious 'suspect_seed1'"])
    assert "verify_own_size" not in malicious and "--seed 1 " in " ".join(planned["xmark release"])
    assert "--seed 1001 " in " ".join(planned["classifier 'surrogate_independent'"])


def _run(delta_p: float, owned: bool, calibrated_p: float | None = None, owner: int | None = None) -> dict:
    run = {"p_value": 1e-4 if owned else 0.5, "wilcoxon_p": 0.01, "delta_p": delta_p, "wsr": delta_p, "owned": owned}
    run["control"] = {"specific": owned, "delta_p": delta_p / 4, "p_value": 0.9}
    if calibrated_p is not None:
        owned_calibrated = calibrated_p <= 0.05
        run["calibrated"] = {"p_value": calibrated_p, "owned": owned_calibrated, "statistic": delta_p, "members": 19}
        run["calibrated"] |= {"member_statistics": [delta_p, 0.2, 0.1], "owner_index": 0, "alpha": 0.05}
    return run if owner is None else {**run, "owner": owner}


def _suspect(owner: int, delta_p: float, calibrated: bool) -> dict:
    p = 0.05 if calibrated else None
    return {
        "owner": owner,
        "mean_ba": 0.8,
        "mean_auroc": 0.9,
        "wsr_at_validation_threshold": {"value": 0.9, "clean_positive_rate": 0.1},
        "release_quality": {"mean_psnr": 30.0, "mean_ssim": 0.9, "mean_lpips": 0.01},
        "malicious": _run(delta_p, True, p),
        "ind_w_owners": {"independent_owner7": _run(0.1, False, None if p is None else 0.5),
                         "independent_owner8": _run(0.3, True, None if p is None else 0.2)},
    }  # fmt: skip


@pytest.mark.parametrize("calibrated", [True, False])
def test_tables_show_owners_spread_the_control_and_both_verdicts(calibrated, tmp_path):
    from xmark_bundle.experiments import plain_words, tables
    from xmark_bundle.experiments.figures import save_scenarios_figure

    p = 0.5 if calibrated else None
    method = {
        "gamma": 0.5,
        "suspects": {
            "owner1/suspect_seed4": _suspect(1, 0.6, calibrated),
            "owner1/suspect_seed5": _suspect(1, 0.8, calibrated),
            "owner2/suspect_seed4": _suspect(2, 0.2, calibrated),
            "owner2/suspect_seed5": _suspect(2, 0.4, calibrated),
        },
        "ind_m": {
            "owner1/b1": _run(0.0, False, p, 1),
            "owner1/b2": _run(0.3, True, 0.04 if calibrated else None, 1),
            "owner2/b1": _run(0.0, False, p, 2),
            "owner2/b2": _run(0.0, False, p, 2),
        },
        "ind_m_seed_controls": {"owner1/surrogate": _run(0.5, True, p, 1), "owner2/surrogate": _run(0.1, False, p, 2)},
    }
    collected = {"benign": {"b1": {"mean_ba": 0.8, "mean_auroc": 0.9}}, "methods": {"xmark": method}}
    table1, table2 = tables(collected)
    cells = table2["rows"][0]["cells"]
    assert set(cells) <= set(table2["columns"])
    assert cells["Malicious ΔP"] == {"per_seed": [0.6, 0.8, 0.2, 0.4]}  # every owner x suspect cell
    assert cells["Malicious ΔP by owner"] == {"value": "1: 0.700 ± 0.141; 2: 0.300 ± 0.141; sd of owner means 0.283"}
    assert table1["rows"][1]["cells"]["WSR at 0.5 by owner"]["value"].startswith("1: 0.700 ± 0.141")
    assert cells["control ΔP"] == {"per_seed": [0.15, 0.2, 0.05, 0.1]} and cells["control p"]["per_seed"] == [0.9] * 4
    assert cells["Malicious verified"] == {"value": "4 of 4"}
    assert cells["Ind-W ΔP"]["per_seed"] == [0.1, 0.3] * 4 and cells["Ind-W verified"] == {"value": "4 of 8"}
    assert cells["Ind-W verified by independent owner"] == {"value": "7: 0 of 4; 8: 4 of 4"}
    assert cells["false accusations"] == {"value": "1 of 4"}
    assert cells["false accusations by owner"] == {"value": "1: 1 of 2; 2: 0 of 2"}
    assert cells["surrogate and its seed (Ind-M) verified"] == {"value": "1 of 2"}  # not among the false accusations
    assert cells["surrogate and its seed (Ind-M) ΔP"] == {"per_seed": [0.5, 0.1]}
    if calibrated:
        assert cells["Malicious calibrated p"] == {"per_seed": [0.05] * 4}
        assert cells["Malicious verified (calibrated)"] == {"value": "4 of 4"}
        assert cells["Ind-W verified (calibrated)"] == {"value": "0 of 8"}
        assert cells["Ind-W verified by independent owner (calibrated)"] == {"value": "7: 0 of 4; 8: 0 of 4"}
        assert cells["false accusations (calibrated)"] == {"value": "1 of 4"}
        assert cells["false accusations by owner (calibrated)"] == {"value": "1: 1 of 2; 2: 0 of 2"}
        by_owner = cells["calibrated null by owner: KS p (n)"]["value"]  # benign models and the seed controls
        assert by_owner.startswith("1: ") and by_owner.endswith(" (3)") and "; 2: " in by_owner
        # the research variant: each benign model ranked after the other benign models' mean is subtracted
        assert cells["Malicious verified (reference-adjusted)"] == {"value": "0 of 4"}  # 2 members: p >= 1/3
        assert cells["false accusations by owner (reference-adjusted)"] == {"value": "1: 0 of 2; 2: 0 of 2"}
        assert cells["reference-adjusted null by owner: KS p (n)"]["value"].endswith(" (2)")
    else:  # no calibrated block in the verifications: no calibrated column is filled
        assert not [column for column in cells if "calibrated" in column]
        assert "Ind-W verified by independent owner (calibrated)" not in cells
    lines = plain_words(collected)
    assert sum("Ind-W (owner1/suspect_seed4)" in line for line in lines) == 2  # one per independent owner
    assert save_scenarios_figure(collected, tmp_path / "scenarios.png")


def test_publishing_records_the_seed_and_a_changed_declaration_is_refused_before_anything_is_written(tmp_path):
    from xmark_bundle.experiments import load_results
    from xmark_bundle.experiments.results import write_results

    method = {
        "gamma": 0.5,
        "suspects": {f"owner{o}/suspect_seed{s}": _suspect(o, 0.5, False) for o in (1, 2) for s in (4, 5)},
        "ind_m": {f"owner{o}/b{b}": _run(0.0, False, None, o) for o in (1, 2) for b in (1, 2)},
    }
    collected = {
        "benign": {"b1": {"mean_ba": 0.8, "mean_auroc": 0.9}},
        "methods": {"xmark": method},
        "stage_times_s": {"phantoms": 60.0},
    }
    raw = {**V2, "seeds": {**V2["seeds"], "data": 5005}, "publish": {"table1": [0], "table2": [1]}}  # this test's seed
    docs = tmp_path / "docs"
    declared = load_experiment(_declare(tmp_path, raw))
    experiment.publish(declared, collected, tmp_path / "out", ["run", "comparison_v2", "--publish"], docs)
    table2 = docs / "experiments" / "table2" / "results.json"
    results = load_results(table2)
    assert results["seeds"]["report"] == 5005 and results["seeds"]["owners"] == V2["seeds"]["owners"]
    columns = results["tables"][0]["columns"]
    assert {"control ΔP", "control p", "Malicious verified", "Malicious verified (calibrated)"} <= set(columns)
    (entry,) = read_ledger(docs / "experiments" / "ledger.json")
    assert (entry["report_seed"], entry["declaration"]) == (5005, "comparison_v2")
    assert entry["sha256"] == declaration_sha256(raw) and entry["parts"] == ["table1", "table2"]
    assert (docs / "experiments.md").read_text().count("Commit ") == 2  # the page regenerated from the parts
    assert results["reading"] == experiment.NO_READING
    write_results(table2, {**results, "reading": "What the tables say."})
    again = experiment.publish(declared, collected, tmp_path / "out", ["run", "comparison_v2", "--publish"], docs)
    assert again == 0 and len(read_ledger(docs / "experiments" / "ledger.json")) == 1
    assert load_results(table2)["reading"] == "What the tables say."  # no number changed: the reading stays
    moved = copy.deepcopy(collected)
    moved["methods"]["xmark"]["suspects"]["owner1/suspect_seed4"]["malicious"]["delta_p"] = 0.9
    experiment.publish(declared, moved, tmp_path / "out", ["run", "comparison_v2", "--publish"], docs)
    assert load_results(table2)["reading"] == experiment.NO_READING  # new numbers: the old reading is not theirs
    before = table2.read_bytes()
    changed = load_experiment(_declare(tmp_path, {**raw, "classifier": {**raw["classifier"], "max_epochs": 6}}))
    with pytest.raises(LedgerError, match="a change needs a new report seed"):
        experiment.publish(changed, collected, tmp_path / "out", ["run", "comparison_v2", "--publish"], docs)
    assert table2.read_bytes() == before


@pytest.mark.parametrize("path", sorted(DECLARATIONS.glob("*.json")), ids=lambda p: p.stem)
def test_every_declaration_plans_its_stages(path, tmp_path):
    declared = load_experiment(path)
    planned = run_experiment(declared.only(list(declared.methods)), ROOT, tmp_path, dry_run=True)["planned_stages"]
    names = [name for name, _ in planned]
    assert len(names) == len(set(names)) and any(" verification " in name for name in names)
    own_size = ["configs/verify_own_size.json" in " ".join(cmd) for name, cmd in planned if " verification " in name]
    if getattr(declared, "task", "classification") == "segmentation":  # StealthMark: the bundle's own verify.json
        assert not any(own_size) and all(
            "stealthmark/configs/verify.json" in " ".join(cmd) for _, cmd in planned if "verification " in _
        )
    else:
        assert all(own_size) if not declared.legacy else not any(own_size)


def test_the_runner_plans_each_owners_family_before_its_release_and_trigger_families_for_independent_owners(tmp_path):
    declared = load_experiment(_declare(tmp_path, V2, "comparison_v2"), tmp_path / "published")
    collected = run_experiment(declared.only(["xmark", "badnets"]), ROOT, tmp_path / "out", dry_run=True)
    order = [name for name, _ in collected["planned_stages"]]
    planned = dict(collected["planned_stages"])
    roles, pool = V2["seeds"], V2["seeds"]["family_pool"]
    assert len(pool) >= MIN_FAMILY_POOL
    for method in ("xmark", "badnets"):
        assert sum(f"{method} watermark 'family_pool/seed" in name for name in order) == len(pool)  # one pool
        for owner in roles["owners"]:
            family = f"{method} owner {owner} family of {len(pool) + 1}"
            assert order.index(family) < order.index(f"{method} owner {owner} release")  # fixed before the release
            command = " ".join(planned[family])
            assert f"--owner_ckpt {tmp_path}/out/models/{method}/owner{owner}/watermark/model.pt" in command
            assert command.count("/family_pool/seed") == len(pool)
    # a trigger's pattern depends on its seed only: its pool serves the independent owners too; a generator's pool
    # is trained again against each independent owner's surrogate, on its data (independent_families)
    assert V2["independent_families"] is True
    for owner in roles["independent_owners"]:
        assert f"badnets independent owner {owner} family of {len(pool) + 1}" in planned
        assert not any(f"badnets watermark 'independent_owner{owner}/family_pool" in name for name in order)
        family = " ".join(planned[f"xmark independent owner {owner} family of {len(pool) + 1}"])
        assert family.count(f"/xmark/independent_owner{owner}/family_pool/seed") == len(pool)
        for seed in pool:
            training = " ".join(planned[f"xmark watermark 'independent_owner{owner}/family_pool/seed{seed}'"])
            assert f"--surrogate_ckpt {tmp_path}/out/models/independent_owner{owner}/surrogate/model.pt" in training
            assert f"--seed {seed} " in training
    data = f"--dataset_dir {tmp_path}/out/independent_phantoms "  # the last independent owner's own phantoms
    last = roles["independent_owners"][-1]
    assert data in " ".join(planned[f"xmark watermark 'independent_owner{last}/family_pool/seed{pool[0]}'"])
    without = load_experiment(_declare(tmp_path, {**V2, "independent_families": False}), tmp_path / "published")
    planned = dict(run_experiment(without.only(["xmark"]), ROOT, tmp_path / "out2", dry_run=True)["planned_stages"])
    assert not any("xmark independent owner" in name and "family" in name for name in planned)
