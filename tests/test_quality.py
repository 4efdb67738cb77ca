"""Release quality against the source: PSNR/SSIM at full resolution and as the model sees the image (no padding)."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from xmark_bundle.data.xray_io import load_xray
from xmark_bundle.engines.quality import PSNR_CAP, manifest_release_quality, release_quality
from xmark_bundle.losses.watermark import LPIPSLoss


def test_a_uniform_change_has_the_same_psnr_at_full_and_at_model_resolution(tmp_path):
    rows, cols = np.meshgrid(np.linspace(0, 1, 300), np.linspace(0, 1, 200), indexing="ij")
    source = np.round((0.3 + 0.4 * rows * cols) * 65535).astype(np.uint16)
    for folder, image in (("src", source), ("rel", source + 655)):  # +655 grey levels everywhere: 0.01 in [0, 1]
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / "a.png")
    a, b = (load_xray(tmp_path / f / "a.png")[0].astype(np.float64) for f in ("src", "rel"))
    expected = -10 * math.log10(np.mean((b - a) ** 2))
    quality = release_quality(["a.png"], tmp_path / "src", tmp_path / "rel", LPIPSLoss(reduction="none"), 256, 64)
    assert quality["mean_psnr"] == pytest.approx(expected, abs=0.01) and quality["model_size"] == 64
    # the letterbox's padding (21 of 64 columns here) would count as unchanged pixels and add 1.7 dB
    assert quality["mean_psnr_model"] == pytest.approx(expected, abs=0.1)
    assert quality["mean_ssim_model"] > 0.99 and quality["files"][0]["ssim_model"] == quality["mean_ssim_model"]
    without = release_quality(["a.png"], tmp_path / "src", tmp_path / "rel", LPIPSLoss(reduction="none"), 256)
    assert "mean_psnr_model" not in without and without["mean_psnr"] == quality["mean_psnr"]


def test_ssim_is_the_standard_one_and_an_unchanged_release_scores_perfectly(tmp_path):
    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.linspace(0, 1, 300), np.linspace(0, 1, 200), indexing="ij")
    source = np.round((0.3 + 0.4 * rows * cols) * 65535).astype(np.uint16)
    noisy = np.clip(source + rng.normal(0, 2000, source.shape), 0, 65535).astype(np.uint16)
    for folder in ("src", "rel", "same"):
        (tmp_path / folder).mkdir()
    for folder, image in (("src", source), ("rel", noisy), ("same", source)):
        Image.fromarray(image).save(tmp_path / folder / "a.png")
    a, b = (load_xray(tmp_path / f / "a.png")[0].astype(np.float64) for f in ("src", "rel"))
    lpips = LPIPSLoss(reduction="none")
    quality = release_quality(["a.png"], tmp_path / "src", tmp_path / "rel", lpips, 256)
    # Wang et al.'s SSIM (11 px Gaussian window, sigma 1.5), as scikit-image computes it
    reference = structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert 0.2 < reference < 0.9 and quality["mean_ssim"] == pytest.approx(reference, abs=1e-4)
    same = release_quality(["a.png"], tmp_path / "src", tmp_path / "same", lpips, 256, 64)
    assert same["mean_psnr"] == same["mean_psnr_model"] == PSNR_CAP and same["mean_ssim"] == pytest.approx(1.0)
    assert same["mean_lpips"] == pytest.approx(0.0, abs=1e-7) and same["max_max_abs_change"] == 0.0


def test_a_manifests_release_quality_is_computed_once_and_recomputed_when_the_manifest_changes(tmp_path):
    rows, cols = np.meshgrid(np.linspace(0, 1, 120), np.linspace(0, 1, 90), indexing="ij")
    source = np.round((0.3 + 0.4 * rows * cols) * 65535).astype(np.uint16)
    for folder, image in (("src", source), ("rel", source + 655)):
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / "a.png")
    manifest = {"dataset_dir": "src", "release_dir": "rel", "generator_checkpoint": "g.pt", "complete": True}
    manifest["marked"] = [{"path": "a.png"}]
    manifest_file = tmp_path / "release_manifest.json"
    manifest_file.write_text(json.dumps(manifest))
    lpips = LPIPSLoss(reduction="none")
    first = manifest_release_quality(manifest_file, tmp_path / "src", tmp_path / "rel", lpips, 64)
    assert (tmp_path / "release_manifest.quality.json").is_file() and first["n_files"] == 1
    Image.fromarray(source + 6550).save(tmp_path / "rel" / "a.png")  # ten times the change, same manifest: reused
    assert manifest_release_quality(manifest_file, tmp_path / "src", tmp_path / "rel", lpips, 64) == first
    manifest_file.write_text(json.dumps({**manifest, "note": "a new release"}))
    again = manifest_release_quality(manifest_file, tmp_path / "src", tmp_path / "rel", lpips, 64)
    assert again["mean_psnr"] == pytest.approx(first["mean_psnr"] - 20, abs=0.05)
    other_size = manifest_release_quality(manifest_file, tmp_path / "src", tmp_path / "rel", lpips, 32)
    assert other_size["model_size"] == 32
