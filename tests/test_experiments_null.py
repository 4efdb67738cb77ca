"""The calibrated null's check: uniform rank p-values pass it, an over-accusing verdict fails it, and it is drawn."""

import numpy as np
from PIL import Image

from xmark_bundle.experiments.figures import save_null_by_owner_figure, save_null_figure
from xmark_bundle.experiments.null import (
    null_p_values,
    null_p_values_by_owner,
    null_uniformity,
    reference_adjusted_runs,
)


def _method(p_values: list[float], members: int = 19) -> dict:
    runs = {f"owner1/benign{i}": {"calibrated": {"p_value": p, "members": members}} for i, p in enumerate(p_values)}
    return {"ind_m": runs, "ind_m_seed_controls": {"owner1/surrogate": {"p_value": 0.5}}}  # no calibrated block


def test_exchangeable_ranks_pass_and_an_over_accusing_verdict_fails(tmp_path):
    rng = np.random.default_rng(5)
    ranks = (rng.integers(0, 20, 400) + 1) / 20  # the owner's rank among 20 exchangeable members
    honest = null_uniformity(null_p_values(_method(list(ranks))))
    assert honest["n"] == 400 and honest["ks_p"] > 0.01 and abs(honest["at_most_0.05"] - 0.05) < 0.03
    biased = (rng.integers(0, 5, 400) + 1) / 20  # the owner's member always among the top 5: not exchangeable
    assert null_uniformity(null_p_values(_method(list(biased))))["ks_p"] < 1e-6
    assert null_uniformity(null_p_values({"ind_m": {}})) is None
    assert not save_null_figure({"methods": {"xmark": {"ind_m": {}}}}, tmp_path / "none.png")
    assert save_null_figure({"methods": {"xmark": _method(list(ranks)), "sscl_bw": _method(list(biased))}},
                            tmp_path / "null.png")  # fmt: skip
    with Image.open(tmp_path / "null.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 400


def test_each_owners_null_p_values_are_kept_apart_and_drawn(tmp_path):
    """One owner whose member lifts every model more than its family (always among the top 2 of 20) and one whose
    member lifts less (never among them): the per-owner split shows that one owner's verdict accuses far more than
    alpha and the other's none, and each owner's KS test rejects uniformity."""
    rng = np.random.default_rng(7)
    potent = (rng.integers(0, 2, 200) + 1) / 20
    weak = (rng.integers(2, 20, 200) + 1) / 20
    runs = {
        f"owner1/benign{i}": {"owner": 1, "calibrated": {"p_value": p, "members": 19}} for i, p in enumerate(potent)
    }
    runs |= {f"owner2/benign{i}": {"owner": 2, "calibrated": {"p_value": p, "members": 19}} for i, p in enumerate(weak)}
    method = {"ind_m": runs}
    by_owner = null_p_values_by_owner(method)
    assert list(by_owner) == [1, 2] and [len(v) for v in by_owner.values()] == [200, 200]
    assert sorted(null_p_values(method)) == sorted(v for values in by_owner.values() for v in values)
    first, second = (null_uniformity(values) for values in by_owner.values())
    assert first["at_most_0.05"] > 0.4 and second["at_most_0.05"] == 0.0  # accuses about half of them / none
    assert first["ks_p"] < 1e-6 and second["ks_p"] < 0.01
    assert save_null_by_owner_figure({"methods": {"xmark": method}}, tmp_path / "by_owner.png")
    assert not save_null_by_owner_figure({"methods": {"xmark": _method([0.5, 0.2])}}, tmp_path / "one.png")
    with Image.open(tmp_path / "by_owner.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 300


def test_reference_adjusted_runs_leave_a_benign_models_own_statistics_out():
    """Each benign model is ranked against the other benign models of its owner, a malicious suspect against all of
    them; an owner with one benign model gives none, and a run without member statistics is skipped."""

    def run(owner, stats, owner_index=0):
        calibrated = {"member_statistics": stats, "owner_index": owner_index, "alpha": 0.05, "p_value": 1.0}
        return {"owner": owner, "calibrated": calibrated}

    method = {
        "ind_m": {
            "owner1/b1": run(1, [0.30, 0.1, 0.0]),
            "owner1/b2": run(1, [0.10, 0.1, 0.0]),
            "owner1/b3": run(1, [0.20, 0.1, 0.0]),
            "owner2/b1": run(2, [0.0, 0.5, 0.1]),
            "owner2/b2": {"owner": 2, "calibrated": {"p_value": 0.5}},  # no member statistics
        },
        "ind_m_seed_controls": {"owner1/surrogate": run(1, [0.25, 0.1, 0.0])},
        "suspects": {"owner1/s1": {"owner": 1, "malicious": run(1, [0.9, 0.1, 0.0])}},
    }
    adjusted = reference_adjusted_runs(method)
    assert sorted(adjusted["ind_m"]) == ["owner1/b1", "owner1/b2", "owner1/b3"]  # owner 2: no second benign model
    b1 = adjusted["ind_m"]["owner1/b1"]  # against b2 and b3: owner's member 0.30 - 0.15, the others 0 and 0
    assert b1["references"] == 2 and abs(b1["owner_statistic"] - 0.15) < 1e-12 and b1["p_value"] == 1 / 3
    assert adjusted["ind_m"]["owner1/b2"]["p_value"] == 1.0  # 0.10 - 0.25 < 0: below every other member
    assert adjusted["ind_m_seed_controls"]["owner1/surrogate"]["references"] == 3
    assert adjusted["malicious"]["owner1/s1"]["references"] == 3 and adjusted["malicious"]["owner1/s1"]["owner"] == 1
