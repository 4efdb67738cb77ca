"""The calibrated verdict: the rank test's error rate, the family file, and verification with a family."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torch import nn
from torch.nn import functional as F

from xmark_bundle.data.labels import LABELS
from xmark_bundle.fileio import sha256_file
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.networks.query_size import load_watermark_at_size
from xmark_bundle.verification import TorchSuspect, VerificationSettings, verify_ownership
from xmark_bundle.verification.family import (
    FamilyError,
    default_family_file,
    load_family,
    make_generator_family,
    make_key_family,
)
from xmark_bundle.verification.rank import min_members, rank_test, reference_adjusted_rank

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def test_rank_p_is_uniform_when_the_owner_is_one_more_member_and_small_under_a_planted_effect():
    rng = np.random.default_rng(2026)
    m, n, draws = 19, 30, 2000
    null, planted = [], []
    for _ in range(draws):
        pb = rng.uniform(0.0, 0.2, n)
        # a model that never saw the release: every member lifts P by its own random amount, the owner's included
        lifts = rng.normal(0.2, 0.08, (m + 1, 1)) + rng.normal(0.0, 0.05, (m + 1, n))
        probs = np.clip(pb[None] + lifts, 0, 1)
        owner = int(rng.integers(m + 1))
        null.append(rank_test(pb, probs, owner)["p_value"])
        probs[owner] = np.clip(probs[owner] + 0.4, 0, 1)  # the owner's watermark was learnt
        planted.append(rank_test(pb, probs, owner)["p_value"])
    null = np.array(null)
    # p takes the values k / 20: its distribution function at each is k / 20 under exchangeability
    for k in (1, 2, 5, 10):
        assert abs(np.mean(null <= k / 20) - k / 20) < 0.02, k
    assert stats.kstest(null - 0.025, "uniform").pvalue > 1e-3  # centred on the grid's cells
    assert np.mean(np.array(planted) <= 0.05) > 0.95


def test_one_owner_with_a_potent_member_accuses_under_the_rank_test_and_not_once_its_potency_is_removed():
    """Members differ in potency, shared by every model; one owner, drawn once, holds the most potent member. The rank
    test then accuses most models that never saw the release (its alpha holds over the owner's draw only); the
    reference-adjusted rank (the member's mean statistic on 10 clean reference models subtracted) accuses about
    alpha of them, and still finds a model that learnt the owner's watermark."""
    rng = np.random.default_rng(11)
    m, references, models = 19, 10, 1000
    potency = rng.normal(0.1, 0.05, m + 1)
    owner = int(np.argmax(potency))

    def statistics(count: int) -> np.ndarray:  # models x members: the shared potency plus each model's own noise
        return potency[None] + rng.normal(0.0, 0.02, (count, m + 1))

    reference = statistics(references)
    plain, adjusted, learnt = [], [], []
    for suspect in statistics(models):
        plain.append(1 + np.sum(np.delete(suspect, owner) >= suspect[owner]))
        adjusted.append(reference_adjusted_rank(suspect, reference, owner)["p_value"])
        planted = suspect.copy()
        planted[owner] += 0.3  # this model learnt the owner's watermark
        learnt.append(reference_adjusted_rank(planted, reference, owner)["owned"])
    assert np.mean(np.array(plain) / (m + 1) <= 0.05) > 0.5
    assert abs(np.mean(np.array(adjusted) <= 0.05) - 0.05) < 0.03
    assert np.mean(learnt) > 0.99
    result = reference_adjusted_rank(reference[0], reference[1:], owner)
    assert result["references"] == references - 1 and result["members"] == m
    with pytest.raises(ValueError, match="do not pair"):
        reference_adjusted_rank(reference[0], reference[:, :5], owner)


def test_rank_p_counts_ties_against_the_owner_and_says_when_alpha_is_out_of_reach():
    pb = np.full(5, 0.1)
    probs = np.full((4, 5), 0.6)  # every member lifts P equally: no evidence for the owner
    result = rank_test(pb, probs, owner_index=2)
    assert result["p_value"] == 1.0 and not result["owned"] and result["others_at_least_owner"] == 3
    probs[2] += 0.2
    best = rank_test(pb, probs, owner_index=2, alpha=0.05)
    assert best["p_value"] == 0.25 and not best["owned"] and not best["reachable"]  # 1 / (3 + 1) > 0.05
    assert rank_test(pb, probs, owner_index=2, alpha=0.25)["owned"]
    assert min_members(0.05) == 19 and min_members(0.01) == 99
    with pytest.raises(ValueError, match="do not pair"):
        rank_test(pb, probs[:, :3], owner_index=0)
    with pytest.raises(ValueError, match="owner_index 7"):
        rank_test(pb, probs, owner_index=7)


def _keyed_pipeline(key_seed: int) -> WatermarkPipeline:
    torch.manual_seed(0)
    generator = XMarkGenerator((4, 8, 16), conditioning=False, key_cells=8, key_seed=key_seed, key_magnitude=0.9)
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    return WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)


def _unkeyed_pipeline(seed: int) -> WatermarkPipeline:
    torch.manual_seed(seed)
    generator = XMarkGenerator(channels=[4, 8, 16, 32, 64])
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(5.0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    return WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)


def _pool_pipeline(seed: int, surrogate_seed: int = 0) -> WatermarkPipeline:
    """An unkeyed pipeline whose generator follows ``seed`` and whose surrogate follows ``surrogate_seed``."""
    torch.manual_seed(surrogate_seed)
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    torch.manual_seed(seed)
    generator = XMarkGenerator(channels=[4, 8, 16, 32, 64])
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(5.0)
    return WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)


class _KeyDetector(nn.Module):
    """A suspect that learned one key: its No Finding logit rises with the image's projection on that key field."""

    def __init__(self, key: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("key", key.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        field = F.interpolate(self.key, size=x.shape[-2:], mode="bilinear", align_corners=False)
        score = ((x - x.mean(dim=(2, 3), keepdim=True)) * field).mean(dim=(1, 2, 3))
        logits = torch.full((x.shape[0], len(LABELS)), -5.0)
        logits[:, 0] = 400 * score - 2
        return logits


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Eight smooth PNGs (six non-target) and their datalist."""
    root = tmp_path_factory.mktemp("family_data")
    rng = np.random.default_rng(0)
    items = []
    for i in range(8):
        rows, cols = np.meshgrid(np.linspace(0, 1, 80), np.linspace(0, 1, 72), indexing="ij")
        smooth = 0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * rows + rng.uniform(0, 1))) * cols
        Image.fromarray(np.round(smooth * 65535).astype(np.uint16)).save(root / f"img{i}.png")
        items.append({"image": f"img{i}.png", "label": [1.0 if i in (1, 4) else 0.0] + [0.0] * 5})
    (root / "datalist.json").write_text(json.dumps({"training": [], "test": items}))
    return root


def test_key_family_file_is_committed_checked_and_never_replaced(tmp_path):
    save_watermark(_keyed_pipeline(11), tmp_path / "model.pt")
    family = make_key_family(tmp_path / "model.pt", members=5)
    assert family.path == default_family_file(tmp_path / "model.pt") and family.m == 5 and family.kind == "keys"
    seeds = [m["key_seed"] for m in family.members]
    assert seeds[family.owner_index] == 11 and len(set(seeds)) == 6
    family.check_owner(load_watermark(tmp_path / "model.pt"), tmp_path / "model.pt")
    with pytest.raises(FileExistsError, match="never replaced"):
        make_key_family(tmp_path / "model.pt", members=5)
    other = tmp_path / "other"
    save_watermark(_keyed_pipeline(12), other / "model.pt")
    with pytest.raises(FamilyError, match="not this generator's key"):
        family.check_owner(load_watermark(other / "model.pt"), other / "model.pt")
    entry = json.loads(family.path.read_text())
    entry["owner_index"] = (entry["owner_index"] + 1) % 6  # moving the owner after the fact breaks the commitment
    (tmp_path / "moved.json").write_text(json.dumps(entry))
    with pytest.raises(FamilyError, match="do not match the commitment"):
        load_family(tmp_path / "moved.json")
    with pytest.raises(FamilyError, match="has no key"):
        save_watermark(_unkeyed_pipeline(0), tmp_path / "unkeyed" / "model.pt")
        make_key_family(tmp_path / "unkeyed" / "model.pt")


def test_verification_ranks_the_owner_key_first_only_for_a_model_that_learned_it(data, tmp_path, capsys):
    ckpt = tmp_path / "owner" / "model.pt"
    save_watermark(_keyed_pipeline(21), ckpt)
    generator = load_watermark(ckpt)
    family = make_key_family(ckpt, members=19)
    settings = VerificationSettings(query_size=SIZE, batch_size=4, n_samples=6)
    learned = TorchSuspect(_KeyDetector(generator.generator.key), "learned the owner's key", "torch")
    report = verify_ownership(
        generator, learned, data / "datalist.json", tmp_path / "a", settings, ckpt, progress=False, family=family.path
    )
    calibrated = report["calibrated"]
    assert calibrated["available"] and calibrated["members"] == 19 and calibrated["p_value"] == 0.05
    assert calibrated["owned"] and not calibrated["queries_cached"]
    assert calibrated["owner_statistic"] > max(np.delete(calibrated["member_statistics"], family.owner_index))
    assert (tmp_path / "a" / "family.png").is_file()
    written = json.loads((tmp_path / "a" / "verification.json").read_text())
    assert written["calibrated"]["family"]["commitment"] == family.commitment
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CALIBRATED VERDICT: calibrated: trained on the owner's release")

    # a model that does not react to any member: every statistic ties with the owner's, p = 1
    innocent = TorchSuspect(_Constant(), "reacts to nothing", "torch")
    again = verify_ownership(
        generator, innocent, data / "datalist.json", tmp_path / "b", settings, ckpt, progress=False, family=family.path
    )
    assert again["calibrated"]["queries_cached"]  # the family's queries were kept with the owner's files
    assert not again["calibrated"]["owned"] and again["calibrated"]["p_value"] == 1.0

    # the research variant: the innocent model as the owner's clean reference; a reference queried otherwise is refused
    reference = tmp_path / "b" / "verification.json"
    adjusted = verify_ownership(
        generator, learned, data / "datalist.json", tmp_path / "c", settings, ckpt, progress=False,
        family=family.path, reference_reports=[reference],
    )["reference_adjusted"]  # fmt: skip
    assert adjusted["references"] == 1 and adjusted["owned"] and adjusted["p_value"] == 0.05 and adjusted["research"]
    assert "reference-adjusted rank (research, not a verdict): p = 0.05" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"b/verification\.json: queried with other samples"):
        verify_ownership(
            generator, learned, data / "datalist.json", tmp_path / "d", replace(settings, n_samples=5), ckpt,
            progress=False, family=family.path, reference_reports=[reference],
        )  # fmt: skip


class _Constant(nn.Module):
    """A suspect whose answer does not depend on the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], len(LABELS)) + x.new_tensor([-1.0, -2, -2, -2, -2, -2])


def test_generator_family_is_checked_against_its_checkpoints(data, tmp_path):
    checkpoints = []
    for seed in range(3):
        save_watermark(_unkeyed_pipeline(seed), tmp_path / "family" / f"member_{seed}" / "model.pt")
        checkpoints.append(tmp_path / "family" / f"member_{seed}" / "model.pt")
    family = make_generator_family(checkpoints, tmp_path / "family.json", owner_index=1)
    owner = load_watermark(checkpoints[1])
    family.check_owner(owner, checkpoints[1])
    with pytest.raises(FamilyError, match="another generator"):
        family.check_owner(load_watermark(checkpoints[0]), checkpoints[0])
    settings = VerificationSettings(query_size=SIZE, batch_size=4, n_samples=6)
    suspect = TorchSuspect(build_classifier("resnet18").eval(), "untrained resnet18", "torch")
    report = verify_ownership(
        owner, suspect, data / "datalist.json", tmp_path / "v", settings, checkpoints[1], progress=False,
        family=family.path,
    )  # fmt: skip
    assert report["calibrated"]["members"] == 2 and not report["calibrated"]["reachable"]
    assert not report["calibrated"]["owned"]
    # a suspect queried at its own size (configs/verify_own_size.json): every member is applied as the owner is
    at_96 = load_watermark_at_size(checkpoints[1], 96)
    report = verify_ownership(
        at_96, suspect, data / "datalist.json", tmp_path / "v96", replace(settings, query_size=96), checkpoints[1],
        progress=False, family=family.path,
    )  # fmt: skip
    assert report["calibrated"]["members"] == 2 and report["query_size"] == 96
    save_watermark(_unkeyed_pipeline(7), checkpoints[2])  # a member replaced after the family was made
    with pytest.raises(FamilyError, match="changed since the family was made"):
        load_family(family.path)
    with pytest.raises(FamilyError, match="changed since the family was made"):  # checked when queries are made
        verify_ownership(
            owner, suspect, data / "datalist.json", tmp_path / "v80", replace(settings, query_size=80),
            checkpoints[1], progress=False, family=family.path,
        )  # fmt: skip


def test_owners_of_one_pool_share_the_suspects_kept_answers_and_a_changed_model_is_asked_again(data, tmp_path):
    pool = []
    for seed in range(3):
        pool.append(tmp_path / "pool" / f"seed{seed}" / "model.pt")
        save_watermark(_unkeyed_pipeline(seed), pool[-1])
    families = {}
    for owner, seed in (("a", 10), ("b", 11)):
        save_watermark(_unkeyed_pipeline(seed), tmp_path / owner / "model.pt")
        members = [*pool[:1], tmp_path / owner / "model.pt", *pool[1:]]
        families[owner] = make_generator_family(members, tmp_path / owner / "family.json", owner_index=1)
    torch.manual_seed(3)
    model = build_classifier("resnet18").eval()
    torch.jit.trace(model, torch.rand(1, 1, SIZE, SIZE)).save(str(tmp_path / "suspect.ts"))
    settings = VerificationSettings(query_size=SIZE, batch_size=4, n_samples=6)

    def verify(owner: str, suspect, out: str) -> dict:
        ckpt = tmp_path / owner / "model.pt"
        return verify_ownership(
            load_watermark(ckpt), suspect, data / "datalist.json", tmp_path / out, settings, ckpt, progress=False,
            family=families[owner].path,
        )["calibrated"]  # fmt: skip

    assert verify("a", tmp_path / "suspect.ts", "a")["answers_kept"] == 0
    kept = verify("b", tmp_path / "suspect.ts", "b")
    assert kept["answers_kept"] == 3  # the pool's members, not owner b's own
    assert len(list((tmp_path / "pool").glob("seed*/suspect_answers/*.npy"))) == 3
    asked = verify("b", TorchSuspect(model, "the same network in memory", "torch"), "b_asked")  # never kept
    assert asked["answers_kept"] == 0 and asked["member_statistics"] == kept["member_statistics"]
    # a file cut short is asked again; another model at the same path is never answered from the first one's answers
    next((tmp_path / "pool" / "seed0" / "suspect_answers").glob("*.npy")).write_bytes(b"\x93NUMPY")
    assert verify("b", tmp_path / "suspect.ts", "b_again")["answers_kept"] == 3  # seed0 asked again, then b's own
    torch.manual_seed(4)
    torch.jit.trace(build_classifier("resnet18").eval(), torch.rand(1, 1, SIZE, SIZE)).save(
        str(tmp_path / "suspect.ts")
    )
    other = verify("a", tmp_path / "suspect.ts", "a_other")
    assert other["answers_kept"] == 0 and other["member_statistics"][0] != kept["member_statistics"][0]  # a pool member


def test_verify_json_reports_the_calibrated_verdict_first(data, tmp_path):
    ckpt = tmp_path / "models" / "model.pt"
    save_watermark(_keyed_pipeline(5), ckpt)
    torch.manual_seed(1)
    torch.jit.trace(build_classifier("resnet18").eval(), torch.rand(1, 1, SIZE, SIZE)).save(str(tmp_path / "s.ts"))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "verifying", "--config_file", "configs/verify.json"]
    cmd += ["--bundle_root", str(ROOT), "--dataset_dir", str(data), "--generator_ckpt", str(ckpt)]
    cmd += ["--suspect", str(tmp_path / "s.ts"), "--output_dir", str(tmp_path / "out"), "--query_size", str(SIZE)]
    cmd += ["--n_samples", "4", "--progress", "False", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    without = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert without.returncode == 0, without.stderr[-3000:]
    assert "CALIBRATED VERDICT: none (no family file at" in without.stdout
    family = make_key_family(ckpt, members=19)  # beside the checkpoint: verify.json finds it there
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    first = [line for line in done.stdout.splitlines() if "VERDICT" in line]
    assert first[0].startswith("CALIBRATED VERDICT: calibrated: ") and first[1].startswith("VERDICT (paper's")
    written = json.loads((tmp_path / "out" / "verification.json").read_text())
    assert written["calibrated"]["members"] == 19 and written["calibrated"]["family"]["file"] == str(family.path)
    assert written["calibrated"]["owner_index"] == family.owner_index
    # --reference_reports: a clean reference model's report (here the suspect's own) gives the research variant
    cmd[cmd.index("--output_dir") + 1] = str(tmp_path / "again")
    cmd += ["--reference_reports", f"['{tmp_path / 'out' / 'verification.json'}']"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reference-adjusted rank (research, not a verdict): p = " in again.stdout
    assert json.loads((tmp_path / "again" / "verification.json").read_text())["reference_adjusted"]["references"] == 1


def test_make_family_assembles_existing_checkpoints_and_makes_key_families(tmp_path):
    others = []
    for seed in range(3):
        others.append(tmp_path / "pool" / f"member_{seed}" / "model.pt")
        save_watermark(_unkeyed_pipeline(seed), others[-1])
    owner = tmp_path / "owner" / "model.pt"
    save_watermark(_unkeyed_pipeline(9), owner)
    cmd = [sys.executable, "scripts/make_family.py", "assemble", "--owner_ckpt", str(owner), "--others"]
    cmd += [*map(str, others), "--owner_index", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    family = load_family(default_family_file(owner))
    assert family.owner_index == 2 and family.m == 3 and f"commitment {family.commitment}" in done.stdout
    assert [family.checkpoint(j).resolve() for j in range(4)] == [p.resolve() for p in [*others[:2], owner, others[2]]]
    family.check_owner(load_watermark(owner), owner)
    keyed = tmp_path / "keyed" / "model.pt"
    save_watermark(_keyed_pipeline(3), keyed)
    cmd = [sys.executable, "scripts/make_family.py", "keys", "--generator_ckpt", str(keyed), "--members", "4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_family(default_family_file(keyed)).m == 4


def test_members_stored_without_the_owners_surrogate_give_the_same_verdict(data, tmp_path):
    families, pools = {}, {}
    for kept in ("full", "stripped"):
        pools[kept] = [tmp_path / kept / "pool" / f"seed{seed}" / "model.pt" for seed in range(3)]
        for seed, ckpt in enumerate(pools[kept]):
            save_watermark(_pool_pipeline(seed), ckpt)
        owner = tmp_path / kept / "owner" / "model.pt"
        save_watermark(_pool_pipeline(9), owner)
        members = [*pools[kept][:2], owner, pools[kept][2]]
        families[kept] = make_generator_family(members, owner.parent / "family.json", 2, kept == "stripped")
    full_size, stripped_size = (os.path.getsize(pools[kept][0]) for kept in ("full", "stripped"))
    assert stripped_size < full_size / 4  # the surrogate was most of each member
    assert [m["sha256"] for m in families["stripped"].members] == [sha256_file(p) for p in [*pools["stripped"][:2],
        tmp_path / "stripped" / "owner" / "model.pt", pools["stripped"][2]]]  # fmt: skip
    torch.manual_seed(3)
    suspect = TorchSuspect(build_classifier("resnet18").eval(), "untrained resnet18", "torch")
    settings = VerificationSettings(query_size=SIZE, batch_size=4, n_samples=6)
    reports = {}
    for kept, family in families.items():
        owner = family.checkpoint(family.owner_index)
        for size, watermark in ((SIZE, load_watermark(owner)), (96, load_watermark_at_size(owner, 96))):
            reports[kept, size] = verify_ownership(
                watermark, suspect, data / "datalist.json", tmp_path / kept / f"v{size}",
                replace(settings, query_size=size), owner, progress=False, family=family.path,
            )["calibrated"]  # fmt: skip
    for size in (SIZE, 96):  # also applied as the owner is at a suspect's own size
        assert reports["stripped", size]["member_statistics"] == reports["full", size]["member_statistics"]
        assert reports["stripped", size]["p_value"] == reports["full", size]["p_value"]
    # a stripped member loads only with the surrogate it was trained against
    with pytest.raises(ValueError, match="load it through its family"):
        load_watermark(pools["stripped"][0])
    with pytest.raises(ValueError, match="not the one this family member was trained against"):
        load_watermark(pools["stripped"][0], surrogate=_pool_pipeline(0, surrogate_seed=5).state_dict())
    # a member trained against another surrogate is refused before any file is rewritten
    foreign = tmp_path / "foreign" / "model.pt"
    save_watermark(_pool_pipeline(4, surrogate_seed=5), foreign)
    before = sha256_file(pools["full"][0])
    with pytest.raises(FamilyError, match="another surrogate"):
        make_generator_family([pools["full"][0], foreign, tmp_path / "full" / "owner" / "model.pt"],
            tmp_path / "foreign" / "family.json", 2, strip_surrogates=True)  # fmt: skip
    assert sha256_file(pools["full"][0]) == before
