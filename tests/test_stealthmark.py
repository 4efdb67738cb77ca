"""The StealthMark bundle end to end at toy size: train a watermarked and a benign model and verify both through
``monai.bundle`` (the CPU demo), the workflows' MONAI properties, the command line, and inference on source grids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from xmark_bundle.data.xray_io import load_xray

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "stealthmark"
sys.path.insert(0, str(ROOT / "scripts"))

import stealthmark_demo  # noqa: E402

TOY = ["--n", "16", "--image-size", "32", "--epochs", "2", "--val-interval", "1", "--n-queries", "4"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The CPU demo at toy size (16 phantoms, 32 px, 2 epochs): its folder and both verification reports."""
    out = tmp_path_factory.mktemp("stealthmark_demo")
    return out, stealthmark_demo.main(["--out", str(out), *TOY])


@pytest.mark.slow
def test_demo_trains_both_models_and_verifies_both(demo, capsys):
    out, reports = demo
    assert set(reports) == {"watermarked", "benign"}
    owner = json.loads((out / "watermarked" / "stealthmark_record.json").read_text())
    benign = json.loads((out / "benign" / "stealthmark_record.json").read_text())
    assert owner["method"] == "stealthmark" and owner["key"] == 2027 and owner["trigger_share"] == 0.5
    assert benign["method"] == "none" and benign["trigger_share"] == 0.0 and benign["seed"] != owner["seed"]
    validation = json.loads((out / "phantoms" / "seg_datalist.json").read_text())["validation"]
    for name, report in reports.items():
        assert report["verdict"] in ("verified", "not verified"), name
        assert report["suspect"]["location"].startswith(str(out / name))
        assert report["trigger"] == owner["trigger"] and report["epsilon"] == owner["epsilon"]
        assert 0.0 <= report["test"]["p_ttest"] <= 1.0 and report["test"]["margin"] == pytest.approx(0.025)
        assert len(report["floor_clean"]) == report["n_queries"] == min(4, len(validation)) >= 2
        assert all("/valid/" in q for q in report["queries"])  # queries from the validation split only
        harm = report["harmlessness"]
        assert harm["images"] == len(validation) and 0.0 <= harm["flip_share"]["mean"] <= 1.0
        assert 0.0 <= harm["clean"]["dice"]["mean"] <= 1.0 and harm["triggered"]["dice"]["n"] == len(validation)
    # the two models differ, and the report names each one's own weights
    assert reports["watermarked"]["suspect"]["sha256"] != reports["benign"]["suspect"]["sha256"]


def _workflow(config: str, workflow_type: str, **override) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE / "configs" / config),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **override,
    )
    workflow.initialize()
    return workflow


@pytest.mark.slow
def test_workflows_have_monai_properties(demo):
    out, _ = demo
    train = _workflow("train.json", "train", dataset_dir=str(out / "phantoms"), ckpt_dir=str(out / "unused"))
    assert train.check_properties() in (None, [])
    infer = _workflow("inference.json", "infer", ckpt_dir=str(out / "watermarked"), dataset_dir=str(out / "phantoms"))
    assert infer.check_properties() in (None, [])


@pytest.mark.slow
def test_verifying_from_the_command_line(demo, tmp_path):
    out, reports = demo
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "monai.bundle", "run", "verifying",
        "--config_file", "stealthmark/configs/verify.json",
        "--dataset_dir", str(out / "phantoms"),
        "--record_file", str(out / "watermarked" / "stealthmark_record.json"),
        "--suspect", str(out / "benign" / "model.pt"),
        "--n_samples", "4", "--device", "cpu", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "VERIFIED" in done.stdout
    report = json.loads((tmp_path / "verification.json").read_text())
    assert report["floor_clean"] == reports["benign"]["floor_clean"]  # the same seeded queries, the same model


@pytest.mark.slow
def test_inference_writes_masks_on_each_source_grid(demo, tmp_path):
    out, _ = demo
    sources = sorted((out / "phantoms" / "valid").rglob("view1_frontal.*"))[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, source in enumerate(sources):
        (inputs / f"case{i}{source.suffix}").write_bytes(source.read_bytes())
    workflow = _workflow(
        "inference.json", "infer", ckpt_dir=str(out / "watermarked"), dataset_dir=str(inputs),
        output_dir=str(tmp_path / "out"), device="cpu",
    )  # fmt: skip
    workflow.run()
    for i, source in enumerate(sources):
        image, _ = load_xray(source)
        with Image.open(tmp_path / "out" / f"case{i}_lung.png") as png:
            mask = np.asarray(png)
        assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 255}


@pytest.mark.slow
def test_training_config_marks_the_keyed_share_only_for_the_watermark(demo):
    from monai.bundle import ConfigParser

    from xmark_bundle.stealthmark.targets import keyed_share

    out, _ = demo
    flags = {}
    for method in ("stealthmark", "none"):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        parser.update({"dataset_dir": str(out / "phantoms"), "method": method, "key": 2027})
        items = parser.get_parsed_content("train#datalist")
        flags[method] = [item["trigger"] for item in items]
        expected = [
            int(method != "none" and keyed_share(str(Path(item["image"]).relative_to(out / "phantoms")), 2027, 0.5))
            for item in items
        ]
        assert flags[method] == expected
    assert 0 < sum(flags["stealthmark"]) < len(flags["stealthmark"]) and sum(flags["none"]) == 0


@pytest.mark.slow
def test_bundle_folder_and_exported_torchscript_answer_like_the_checkpoint(demo, tmp_path):
    import shutil

    import torch

    from xmark_bundle.verification.seg_blackbox import open_segmentation_suspect

    out, _ = demo
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    shutil.copytree(out / "watermarked", bundle / "models")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = open_segmentation_suspect(out / "watermarked").probability_maps(x)
    from_config = open_segmentation_suspect(bundle)
    assert from_config.describe()["kind"] == "monai-bundle"
    assert torch.allclose(from_config.probability_maps(x), expected, atol=1e-6)
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(bundle / "models" / "model.ts"), "--ckpt_file", str(bundle / "models" / "model.pt"),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
        "--key_in_ckpt", "model",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = open_segmentation_suspect(bundle)  # models/model.ts now comes first
    assert exported.describe()["kind"] == "monai-bundle-torchscript"
    assert torch.allclose(exported.probability_maps(x), expected, atol=1e-5)
