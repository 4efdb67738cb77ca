"""The bundle's workflows run end to end through ``monai.bundle.ConfigWorkflow`` on a few small phantoms.

Like the MONAI model-zoo CI: the real configs, shrunk by overrides (image size, epochs, widths), real engines.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import monai
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import Compose
from scipy import stats
from sklearn.metrics import accuracy_score, roc_auc_score

from xmark_bundle.data import LoadXRayd
from xmark_bundle.data.chexpert import prepare_datalist
from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.fileio import sha256_file
from xmark_bundle.networks.checkpoint import load_watermark, watermark_record
from xmark_bundle.networks.classifier import load_classifier
from xmark_bundle.networks.generator import SSCLBWGenerator
from xmark_bundle.transforms import ResizeLongestPadd
from xmark_bundle.verification.family import load_family

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """40 small phantoms (256-320 px) and their datalist."""
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, n=40, seed=1, min_size=256, max_size=320, valid_fraction=0.25)
    prepare_datalist(out / "train.csv", out / "datalist.json", test_csv=out / "valid.csv", val_fraction=0.25)
    return out


def _workflow(configs: list[str], workflow_type: str | None = "train", **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        **{"bundle_root": str(ROOT), "num_workers": 0, "progress": False, **override},
    )
    workflow.initialize()
    return workflow


@pytest.fixture(scope="module")
def classifier(phantoms, tmp_path_factory):
    """A surrogate trained for one epoch at 64 px through configs/train_classifier.json."""
    ckpt_dir = tmp_path_factory.mktemp("classifier")
    _train_classifier(phantoms, ckpt_dir, max_epochs=1)
    return ckpt_dir


def _train_classifier(phantoms: Path, ckpt_dir: Path, **override) -> None:
    """Train through configs/train_classifier.json at 64 px on ``phantoms`` into ``ckpt_dir``."""
    workflow = _workflow(
        ["train_classifier.json"], dataset_dir=str(phantoms), ckpt_dir=str(ckpt_dir), image_size=64, batch_size=8,
        **override,
    )  # fmt: skip
    assert workflow.check_properties() in (None, [])
    workflow.run()
    workflow.finalize()


def _predictions(classifier: Path, phantoms: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's probabilities on a split's letterboxed 64 px images (outside the bundle), and the targets."""
    rows = json.loads((phantoms / "datalist.json").read_text())[split]
    model = load_classifier(classifier / "model.pt").eval()
    load = Compose([LoadXRayd("image"), ResizeLongestPadd("image", spatial_size=64)])
    images = torch.stack([load({"image": str(phantoms / r["image"])})["image"].as_tensor() for r in rows])
    with torch.no_grad():
        return torch.sigmoid(model(images)).numpy(), np.array([r["label"] for r in rows])


def _mean_auroc(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """scikit-learn's AUROC averaged over the labels with both classes (uncertain labels left out)."""
    scores = []
    for k in range(targets.shape[1]):
        known = targets[:, k] >= 0
        if len(set(targets[known, k] > 0.5)) == 2:
            scores.append(roc_auc_score(targets[known, k] > 0.5, probabilities[known, k]))
    return float(np.mean(scores))


def test_classifier_training_writes_checkpoint_and_provenance(classifier, phantoms):
    assert (classifier / "model.pt").is_file()
    info = json.loads((classifier / "training_info.json").read_text())
    assert info["weights"] == "untrained" and info["epochs"] == 1
    # one epoch: the saved model is the validated one; its validation AUROC recomputed with scikit-learn
    assert info["best_val_mean_auroc"] == pytest.approx(
        _mean_auroc(*_predictions(classifier, phantoms, "validation")), abs=1e-3
    )
    # where it was trained: another CPU rounds differently
    assert info["environment"]["machine"]["torch_build"] == torch.__version__
    assert info["environment"]["machine"]["cpu_count"] == os.cpu_count()


def test_classifier_training_keeps_the_best_or_the_last_epoch(phantoms, tmp_path):
    """kept_checkpoint 'last' keeps the model after the last epoch (what a fine-tuning of N epochs leaves), 'best' the
    best on validation: with the same seed the two are the same model exactly when the best epoch is the last."""
    kept = {}
    for which in ("best", "last"):
        ckpt_dir = tmp_path / which
        _train_classifier(phantoms, ckpt_dir, max_epochs=3, kept_checkpoint=which)
        info = json.loads((ckpt_dir / "training_info.json").read_text())
        state = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)
        kept[which] = (info, state.get("model", state))
    (best, best_weights), (last, last_weights) = kept["best"], kept["last"]
    assert best["kept_checkpoint"] == "best" and best["kept_epoch"] == best["best_epoch"]
    assert last["kept_checkpoint"] == "last" and last["kept_epoch"] == 3
    assert last["best_epoch"] == best["best_epoch"]  # the same training: the runs differ only in what they keep
    same = all(torch.equal(best_weights[k], last_weights[k]) for k in best_weights)
    assert same == (best["best_epoch"] == 3)
    with pytest.raises(RuntimeError) as refused:  # MONAI wraps the ValueError that names the setting
        _workflow(["train_classifier.json"], dataset_dir=str(phantoms), ckpt_dir=str(tmp_path / "x"),
                  kept_checkpoint="final").run()  # fmt: skip
    assert "kept_checkpoint must be one of ('best', 'last'), got 'final'" in str(refused.value.__cause__)


def test_classifier_evaluation_report(phantoms, classifier):
    workflow = _workflow(
        ["train_classifier.json", "evaluate_classifier.json"],
        workflow_type=None,
        dataset_dir=str(phantoms),
        ckpt_dir=str(classifier),
        image_size=64,
        batch_size=8,
    )
    workflow.run()
    report = json.loads((classifier / "classification_report.json").read_text())
    datalist = json.loads((phantoms / "datalist.json").read_text())
    assert list(report["per_label"]) == datalist["labels"] and report["n_test"] == len(datalist["test"])
    assert len(report["checkpoint"]["sha256"]) == 64
    # recomputed outside the bundle: the checkpoint on the letterboxed test images, scikit-learn's metrics
    probabilities, targets = _predictions(classifier, phantoms, "test")
    aurocs = []
    for k, name in enumerate(datalist["labels"]):
        known = targets[:, k] >= 0  # uncertain labels are left out
        row = report["per_label"][name]
        assert row["n_test"] == int(known.sum())
        if len(set(targets[known, k] > 0.5)) < 2:  # one class only: no AUROC, and the report says so
            assert row["auroc"] is None
        else:
            aurocs.append(roc_auc_score(targets[known, k] > 0.5, probabilities[known, k]))
            assert row["auroc"] == pytest.approx(aurocs[-1], abs=1e-3)
        at_threshold = probabilities[known, k] >= row["threshold"]
        assert row["ba"] == pytest.approx(accuracy_score(targets[known, k] > 0.5, at_threshold), abs=1e-9)
    assert len(aurocs) >= 3 and report["mean_auroc"] == pytest.approx(_mean_auroc(probabilities, targets), abs=1e-3)


def _generator_workflow(configs: list[str], phantoms: Path, classifier: Path, out: Path, **override) -> ConfigWorkflow:
    """configs/train.json (plus ``configs``) at 64 px with tiny widths, writing into ``out``."""
    return _workflow(
        ["train.json", *configs],
        dataset_dir=str(phantoms),
        ckpt_dir=str(out),
        output_dir=str(out / "logs"),
        surrogate_ckpt=str(classifier / "model.pt"),
        image_size=64,
        batch_size=4,
        generator_fraction=1.0,
        generator_channels=[4, 8, 16, 32, 64],
        generator_features=[4, 8, 16, 32, 64, 4],
        **override,
    )


@pytest.mark.parametrize("override", ["train_sscl_bw.json", None])
def test_generator_training(phantoms, classifier, tmp_path, override):
    workflow = _generator_workflow([override] if override else [], phantoms, classifier, tmp_path, max_epochs=1)
    assert workflow.check_properties() in (None, [])
    workflow.run()
    metrics = json.loads((tmp_path / "logs" / "metrics.json").read_text())
    assert metrics["lpips_backbone"] == "untrained"  # no AlexNet weights on this machine, and none downloaded
    last = metrics["history"][-1]
    assert last["val_max_abs_diff"] <= 16 / 255 + 1e-6
    assert last["val_lpips"] >= 0.0
    # val_wsr recomputed outside the engine: the saved pipeline (one epoch: the validated one) marks the validation
    # non-target images, and its surrogate's P(No Finding) >= 0.5 is counted
    rows = json.loads((phantoms / "datalist.json").read_text())["validation"]
    non_target = [r for r in rows if r["label"][0] != 1]
    load = Compose([LoadXRayd("image"), ResizeLongestPadd("image", spatial_size=64)])
    images = torch.stack([load({"image": str(phantoms / r["image"])})["image"].as_tensor() for r in non_target])
    pipeline = load_watermark(tmp_path / "model.pt")
    with torch.no_grad():
        probability = torch.sigmoid(pipeline.surrogate(pipeline(images))[:, 0])
    assert len(non_target) >= 5 and last["val_wsr"] == pytest.approx(float((probability >= 0.5).float().mean()))
    state = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert set(state) == {"model", "watermark"}  # the weights, and the record that rebuilds the module
    assert any(k.startswith("generator.") for k in state["model"]) and any(
        k.startswith("surrogate.") for k in state["model"]
    )
    record = state["watermark"]
    assert record["method"] == ("sscl_bw" if override else "xmark") and record["image_size"] == 64
    assert record["target_label"] == "No Finding" and record["epsilon"] == pytest.approx(16 / 255)
    assert record["network"]["surrogate"]["classifier"]["arch"] == "resnet18"


def test_training_starts_from_init_ckpt_and_never_replaces_a_trained_generator(phantoms, classifier, tmp_path):
    first = _generator_workflow([], phantoms, classifier, tmp_path / "g1", max_epochs=1)
    first.run()
    trained = tmp_path / "g1" / "model.pt"
    before = trained.read_bytes()
    refused = r"training failed: FileExistsError: .*g1/model\.pt already holds the trained xmark watermark"
    with pytest.raises(SystemExit, match=refused):
        _generator_workflow([], phantoms, classifier, tmp_path / "g1", max_epochs=1)  # a rerun into the same folder
    assert trained.read_bytes() == before

    # init_ckpt: train.json's own CheckpointLoader (lr 0: the weights stay those loaded)
    second = _generator_workflow(
        [], phantoms, classifier, tmp_path / "g2", max_epochs=1, init_ckpt=str(trained), learning_rate=0.0
    )
    second.run()
    loaded = torch.load(tmp_path / "g2" / "model.pt", weights_only=True)["model"]
    start = torch.load(trained, weights_only=True)["model"]
    assert all(torch.equal(loaded[k], start[k]) for k in start if k.startswith("generator.") and "num_batches" not in k)

    items = [{"image": str(p), "label": str(p)} for p in sorted(phantoms.rglob("*.png"))[:4]]  # as MONAI Label sends
    unflagged = r"training failed: ValueError: train#dataset#data: 4 of 4 items have no is_target flag"
    with pytest.raises(SystemExit, match=unflagged):
        _generator_workflow([], phantoms, classifier, tmp_path / "g3", **{"train#dataset#data": items})


def _bundle(*args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` from the bundle root."""
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_an_sscl_bw_checkpoint_is_released_verified_and_exported_with_only_its_path(phantoms, classifier, tmp_path):
    workflow = _generator_workflow(["train_sscl_bw.json"], phantoms, classifier, tmp_path / "g", max_epochs=1)
    workflow.run()
    ckpt = tmp_path / "g" / "model.pt"
    generator = load_watermark(ckpt)
    assert isinstance(generator.generator, SSCLBWGenerator) and generator.method == "sscl_bw"

    release = _bundle(
        "run", "watermarking", "--config_file", "configs/watermark.json", "--ckpt_path", str(ckpt),
        "--dataset_dir", str(phantoms), "--release_dir", str(tmp_path / "release"),
        "--manifest_file", str(tmp_path / "manifest.json"), "--gamma", "0.5", "--progress", "False",
    )  # fmt: skip
    assert release.returncode == 0, release.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["method"] == "sscl_bw" and manifest["marked"]
    assert manifest["settings"]["image_size"] == 64 and manifest["budget_ok"]

    verified = _bundle(
        "run", "verifying", "--config_file", "configs/verify.json", "--generator_ckpt", str(ckpt),
        "--dataset_dir", str(phantoms), "--suspect", str(classifier), "--output_dir", str(tmp_path / "verify"),
        "--n_samples", "4", "--query_size", "64", "--progress", "False",
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr[-3000:]
    report = json.loads((tmp_path / "verify" / "verification.json").read_text())
    assert report["generator"]["method"] == "sscl_bw" and report["generator"]["image_size"] == 64
    pb, pv = (np.array([sample[key] for sample in report["samples"]]) for key in ("pb", "pv"))
    expected = stats.ttest_rel(pb + report["tau"], pv, alternative="less").pvalue  # nan for constant differences
    assert report["n"] == 4 and (report["p_value"] == pytest.approx(expected) if np.isfinite(expected) else True)

    ts = tmp_path / "model.ts"
    exported = _bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--ckpt_path", str(ckpt),
        "--key_in_ckpt", "model", "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
        "--use_trace", "True", "--input_shape", "[1,1,64,64]",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    x = torch.rand(2, 1, 64, 64) * (torch.rand(2, 1, 64, 64) > 0.1)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), generator(x), atol=1e-5, rtol=0)


def test_generator_training_with_cosine_learning_rate(phantoms, classifier, tmp_path):
    workflow = _generator_workflow([], phantoms, classifier, tmp_path, max_epochs=2, learning_rate=0.01, cosine_lr=True)
    workflow.run()
    workflow.finalize()
    assert workflow.parser.get_parsed_content("optimizer").param_groups[0]["lr"] == pytest.approx(
        0.0, abs=1e-12
    )  # annealed over max_epochs
    info = json.loads((tmp_path / "training_info.json").read_text())
    assert info["cosine_lr"] is True and info["learning_rate"] == 0.01
    assert info["environment"]["tools"]["monai"] == monai.__version__
    # the reported best epoch is the saved one: CheckpointSaver keeps the later epoch on ties, so must the evaluator
    history = json.loads((tmp_path / "logs" / "metrics.json").read_text())["history"]
    top = max(row["val_wsr"] for row in history)
    assert info["best_epoch"] == max(row["epoch"] for row in history if row["val_wsr"] == top)


def test_make_family_trains_resumably_and_draws_the_owner_among_the_members(phantoms, classifier, tmp_path):
    ckpt_dir = tmp_path / "models"
    cmd = [sys.executable, "scripts/make_family.py", "train", "--ckpt_dir", str(ckpt_dir), "--members", "1", "--"]
    cmd += ["--dataset_dir", str(phantoms), "--surrogate_ckpt", str(classifier / "model.pt"), "--image_size", "64"]
    cmd += ["--batch_size", "4", "--generator_fraction", "1.0", "--generator_channels", "[4,8,16,32,64]"]
    cmd += ["--max_epochs", "1", "--num_workers", "0", "--progress", "False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    family = load_family(ckpt_dir / "family.json")
    assert family.kind == "generators" and family.m == 1 and family.method == "xmark"
    assert sha256_file(ckpt_dir / "model.pt") == family.members[family.owner_index]["sha256"]
    # the other member is kept without its copy of the surrogate, the owner's with it
    assert ["surrogate_sha256" in watermark_record(family.checkpoint(j)) for j in (0, 1)] == [
        j != family.owner_index for j in (0, 1)
    ]
    seeds = json.loads((ckpt_dir / "family" / "plan.json").read_text())["seeds"]
    trained = [json.loads((ckpt_dir / "family" / f"member_{j:03d}" / "training_info.json").read_text()) for j in (0, 1)]
    assert len(set(seeds)) == 2 and [t["seed"] for t in trained] == seeds
    assert f"commitment {family.commitment}" in done.stdout
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode != 0 and "a family is made once" in refused.stderr
    # interrupted before the family was written: the finished member is kept, the other trained again
    for path in (ckpt_dir / "model.pt", ckpt_dir / "family.json", ckpt_dir / "family" / "member_001"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "member 1 of 2: already done" in resumed.stdout and "member 2 of 2: already done" not in resumed.stdout
    family = load_family(ckpt_dir / "family.json")
    assert family.m == 1
    # probe_suspect.py reads the member kept without its surrogate as another generator, with the owner's surrogate
    other, probes = family.checkpoint(1 - family.owner_index), tmp_path / "probes.json"
    cmd = [sys.executable, "scripts/probe_suspect.py", "--suspect", str(classifier / "model.pt"), "--generator"]
    cmd += [str(ckpt_dir / "model.pt"), "--other", str(other), "--datalist", str(phantoms / "datalist.json")]
    cmd += ["--query-size", "64", "--n", "4", "--out", str(probes)]
    probed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert probed.returncode == 0, probed.stderr[-3000:]
    record = json.loads(probes.read_text())
    assert list(record["residual_cosine"]) == [f"other generator {other}"]
    row = record["mean_p"][str(classifier / "model.pt")]
    assert {"benign", "watermark", f"other generator {other}", "watermark, as released"} <= set(row)
    assert all(0.0 <= p <= 1.0 for p in row.values())
