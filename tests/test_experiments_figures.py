"""The experiment figures as a reader sees them: titles inside the picture, whatever the number of methods."""

import numpy as np
from PIL import Image

from xmark_bundle.experiments.figures import save_scenarios_figure


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
