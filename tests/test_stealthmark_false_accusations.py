"""The false-accusation script at toy size (it runs, resumes without retraining, counts k of N with exact intervals)
and the ordinary burned-in markers it queries with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from xmark_bundle.stealthmark.triggers import apply_trigger, burn_in_markers, trigger_region

pytest.importorskip("segno", reason="segno (requirements.txt) encodes the owner's QR code")
pytest.importorskip("cv2", reason="OpenCV decodes QR codes")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import stealthmark_false_accusations as fa  # noqa: E402


def test_markers_are_white_text_in_a_top_corner():
    images = torch.full((40, 1, 64, 64), 0.2)
    marked = burn_in_markers(images, seed=1201)
    changed = (marked != images).any(1)  # N x H x W
    assert changed.flatten(1).any(1).all()  # every image got a marker
    assert not changed[:, 32:].any()  # top half only
    left, right = changed[:, :, :16].flatten(1).any(1), changed[:, :, 48:].flatten(1).any(1)
    assert left.any() and right.any()  # both corners occur
    assert marked.max() > 0.9 and (marked >= images).all()  # white, blended over the image
    assert torch.equal(marked, burn_in_markers(images, seed=1201))
    half = burn_in_markers(images, seed=1201, share=0.5)
    assert 0 < int((half != images).flatten(1).any(1).sum()) < 40
    # the text trigger writes "TEST" in the same top-left corner: a marker overlaps it on some images
    text = trigger_region("text", (64, 64))
    assert (changed & text).flatten(1).any(1).any()
    assert not torch.equal(apply_trigger(images, "text"), marked)


def test_clopper_pearson_is_the_exact_interval():
    assert fa.clopper_pearson(0, 20) == pytest.approx([0.0, 0.1684], abs=1e-4)
    assert fa.clopper_pearson(20, 20) == pytest.approx([0.8316, 1.0], abs=1e-4)
    low, high = fa.clopper_pearson(3, 10)
    assert low < 0.3 < high


@pytest.mark.slow
def test_script_counts_every_model_and_resumes_without_retraining(tmp_path):
    argv = [
        "--out", str(tmp_path), "--n-phantoms", "14", "--image-size", "32", "--n-benign", "2",
        "--n-other-keys", "1", "--owner-steps", "3", "--benign-steps", "3", "--qr-samples", "1800",
        "--n-queries", "4", "--extra-triggers", "text",
    ]  # fmt: skip
    results = fa.main(argv)
    models = results["models"]
    assert {m["role"] for m in models.values()} == {"owner", "benign", "other_key"}
    assert {models["benign_00_unet"]["arch"], models["benign_01_segresnet"]["arch"]} == {"unet", "segresnet"}
    seeds = [m["seed"] for m in models.values()]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= 1000
    assert len(results["evaluations"]) == 4 * 2 * 2  # models x query sets x owner records
    counts = results["summary"]["counts"]
    assert set(counts) == {"plain|owner_record", "markers|owner_record", "plain|text_record", "markers|text_record"}
    floor = counts["plain|owner_record"]["floor"]
    assert floor["benign"]["n"] == 2 and floor["not_owner"]["n"] == 3 and floor["owner"]["n"] == 1
    assert set(counts["plain|owner_record"]) == {"floor", "authors", "qr_a", "qr_b", "qr_b_binomial"}
    assert set(counts["plain|text_record"]) == {"floor", "authors"}  # QR only for the owner's own record
    # the authors' grid QR is the verifier's pattern whatever the model: every non-owner model "decodes"
    qr_a = counts["plain|owner_record"]["qr_a"]["not_owner"]
    assert qr_a["k"] == qr_a["n"] == 3
    stamp = (tmp_path / "models" / "owner" / "model.pt").stat().st_mtime_ns
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["evaluations"].keys() == results["evaluations"].keys()
    again = fa.main(argv)
    assert (tmp_path / "models" / "owner" / "model.pt").stat().st_mtime_ns == stamp  # not retrained
    assert again["models"]["owner"]["train_seconds"] == models["owner"]["train_seconds"]
    assert (
        again["evaluations"]["owner|plain|owner_record"]["seconds"]
        == (results["evaluations"]["owner|plain|owner_record"]["seconds"])
    )  # not re-evaluated
