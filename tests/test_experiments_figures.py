"""The experiment figures as a reader sees them: titles inside the picture, whatever the number of methods."""

import numpy as np
from PIL import Image

from xmark_bundle.experiments.figures import save_figures, save_scenarios_figure


def _run(owned: bool, delta_p: float) -> dict:
    return {"owned": owned, "delta_p": delta_p}


def test_the_scenarios_title_is_not_cut_when_one_method_makes_the_figure_narrow(tmp_path):
    method = {
        "suspects": {"suspect_seed1": {"malicious": _run(True, 0.8), "ind_w": _run(False, 0.1)}},
        "ind_m": {"resnet18_seed11": _run(False, 0.0)},
    }
    save_scenarios_figure({"methods": {"xmark": method}}, tmp_path / "scenarios.png")
    with Image.open(tmp_path / "scenarios.png") as figure:
        pixels = np.asarray(figure.convert("L"), dtype=float)
    title = pixels[: int(0.12 * pixels.shape[0])]  # the suptitle's band
    assert (title < 128).any()  # the title is drawn
    for edge in (title[:, :3], title[:, -3:]):
        assert not (edge < 128).any()  # and no text runs into the picture's left or right border


def _floor(owned: bool, rise: float) -> dict:
    return {"owned": owned, "floor_clean": 0.01, "floor_triggered": 0.01 + rise, "margin": 0.025}


def test_a_segmentation_run_gets_the_floor_figure_and_no_classification_figure(tmp_path):
    collected = {
        "task": "segmentation",
        "architectures": ["basicunet", "segresnet"],
        "triggers": ["patch"],
        "models": {
            f"{arch}/patch/stealthmark/owner{o}": {
                "arch": arch,
                "trigger": "patch",
                "method": "stealthmark",
                "verification": _floor(o != 2, 0.08 if o != 2 else 0.0),
            }
            for arch in ("basicunet", "segresnet")
            for o in (1, 2)
        },
        "benign": {
            f"{arch}_seed{s}": {"arch": arch, "verification": {"patch": {"1": _floor(False, 0.001)}}}
            for arch in ("basicunet", "segresnet")
            for s in (5, 6)
        },
        "other_keys": {},
    }
    assert save_figures(collected, tmp_path) == ["floors.png"]
    with Image.open(tmp_path / "floors.png") as figure:
        pixels = np.asarray(figure.convert("L"), dtype=float)
    assert pixels.shape[0] > pixels.shape[1]  # one column (one trigger), a row per architecture
    assert not list(tmp_path.glob("scenarios.png"))
    assert save_figures({**collected, "models": {}}, tmp_path / "none") == []  # nothing trained: nothing drawn
