"""Experiment declarations (checked on load) and the tables made from collected numbers."""

import copy
import json
from pathlib import Path

import pytest
from PIL import Image
from scipy import stats

from xmark_bundle.experiments import ExperimentError, false_accusations, load_experiment, plain_words, tables
from xmark_bundle.experiments.figures import (
    _removal_points,
    save_detectability_figure,
    save_figures,
    save_removal_figure,
    save_scenarios_figure,
)
from xmark_bundle.experiments.page import render_page
from xmark_bundle.experiments.runner import watermark_recipe
from xmark_bundle.experiments.tables import kind_label, removal_table

ROOT = Path(__file__).resolve().parents[1]


def test_declared_experiments_load_and_keep_opt_in_methods_out_by_default():
    demo = load_experiment(ROOT / "configs/experiments/demo.json")
    assert list(demo.only(None).methods) == ["xmark"] and "keyed_grating" in demo.methods
    assert list(demo.only(["keyed_grating"]).methods) == ["keyed_grating"]
    assert demo.methods["xmark"].kind == "generator" and demo.query_size == 128
    with pytest.raises(ExperimentError, match=r"declares no method \['sig'\]"):
        demo.only(["sig"])
    for path in sorted((ROOT / "configs/experiments").glob("*.json")):  # every declaration loads
        declared = load_experiment(path)
        reported = declared.data_seed != declared.seeds["development"]
        development = declared.name in ("demo", "quick", "stealthmark_quick") or declared.name.endswith("_dev")
        assert reported or development, f"{path.name} reports on the development seed (name it *_dev if it chooses)"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"name": "other"}, "the file must be called other.json"),
        ({"seeds": {"data": 1, "development": 0, "suspects": []}}, "non-empty list 'suspects'"),
        ({"methods": {"m": {"kind": "magic"}}}, "kind must be one of"),
        ({"methods": {"m": {"kind": "trigger", "gama": 0.1}}}, r"unknown keys \['gama'\]"),
        ({"benign": []}, "at least one benign model"),
        ({"detectability": "yes"}, "detectability must be true or false"),
        ({"independent_families": 1}, "independent_families must be true or false"),
        ({"removal": {"prune_rates": [0.5, 1.0]}}, r"prune_rates must lie in \[0, 1\)"),
        ({"removal": {"prune_rate": [0.5]}}, r"removal: unknown keys \['prune_rate'\]"),
        ({"removal": {"kept_checkpoint": "final"}}, r"kept_checkpoint must be one of \('best', 'last'\)"),
        ({"suspect_variants": {"v": {"evasion": "jpeg"}}}, "evasion must be one of"),
        ({"suspect_variants": {"v": {"configs": ["configs/none.json"]}}}, r"no config file \['configs/none.json'\]"),
    ],
)
def test_a_bad_declaration_names_the_file_and_the_problem(change, problem, tmp_path):
    raw = {**json.loads((ROOT / "configs/experiments/quick.json").read_text()), **change}
    path = tmp_path / "quick.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ExperimentError, match=problem) as caught:
        load_experiment(path)
    assert str(path) in str(caught.value)


def test_independent_families_need_a_pool(tmp_path):
    raw = json.loads((ROOT / "configs/experiments/quick.json").read_text())
    raw["seeds"] = {k: v for k, v in raw["seeds"].items() if k != "family_pool"}
    path = tmp_path / "quick.json"
    path.write_text(json.dumps({**raw, "independent_families": True}))
    with pytest.raises(ExperimentError, match="independent_families needs seeds.family_pool"):
        load_experiment(path)
    path.write_text(json.dumps(raw))
    assert load_experiment(path).independent_families is False


def test_false_accusation_interval_is_clopper_pearson():
    runs = {f"m{i}": {"owned": i < 2} for i in range(20)}
    found = false_accusations(runs)
    assert (found["k"], found["n"], found["rate"]) == (2, 20, 0.1)
    # the exact interval from its definition: Beta quantiles
    assert found["low"] == pytest.approx(stats.beta.ppf(0.025, 2, 19))
    assert found["high"] == pytest.approx(stats.beta.ppf(0.975, 3, 18))
    none = false_accusations({f"m{i}": {"owned": False} for i in range(20)})
    assert none["low"] == 0 and none["high"] == pytest.approx(1 - 0.025 ** (1 / 20))


def _scenario(p: float, owned: bool, specific: bool = False) -> dict:
    return {
        "p_value": p,
        "wilcoxon_p": p,
        "delta_p": 0.5 if owned else 0.0,
        "wsr": 0.9 if owned else 0.1,
        "owned": owned,
        "control": {"specific": specific, "delta_p": 0.1, "p_value": 0.7},
    }


def test_tables_hold_every_seed_and_every_benign_model_and_render(tmp_path):
    suspect = {
        "mean_ba": 0.8,
        "mean_auroc": 0.9,
        "lpips_backbone": "untrained",
        "wsr_at_validation_threshold": {"value": 0.95, "clean_positive_rate": 0.06},
        "release_quality": {"mean_psnr": 30.0, "mean_ssim": 0.9, "mean_lpips": 0.01},
        "malicious": _scenario(1e-5, True),
        "ind_w": _scenario(0.5, False),
    }
    collected = {
        "benign": {
            "resnet18_seed1": {"mean_ba": 0.79, "mean_auroc": 0.88},
            "vgg_seed2": {"mean_ba": 0.7, "mean_auroc": 0.8},
        },
        "methods": {
            "xmark": {
                "gamma": 0.5,
                "suspects": {"suspect_seed1": suspect, "suspect_seed2": {**suspect, "mean_ba": 0.7}},
                "ind_m": {"resnet18_seed1": _scenario(0.01, True), "vgg_seed2": _scenario(0.9, False)},
            }
        },
    }
    table1, table2 = tables(collected)
    row = table1["rows"][1]
    assert row["cells"]["BA"] == {"per_seed": [0.8, 0.7]} and "untrained trunk" in table1["notes"]
    assert table1["rows"][0]["cells"]["BA"] == {"per_seed": [0.79, 0.7]}
    cells = table2["rows"][0]["cells"]
    assert cells["false accusations"] == {"value": "1 of 2"} and cells["Ind-M p"] == {"per_seed": [0.01, 0.9]}
    assert cells["Malicious specific"] == {"value": "0 of 2"}
    page = render_page(
        [
            {
                "name": "t",
                "title": "T",
                "commit": "c",
                "seeds": {"development": 0, "report": 1},
                "wall_time_s": {},
                "commands": [],
                "tables": [table1, table2],
                "reading": "r",
            }
        ]
    )
    assert "| xmark (γ 0.5) | 0.750 ± 0.071 (0.800, 0.700)" in page
    save_scenarios_figure(collected, tmp_path / "scenarios.png")
    with Image.open(tmp_path / "scenarios.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 300
    words = plain_words(collected)
    assert "xmark, Ind-M: 1 of 2 models trained on the clean data are verified - a false accusation." in words
    assert any("WARNING: the control says" in line for line in words)


def test_suspect_variants_get_rows_of_their_own_and_ind_m_is_counted_once(tmp_path):
    suspect = {
        "mean_ba": 0.8,
        "mean_auroc": 0.9,
        "wsr_at_validation_threshold": {"value": 0.95, "clean_positive_rate": 0.06},
        "release_quality": {"mean_psnr": 30.0, "mean_ssim": 0.9, "mean_lpips": 0.01},
        "malicious": _scenario(1e-5, True),
        "ind_w": _scenario(0.5, False),
    }
    method = {
        "gamma": 0.1,
        "suspects": {
            "suspect_seed1": {**suspect, "variant": ""},
            "suspect_vgg_seed1": {**suspect, "variant": "vgg", "mean_ba": 0.6},
            "suspect_vgg_seed2": {**suspect, "variant": "vgg", "mean_ba": 0.7},
        },
        "ind_m": {"b1": _scenario(0.9, False)},
    }
    table1, table2 = tables({"benign": {"b1": {"mean_ba": 0.8, "mean_auroc": 0.9}}, "methods": {"badnets": method}})
    assert [row["label"] for row in table1["rows"][1:]] == ["badnets (γ 0.1)", "badnets, vgg suspects (γ 0.1)"]
    assert table1["rows"][2]["cells"]["BA"] == {"per_seed": [0.6, 0.7]}
    first, second = table2["rows"]
    assert first["cells"]["false accusations"] == {"value": "0 of 1"} and "false accusations" not in second["cells"]
    assert second["cells"]["Malicious specific"] == {"value": "0 of 2"}
    # the figure of the kinds of suspect, beside Table 1
    assert save_figures({"methods": {"badnets": method}}, tmp_path) == ["scenarios.png", "variants.png"]
    with Image.open(tmp_path / "variants.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 300
    # where the run recorded the kinds, the declared suspect's rows say what it is; a kind by its name
    kinds = {"": {"arch": "resnet18", "image_size": 128}, "vgg": {"arch": "vgg16_bn", "image_size": 128}}
    table1, table2 = tables({"benign": {}, "suspect_kinds": kinds, "methods": {"badnets": method}})
    assert [row["label"] for row in table2["rows"]] == [
        "badnets, declared (resnet18, 128 px) suspects",
        "badnets, vgg suspects",
    ]
    assert kind_label("", {}) == "declared"
    # one kind: the method's name alone
    one = {**method, "suspects": {"suspect_seed1": method["suspects"]["suspect_seed1"]}}
    table1, _ = tables({"benign": {}, "suspect_kinds": {"": kinds[""]}, "methods": {"badnets": one}})
    assert table1["rows"][1]["label"] == "badnets (γ 0.1)"


def test_a_detectability_table_follows_when_a_method_measured_it(tmp_path):
    report = {
        "pool": "target class",
        "n_candidates": 40,
        "n_marked": 20,
        "container": {"marked_files_whose_container_changed": 0, "signature_vs_marked_p": 0.71234, "signatures": 3,
                      "bytes_per_pixel_auroc": 0.61234},
        "pixels": {"high_pass_energy_auroc": 0.9, "pyramid_logistic_regression_auroc": 0.8, "small_cnn_auroc": 0.7},
        "suspect": {"spectral_auroc": 0.55, "spectral_recall": 0.4, "activation_clustering_recall": 0.3,
                    "activation_clustering_precision": 0.6},
    }  # fmt: skip
    method = {"gamma": 0.5, "suspects": {}, "ind_m": {"b1": _scenario(0.9, False)}, "detectability": report}
    detect = tables({"benign": {}, "methods": {"xmark": method, "badnets": {**method, "detectability": None}}})
    assert len(detect) == 3 and [row["label"] for row in detect[2]["rows"]] == ["xmark"]
    cells = detect[2]["rows"][0]["cells"]
    assert cells["marked of candidates"] == {"value": "20 of 40 (target class)"}
    assert cells["signature vs marked p"] == {"value": 0.712} and cells["bytes/pixel AUROC"] == {"value": 0.612}
    assert set(cells) == set(detect[2]["columns"])
    assert cells["spectral recall (chance)"] == {"value": "0.40 (0.75)"}  # 30 of 40 flagged at random
    assert cells["AC recall, precision (base rate)"] == {"value": "0.30, 0.60 (0.50)"}
    assert len(tables({"benign": {}, "methods": {"badnets": {**method, "detectability": None}}})) == 2
    # its figure: the AUROC columns as bars, beside the table
    collected = {"benign": {}, "methods": {"xmark": method, "badnets": {**method, "detectability": None}}}
    assert save_figures(collected, tmp_path) == ["scenarios.png", "detectability.png"]
    with Image.open(tmp_path / "detectability.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 300
    assert not save_detectability_figure({"methods": {"badnets": {**method, "detectability": None}}}, tmp_path / "x")


def test_removal_gets_a_table_row_per_attack_and_a_figure_beside_it(tmp_path):
    def tuned(mode: str, epochs: int, owned: bool, rate: float | None = None) -> dict:
        run = {"mode": mode, "epochs": epochs, "mean_ba": 0.75, **_scenario(1e-3 if owned else 0.4, owned)}
        run |= {"kept_epoch": 1} if epochs else {}
        return run if rate is None else {**run, "rate": rate}

    def suspect(owned_after_pruning: bool) -> dict:
        removal = {"head_1": tuned("head", 1, True), "full_1": tuned("full", 1, True)}
        removal["pruned_0.5"] = tuned("pruned", 0, True, 0.5)
        removal["fine_pruned_0.5"] = tuned("fine-pruned", 2, owned_after_pruning, 0.5)
        return {"mean_ba": 0.8, "malicious": _scenario(1e-9, True), "ind_w": _scenario(0.5, False), "removal": removal}

    collected = {
        "methods": {
            "xmark": {
                "suspects": {"suspect_seed1": suspect(True), "suspect_seed2": suspect(False)},
                "ind_m": {"resnet18_seed1": _scenario(0.9, False)},
            }
        },
    }
    removal = removal_table(collected)
    assert removal["title"].startswith("Removal")
    rows = {row["label"]: row["cells"] for row in removal["rows"]}
    assert list(rows) == [
        "xmark, as trained",
        "xmark, fine-tuned head, best of 1 epochs",
        "xmark, fine-tuned full, best of 1 epochs",
        "xmark, pruned 50%, not fine-tuned",
        "xmark, fine-pruned 50%, then best of 2 epochs",
    ]
    fine_pruned = rows["xmark, fine-pruned 50%, then best of 2 epochs"]
    assert fine_pruned["verified"] == {"value": "1 of 2"} and fine_pruned["WSR at 0.5"] == {"per_seed": [0.9, 0.1]}
    # which epoch each fine-tuning kept; a pruned model was not trained
    assert fine_pruned["kept epoch"] == {"per_seed": [1, 1]}
    assert "kept epoch" not in rows["xmark, pruned 50%, not fine-tuned"]
    assert "verified (calibrated)" not in fine_pruned  # no family: the margin test only
    # with the owner's family, each row also counts the calibrated verdict (the product's lead verdict)
    calibrated = copy.deepcopy(collected)
    for s in calibrated["methods"]["xmark"]["suspects"].values():
        for i, run in enumerate([s["malicious"], *s["removal"].values()]):
            run["calibrated"] = {"p_value": 0.05 if i % 2 == 0 else 0.4, "owned": i % 2 == 0}
    rows = {row["label"]: row["cells"] for row in removal_table(calibrated)["rows"]}
    assert rows["xmark, as trained"]["verified (calibrated)"] == {"value": "2 of 2"}
    assert rows["xmark, fine-tuned head, best of 1 epochs"]["calibrated p"] == {"per_seed": [0.4, 0.4]}
    assert rows["xmark, fine-tuned head, best of 1 epochs"]["verified (calibrated)"] == {"value": "0 of 2"}
    # and the figure fills a dot by that verdict: the head fine-tuning is verified by the margin test only
    suspects = list(calibrated["methods"]["xmark"]["suspects"].values())
    assert [point[3] for point in _removal_points(suspects, "head", "epochs")] == [True, True, False, False]
    assert save_removal_figure(calibrated, tmp_path / "calibrated.png")
    # a fine-tuning that kept its last epoch says so
    last = {**tuned("full", 1, True), "kept_checkpoint": "last"}
    kept_last = {"methods": {"xmark": {"suspects": {"s": {**suspect(True), "removal": {"full_1": last}}}}}}
    assert removal_table(kept_last)["rows"][1]["label"] == "xmark, fine-tuned full, 1 epochs"
    assert save_figures(collected, tmp_path) == ["scenarios.png", "removal.png"]
    with Image.open(tmp_path / "removal.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > figure.size[1] > 300  # three panels side by side
    for suspect_ in collected["methods"]["xmark"]["suspects"].values():
        del suspect_["removal"]
    assert save_figures(collected, tmp_path / "none") == ["scenarios.png"]
    assert not (tmp_path / "none" / "removal.png").exists()


def test_arms_that_differ_only_in_the_release_share_their_watermark():
    ablation = load_experiment(ROOT / "configs/experiments/ablation.json").methods
    surrogate = Path("models/surrogate")

    def recipe(name: str, seed: int = 1) -> str:
        return watermark_recipe(ablation[name], surrogate, seed, False)

    assert recipe("xmark") == recipe("gamma_0.1") == recipe("gamma_0.25") == recipe("gamma_1")
    others = {recipe(name) for name in ("xmark", "no_conditioning", "no_laplacian", "epsilon_4", "epsilon_8")}
    assert len(others) == 5 and recipe("xmark", seed=1001) != recipe("xmark")
    assert watermark_recipe(ablation["xmark"], Path("models/surrogate_independent"), 1, False) != recipe("xmark")
    comparison = load_experiment(ROOT / "configs/experiments/comparison.json").methods
    badnets, blended = comparison["badnets"], comparison["blended"]
    assert badnets.settings == blended.settings  # the same settings, yet each trigger is made for its own method
    assert watermark_recipe(badnets, surrogate, 1, False) != watermark_recipe(blended, surrogate, 1, False)
