"""Pruning of StealthMark segmenters (xmark_bundle/stealthmark/pruning.py, stealthmark/configs/prune.json): global
L1-magnitude pruning zeroes exactly the declared share of the smallest conv/linear weights of every bundle network,
and the pruned checkpoint is a plain one that the bundle's verify and evaluate workflows load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.fileio import sha256_file
from xmark_bundle.stealthmark.networks import build_segmentation_network
from xmark_bundle.stealthmark.pruning import prunable_weights, prune_global_l1, run_pruning, zero_share
from xmark_bundle.stealthmark.records import write_records

ROOT = Path(__file__).resolve().parents[1]
#: (architecture, width) at toy size: every network the bundle builds.
NETWORKS = [("basicunet", 4), ("unet", 4), ("segresnet", 4), ("attentionunet", 4), ("swinunetr", 12), ("unetr", 4)]


@pytest.mark.parametrize(("arch", "width"), NETWORKS)
def test_the_declared_share_of_the_smallest_weights_is_zeroed_for_every_network(arch, width):
    if arch in ("swinunetr", "unetr"):
        pytest.importorskip("einops", reason="MONAI's transformer networks need einops")
    torch.manual_seed(0)
    network = build_segmentation_network(arch, 32, width)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    assert zero_share(network) == 0  # a freshly initialised network has no exact zeros
    n = sum(m.weight.numel() for _, m in prunable_weights(network))
    for rate in (0.1, 0.3, 0.5):  # cumulative: each rate prunes the already pruned network further
        report = prune_global_l1(network, rate)
        assert report["n_weights"] == n
        assert abs(zero_share(network) - rate) <= 1 / n and report["zero_share"] == zero_share(network)
    # a plain state dict of the same network: same keys, nothing of torch's pruning reparametrisation left
    state = network.state_dict()
    assert set(state) == set(before) and not any(k.endswith(("_orig", "_mask")) for k in state)
    # magnitude: every zeroed weight was at most as large as every kept one; kept weights and other tensors unchanged
    pruned_names = {f"{name}.weight" if name else "weight" for name, _ in prunable_weights(network)}
    zeroed = torch.cat([before[k][state[k] == 0].abs() for k in pruned_names])
    kept = torch.cat([before[k][state[k] != 0].abs() for k in pruned_names])
    assert zeroed.max() <= kept.min()
    for key in state:
        assert torch.equal(state[key][state[key] != 0], before[key][state[key] != 0])
        if key not in pruned_names:
            assert torch.equal(state[key], before[key])


def test_a_rate_outside_zero_to_one_is_refused():
    network = build_segmentation_network("unet", 32, 4)
    for rate in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"pruning rate must be in \[0, 1\)"):
            prune_global_l1(network, rate)


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """A toy watermark owner's checkpoint folder (untrained UNet, record written as training writes it) and phantoms
    with masks."""
    base = tmp_path_factory.mktemp("prune")
    data = base / "phantoms"
    write_phantom_dataset(data, 8, 3, dicom_fraction=0.0, min_size=64, max_size=80, valid_fraction=0.5, masks=True)
    folder = base / "owner"
    torch.manual_seed(1)
    network = build_segmentation_network("unet", 32, 4)
    folder.mkdir()
    torch.save(network.state_dict(), folder / "model.pt")  # as training's CheckpointSaver writes it
    write_records(folder, "unet", 32, 4, "stealthmark", "patch", 2027, 0.1, 0.5, 11)
    return base, data, folder


def test_the_pruned_checkpoint_is_written_by_the_bundle_and_loads_in_verify_and_evaluate(owner):
    base, data, folder = owner
    out = base / "pruned30"
    source_hash = sha256_file(folder / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "pruning", "--config_file", "stealthmark/configs/prune.json"]
    cmd += ["--source", str(folder), "--rate", "0.3", "--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "pruning.json").read_text())
    assert report["rate"] == 0.3 and abs(report["zero_share"] - 0.3) <= 1 / report["n_weights"]
    assert not (out / "stealthmark_record.json").exists()  # the owner's record stays the owner's
    # a plain state dict, as training writes: finetune.json's strict load (init_ckpt) takes it
    build_segmentation_network("unet", 32, 4).load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert sha256_file(folder / "model.pt") == source_hash  # the source is only read
    record = folder / "stealthmark_record.json"
    common = ["--dataset_dir", str(data), "--record_file", str(record), "--suspect", str(out), "--device", "cpu"]
    verify = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "verifying",
        "--config_file",
        "stealthmark/configs/verify.json",
    ]
    verify += [*common, "--output_dir", str(base / "verification"), "--n_samples", "4"]
    done = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    verified = json.loads((base / "verification" / "verification.json").read_text())
    assert verified["suspect"]["location"].startswith(str(out)) and verified["n_queries"] == 4
    assert verified["verdict"] in ("verified", "not verified")
    evaluate = [sys.executable, "-m", "monai.bundle", "run", "evaluating"]
    evaluate += ["--config_file", "stealthmark/configs/evaluate.json", *common, "--output_dir", str(base / "harm")]
    done = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert 0 <= json.loads((base / "harm" / "harmlessness.json").read_text())["clean"]["dice"]["mean"] <= 1


def test_pruning_refuses_to_write_over_its_source(owner):
    _, _, folder = owner
    with pytest.raises(ValueError, match="holds the source checkpoint"):
        run_pruning(folder, 0.3, folder)


def test_fine_tuning_keeps_its_best_or_its_last_validated_epoch(tmp_path):
    """train.json's ``kept_checkpoint``: "best" (the default) saves the best validation epoch, "last" the weights the
    training ends with (what a suspect who fine-tunes keeps): MONAI's CheckpointSaver is set for one or the other, and
    a "last" run's model.pt is the network as training left it."""
    from monai.bundle import ConfigParser, ConfigWorkflow
    from monai.handlers import CheckpointSaver

    from xmark_bundle.data.phantoms import write_phantom_dataset

    config = str(ROOT / "stealthmark/configs/train.json")
    for kept, best, last in (("best", True, False), ("last", False, True)):
        parser = ConfigParser()
        parser.read_config(config)
        parser.update({"kept_checkpoint": kept, "ckpt_dir": str(tmp_path / "unused")})
        saver = next(h for h in parser.get_parsed_content("validate#handlers") if isinstance(h, CheckpointSaver))
        assert (saver._key_metric_checkpoint is not None, saver._final_checkpoint is not None) == (best, last)
    data = tmp_path / "phantoms"
    write_phantom_dataset(data, 12, 3, dicom_fraction=0.0, min_size=64, max_size=80, valid_fraction=0.25, masks=True)
    workflow = ConfigWorkflow(
        config_file=config, meta_file=str(ROOT / "stealthmark/configs/metadata.json"), workflow_type="train",
        dataset_dir=str(data), ckpt_dir=str(tmp_path / "last"), image_size=32, arch="basicunet", width=4,
        max_epochs=2, val_interval=1, batch_size=4, device="cpu", kept_checkpoint="last",
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    final = workflow.parser.get_parsed_content("network").state_dict()
    stored = torch.load(tmp_path / "last" / "model.pt", weights_only=True)
    assert set(stored) == set(final) and all(torch.equal(final[k].cpu(), stored[k]) for k in final)
    workflow.finalize()
