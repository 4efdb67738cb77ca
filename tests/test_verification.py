"""Ownership test statistics, the verify_ownership run and configs/verify.json through `monai.bundle run`."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy
import torch
from PIL import Image
from scipy import stats
from torch import nn

from xmark_bundle.data.labels import LABELS
from xmark_bundle.fileio import sha256_file
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline, is_keyed
from xmark_bundle.verification import (
    ProbabilityError,
    SuspectModelError,
    TorchSuspect,
    VerificationSettings,
    control_comparison,
    other_key_control,
    ownership_test,
    unkeyed_control,
    verify_ownership,
    watermark_success_rate,
)

ROOT = Path(__file__).resolve().parents[1]
SIZE, QUERY, CHANNELS = 64, 64, [4, 8, 16, 32, 64]


def test_ownership_test_matches_the_textbook_paired_t_test():
    pb = [0.10, 0.20, 0.05, 0.30, 0.15, 0.25]
    pv = [0.70, 0.90, 0.40, 0.80, 0.60, 0.55]
    tau = 0.25
    d = [b + tau - v for b, v in zip(pb, pv, strict=True)]  # H1: mean(d) < 0
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    p = stats.t.sf(-t, n - 1)  # one-sided, lower tail
    result = ownership_test(pb, pv, tau=tau, alpha=0.05)
    assert result["statistic"] == pytest.approx(t, rel=1e-12)
    assert result["p_value"] == pytest.approx(p, rel=1e-9)
    assert p < 0.01 and result["owned"] and result["verdict"].startswith("verified")
    assert result["delta_p"] == pytest.approx(np.mean(pv) - np.mean(pb))
    assert result["n"] == n and result["tau"] == tau and result["alpha"] == 0.05

    # Wilcoxon signed-rank beside it: all six differences Pv - Pb - tau are positive, the exact one-sided p is 1/2^6
    assert all(v - b - tau > 0 for b, v in zip(pb, pv, strict=True)) and result["wilcoxon_p"] == pytest.approx(1 / 64)

    weak = ownership_test(pb, [v - 0.2 for v in pv], tau=tau)  # lift of about 0.3 only: not beyond tau
    assert 0.05 < weak["p_value"] < 1 and not weak["owned"] and weak["verdict"].startswith("not verified")


def test_constant_differences_give_the_limit_of_the_test():
    saturated = ownership_test([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert saturated["p_value"] == 0.0 and saturated["owned"] and saturated["statistic"] is None
    pb = np.array([0.1, 0.2, 0.3])
    exactly_tau = ownership_test(pb, pb + 0.25)  # H0 holds exactly (scipy: NaN)
    assert exactly_tau["p_value"] == 1.0 and not exactly_tau["owned"]
    below_tau = ownership_test(pb, pb + 0.1)
    assert below_tau["p_value"] == 1.0 and not below_tau["owned"]
    above_tau = ownership_test(pb, pb + 0.4)
    assert above_tau["p_value"] == 0.0 and above_tau["owned"]
    assert exactly_tau["wilcoxon_p"] == 1.0  # no difference left after dropping the zeros
    assert json.dumps(above_tau, allow_nan=False)  # the record stays valid JSON


def test_unusable_probabilities_are_refused_with_the_model_named():
    with pytest.raises(ProbabilityError, match=r"model X \(watermarked queries Pv\): 1 of 3 .* NaN"):
        ownership_test([0.1, 0.2, 0.3], [0.5, float("nan"), 0.4], source="model X")
    with pytest.raises(ProbabilityError, match="at least 2 query pairs, got 1"):
        ownership_test([0.1], [0.9])
    with pytest.raises(ProbabilityError, match=r"outside \[0, 1\].*logits"):
        ownership_test([0.1, 2.5], [0.9, 0.8])
    with pytest.raises(ProbabilityError, match="paired 1-D arrays"):
        ownership_test([0.1, 0.2, 0.3], [0.9, 0.8])
    with pytest.raises(ValueError, match="tau"):
        ownership_test([0.1, 0.2], [0.9, 0.8], tau=1.5)


def test_watermark_success_rate_counts_pv_at_or_above_the_threshold():
    assert watermark_success_rate([0.2, 0.5, 0.7, 0.49]) == 0.5
    assert watermark_success_rate([0.2, 0.5, 0.7, 0.49], threshold=0.8) == 0.0


def _pipeline() -> WatermarkPipeline:
    torch.manual_seed(0)
    generator = XMarkGenerator(channels=CHANNELS)
    with torch.no_grad():  # large weights so that the residual uses much of the budget
        for p in generator.parameters():
            p.mul_(5.0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    return WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)


class _HighFrequencyDetector(nn.Module):
    """A suspect that learned the watermark: its No Finding logit rises with the image's Laplacian energy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[..., 1:-1, 1:-1]
        lap = 4 * centre - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
        logits = torch.full((x.shape[0], len(LABELS)), -5.0)
        logits[:, 0] = 100 * (lap.abs().mean(dim=(1, 2, 3)) - 0.08)
        return logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny G checkpoint, a suspect classifier (eager and TorchScript) and 9 PNGs with a datalist (6 non-target)."""
    root = tmp_path_factory.mktemp("verify")
    save_watermark(_pipeline(), root / "generator.pt")
    torch.manual_seed(1)
    suspect = build_classifier("resnet18").eval()
    torch.jit.trace(suspect, torch.rand(1, 1, QUERY, QUERY)).save(str(root / "suspect.ts"))
    rng = np.random.default_rng(0)
    items = []
    for i, shape in enumerate([(90, 70), (80, 100), (64, 64), (120, 96), (70, 70), (100, 80), (72, 90), (96, 64)]):
        name = f"img{i}.png"
        rows, cols = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
        smooth = 0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * rows + rng.uniform(0, 1))) * cols
        Image.fromarray(np.round(smooth * 65535).astype(np.uint16)).save(root / name)
        label = [0.0] * len(LABELS)
        label[0] = 1.0 if i in (1, 4) else 0.0  # "No Finding" present in 2 images: target samples
        items.append({"image": name, "label": label})
    items.append({"image": "img8.png", "label": [-1.0] + [0.0] * 5})  # uncertain: never queried
    Image.fromarray(rng.integers(0, 255, (50, 60), dtype=np.uint8)).save(root / "img8.png")
    (root / "datalist.json").write_text(json.dumps({"training": [], "test": items}))
    return root, suspect


def test_verify_ownership_writes_the_report(setup, tmp_path, capsys):
    root, classifier = setup
    suspect = TorchSuspect(_HighFrequencyDetector(), "watermark detector", "torch")  # reacts to G's residual
    settings = VerificationSettings(query_size=QUERY, batch_size=2, n_samples=4)  # one shape: fast on CPU
    generator, ckpt = load_watermark(root / "generator.pt"), root / "generator.pt"
    report = verify_ownership(
        generator, suspect, root / "datalist.json", tmp_path / "a", settings, generator_ckpt=ckpt, progress=False
    )
    written = json.loads((tmp_path / "a" / "verification.json").read_text())
    assert written == json.loads(json.dumps(report))
    for key in ("p_value", "delta_p", "wsr", "n", "tau", "alpha", "verdict", "owned", "suspect", "generator"):
        assert key in written, key
    assert written["n"] == 4 and len(written["samples"]) == 4
    assert written["environment"]["tools"]["scipy"] == scipy.__version__ and written["environment"]["machine"]["cpu"]
    assert {s["index"] for s in written["samples"]} <= {0, 2, 3, 5, 6, 7}  # non-target items only
    assert written["generator"]["sha256"] == sha256_file(root / "generator.pt")
    assert 0 < written["generator"]["max_abs_perturbation"] <= 16 / 255 + 1e-6
    assert set(written["timings_s"]) >= {"open_suspect", "load_and_letterbox", "watermark", "query", "test", "total"}
    pb, pv = (np.array([s[key] for s in written["samples"]]) for key in ("pb", "pv"))
    assert written["delta_p"] == pytest.approx(np.mean(pv - pb))
    assert written["wsr"] == pytest.approx(np.mean(pv >= 0.5))
    assert written["owned"] and written["p_value"] < 0.01 and written["wsr"] == 1.0 and written["delta_p"] > 0.5
    # the p-values from their textbook definitions (scipy), on the report's own samples
    assert written["p_value"] == pytest.approx(stats.ttest_rel(pb + 0.25, pv, alternative="less").pvalue, rel=1e-9)
    assert written["wilcoxon_p"] == pytest.approx(stats.wilcoxon(pv - pb - 0.25, alternative="greater").pvalue)
    with Image.open(tmp_path / "a" / "verification.png") as figure:
        assert figure.format == "PNG" and figure.size[0] > 800
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("CALIBRATED VERDICT: none (no family file given")
    assert 8 <= len(out) <= 12 and sum(line.startswith("VERDICT (paper's") for line in out) == 1
    # a detector of any high-frequency energy is not key-specific: the unkeyed control triggers it as well
    control = written["control"]
    assert not control["specific"] and control["p_value"] < 0.05 and control["delta_p"] > 0.25
    pc = np.array([s["pc"] for s in written["samples"]])
    assert control["delta_p"] == pytest.approx(np.mean(pc - pb))
    assert not control["specific"] and control["reacts"]
    assert out[-2].startswith("WARNING: the suspect also reacts to the control")

    again = verify_ownership(
        generator, suspect, root / "datalist.json", tmp_path / "b", settings, generator_ckpt=ckpt, progress=False
    )
    assert again["samples"] == report["samples"]  # seeded choice, deterministic queries

    innocent = TorchSuspect(classifier, "untrained resnet18", "torch")
    with pytest.warns(UserWarning, match="only 6 non-target samples"):
        everything = verify_ownership(
            generator, innocent, root / "datalist.json", tmp_path / "c", replace(settings, n_samples=50), progress=False
        )
    assert everything["n"] == 6 and everything["generator"]["sha256"] is None
    assert not everything["owned"] and abs(everything["delta_p"]) < 0.1
    assert not everything["control"]["reacts"] and not everything["control"]["specific"]  # nothing to be specific
    one = [{"image": str(root / "img0.png"), "label": [0.0] * len(LABELS)}]  # items given directly
    with pytest.raises(ValueError, match="only 1 non-target sample"):
        verify_ownership(generator, innocent, one, tmp_path / "d", settings, progress=False)
    three_scores = TorchSuspect(build_classifier("resnet18", num_classes=3), "three-label net", "torch")
    with pytest.raises(SuspectModelError, match="three-label net returns 3 scores and names no labels"):
        verify_ownership(generator, three_scores, root / "datalist.json", tmp_path / "e", settings, progress=False)
    assert not (tmp_path / "e").exists()  # refused before any work


def _bundle_run(root: Path, out: Path, suspect: str, run_id: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", "configs/verify.json"]
    cmd += ["--meta_file", "configs/metadata.json", "--bundle_root", str(ROOT), "--dataset_dir", str(root)]
    cmd += ["--generator_ckpt", str(root / "generator.pt"), "--suspect", suspect, "--output_dir", str(out)]
    cmd += ["--query_size", str(QUERY), "--n_samples", "4", "--progress", "False", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_bundle_run_verifying(setup, tmp_path):
    root, _ = setup
    done = _bundle_run(root, tmp_path / "ok", str(root / "suspect.ts"), "verifying")
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((tmp_path / "ok" / "verification.json").read_text())
    assert written["n"] == 4 and written["suspect"]["kind"] == "torchscript"
    assert written["suspect"]["sha256"] == sha256_file(root / "suspect.ts")
    assert "VERDICT: " in done.stdout


def test_bundle_run_failure_ends_with_one_clear_line(setup, tmp_path):
    root, _ = setup
    failed = _bundle_run(root, tmp_path / "bad", str(root / "no_such_model.ts"), "run")
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("verification failed: SuspectModelError: suspect model not found:"), failed.stderr[-3000:]
    assert "no_such_model.ts" in last
    assert not (tmp_path / "bad" / "verification.json").exists()


def test_unkeyed_control_keeps_magnitudes_and_randomises_signs():
    torch.manual_seed(0)
    image = torch.rand(2, 1, 32, 32) * 0.8 + 0.1
    image[..., :4] = 0.0  # letterbox padding: the watermark never touches it, nor does the control
    residual = (torch.rand_like(image) * 2 - 1) * 0.05 * (image > 0)
    control = unkeyed_control(image, image + residual, torch.Generator().manual_seed(3))
    torch.testing.assert_close((control - image).abs(), residual.abs())
    agree = torch.sign(control - image) == torch.sign(residual)
    assert 0.4 < agree[residual != 0].float().mean() < 0.6  # signs independent of the watermark's
    again = unkeyed_control(image, image + residual, torch.Generator().manual_seed(3))
    assert torch.equal(control, again) and bool((control[..., :4] == 0).all())


def test_control_of_a_keyed_generator_uses_other_keys():
    torch.manual_seed(0)
    generator = XMarkGenerator((4, 8, 16), conditioning=False, key_cells=8, key_seed=0).eval()
    assert is_keyed(generator) and not is_keyed(XMarkGenerator((4, 8, 16)))
    key = generator.key.clone()
    image = torch.rand(3, 1, 32, 32) * 0.8 + 0.1
    with torch.no_grad():
        marked = generator(image)
        control = other_key_control(generator, image, torch.Generator().manual_seed(1))
        seed = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(1)))
        other = XMarkGenerator((4, 8, 16), conditioning=False).eval()
        other.load_state_dict({**generator.state_dict(), "key": generator.other_key(seed)})
        torch.testing.assert_close(control, other(image), rtol=0, atol=0)  # our network, another key
    assert torch.equal(generator.key, key)  # the generator keeps its own key
    torch.testing.assert_close((control - image).abs().mean(), (marked - image).abs().mean(), rtol=0.2, atol=0)
    agree = torch.sign(control - image) == torch.sign(marked - image)
    assert 0.3 < float(agree.float().mean()) < 0.7  # signs unrelated to our key's


def test_the_watermark_must_beat_the_control_by_tau_to_be_specific():
    rng = np.random.default_rng(0)
    pb = np.clip(rng.normal(0.09, 0.05, 100), 0, 1)
    # a clean model that reads any grating as the target, ours a little more (docs/research_log.md, "Control margin")
    pc = np.clip(pb + 0.21 + rng.normal(0, 0.05, 100), 0, 1)
    pv = np.clip(pc + 0.14 + rng.normal(0, 0.05, 100), 0, 1)
    control = control_comparison(pb, pv, pc, tau=0.25, alpha=0.05, source="clean", keyed=True)
    assert ownership_test(pb, pv, tau=0.25)["owned"]  # the paper's test alone would accuse it
    assert not control["reacts"] and not control["specific"]
    expected = stats.ttest_rel(pc + 0.25, pv, alternative="less").pvalue
    assert control["p_value_vs_watermark"] == pytest.approx(expected) and expected > 0.05
    assert stats.ttest_rel(pc, pv, alternative="less").pvalue < 1e-6  # what the margin-free test called specific
    # a model that learned our key: the other keys leave it near Pb, ours lifts it far above
    learned = np.clip(pb + 0.85 + rng.normal(0, 0.05, 100), 0, 1)
    near = np.clip(pb + 0.05 + rng.normal(0, 0.05, 100), 0, 1)
    control = control_comparison(pb, learned, near, tau=0.25, alpha=0.05, source="malicious", keyed=True)
    assert control["specific"] and control["p_value_vs_watermark"] < 1e-10
