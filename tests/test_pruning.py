"""Fine-pruning (xmark_bundle.networks.pruning, configs/finetune_pruned.json): the dormant units go, and stay gone."""

import json
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from xmark_bundle.networks.classifier import build_classifier, penultimate_features
from xmark_bundle.networks.pruning import keep_pruned, prune_dormant, pruned_units

ROOT = Path(__file__).resolve().parents[1]


def test_the_least_active_units_on_the_given_images_are_pruned():
    torch.manual_seed(0)
    model = build_classifier("resnet18")
    images = torch.rand(6, 1, 64, 64)
    mean = penultimate_features(model, images).mean(0)
    report = prune_dormant(model, images, 0.25)
    assert report["n_units"] == 512 and len(report["units"]) == 128
    # every pruned unit is at most as active as every kept one, recomputed from the features themselves
    kept = sorted(set(range(512)) - set(report["units"]))
    assert mean[report["units"]].max() <= mean[kept].min()
    assert pruned_units(model).tolist() == report["units"]
    torch.testing.assert_close(torch.tensor(report["mean_activation"]), mean)
    # a pruned unit no longer reaches the logits: changing its feature changes nothing
    head = model.fc
    features = penultimate_features(model, images)
    bumped = features.clone()
    bumped[:, report["units"]] += 10.0
    torch.testing.assert_close(head(bumped), head(features))
    assert prune_dormant(build_classifier("resnet18"), images, 0.0)["units"] == []
    with pytest.raises(ValueError, match=r"pruning rate must be in \[0, 1\), got 1.0"):
        prune_dormant(model, images, 1.0)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_fine_tuning_every_layer_keeps_the_pruned_units_pruned(arch):
    torch.manual_seed(1)
    model = build_classifier(arch)
    units = prune_dormant(model, torch.rand(4, 1, 64, 64), 0.5)["units"]
    keep_pruned(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)  # decoupled weight decay, as train_classifier.json
    model.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        optimiser.zero_grad()
        model(torch.rand(4, 1, 64, 64)).sum().backward()
        optimiser.step()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight
    assert torch.all(head[:, units] == 0)
    kept = sorted(set(range(head.shape[1])) - set(units))
    assert not torch.equal(head[:, kept], start[[k for k in start if k.endswith("weight")][-1]][:, kept])
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, start[k])]
    assert len(changed) > 10  # every layer is trained, not the head alone


def test_configs_finetune_pruned_builds_a_network_that_keeps_its_pruned_units(tmp_path):
    torch.manual_seed(2)
    model = build_classifier("resnet18")
    units = prune_dormant(model, torch.rand(4, 1, 64, 64), 0.3)["units"]
    torch.save({"model": model.state_dict()}, tmp_path / "pruned.pt")
    parser = ConfigParser()
    parser.read_config([ROOT / "configs/train_classifier.json", ROOT / "configs/finetune_pruned.json"])
    parser.update({"bundle_root": str(ROOT), "pretrained_weights": str(tmp_path / "pruned.pt")})
    parser.update({"device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    assert network.weights_status == f"checkpoint:{tmp_path / 'pruned.pt'}"
    assert pruned_units(network).tolist() == units
    network(torch.rand(2, 1, 64, 64)).sum().backward()
    assert torch.all(network.fc.weight.grad[:, units] == 0) and network.fc.weight.grad.abs().sum() > 0


def test_the_script_refuses_to_write_over_its_source_or_to_prune_without_clean_images(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import prune_classifier

    source = tmp_path / "suspect"
    source.mkdir()
    torch.save(build_classifier("resnet18").state_dict(), source / "model.pt")
    before = (source / "model.pt").read_bytes()
    empty = tmp_path / "datalist.json"
    empty.write_text(json.dumps({"training": [], "test": []}))
    common = ["--ckpt", str(source / "model.pt"), "--datalist", str(empty), "--rate", "0.5"]
    with pytest.raises(SystemExit):
        prune_classifier.main([*common, "--out", str(source)])
    assert "holds the source checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prune_classifier.main([*common, "--out", str(tmp_path / "pruned")])
    assert f"{empty}: its training split is empty" in capsys.readouterr().err
    assert (source / "model.pt").read_bytes() == before and not (tmp_path / "pruned").exists()
