"""StealthMark's keyed research variant: the ``blocks`` trigger (a 4 x 4 black-and-white grid chosen by the owner's
key) and decoys (other images carry the same kind of trigger under other keys, with the clean target)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.stealthmark.records import write_records
from xmark_bundle.stealthmark.targets import StealthMarkd, decoy_key, floor_target, keyed_share, mark_datalist
from xmark_bundle.stealthmark.triggers import (
    KEYED_TRIGGERS,
    TRIGGERS,
    apply_trigger,
    blocks_side,
    keyed_blocks,
    trigger_region,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "stealthmark" / "configs" / "train.json"


def _image(seed: int = 0, shape: tuple[int, int] = (64, 64)) -> torch.Tensor:
    return torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _cells(image: torch.Tensor, side: int) -> torch.Tensor:
    """The 4 x 4 cell values read back from the top-right square of a (1, H, W) image whose side is a multiple of 4."""
    square = image[0, :side, image.shape[-1] - side :]
    cell = side // 4
    return square.reshape(4, cell, 4, cell).permute(0, 2, 1, 3).reshape(4, 4, -1)


def test_blocks_pattern_is_deterministic_balanced_and_keyed():
    assert "blocks" in TRIGGERS and set(KEYED_TRIGGERS) == {"noise", "blocks", "blocks8"}
    patterns = {key: keyed_blocks(key) for key in range(2000, 2100)}
    for key, pattern in patterns.items():
        assert pattern.shape == (4, 4) and pattern.dtype == torch.bool
        assert int(pattern.sum()) == 8  # balanced: exactly 8 white cells
        assert torch.equal(keyed_blocks(key), pattern)  # the same for every call
    assert not torch.equal(keyed_blocks(2027), keyed_blocks(2028))
    assert len({tuple(p.flatten().tolist()) for p in patterns.values()}) >= 95  # 100 keys, C(16, 8) = 12870 patterns
    image = _image()
    assert torch.equal(apply_trigger(image, "blocks", 2027), apply_trigger(image, "blocks", 2027))
    assert not torch.equal(apply_trigger(image, "blocks", 2027), apply_trigger(image, "blocks", 2028))


@pytest.mark.parametrize(("shape", "side"), [((64, 64), 8), ((128, 96), 12), ((256, 256), 32), ((20, 24), 4)])
def test_blocks_square_sits_top_right_and_paints_the_keys_cells(shape, side):
    assert blocks_side(shape) == side  # min(H, W) // 8, at least 4 px
    region = trigger_region("blocks", shape)
    assert int(region.sum()) == side * side and region[:side, shape[1] - side :].all()
    image = _image(1, shape)
    out = apply_trigger(image, "blocks", key=7)
    assert torch.equal(out[0][~region], image[0][~region])  # nothing outside the square changes
    cells = _cells(out, side)
    white = keyed_blocks(7)
    assert (cells[white] == 1).all() and (cells[~white] == 0).all()  # each cell is one colour: white by the key
    batch = apply_trigger(torch.stack([image, image]), "blocks", key=7)  # (N, 1, H, W) too
    assert torch.equal(batch[1], out)


@pytest.mark.parametrize(("shape", "side"), [((64, 64), 16), ((128, 96), 24), ((20, 24), 8)])
def test_blocks8_is_an_8_by_8_grid_of_32_white_cells_in_a_quarter_square(shape, side):
    """The finer block trigger: 8 x 8 cells, 32 white, side min(H, W) // 4 (at least 8 px), top right; random keys
    share about half their white cells, so a near pattern is rare (16 +- 2 of 32, against 4 of 8 for ``blocks``)."""
    pattern = keyed_blocks(2027, "blocks8")
    assert pattern.shape == (8, 8) and int(pattern.sum()) == 32 and torch.equal(keyed_blocks(2027, "blocks8"), pattern)
    assert blocks_side(shape, "blocks8") == side
    image = _image(3, shape)
    out = apply_trigger(image, "blocks8", key=2027)
    region = trigger_region("blocks8", shape)
    assert int(region.sum()) == side * side and region[:side, shape[1] - side :].all()
    assert torch.equal(out[0][~region], image[0][~region])
    cell = side // 8
    square = out[0, :side, shape[1] - side :].reshape(8, cell, 8, cell).permute(0, 2, 1, 3).reshape(8, 8, -1)
    assert (square[pattern] == 1).all() and (square[~pattern] == 0).all()
    shared = [int((keyed_blocks(k, "blocks8") & pattern).sum()) for k in range(3000, 3200)]
    assert 15 < sum(shared) / len(shared) < 17 and max(shared) < 28  # hypergeometric: mean 16, sd 2


def test_blocks_cells_split_a_square_whose_side_is_not_a_multiple_of_four():
    shape = (120, 130)  # side 15: cell edges at 0, 4, 8, 11, 15
    out = apply_trigger(torch.full((1, *shape), 0.5), "blocks", key=3)
    square = out[0, :15, 130 - 15 :]
    assert set(square.unique().tolist()) == {0.0, 1.0}
    edges = [0, 4, 8, 11, 15]
    pattern = keyed_blocks(3)
    for i in range(4):
        for j in range(4):
            cell = square[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            assert (cell == float(pattern[i, j])).all()


def _items(n: int = 400) -> list[dict[str, str]]:
    return [{"image": f"train/patient{i:05d}/study1/view1_frontal.png", "label": "x"} for i in range(n)]


def test_decoys_are_a_keyed_share_disjoint_from_the_owners_with_other_keys():
    items = _items()
    marked = mark_datalist(items, 2027, 0.5, decoy_share=0.25, trigger="blocks")
    assert marked == mark_datalist(items, 2027, 0.5, decoy_share=0.25, trigger="blocks")  # not redrawn
    # the owner's share is the one without decoys
    assert [m["trigger"] for m in marked] == [m["trigger"] for m in mark_datalist(items, 2027, 0.5)]
    owner = [m for m in marked if m["trigger"]]
    decoys = [m for m in marked if m["decoy"]]
    assert all(m["decoy"] == 0 for m in owner)  # disjoint
    assert 0.18 < len(decoys) / len(items) < 0.32  # a share of all images
    keys = [m["decoy"] for m in decoys]
    assert 2027 not in keys and len(set(keys)) == len(keys)  # never the owner's key, one per image
    assert all(not torch.equal(keyed_blocks(k), keyed_blocks(2027)) for k in keys)  # nor the owner's pattern
    assert keys[0] == decoy_key(2027, decoys[0]["image"], "blocks")  # derived from the key and the identifier
    other = mark_datalist(items, 2028, 0.5, decoy_share=0.25, trigger="blocks")
    assert [m["decoy"] for m in other] != [m["decoy"] for m in marked]
    assert all("decoy" not in m for m in mark_datalist(items, 2027, 0.5, trigger="blocks"))  # default: as before


@pytest.mark.parametrize("trigger", KEYED_TRIGGERS)
def test_decoy_items_carry_another_keys_trigger_and_keep_the_clean_target(trigger):
    image, label = _image(2), torch.zeros(1, 64, 64)
    label[:, 20:40, 10:30] = 1
    transform = StealthMarkd(trigger=trigger, key=2027, epsilon=0.1, decoy_share=0.25)
    items = mark_datalist(_items(40), 2027, 0.5, decoy_share=0.25, trigger=trigger)
    decoy = next(m["decoy"] for m in items if m["decoy"])
    out = transform({"image": image, "label": label, "trigger": 0, "decoy": decoy})
    assert torch.equal(out["image"], apply_trigger(image, trigger, decoy))
    assert not torch.equal(out["image"], apply_trigger(image, trigger, 2027))
    assert out["label"] is label  # the clean target
    owner = transform({"image": image, "label": label, "trigger": 1, "decoy": 0})
    assert torch.equal(owner["image"], apply_trigger(image, trigger, 2027))
    assert torch.equal(owner["label"], floor_target(label, 0.1))
    plain = transform({"image": image, "label": label, "trigger": 0, "decoy": 0})
    assert plain["image"] is image and plain["label"] is label
    with pytest.raises(ValueError, match="owner's key"):
        transform({"image": image, "label": label, "trigger": 0, "decoy": 2027})
    # without decoy_share a decoy flag is ignored; a benign model ("none") never changes anything
    assert StealthMarkd(trigger=trigger, key=2027)({"image": image, "label": label, "decoy": decoy})["image"] is image
    benign = StealthMarkd(trigger=trigger, key=2027, method="none", decoy_share=0.25)
    assert benign({"image": image, "label": label, "trigger": 0, "decoy": decoy})["image"] is image


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t not in KEYED_TRIGGERS])
def test_decoys_are_refused_with_an_unkeyed_trigger(trigger):
    with pytest.raises(ValueError, match=r"needs a keyed trigger \(noise, blocks, blocks8\)"):
        StealthMarkd(trigger=trigger, key=2027, decoy_share=0.25)
    with pytest.raises(ValueError, match=r"needs a keyed trigger"):
        mark_datalist(_items(10), 2027, 0.5, decoy_share=0.25, trigger=trigger)
    StealthMarkd(trigger=trigger, key=2027, decoy_share=0.0)  # no decoys: as before
    mark_datalist(_items(10), 2027, 0.5, decoy_share=0.0, trigger=trigger)


def test_decoy_share_must_fit_beside_the_owners_share():
    with pytest.raises(ValueError, match=r"decoy_share must lie in \[0, 1 - trigger_share\]"):
        mark_datalist(_items(10), 2027, 0.5, decoy_share=0.6, trigger="blocks")
    with pytest.raises(ValueError, match="decoy_share"):
        StealthMarkd(trigger="blocks", decoy_share=-0.1)
    every = mark_datalist(_items(40), 2027, 0.5, decoy_share=0.5, trigger="blocks")
    assert all(m["trigger"] or m["decoy"] for m in every)


def test_records_carry_the_decoy_share(tmp_path):
    path = write_records(tmp_path / "a", "basicunet", 64, 8, "stealthmark", "blocks", 2027, 0.1, 0.5, 1, None, 0.25)
    record = json.loads(path.read_text())
    assert record["decoy_share"] == 0.25 and record["trigger"] == "blocks" and record["trigger_share"] == 0.5
    default = json.loads(
        write_records(tmp_path / "b", "unet", 64, 8, "stealthmark", "patch", 1, 0.1, 0.5, 0).read_text()
    )
    assert default["decoy_share"] == 0.0
    benign = write_records(tmp_path / "c", "unet", 64, 8, "none", "blocks", 1, 0.1, 0.5, 0, decoy_share=0.25)
    assert json.loads(benign.read_text())["decoy_share"] == 0.0


def _parsed_datalist(data: Path, **override) -> list[dict]:
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({"dataset_dir": str(data), **override})
    return parser.get_parsed_content("train#datalist")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("keyed") / "phantoms"
    write_phantom_dataset(data, 16, 3, dicom_fraction=0.0, min_size=64, max_size=80, valid_fraction=0.25, masks=True)
    return data


def test_training_config_passes_decoys_and_refuses_them_for_an_unkeyed_trigger(phantoms):
    items = _parsed_datalist(phantoms, trigger="blocks", key=2027, decoy_share=0.25)
    for item in items:
        identifier = str(Path(item["image"]).relative_to(phantoms))
        assert item["trigger"] == int(keyed_share(identifier, 2027, 0.5))
        assert item["decoy"] == (decoy_key(2027, identifier, "blocks") if item["decoy"] else 0)
    assert sum(bool(i["decoy"]) for i in items) > 0 and not any(i["trigger"] and i["decoy"] for i in items)
    benign = _parsed_datalist(phantoms, trigger="blocks", key=2027, decoy_share=0.25, method="none")
    assert not any(i["trigger"] or i.get("decoy", 0) for i in benign)
    assert all("decoy" not in i for i in _parsed_datalist(phantoms))  # the default: no decoys
    with pytest.raises(RuntimeError, match="Failed to evaluate") as err:  # MONAI's wrapper of the refusal
        _parsed_datalist(phantoms, trigger="patch", decoy_share=0.25)
    assert isinstance(err.value.__cause__, ValueError) and "needs a keyed trigger" in str(err.value.__cause__)


@pytest.mark.slow
def test_blocks_trigger_with_decoys_trains_and_verifies_through_the_bundle_cli(phantoms, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    model = tmp_path / "model"
    train = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "stealthmark/configs/train.json",
        "--dataset_dir", str(phantoms), "--ckpt_dir", str(model),
        "--trigger", "blocks", "--key", "2027", "--decoy_share", "0.25", "--epsilon", "0.1",
        "--image_size", "32", "--arch", "basicunet", "--width", "4",
        "--max_epochs", "1", "--val_interval", "1", "--batch_size", "4", "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((model / "stealthmark_record.json").read_text())
    assert (model / "model.pt").is_file()
    assert record["trigger"] == "blocks" and record["key"] == 2027 and record["decoy_share"] == 0.25
    verify = [
        sys.executable, "-m", "monai.bundle", "run", "verifying",
        "--config_file", "stealthmark/configs/verify.json",
        "--dataset_dir", str(phantoms), "--record_file", str(model / "stealthmark_record.json"),
        "--suspect", str(model), "--n_samples", "4", "--device", "cpu", "--output_dir", str(tmp_path / "verification"),
    ]  # fmt: skip
    done = subprocess.run(verify, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "verification" / "verification.json").read_text())
    assert report["trigger"] == "blocks" and report["decoy_share"] == 0.25
    assert report["verdict"] in ("verified", "not verified")
    # an unkeyed trigger with decoys stops before training, and names why
    refused = [*train[: train.index("--trigger")], "--trigger", "patch", *train[train.index("--key") :]]
    refused[refused.index("--ckpt_dir") + 1] = str(tmp_path / "refused")
    done = subprocess.run(refused, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "needs a keyed trigger" in done.stderr
    assert not (tmp_path / "refused" / "model.pt").exists()


@pytest.mark.slow
def test_demo_trains_with_decoys_and_verifies_under_other_keys(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import stealthmark_demo

    toy = ["--n", "16", "--image-size", "32", "--epochs", "1", "--val-interval", "1", "--n-queries", "4"]
    options = ["--trigger", "blocks", "--decoy-share", "0.25", "--other-key", "2028", "2029", "--no-benign"]
    reports = stealthmark_demo.main(["--out", str(tmp_path), *toy, *options])
    assert set(reports) == {"watermarked", "watermarked@2028", "watermarked@2029"}
    owner = json.loads((tmp_path / "watermarked" / "stealthmark_record.json").read_text())
    assert owner["key"] == 2027 and owner["decoy_share"] == 0.25 and not (tmp_path / "benign").exists()
    for key in (2028, 2029):
        copy = json.loads((tmp_path / f"record_key_{key}" / "stealthmark_record.json").read_text())
        assert copy == {**owner, "key": key}  # the same record under another key
        report = reports[f"watermarked@{key}"]
        assert report["suspect"]["sha256"] == reports["watermarked"]["suspect"]["sha256"]
        assert report["floor_clean"] == reports["watermarked"]["floor_clean"]  # the same queries, clean
        assert report["floor_triggered"] != reports["watermarked"]["floor_triggered"]  # another key's pattern
