"""Registered conclusions: each claim is decided on each phantom family's published table, the ledger keeps its hash
at the first publication of the results it reads, and a claim that moved after its numbers were known is refused."""

import copy
import json
import sys
from pathlib import Path

import pytest

from xmark_bundle.experiments import load_experiment
from xmark_bundle.experiments.conclusions import (
    Choice,
    Conclusion,
    ConclusionError,
    check_unchanged,
    evaluate,
    evaluate_choice,
    load_choices,
    load_conclusions,
    pick,
    registered_hashes,
    render_choices,
    render_conclusions,
)
from xmark_bundle.experiments.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[1]
REGISTERED = ROOT / "docs" / "experiments" / "conclusions.json"
sys.path.insert(0, str(ROOT / "scripts"))
import experiment  # noqa: E402  (scripts/experiment.py)
import experiments_page  # noqa: E402  (scripts/experiments_page.py)

V2 = json.loads((ROOT / "configs" / "experiments" / "comparison_v2.json").read_text())


def _table(rows: dict) -> dict:
    return {"title": "Table 2: t", "columns": [], "rows": [{"label": k, "cells": v} for k, v in rows.items()]}


def _results(name: str, rows: dict, seed: int = 5005) -> dict:
    return {"name": name, "seeds": {"report": seed}, "tables": [_table(rows)]}


def _claim(**kwargs) -> Conclusion:
    claim = {"table": "table2", "row": "xmark", "cell": "c", "measure": "share", "op": ">=", "than": 0.5, **kwargs}
    return Conclusion("x", "statement", claim)


def _declared_rows(name: str) -> set[str]:
    """The row labels the tables give declaration ``name``: its methods, the benign row, and with ``removal`` each
    method's removal rows (as the removal table names them)."""
    from xmark_bundle.experiments.tables import _removal_label

    raw = json.loads((ROOT / "configs" / "experiments" / f"{name}.json").read_text())
    removal, methods = raw.get("removal", {}), set(raw["methods"])
    kept = removal.get("kept_checkpoint", "best")
    runs = [
        {"mode": m, "epochs": e, "kept_checkpoint": kept}
        for m in ("head", "full")
        for e in removal.get(f"{m}_epochs", [])
    ]
    for rate in removal.get("prune_rates", []):
        runs += [{"mode": "pruned", "epochs": 0, "rate": rate}]
        runs += [
            {"mode": "fine-pruned", "epochs": removal.get("prune_epochs", 2), "rate": rate, "kept_checkpoint": kept}
        ]
    labels = {f"{m}, {_removal_label(r)}" for m in methods for r in runs} | {f"{m}, as trained" for m in methods}
    return methods | {"benign models (clean data)"} | (labels if removal else set())


def test_the_registered_conclusions_read_the_declared_methods_on_both_families():
    families, conclusions = load_conclusions(REGISTERED)
    assert set(families) == {"classic", "physical"}
    declarations = ("comparison_v2", "comparison_v2_physical", "removal_v2", "pruning_v2", "ablation_v2")
    publishing = {}  # published part -> the declaration that publishes it
    for name in declarations:
        publishing |= dict.fromkeys(
            json.loads((ROOT / "configs/experiments" / f"{name}.json").read_text())["publish"], name
        )
    for conclusion in conclusions:
        for family, tables in families.items():
            if not conclusion.reads(family):
                continue
            rows = _declared_rows(publishing[tables[conclusion.claim["table"]]])
            assert conclusion.claim["row"] in rows, (conclusion.id, family)
            than = conclusion.claim["than"]
            assert isinstance(than, (int, float)) or than["row"] in rows, (conclusion.id, family)
    physical = json.loads((ROOT / "configs" / "experiments" / "comparison_v2_physical.json").read_text())
    assert set(families["physical"].values()) <= set(physical["publish"])  # the physical run publishes what is read
    assert set(families["classic"].values()) <= set(publishing)  # comparison, removal, pruning and ablation parts


@pytest.mark.parametrize(
    ("claim", "cells", "holds"),
    [
        ({}, {"c": {"value": "2 of 3"}}, True),
        ({}, {"c": {"value": "1 of 3"}}, False),
        ({"measure": "mean", "op": "<=", "than": 0.6}, {"c": {"per_seed": [0.5, 0.6, 0.8]}}, False),
        ({"measure": "mean", "op": "<=", "than": 0.7}, {"c": {"per_seed": [0.5, 0.6, 0.8]}}, True),
        ({"measure": "number", "than": 0.05}, {"c": {"value": "0.0312 (66)"}}, False),
        ({"measure": "number", "than": 0.05}, {"c": {"value": "0.42 (66)"}}, True),
        ({"than": {"row": "other", "cell": "c"}}, {"c": {"value": "1 of 3"}}, True),  # 1/3 >= other's 1/3
        ({"op": ">", "than": {"row": "other", "cell": "c"}}, {"c": {"value": "1 of 3"}}, False),
        (
            {"measure": "mean", "than": {"row": "other", "cell": "m", "plus": -0.02}, "cell": "m"},
            {"m": {"value": 0.79}},
            True,
        ),  # 0.79 >= 0.8 - 0.02
        # by-owner cells: a claim on every owner at once (the worst owner decides)
        ({"measure": "max_share", "op": "<=", "than": 0.1}, {"c": {"value": "201: 0 of 22; 202: 2 of 22"}}, True),
        ({"measure": "max_share", "op": "<=", "than": 0.1}, {"c": {"value": "201: 0 of 22; 202: 4 of 22"}}, False),
        ({"measure": "min_number", "than": 0.05}, {"c": {"value": "201: 0.28 (22); 202: 0.0031 (22)"}}, False),
        ({"measure": "min_number", "than": 0.05}, {"c": {"value": "201: 0.28 (22); 202: 0.33 (22)"}}, True),
    ],
)
def test_a_claim_is_decided_on_its_cell(claim, cells, holds):
    other = {"c": {"value": "1 of 3"}, "m": {"value": 0.8}}
    outcome = evaluate(_claim(**claim), _results("table2", {"xmark (γ 0.5)": cells, "other": other}))
    assert outcome["holds"] is holds and outcome["report_seed"] == 5005


def test_a_missing_table_row_or_cell_decides_nothing():
    assert evaluate(_claim(), None) == {"holds": None, "why": "not published"}
    assert evaluate(_claim(), _results("table2", {"sscl_bw": {"c": {"value": "1 of 1"}}}))["holds"] is None
    assert evaluate(_claim(), _results("table2", {"xmark": {"d": {"value": "1 of 1"}}}))["holds"] is None
    by_owner = _claim(measure="max_share", op="<=", than=0.1)
    assert evaluate(by_owner, _results("table2", {"xmark": {"c": {"value": "0 of 22"}}}))["holds"] is None  # no owners
    assert evaluate(by_owner, _results("table2", {"xmark": {"c": {"value": "201: 0 of 22; 202: -"}}}))["holds"] is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"id": "a", "statement": "s", "claim": {"table": "table2"}}, "lacks"),
        ({"id": "a", "statement": "s", "claim": {**_claim().claim, "measure": "median"}}, "measure must be"),
        ({"id": "a", "statement": "s", "claim": {**_claim().claim, "op": "=="}}, "op must be"),
        ({"id": "a", "statement": "s", "claim": {**_claim().claim, "table": "table9"}}, "does not name"),
        ({"statement": "s", "claim": _claim().claim}, "unique id"),
    ],
)
def test_a_bad_conclusions_file_is_refused_by_name(tmp_path, entry, problem):
    path = tmp_path / "conclusions.json"
    path.write_text(json.dumps({"format": 1, "families": {"a": {"table2": "table2"}}, "conclusions": [entry]}))
    with pytest.raises(ConclusionError, match=problem) as err:
        load_conclusions(path)
    assert str(path) in str(err.value)


def _collected() -> dict:
    def run(delta_p, owned, calibrated_p):
        calibrated = {"p_value": calibrated_p, "owned": calibrated_p <= 0.05, "statistic": delta_p, "members": 19}
        control = {"specific": owned, "delta_p": delta_p / 4, "p_value": 0.9}
        return {"p_value": 1e-4 if owned else 0.5, "wilcoxon_p": 0.01, "delta_p": delta_p, "wsr": delta_p,
                "owned": owned, "control": control, "calibrated": calibrated}  # fmt: skip

    suspect = {
        "mean_ba": 0.8,
        "mean_auroc": 0.9,
        "wsr_at_validation_threshold": {"value": 0.9, "clean_positive_rate": 0.1},
        "release_quality": {"mean_psnr": 30.0, "mean_ssim": 0.9, "mean_lpips": 0.01},
        "ind_w_owners": {"independent_owner7": run(0.1, False, 0.5)},
    }
    suspects = {  # 2 of 4 verified under the calibrated verdict
        f"owner{o}/suspect_seed{s}": {**suspect, "owner": o, "malicious": run(0.5, True, 0.05 if s == 4 else 0.6)}
        for o in (1, 2)
        for s in (4, 5)
    }
    ind_m = {f"owner{o}/b{b}": {**run(0.0, False, 0.5), "owner": o} for o in (1, 2) for b in (1, 2)}
    return {
        "benign": {"b1": {"mean_ba": 0.8, "mean_auroc": 0.9}},
        "methods": {"xmark": {"gamma": 0.5, "suspects": suspects, "ind_m": ind_m}},
        "stage_times_s": {"phantoms": 60.0},
    }


def _register(docs: Path, statement: str, than: float, cid: str = "power") -> Path:
    path = docs / "experiments" / "conclusions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = {"table": "table2", "row": "xmark", "cell": "Malicious verified (calibrated)", "measure": "share",
             "op": ">=", "than": than}  # fmt: skip
    raw = json.loads(path.read_text()) if path.is_file() else {"format": 1, "conclusions": []}
    raw["families"] = {"classic": {"table2": "table2"}, "physical": {"table2": "table2_physical"}}
    raw["conclusions"] = [c for c in raw["conclusions"] if c["id"] != cid] + [
        {"id": cid, "statement": statement, "claim": claim}
    ]
    path.write_text(json.dumps(raw))
    return path


def test_a_claim_registered_before_publication_is_kept_and_a_moved_one_is_refused(tmp_path):
    docs = tmp_path / "docs"
    registered = _register(docs, "X-Mark verifies half", 0.5)
    raw = copy.deepcopy({**V2, "seeds": {**V2["seeds"], "data": 5005}, "publish": {"table2": [1]}})  # this test's seed
    path = tmp_path / "comparison_v2.json"
    path.write_text(json.dumps(raw))
    declared = load_experiment(path)
    argv = ["run", "comparison_v2", "--publish"]
    experiment.publish(declared, _collected(), tmp_path / "out", argv, docs)
    (entry,) = read_ledger(docs / "experiments" / "ledger.json")
    assert set(entry["conclusions"]) == {"power"}
    page = (docs / "experiments.md").read_text()
    assert "yes: 0.5 >= 0.5 (seed 5005, before)" in page and "physical: not published" in page

    _register(docs, "X-Mark verifies a quarter", 0.5, cid="later")  # added after the results: exploratory
    published = [json.loads((docs / "experiments/table2/results.json").read_text())]
    lines = experiments_page.conclusions_section(docs, published)
    assert any("X-Mark verifies a quarter" in line and "(seed 5005, after)" in line for line in lines)

    _register(docs, "X-Mark verifies a third", 0.34)  # the registered claim moved once its number was known
    with pytest.raises(ConclusionError, match="'power' changed after the results it reads"):
        experiments_page.conclusions_section(docs, published)
    assert experiments_page.main(["--docs", str(docs)]) == 1
    before = (docs / "experiments/table2/results.json").read_bytes()
    with pytest.raises(ConclusionError, match="'power' changed"):
        experiment.publish(declared, _collected(), tmp_path / "out", argv, docs)
    assert (docs / "experiments/table2/results.json").read_bytes() == before  # refused before anything was written
    assert registered.is_file()


def test_the_verdict_names_the_families_it_holds_on():
    families = {"classic": {"table2": "table2"}, "physical": {"table2": "table2_physical"}}
    conclusion = Conclusion("c", "s", _claim().claim)
    published = {
        "table2": _results("table2", {"xmark": {"c": {"value": "2 of 3"}}}),
        "table2_physical": _results("table2_physical", {"xmark": {"c": {"value": "0 of 3"}}}),
    }
    (line,) = render_conclusions(families, [conclusion], published, [], Path("c.json"))[-2:-1]
    assert line.endswith("| holds on classic only |")
    published["table2_physical"] = _results("table2_physical", {"xmark": {"c": {"value": "3 of 3"}}})
    (line,) = render_conclusions(families, [conclusion], published, [], Path("c.json"))[-2:-1]
    assert line.endswith("| holds on both |") and line.count("after)") == 2


def _choice(**rule) -> Choice:
    base = {
        "candidates": ["a", "b", "c"],
        "requirements": [{"table": "table2", "cell": "fa", "measure": "share", "op": "<=", "than": 0.1}],
        "rank_by": {"table": "table2", "cell": "power", "measure": "share"},
    }
    return Choice("pick", "Which method", {**base, **rule})


def _family(rows: dict[str, tuple[str, str]], name: str) -> dict:
    """A published table2: each candidate's (false accusations, power) counts."""
    return _results(name, {c: {"fa": {"value": fa}, "power": {"value": p}} for c, (fa, p) in rows.items()})


def test_a_choice_picks_the_best_smallest_family_score_among_candidates_that_meet_every_requirement():
    families = {"classic": {"table2": "table2"}, "physical": {"table2": "table2_physical"}}
    published = {
        # a: 9/9 on classic but 4/9 on physical; b: 6/9 on both; c: the best power, but it accuses 2 of 10 on one
        "table2": _family({"a": ("0 of 10", "9 of 9"), "b": ("1 of 10", "6 of 9"), "c": ("0 of 10", "9 of 9")}, "t"),
        "table2_physical": _family(
            {"a": ("0 of 10", "4 of 9"), "b": ("0 of 10", "6 of 9"), "c": ("2 of 10", "9 of 9")}, "t"
        ),
    }
    choice = _choice()
    per_family = {f: evaluate_choice(choice, tables, published) for f, tables in families.items()}
    assert per_family["physical"]["c"]["failed"] == ["fa 0.2 not <= 0.1"]
    assert pick(per_family) == (["b"], 6 / 9, [])
    lines = render_choices(families, [choice], published, [], Path("c.json"))
    assert "| c | 1 (meets every requirement) | 1 (fails: fa 0.2 not <= 0.1) |" in lines
    assert any(line.startswith("Pick: **b** (smallest family score 0.667; registered after") for line in lines)

    published["table2_physical"] = _family(
        {"a": ("0 of 10", "6 of 9"), "b": ("0 of 10", "6 of 9"), "c": ("2 of 10", "9 of 9")}, "t"
    )
    per_family = {f: evaluate_choice(choice, tables, published) for f, tables in families.items()}
    assert pick(per_family)[0] == ["a", "b"]  # a tie names both
    del published["table2_physical"]  # a family not yet published: nothing is picked
    per_family = {f: evaluate_choice(choice, tables, published) for f, tables in families.items()}
    assert pick(per_family)[:2] == ([], None) and "physical: table2_physical not published" in pick(per_family)[2]
    published["table2_physical"] = _family({"a": ("0 of 10", "6 of 9")}, "t")  # b and c are not in this table
    per_family = {f: evaluate_choice(choice, tables, published) for f, tables in families.items()}
    assert "physical: no 'fa' cell" in pick(per_family)[2]


def test_the_registered_choice_ranks_clean_label_methods_and_cannot_move_once_published(tmp_path):
    (choice,) = load_choices(REGISTERED)
    candidates = set(choice.rule["candidates"])
    assert candidates <= set(V2["methods"]) and not candidates & {"badnets", "blended", "wanet", "ubw_p"}
    families, conclusions = load_conclusions(REGISTERED)
    hashes = registered_hashes(families, [*conclusions, choice], ["table2_physical"])
    assert hashes[choice.id] == choice.sha256  # recorded with the first publication of what it reads
    moved = Choice(choice.id, choice.statement, {**choice.rule, "candidates": sorted(candidates - {"sscl_bw"})})
    with pytest.raises(ConclusionError, match=f"'{choice.id}' changed after the results it reads"):
        check_unchanged(hashes, [*conclusions, moved], REGISTERED)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"candidates": ["a"]}, "needs >= 2 'candidates'"),
        ({"rank_by": {"table": "table2", "cell": "power"}}, "needs 'rank_by'"),
        ({"requirements": [{"table": "table9", "cell": "fa", "measure": "share", "op": "<=", "than": 0.1}]}, "table9"),
        (
            {"requirements": [{"table": "table2", "cell": "fa", "measure": "share", "op": "<=", "than": {"row": "a"}}]},
            "'than' must be a number",
        ),
    ],
)
def test_a_bad_choice_is_refused_by_name(tmp_path, rule, problem):
    path = tmp_path / "conclusions.json"
    raw = {"format": 1, "families": {"classic": {"table2": "table2"}}, "conclusions": []}
    raw["choices"] = [{"id": "pick", "statement": "s", "rule": {**_choice().rule, **rule}}]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConclusionError, match=problem):
        load_choices(path)


def test_a_claim_limited_to_one_family_is_decided_there_only(tmp_path):
    """Removal, pruning and the ablation run on the classic family only: such a claim names its families, is not
    asked of the other family (which need not name its table), and its ledger hash comes with the classic part."""
    families = {"classic": {"table2": "table2", "removal": "removal"}, "physical": {"table2": "table2_physical"}}
    claim = {**_claim().claim, "table": "removal", "families": ["classic"]}
    conclusion = Conclusion("r", "s", claim)
    published = {"removal": _results("removal", {"xmark": {"c": {"value": "2 of 3"}}})}
    (line,) = render_conclusions(families, [conclusion], published, [], Path("c.json"))[-2:-1]
    assert "| not run on this family |" in line and line.endswith("| holds on classic (the only family it reads) |")
    assert registered_hashes(families, [conclusion], ["removal"]) == {"r": conclusion.sha256}
    assert registered_hashes(families, [conclusion], ["table2_physical"]) == {}
    path = tmp_path / "conclusions.json"
    raw = {"format": 1, "families": families, "conclusions": [{"id": "r", "statement": "s", "claim": claim}]}
    path.write_text(json.dumps(raw))
    assert load_conclusions(path)[1] == [conclusion]
    for bad, problem in ((["lab"], "names families \\['lab'\\]"), ([], "non-empty list"), (None, "reads table")):
        limited = {**claim, "families": bad} if bad is not None else {k: v for k, v in claim.items() if k != "families"}
        raw["conclusions"] = [{"id": "r", "statement": "s", "claim": limited}]
        path.write_text(json.dumps(raw))
        with pytest.raises(ConclusionError, match=problem):
            load_conclusions(path)
