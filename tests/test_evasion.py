"""A data user's defences: each does what its name says to the pixels, and an evaded release keeps every file's
container, grid and relative path."""

import json

import numpy as np
import pytest

from xmark_bundle.data.chexpert import prepare_datalist
from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.experiments.detectability import container_signature
from xmark_bundle.experiments.evasion import EVASIONS, evade_release


def _checker(shape: tuple[int, int], amplitude: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    smooth = 0.3 + 0.4 * (rows / shape[0]) * (cols / shape[1])
    return (smooth + amplitude * ((rows + cols) % 2 - 0.5)).astype(np.float32)


def test_each_evasion_changes_what_it_should():
    rng = np.random.default_rng(0)
    image = _checker((1000, 800), 0.1)  # a smooth ramp carrying a 1-pixel checkerboard of amplitude 0.1
    ramp = _checker((1000, 800), 0.0)
    down = EVASIONS["downscale512"](image, rng)
    assert np.abs(down - ramp).mean() < 0.01  # the 1-pixel pattern is gone, the ramp stays
    assert np.array_equal(EVASIONS["downscale512"](image[:500, :400], rng), image[:500, :400])  # already small
    jpeg = EVASIONS["jpeg75"](image, rng)
    assert np.array_equal(jpeg * 255, np.round(jpeg * 255)) and np.abs(jpeg - image).mean() < 0.05
    noised = EVASIONS["noise0.02"](ramp, np.random.default_rng(1))
    assert (noised - ramp).std() == pytest.approx(0.02, rel=0.05)
    assert np.array_equal(noised, EVASIONS["noise0.02"](ramp, np.random.default_rng(1)))  # seeded
    equalised = EVASIONS["histeq"](ramp, rng)
    quantiles = np.quantile(equalised, [0.1, 0.5, 0.9])
    np.testing.assert_allclose(quantiles, [0.1, 0.5, 0.9], atol=0.02)  # the grey levels are spread uniformly


def test_an_evaded_release_keeps_containers_and_changes_every_listed_image(tmp_path):
    release = tmp_path / "release"
    write_phantom_dataset(release, n=12, seed=2, min_size=128, max_size=160)
    prepare_datalist(release / "train.csv", release / "datalist.json", test_csv=release / "valid.csv")
    out = evade_release(release, tmp_path / "evaded", "noise0.02", seed=3)
    assert (out / "datalist.json").read_bytes() == (release / "datalist.json").read_bytes()
    assert (out / "train.csv").read_bytes() == (release / "train.csv").read_bytes()
    datalist = json.loads((release / "datalist.json").read_text())
    listed = {row["image"] for split in ("training", "validation", "test") for row in datalist[split]}
    assert len(listed) == 12
    for rel in listed:
        before, after = load_xray(release / rel)[0], load_xray(out / rel)[0]
        assert before.shape == after.shape and 0.01 < np.abs(after - before).std() < 0.03
        assert container_signature(out / rel) == container_signature(release / rel)
    assert not list(tmp_path.glob(".evaded*"))  # the partial copy was renamed
    with pytest.raises(FileExistsError, match="refusing"):
        evade_release(release, out, "histeq")
    with pytest.raises(ValueError, match="unknown evasion"):
        evade_release(release, tmp_path / "other", "blur")
