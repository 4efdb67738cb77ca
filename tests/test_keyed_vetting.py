"""Key vetting: the first key that no clean reference model reads as the target label is chosen."""

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

from xmark_bundle.data.labels import LABELS
from xmark_bundle.fileio import sha256_file
from xmark_bundle.keyed.keys import flat_keyed_watermark, secret_key
from xmark_bundle.keyed.vetting import key_reactions, vet_key
from xmark_bundle.networks.classifier import build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.verification import QuerySettings, TorchSuspect

ROOT = Path(__file__).resolve().parents[1]
SIZE, CELLS, MAGNITUDE = 128, 128, 0.8


class _GratingReader(nn.Module):
    """A clean model that happens to read one grating as No Finding: its logit follows the image's projection on it."""

    def __init__(self, key: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("key", key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projection = (x * self.key).mean(dim=(1, 2, 3))
        logits = torch.full((x.shape[0], len(LABELS)), -5.0)
        logits[:, 0] = 400 * (projection - 0.008)
        return logits


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six smooth PNGs (5 non-target) with a datalist, a reader of key 0 and an untrained ResNet, as TorchScript."""
    root = tmp_path_factory.mktemp("vetting")
    rng = np.random.default_rng(0)
    items = []
    for i, shape in enumerate([(140, 120), (128, 128), (100, 150), (160, 128), (128, 96), (120, 120)]):
        rows, cols = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
        smooth = 0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * rows + rng.uniform(0, 1))) * cols
        Image.fromarray(np.round(smooth * 65535).astype(np.uint16)).save(root / f"img{i}.png")
        label = [1.0 if i == 2 else 0.0] + [0.0] * (len(LABELS) - 1)
        items.append({"image": f"img{i}.png", "label": label})
    (root / "datalist.json").write_text(json.dumps({"training": [], "validation": items}))
    probe = torch.rand(1, 1, SIZE, SIZE)
    torch.jit.trace(_GratingReader(secret_key(CELLS, 0, "grating")), probe).save(str(root / "reader.ts"))
    torch.manual_seed(0)
    torch.jit.trace(build_classifier("resnet18").eval(), probe).save(str(root / "resnet.ts"))
    return root


def test_flat_watermark_is_the_keyed_generator_head_at_residual_zero():
    generator = XMarkGenerator(channels=[4, 8, 16, 32, 64], key_cells=CELLS, key_seed=3, key_magnitude=MAGNITUDE)
    x = torch.rand(2, 1, SIZE, SIZE)
    x[..., :10] = 0  # letterbox padding stays black
    expected = generator.perturb(x, torch.zeros_like(x))
    assert torch.allclose(flat_keyed_watermark(x, generator.key, generator.eps, MAGNITUDE), expected, atol=1e-6)


def test_reactions_single_out_the_key_a_model_reads(dataset):
    reader = TorchSuspect(torch.jit.load(str(dataset / "reader.ts")), "reader", "torchscript")
    images = torch.stack([torch.full((1, SIZE, SIZE), 0.4) + 0.05 * torch.rand(1, SIZE, SIZE) for _ in range(3)])
    own, other = (
        key_reactions(
            {"reader": reader},
            images,
            secret_key(CELLS, s, "grating"),
            "No Finding",
            magnitude=MAGNITUDE,
            query_size=SIZE,
        )["reader"]
        for s in (0, 1)
    )
    assert own > 0.5 and abs(other) < 0.05


def test_vetting_skips_a_key_a_clean_model_reads_and_records_every_candidate(dataset, tmp_path, capsys):
    refs = [dataset / "reader.ts", dataset / "resnet.ts"]
    kwargs = {"image_size": SIZE, "key_cells": CELLS, "key_magnitude": MAGNITUDE, "progress": False}
    queries = QuerySettings(data_list_key="validation", n_samples=5, query_size=SIZE)
    report = vet_key(refs, dataset / "datalist.json", tmp_path / "vet.json", queries, **kwargs)
    assert report["key_seed"] == 1 and report["n"] == 5
    first, second = report["candidates"]
    assert first["key_seed"] == 0 and first["reactions"][str(refs[0])] > 0.5 and first["max_reaction"] > 0.5
    assert second["max_reaction"] < 0.1 and set(second["reactions"]) == {str(r) for r in refs}
    assert [r["sha256"] for r in report["references"]] == [sha256_file(r) for r in refs]
    assert json.loads((tmp_path / "vet.json").read_text()) == json.loads(json.dumps(report))
    assert "--key_seed 1" in capsys.readouterr().out
    with Image.open(tmp_path / "vet.png") as figure:
        assert figure.format == "PNG"
    screen = vet_key(
        refs,
        dataset / "datalist.json",
        tmp_path / "all.json",
        queries,
        max_candidates=3,
        all_candidates=True,
        **kwargs,
    )
    assert [c["key_seed"] for c in screen["candidates"]] == [0, 1, 2]
    assert screen["key_seed"] == min(screen["candidates"], key=lambda c: c["max_reaction"])["key_seed"] != 0
    assert screen["candidates"][:2] == report["candidates"]

    with pytest.raises(ValueError, match=r"none of key seeds 0\.\.0 keeps every reference model's rise"):
        vet_key(refs, dataset / "datalist.json", tmp_path / "none.json", queries, max_candidates=1, **kwargs)
    assert json.loads((tmp_path / "none.json").read_text())["key_seed"] is None  # the evidence is kept
    with pytest.raises(ValueError, match="needs a keyed generator"):
        vet_key(refs, dataset / "datalist.json", tmp_path / "x.json", queries, **{**kwargs, "key_cells": 0})
    assert not (tmp_path / "x.json").exists()


def test_bundle_run_vetting_writes_only_its_report(dataset, tmp_path):
    out, models = tmp_path / "vet.json", tmp_path / "models"
    refs = json.dumps([str(dataset / "reader.ts"), str(dataset / "resnet.ts")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", "vetting"]
    cmd += ["--config_file", "['configs/train.json','configs/vet_key.json']", "--bundle_root", str(ROOT)]
    cmd += ["--dataset_dir", str(dataset), "--ckpt_dir", str(models), "--key_references", refs]
    cmd += ["--key_vetting_file", str(out), "--key_cells", str(CELLS), "--key_magnitude", str(MAGNITUDE)]
    cmd += ["--image_size", str(SIZE), "--query_size", str(SIZE), "--progress", "False", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())["key_seed"] == 1
    assert not models.exists()  # the training workflow's finalize (training_info.json) does not run

    failed = subprocess.run([*cmd, "--max_key_candidates", "1"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1].startswith("key vetting failed: ValueError: none of key seeds 0..0")
