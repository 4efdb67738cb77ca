"""The classic backdoor triggers as watermarking modules: patterns, budgets, checkpoints, configs/trigger.json, and
verification through the same path as X-Mark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from xmark_bundle.data.labels import LABELS
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark, watermark_record
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.triggers import BadNetsTrigger, LabelConsistentTrigger, make_trigger
from xmark_bundle.verification import TorchSuspect, VerificationSettings, verify_ownership

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
METHODS = ("badnets", "blended", "wanet")


def _letterboxed(n: int = 3) -> torch.Tensor:
    """``n`` smooth portrait images letterboxed into SIZE x SIZE (zero columns left and right)."""
    torch.manual_seed(0)
    image = torch.zeros(n, 1, SIZE, SIZE)
    rows = torch.linspace(0, 1, SIZE)[:, None]
    for i in range(n):
        image[i, 0, :, 10:54] = 0.3 + 0.4 * torch.sin(6.28 * (rows * (i + 1) + torch.rand(1))) ** 2 + 0.05
    return image


@pytest.mark.parametrize("method", METHODS)
def test_trigger_changes_only_content_within_its_budget_and_depends_on_its_seed(method):
    image = _letterboxed()
    trigger = make_trigger(method, image_size=SIZE, seed=0)
    marked = trigger(image)
    change = (marked - image).abs()
    assert change.max() > 0.02, "the trigger must mark the image"
    assert change.max() <= trigger.eps + 1e-6
    assert change[..., :10].max() == 0 and change[..., 54:].max() == 0, "letterbox padding must stay zero"
    assert trigger.poison_label and trigger.method == method
    again, other = make_trigger(method, image_size=SIZE, seed=0)(image), make_trigger(method, SIZE, seed=1)(image)
    assert torch.equal(again, marked) and not torch.equal(other, marked)
    with pytest.raises(ValueError, match=f"B x 1 x {SIZE} x {SIZE}"):
        trigger(torch.rand(1, 1, SIZE // 2, SIZE // 2))


def test_blended_and_wanet_follow_their_definitions():
    image = _letterboxed()
    blended = make_trigger("blended", image_size=SIZE, seed=2, alpha=0.2)
    content = image > 0
    expected = image + 0.2 * (blended.pattern - image)
    torch.testing.assert_close(blended(image)[content], expected[content], rtol=0, atol=1e-6)
    # bilinear sampling is exact on a linear image: a horizontal ramp reads back the field's x coordinate
    wanet = make_trigger("wanet", image_size=SIZE, seed=2)
    ramp = (0.2 + 0.6 * torch.linspace(0, 1, SIZE)).expand(1, 1, SIZE, SIZE).contiguous()
    torch.testing.assert_close(wanet(ramp)[0, 0], 0.2 + 0.6 * (wanet.grid[0, ..., 0] + 1) / 2, rtol=0, atol=1e-5)
    moved = (wanet.grid[0, ..., 0] - torch.linspace(-1, 1, SIZE)[None, :]).abs() * (SIZE - 1) / 2  # in pixels
    assert 0.05 < float(moved.mean()) < 1.0  # the paper's subtle warp: under a pixel on average


def test_badnets_patch_sits_in_the_content_corner_and_survives_downscaling():
    image = _letterboxed(1)
    trigger = BadNetsTrigger(image_size=SIZE, patch_fraction=1 / 8)
    changed = torch.nonzero((trigger(image) - image)[0, 0].abs() > 0)
    size = trigger.patch_size
    assert size == 8 and changed[:, 0].max() < SIZE - size // 2 and changed[:, 1].max() < 54 - size // 2
    assert changed[:, 1].min() >= 54 - size - size // 2  # the content's right edge, not the padding's
    small = F.interpolate(torch.cat([image, trigger(image)]), size=(SIZE // 2, SIZE // 2), mode="area")
    assert (small[1] - small[0]).abs().max() > 0.2  # a 4 px patch at half size still stands out
    with pytest.raises(ValueError, match="patch_fraction"):
        BadNetsTrigger(image_size=SIZE, patch_fraction=0.5)
    with pytest.raises(ValueError, match="unknown trigger method 'patch'"):
        make_trigger("patch")


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rebuilds_the_same_trigger(method, tmp_path):
    trigger = make_trigger(method, image_size=SIZE, seed=3)
    save_watermark(trigger, tmp_path / "model.pt", target_label="Edema")
    record = watermark_record(tmp_path / "model.pt")
    assert record["method"] == method and record["target_label"] == "Edema" and record["image_size"] == SIZE
    assert record["epsilon"] == pytest.approx(trigger.eps)
    loaded = load_watermark(tmp_path / "model.pt")
    image = _letterboxed()
    assert torch.equal(loaded(image), trigger(image)) and loaded.watermark_record["method"] == method


def test_trigger_config_writes_a_checkpoint_and_never_replaces_one(tmp_path):
    def run(*extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "making", "--config_file", "configs/trigger.json"]
        cmd += ["--ckpt_dir", str(tmp_path), "--image_size", str(SIZE), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)

    done = run("--method", "blended", "--seed", "5", "--trigger_args", "{'alpha': 0.2}")
    assert done.returncode == 0, done.stderr[-3000:]
    record = watermark_record(tmp_path / "model.pt")
    assert record["network"]["alpha"] == 0.2 and record["network"]["seed"] == 5 and record["epsilon"] == 0.2
    before = (tmp_path / "model.pt").read_bytes()
    refused = run("--method", "badnets")
    assert refused.returncode != 0 and (tmp_path / "model.pt").read_bytes() == before
    assert "model.pt already holds the trained blended watermark" in refused.stderr.strip().splitlines()[-1]
    (tmp_path / "model.pt").unlink()
    no_surrogate = run("--method", "label_consistent")
    assert no_surrogate.returncode != 0 and "give surrogate_ckpt" in no_surrogate.stderr.strip().splitlines()[-1]
    bad = run("--method", "sig")
    assert bad.returncode != 0 and not (tmp_path / "model.pt").exists()
    assert bad.stderr.strip().splitlines()[-1].startswith("trigger failed: ValueError: unknown trigger method 'sig'")


class _BottomRightDetector(nn.Module):
    """A suspect that reacts to sharp edges in the image's bottom-right quarter (where BadNets pastes its patch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[..., x.shape[-2] // 2 :, x.shape[-1] // 2 :]
        edges = (corner[..., 1:, :] - corner[..., :-1, :]).abs().amax(dim=(1, 2, 3))
        logits = torch.full((x.shape[0], len(LABELS)), -5.0)
        logits[:, 0] = 40 * (edges - 0.2)
        return logits


def test_a_trigger_is_verified_through_the_same_path_as_x_mark(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        rows = np.linspace(0, 1, 90)[:, None] * np.ones((1, 70))
        smooth = 0.4 + 0.2 * np.sin(2 * np.pi * (rows + rng.uniform()))
        Image.fromarray(np.round(smooth * 65535).astype(np.uint16)).save(tmp_path / f"img{i}.png")
        items.append({"image": f"img{i}.png", "label": [0.0] * len(LABELS)})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "test": items}))
    save_watermark(BadNetsTrigger(image_size=SIZE, patch_fraction=1 / 8), tmp_path / "badnets.pt")
    trigger = load_watermark(tmp_path / "badnets.pt")
    settings = VerificationSettings(query_size=SIZE, batch_size=3, n_samples=6)
    suspect = TorchSuspect(_BottomRightDetector(), "patch detector", "torch")
    datalist, ckpt = tmp_path / "datalist.json", tmp_path / "badnets.pt"
    report = verify_ownership(trigger, suspect, datalist, tmp_path / "out", settings, ckpt, progress=False)
    assert report["generator"]["method"] == "badnets" and report["generator"]["max_abs_perturbation"] <= 1.0
    assert report["owned"] and report["wsr"] == 1.0  # the patch raises P(k) on every query
    # the control (the patch's magnitudes with random signs) is no clean patch: weaker edges, the reaction differs
    assert report["control"]["description"].startswith("same samples, the watermark's per-pixel magnitudes")


def _label_consistent() -> LabelConsistentTrigger:
    torch.manual_seed(0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    return LabelConsistentTrigger(surrogate, image_size=SIZE, patch_fraction=1 / 8, adversarial_eps=8 / 255, steps=5)


def test_label_consistent_release_lowers_the_surrogate_target_logit_and_queries_carry_the_patch_alone(tmp_path):
    trigger, image = _label_consistent(), _letterboxed()
    patched, released = trigger(image), trigger.release_marking(image)
    assert torch.equal(patched, BadNetsTrigger(SIZE, patch_fraction=1 / 8)(image))  # the query: the patch alone
    patch = patched != image
    outside = (released - image)[~patch]
    assert 0 < outside.abs().max() <= 8 / 255 + 1e-6 and torch.equal(released[patch], patched[patch])
    assert (released - image)[..., :10].abs().max() == 0  # padding untouched
    with torch.no_grad():
        before, after = (trigger.surrogate(x)[:, 0] for x in (patched, released))
    assert bool((after < before).all()), (before, after)  # harder to call a target without the patch
    assert not trigger.poison_label and trigger.method == "label_consistent"

    save_watermark(trigger, tmp_path / "lc.pt")
    loaded = load_watermark(tmp_path / "lc.pt")
    assert loaded.watermark_record["network"]["surrogate"]["size"] == SIZE
    assert torch.allclose(loaded.release_marking(image), released, atol=1e-6)
