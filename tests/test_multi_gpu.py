"""configs/multi_gpu_train.json: real 2-process DDP runs (torchrun, gloo on CPU) of both training configs.

What is comparable with a single-process run, and why:

* ``batch_size`` is per rank under DDP (global batch = nproc x batch_size), the DistributedSampler hands rank r the
  samples r, r + 2, r + 4, ... (shuffle off) and DDP averages the ranks' gradients.
* Generator (configs/train.json): no BatchNorm (instance norm only), so with per-rank batch 2 against a
  single-process batch of 4 the mean over ranks of each iteration's loss is the single-process loss, and the
  averaged gradient the single-process gradient, whenever both ranks hold as many target as non-target samples
  (Lt and Lnt are means over the target / non-target samples of a batch). The phantom set below is chosen so that
  every batch of the epoch is balanced; the test checks that premise, then the whole loss trajectory and the
  distributed validation metrics (gathered over both ranks) against the single-process run.
* Classifier (configs/train_classifier.json): BatchNorm normalises with the statistics of each rank's own half
  batch (SyncBatchNorm is opt-in, ``--sync_batchnorm True``, CUDA only), so the 2-process loss is not the
  full-batch loss. What must hold exactly is that each rank's first-iteration loss equals a single-process run on
  that rank's shard (same initial weights, same samples, same BN batch statistics); random augmentation is off.
* Validation is distributed (each rank a shard of the validation set, the bare network, buffers from rank 0):
  every metric of the bundle is a MONAI cumulative metric whose buffers are all-gathered, so each rank gets the
  figures over the whole set; file-writing handlers (checkpoint, metrics file, TensorBoard, progress) live on
  rank 0 only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from xmark_bundle.data.chexpert import prepare_datalist
from xmark_bundle.data.labels import LABELS
from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.selection import balanced_generator_set
from xmark_bundle.networks.checkpoint import load_watermark

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
NPROC = 2
#: Relative tolerance on losses and metrics: the runs differ only in float summation order (gloo's gradient
#: all-reduce, per-rank means), about 1e-7 relative per step.
RTOL = 1e-4

#: Test-only override: each rank records every iteration's training loss, its pid and the handlers it attached.
RECORD = {
    "loss_record": "$@output_dir + '/losses_rank' + os.environ.get('RANK', '0') + '.json'",
    "loss_history": "$[]",
    "+initialize": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, "
        "lambda engine: @loss_history.append(float(engine.state.output[0]['loss'])))"
    ],
    "+finalize": [
        "$xmark_bundle.fileio.write_json(@loss_record, "
        "{'rank': int(os.environ.get('RANK', 0)), 'pid': os.getpid(), 'losses': @loss_history, "
        "'train_handlers': [type(h).__name__ for h in @train#trainer#train_handlers], "
        "'val_handlers': [type(h).__name__ for h in @validate#evaluator#val_handlers or []]})"
    ],
}
#: No random augmentation in the classifier, so that runs see identical inputs.
NO_AUGMENTATION = {"train#augmentation#0#prob": 0.0, "train#augmentation#1#prob": 0.0, "noise_prob": 0.0}


def test_override_targets_exist_in_both_training_configs():
    """The override's path-based keys point at the handlers they mean in both configs (cheap, no processes)."""
    for name in ("train.json", "train_classifier.json"):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / name), str(CONFIGS / "multi_gpu_train.json")])
        # TensorBoard writers make their event file when built, so rank > 0 must not build them at all
        assert parser["train#handlers#3#_target_"] == "TensorBoardStatsHandler", name
        assert parser["validate#handlers#1#_target_"] == "TensorBoardStatsHandler", name
        assert parser["train#dataloader#shuffle"] is False and parser["train#dataloader#sampler"] == "@train#sampler"
        assert parser["validate#evaluator#network"] == "@network_def"
        assert "training_info" in parser and "network_def" in parser
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    assert parser["pipeline#generator"] == "@network_def"  # the checkpoint holds the bare generator, never DDP


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """32 small phantoms: 20 training samples, of which the generator's balanced set is 6 target + 6 non-target."""
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, n=32, seed=1, min_size=256, max_size=320, valid_fraction=0.25)
    prepare_datalist(out / "train.csv", out / "datalist.json", test_csv=out / "valid.csv", val_fraction=0.25)
    return out


@pytest.fixture(scope="module")
def record_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("record") / "record_losses.json"
    path.write_text(json.dumps(RECORD))
    return path


def _cli(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return args


def _torchrun(configs: list[str], record_file: Path, **overrides) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 --standalone -m monai.bundle run training`` with the override layered on."""
    config_files = [f"configs/{c}" for c in configs] + ["configs/multi_gpu_train.json", str(record_file)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--standalone",
        "-m", "monai.bundle", "run", "training", "--config_file", str(config_files),
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
    ]  # fmt: skip
    cmd += _cli({"bundle_root": str(ROOT), "num_workers": 0, "progress": False, "device": "cpu", **overrides})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def _single(configs: list[str], record_file: Path, **overrides) -> ConfigWorkflow:
    """The same configs in this process, without the multi-GPU override."""
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs] + [str(record_file)],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        **{"bundle_root": str(ROOT), "num_workers": 0, "progress": False, "device": "cpu", **overrides},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def _losses(folder: Path) -> dict[int, dict]:
    return {r: json.loads((folder / f"losses_rank{r}.json").read_text()) for r in range(NPROC)}


def _one_writer(folder: Path, pid: int) -> None:
    """Every TensorBoard event file in ``folder`` was written by the process ``pid``."""
    events = list(folder.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events in {folder}"
    assert {int(e.name.split(".")[-2]) for e in events} == {pid}


@pytest.fixture(scope="module")
def classifier(phantoms, record_file, tmp_path_factory):
    """configs/train_classifier.json for one epoch at 64 px under DDP, and single-process runs on each rank's shard."""
    ddp = tmp_path_factory.mktemp("classifier_ddp")
    common = {"dataset_dir": str(phantoms), "image_size": 64, "batch_size": 2, "max_epochs": 1, **NO_AUGMENTATION}
    _torchrun(["train_classifier.json"], record_file, ckpt_dir=str(ddp), **{"train#sampler#shuffle": False}, **common)
    shards = []
    for rank in range(NPROC):
        out = tmp_path_factory.mktemp(f"classifier_shard{rank}")
        sampler = (
            "$monai.data.DistributedSampler(@train#dataset, even_divisible=True, "
            f"num_replicas={NPROC}, rank={rank}, shuffle=False)"
        )
        _single(
            ["train_classifier.json"], record_file, ckpt_dir=str(out),
            **{"train#dataloader#sampler": sampler, "train#dataloader#shuffle": False}, **common,
        )  # fmt: skip
        shards.append(out)
    return ddp, shards


@pytest.mark.slow
def test_classifier_ddp_writes_one_checkpoint_and_matches_each_ranks_shard(classifier):
    ddp, shards = classifier
    losses = _losses(ddp)
    assert len(losses[0]["losses"]) == len(losses[1]["losses"]) == 5  # 20 samples / 2 ranks / batch 2
    _one_writer(ddp, losses[0]["pid"])  # TensorBoard (train and validation) only on rank 0
    assert "CheckpointSaver" in losses[0]["val_handlers"] and losses[1]["val_handlers"] == []
    assert losses[1]["train_handlers"] == ["ValidationHandler", "LrScheduleHandler"]  # validation is distributed
    state = torch.load(ddp / "model.pt", map_location="cpu", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("module.") for k in state)  # the bare network
    assert sorted(p.name for p in ddp.iterdir() if not p.name.startswith("events.")) == [
        "losses_rank0.json", "losses_rank1.json", "model.pt", "training_info.json",
    ]  # fmt: skip
    info = json.loads((ddp / "training_info.json").read_text())
    assert info["epochs"] == 1 and 0.0 <= info["best_val_mean_auroc"] <= 1.0
    for rank, shard in enumerate(shards):
        # BatchNorm statistics are per rank: rank r's first loss is a single-process step on its own shard
        single = json.loads((shard / "losses_rank0.json").read_text())["losses"]
        assert losses[rank]["losses"][0] == pytest.approx(single[0], rel=RTOL), rank


@pytest.mark.slow
def test_generator_ddp_matches_single_process(phantoms, classifier, record_file, tmp_path):
    datalist = json.loads((phantoms / "datalist.json").read_text())
    items = balanced_generator_set(datalist["training"], LABELS.index("No Finding"), 1.0, 0)
    flags = [item["is_target"] for item in items]
    global_batch = 4
    for start in range(0, len(flags), global_batch):  # the premise: each rank holds as many targets in each batch
        batch = flags[start : start + global_batch]
        assert sum(batch[0::NPROC]) == sum(batch[1::NPROC])
    surrogate = classifier[0] / "model.pt"  # the DDP-trained classifier loads as the surrogate
    common = {
        "dataset_dir": str(phantoms), "surrogate_ckpt": str(surrogate), "image_size": 64, "max_epochs": 1,
        "generator_fraction": 1.0, "generator_channels": [4, 8, 16, 32, 64],
    }  # fmt: skip
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _torchrun(
        ["train.json"], record_file, ckpt_dir=str(ddp), output_dir=str(ddp / "logs"),
        batch_size=global_batch // NPROC, **{"train#sampler#shuffle": False}, **common,
    )  # fmt: skip
    _single(
        ["train.json"], record_file, ckpt_dir=str(single), output_dir=str(single / "logs"),
        batch_size=global_batch, **{"train#dataloader#shuffle": False}, **common,
    )  # fmt: skip

    losses = _losses(ddp / "logs")
    reference = json.loads((single / "logs" / "losses_rank0.json").read_text())["losses"]
    assert len(reference) == len(losses[0]["losses"]) == len(losses[1]["losses"]) == len(items) // global_batch
    mean_over_ranks = [sum(step) / NPROC for step in zip(losses[0]["losses"], losses[1]["losses"], strict=True)]
    assert mean_over_ranks == pytest.approx(reference, rel=RTOL)

    # rank 0 alone wrote the checkpoint, the metrics file and TensorBoard; the checkpoint is the bare pipeline
    _one_writer(ddp / "logs", losses[0]["pid"])
    assert {"CheckpointSaver", "MetricsFileWriter", "WatermarkGridHandler"} <= set(losses[0]["val_handlers"])
    assert losses[1]["val_handlers"] == [] and losses[1]["train_handlers"] == ["ValidationHandler"]
    assert sorted(p.name for p in ddp.iterdir()) == ["logs", "model.pt", "training_info.json"]
    state = torch.load(ddp / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("generator.") for k in state["model"])
    assert not any("module." in k for k in state["model"])
    generator = load_watermark(ddp / "model.pt")
    assert generator.method == "xmark" and generator.image_size == 64

    # validation is distributed (each rank a shard, metrics gathered): the same figures as one process on all of it
    ddp_metrics = json.loads((ddp / "logs" / "metrics.json").read_text())["history"][-1]
    single_metrics = json.loads((single / "logs" / "metrics.json").read_text())["history"][-1]
    assert ddp_metrics.keys() == single_metrics.keys()
    for key in ddp_metrics:
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=RTOL, abs=1e-6), key
    info = json.loads((ddp / "training_info.json").read_text())
    assert info["epochs"] == 1 and info["best_val_wsr"] == pytest.approx(ddp_metrics["val_wsr"])
