"""The film comparison's measurements (scripts/compare_phantoms_to_film.py) on images whose answer is known."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, special

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import compare_phantoms_to_film as compare  # noqa: E402


@pytest.mark.parametrize("sigma", [1.5, 3.0])
def test_rise_of_a_blurred_step_is_its_10_90_distance(sigma):
    """A step blurred by a Gaussian rises from 10 % to 90 % over 2 * 1.2816 * sigma."""
    rows = np.arange(200, dtype=np.float64)[:, None]
    image = np.repeat(0.2 + 0.6 * special.ndtr((rows - 117.3) / sigma), 40, axis=1)
    expected = 2 * special.ndtri(0.9) * sigma
    assert compare._rise(image, (0.3, 0.9, 0.0, 1.0), True, 15) == pytest.approx(expected, rel=0.05)
    assert compare._rise(image[::-1], (0.1, 0.7, 0.0, 1.0), False, 15) == pytest.approx(expected, rel=0.05)


def test_nps_of_white_noise_is_flat_and_of_smoothed_noise_falls():
    rng = np.random.default_rng(0)
    mask = np.zeros((400, 400), bool)
    mask[50:350, 30:190] = mask[50:350, 210:370] = True
    white = rng.standard_normal((400, 400))
    freq, power = compare._nps(white, mask)
    slope, high = compare._nps_summary(freq, power)
    assert abs(slope) < 0.3 and np.nanmean(power) == pytest.approx(1.0, rel=0.2)
    assert high == pytest.approx(0.75, abs=0.1)  # area share of the band above 0.25 cycles/px (radially weighted)
    smooth_slope, smooth_high = compare._nps_summary(*compare._nps(ndimage.gaussian_filter(white, 2.0), mask))
    assert smooth_slope < -1.0 and smooth_high < 0.05


def test_rois_lie_inside_each_lung():
    mask = np.zeros((300, 300), bool)
    mask[20:280, 20:140] = mask[60:200, 170:280] = True
    corners = compare._rois(mask, 40)
    assert len(corners) == 2
    for r, c in corners:
        assert mask[r : r + 40, c : c + 40].all()
