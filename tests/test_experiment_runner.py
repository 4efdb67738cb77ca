"""`scripts/experiment.py run quick` (the stages of `make demo` at toy sizes) runs every stage and resumes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from xmark_bundle.fileio import sha256_file
from xmark_bundle.networks.checkpoint import watermark_record

ROOT = Path(__file__).resolve().parents[1]


def test_quick_experiment_runs_every_stage_collects_its_numbers_and_resumes(tmp_path):
    out = tmp_path / "quick"
    cmd = [sys.executable, "scripts/experiment.py", "run", "quick", "--out", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    collected = json.loads((out / "collected.json").read_text())
    assert list(collected["methods"]) == ["xmark"]  # badnets is declared but not run by default
    xmark = collected["methods"]["xmark"]
    suspect = xmark["suspects"]["owner2/suspect_seed1"]
    ind_w = suspect["ind_w_owners"]["independent_owner1000"]
    surrogate = xmark["ind_m_seed_controls"]["owner2/surrogate"]  # the surrogate verified as Ind-M, kept apart
    assert list(xmark["ind_m"]) == ["owner2/resnet18_seed3"]
    assert list(xmark["ind_m_seed_controls"]) == ["owner2/surrogate"]
    for scenario in (suspect["malicious"], ind_w, xmark["ind_m"]["owner2/resnet18_seed3"], surrogate):
        report = json.loads(Path(scenario["report"]).read_text())
        assert scenario["p_value"] == report["p_value"] and scenario["n"] == report["n"] == 8
        assert (Path(scenario["report"]).parent / "verification.png").stat().st_size > 0
    # the calibrated verdict: the owner's family (its watermark and the pool of seeds 4 and 5), made before the
    # release beside its checkpoint, ranks it for Malicious and Ind-M; Ind-W's independent owner has no family here
    family = json.loads((out / "models/xmark/owner2/watermark/family.json").read_text())
    assert len(family["members"]) == 3 and family["members"][family["owner_index"]]["checkpoint"] == "model.pt"
    for scenario in (suspect["malicious"], xmark["ind_m"]["owner2/resnet18_seed3"]):
        assert scenario["calibrated"]["members"] == 2 and scenario["calibrated"]["p_value"] in (1 / 3, 2 / 3, 1.0)
    assert "calibrated" not in ind_w
    pool = [json.loads((out / f"models/xmark/family_pool/seed{s}/training_info.json").read_text()) for s in (4, 5)]
    assert [info["seed"] for info in pool] == [4, 5]
    # the pool's members are kept without the owners' surrogate (the family supplies it); the owner's keeps its own
    records = [watermark_record(out / f"models/xmark/family_pool/seed{s}/model.pt") for s in (4, 5)]
    assert all("surrogate_sha256" in record for record in records)
    assert "surrogate_sha256" not in watermark_record(out / "models/xmark/owner2/watermark/model.pt")
    # Malicious and Ind-M use our watermark, Ind-W the independent owner's (own surrogate, own seed)
    ours = json.loads(Path(suspect["malicious"]["report"]).read_text())["generator"]["checkpoint"]
    other = json.loads(Path(ind_w["report"]).read_text())["generator"]["checkpoint"]
    assert ours == str(out / "models/xmark/owner2/watermark/model.pt") and other != ours
    located = json.loads(Path(surrogate["report"]).read_text())["suspect"]["location"]
    assert located.startswith(str(out / "models/surrogate"))
    infos = [
        json.loads((out / "models/xmark" / g / "training_info.json").read_text())
        for g in ("owner2/watermark", "independent_owner1000/watermark")
    ]
    assert [info["method"] for info in infos] == ["xmark", "xmark"] and [i["seed"] for i in infos] == [2, 1000]
    history = json.loads((out / "models/xmark/owner2/watermark/logs/metrics.json").read_text())["history"]
    kept = next(row for row in history if row["epoch"] == infos[0]["best_epoch"])
    assert xmark["watermark"] == {
        "epoch": infos[0]["best_epoch"],
        **{k: kept[k] for k in ("val_wsr", "val_lap", "val_lpips", "val_psnr")},
    }
    assert infos[0]["surrogate_ckpt"] != infos[1]["surrogate_ckpt"]
    manifest = json.loads((out / "models/xmark/owner2/release_manifest.json").read_text())
    assert manifest["method"] == "xmark" and manifest["marked"] and manifest["budget_ok"] and not manifest["decoys"]
    assert 0 <= suspect["mean_ba"] <= 1 and suspect["release_quality"]["n_files"] == len(manifest["marked"])
    assert all((out / figure).stat().st_size > 0 for figure in ("scenarios.png", "removal.png", "variants.png"))
    # detectability (declared): gamma 1 marks every target image, so every training file is a candidate
    detected = xmark["detectability"]
    assert detected["pool"].startswith("all training files") and detected["n_marked"] == len(manifest["marked"])
    assert detected["suspect"]["checkpoint"] == str(out / "models/xmark/owner2/suspect_seed1/model.pt")
    assert detected["container"]["marked_files_whose_container_changed"] == 0
    # the evaded variant: trained on the noised copy of the release, with the strong augmentation
    evaded = xmark["suspects"]["owner2/suspect_evaded_seed1"]
    assert evaded["variant"] == "evaded" and evaded["malicious"]["n"] == 8
    assert collected["suspect_kinds"] == {
        "": {"arch": "resnet18", "image_size": 64},
        "evaded": {
            "arch": "resnet18",
            "image_size": 64,
            "evasion": "noise0.02",
            "configs": ["configs/train_classifier_strong_aug.json"],
        },
    }
    info = json.loads((out / "models/xmark/owner2/suspect_evaded_seed1/training_info.json").read_text())
    assert info["datalist"] == str(out / "release_evaded/xmark/owner2/noise0.02/datalist.json")
    evaded_stage = first.stdout.split("classifier 'xmark owner 2 suspect evaded seed 1'")[1].split("\n")[0]
    assert "train_classifier_strong_aug.json" in evaded_stage
    # the pre-trained start: the suspects and the benign model start from the classifier of the other phantom set
    pretrained = out / "models/pretrained/resnet18_64px/model.pt"
    for model in ("models/xmark/owner2/suspect_seed1", "models/benign/resnet18_seed3"):
        assert json.loads((out / model / "training_info.json").read_text())["weights"] == f"checkpoint:{pretrained}"
    # removal: the suspect fine-tuned on the clean half (head only, every layer) and fine-pruned, each verified again
    removal = suspect["removal"]
    assert list(removal) == ["head_1", "full_1", "pruned_0.5", "fine_pruned_0.5"] and removal["head_1"]["n"] == 8
    suspect_dir = out / "models/xmark/owner2/suspect_seed1"
    tuned = json.loads((suspect_dir.parent / "suspect_seed1_finetuned_head_1/training_info.json").read_text())
    assert tuned["weights"] == f"checkpoint:{suspect_dir / 'model.pt'}" and tuned["epochs"] == 1
    subset = json.loads((out / "phantoms/datalist_clean_subset.json").read_text())
    assert tuned["datalist"] == str(out / "phantoms/datalist_clean_subset.json")
    assert len(subset["training"]) == round(0.5 * subset["metadata"]["subset"]["of"])
    # pruning: half the penultimate units pruned on the clean half, evaluated and verified as it is, then fine-tuned
    # with them kept pruned (fine-pruning)
    assert removal["pruned_0.5"]["rate"] == 0.5 and removal["pruned_0.5"]["epochs"] == 0
    assert removal["fine_pruned_0.5"]["mode"] == "fine-pruned" and removal["fine_pruned_0.5"]["n"] == 8
    # a fine-tuning of one epoch keeps that epoch; a pruned model was not trained
    assert removal["head_1"]["kept_epoch"] == tuned["best_epoch"] == 1 and "kept_epoch" not in removal["pruned_0.5"]
    assert removal["head_1"]["kept_checkpoint"] == tuned["kept_checkpoint"] == "best"
    pruned = suspect_dir.parent / "suspect_seed1_pruned_0.5"
    pruning = json.loads((pruned / "pruning.json").read_text())
    assert pruning["n_images"] == len(subset["training"]) and len(pruning["units"]) == 256 == pruning["n_units"] / 2
    assert json.loads((pruned / "training_info.json").read_text())["weights"] == f"pruned:{suspect_dir}/model.pt"
    assert (pruned / "classification_report.json").is_file()
    info = json.loads((suspect_dir.parent / "suspect_seed1_pruned_0.5_finetuned_1/training_info.json").read_text())
    assert info["weights"] == f"checkpoint:{pruned / 'model.pt'}"
    for folder in (pruned, suspect_dir.parent / "suspect_seed1_pruned_0.5_finetuned_1"):
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        head = state.get("model", state)["fc.weight"]
        assert torch.all(head[:, pruning["units"]] == 0) and int((head.abs().sum(0) > 0).sum()) == 256
    stages = first.stdout.count(": done in ")  # 38, and the family: two pool watermarks and the family file
    assert stages == len(collected["stage_times_s"]) == 41, first.stdout[-2000:]
    assert "xmark, Ind-W (owner2/suspect_seed1): queried with an independent owner's xmark watermark" in first.stdout

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # everything done: every stage skipped
    assert again.returncode == 0 and again.stdout.count(": already done (") == stages, again.stdout[-2000:]
    assert json.loads((out / "collected.json").read_text()) == collected

    # --discard-tuned-models: each fine-tuned and pruned model that removal measured becomes a record of its SHA-256
    # and size; every stage stays done and no number changes; a stage that needs a discarded model stops, naming it
    names = ("finetuned_head_1", "finetuned_full_1", "pruned_0.5", "pruned_0.5_finetuned_1")
    tuned = [suspect_dir.parent / f"suspect_seed1_{name}" / "model.pt" for name in names]
    hashes = [sha256_file(path) for path in tuned]
    lean = subprocess.run([*cmd, "--discard-tuned-models"], cwd=ROOT, capture_output=True, text=True)
    assert lean.returncode == 0 and lean.stdout.count(": already done (") == stages, lean.stdout[-2000:]
    assert not any(path.exists() for path in tuned) and (suspect_dir / "model.pt").is_file()
    records = [json.loads(path.with_name("model.pt.discarded.json").read_text()) for path in tuned]
    assert [r["sha256"] for r in records] == hashes and all(r["bytes"] > 10**6 for r in records)
    assert json.loads((out / "collected.json").read_text()) == collected
    verified = Path(removal["fine_pruned_0.5"]["report"])
    verified.unlink()  # its verification must run again, from a model that was discarded
    stopped = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert stopped.returncode == 1 and "model.pt.discarded.json); delete the folder" in stopped.stderr, stopped.stderr
    for path in tuned[2:]:  # the way back: prune again, fine-prune again from it, evaluate both, verify
        shutil.rmtree(path.parent)
    remade = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert remade.returncode == 0 and remade.stdout.count(": done in ") == 5, remade.stdout[-2000:]
    assert verified.is_file() and tuned[2].is_file() and tuned[3].is_file()

    # a pool watermark interrupted after saving model.pt but before training_info.json: removed, then trained again
    interrupted = out / "models/xmark/family_pool/seed5"
    (interrupted / "training_info.json").unlink()
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and resumed.stdout.count(": done in ") == 1, resumed.stdout[-2000:]
    assert f"removing {interrupted / 'model.pt'}: left by an interrupted run of this stage" in resumed.stdout
    assert (interrupted / "training_info.json").is_file()

    refused = subprocess.run([*cmd, "--publish"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "runs on the development seed" in refused.stderr
    unknown = subprocess.run([*cmd, "--method", "sig"], cwd=ROOT, capture_output=True, text=True)
    assert unknown.returncode == 2 and "declares no method ['sig']" in unknown.stderr
