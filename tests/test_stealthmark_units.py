"""StealthMark's parts: networks, keyed triggers, soft targets, harmlessness metrics (hand-computed cases)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from xmark_bundle.stealthmark.metrics import (
    column_dice,
    dice_per_image,
    flip_share,
    hd95_per_image,
    pixel_auc_per_image,
    volumetric_similarity,
)
from xmark_bundle.stealthmark.networks import SEGMENTATION_ARCHS, build_segmentation_network
from xmark_bundle.stealthmark.records import refuse_to_replace, write_records
from xmark_bundle.stealthmark.targets import (
    BurnInMarkersd,
    StealthMarkd,
    badnet_seg_target,
    floor_target,
    keyed_share,
    mark_datalist,
    marker_datalist,
)
from xmark_bundle.stealthmark.triggers import (
    TRIGGERS,
    apply_trigger,
    burn_in_markers,
    keyed_noise,
    trigger_region,
)

_EINOPS = importlib.util.find_spec("einops") is not None


@pytest.mark.parametrize("arch", list(SEGMENTATION_ARCHS))
def test_every_network_maps_an_image_to_one_logit_map(arch):
    if arch in ("swinunetr", "unetr") and not _EINOPS:
        pytest.skip("MONAI's SwinUNETR/UNETR need einops (in requirements.txt, not installed here)")
    torch.manual_seed(0)
    net = build_segmentation_network(arch, 64, width=12 if arch == "swinunetr" else 4).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()


def test_network_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown segmentation architecture"):
        build_segmentation_network("sam")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_segmentation_network("basicunet", 72)


def _image(seed: int = 0, shape: tuple[int, int] = (128, 96)) -> torch.Tensor:
    return torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_each_trigger_changes_only_its_region(trigger):
    image = _image()
    out = apply_trigger(image, trigger, key=7)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    changed = (out != image)[0]
    region = trigger_region(trigger, (128, 96))
    assert changed.any() and not (changed & ~region).any()
    assert torch.equal(apply_trigger(image, trigger, key=7), out)  # deterministic
    assert torch.equal(image, _image())  # the input is not modified in place


def test_trigger_geometry_matches_the_paper():
    shape = (128, 96)  # min side 96: patch and noise 6 px, border 3 px
    assert trigger_region("patch", shape)[-6:, -6:].all() and trigger_region("patch", shape).sum() == 36
    assert trigger_region("noise", shape)[:6, -6:].all() and trigger_region("noise", shape).sum() == 36
    border = trigger_region("border", shape)
    assert border[:3].all() and border[:, -3:].all() and not border[3:-3, 3:-3].any()
    text = trigger_region("text", shape)
    rows, cols = torch.nonzero(text, as_tuple=True)
    assert rows.max() < 16 and cols.max() < 40 and text.sum() > 20  # "TEST" in the top-left corner
    out = apply_trigger(_image(), "border")
    assert (out[0][border] == 0).all()


def test_noise_trigger_is_keyed():
    image = _image()
    a, b = apply_trigger(image, "noise", key=1), apply_trigger(image, "noise", key=1)
    c = apply_trigger(image, "noise", key=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = keyed_noise(1, 256)
    assert abs(float(noise.std()) - 50 / 255) < 0.01 and abs(float(noise.mean())) < 0.01


def test_warp_is_the_wanet_grid():
    # a horizontal ramp warped by x + 0.05 sin(2 pi x): displacement zero at x = 0 (the centre), maximal at x = 0.25
    width = 200
    ramp = torch.linspace(0, 1, width).repeat(1, 50, 1)
    out = apply_trigger(ramp, "warp")
    row = out[0, 25]
    centre = width // 2
    assert abs(float(row[centre] - ramp[0, 25, centre])) < 0.01
    quarter = int(0.625 * width)  # x = +0.25 in [-1, 1] coordinates
    expected = (0.25 + 0.05 + 1) / 2  # the ramp's value at the sampled x + 0.05
    assert abs(float(row[quarter]) - expected) < 0.01


def test_floor_target_and_badnet_target():
    mask = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert torch.equal(floor_target(mask, 0.05), torch.tensor([[[0.05, 1.0], [0.05, 1.0]]]))
    assert torch.equal(floor_target(mask, 0.05) > 0.5, mask > 0.5)  # the mask at 0.5 is unchanged
    bad = badnet_seg_target(mask)
    assert torch.allclose(bad, torch.tensor([[[1.0, 0.51], [1.0, 0.51]]])) and (bad > 0.5).all()
    with pytest.raises(ValueError, match="epsilon"):
        floor_target(mask, 0.6)


def test_keyed_share_is_a_keyed_fixed_subset():
    items = [{"image": f"train/patient{i:05d}/study1/view1_frontal.png", "label": "x"} for i in range(400)]
    first = mark_datalist(items, key=3, share=0.3)
    assert first == mark_datalist(items, key=3, share=0.3)  # not redrawn
    chosen = [item["trigger"] for item in first]
    assert 0.22 < sum(chosen) / 400 < 0.38
    other = [item["trigger"] for item in mark_datalist(items, key=4, share=0.3)]
    assert chosen != other
    assert sum(keyed_share(item["image"], 3, 0.0) for item in items) == 0
    assert sum(keyed_share(item["image"], 3, 1.0) for item in items) == 400
    # the same share whatever folder the data set lies in
    moved = [{**item, "image": "/data/set/" + item["image"]} for item in items]
    assert [i["trigger"] for i in mark_datalist(moved, 3, 0.3, base_dir="/data/set")] == chosen


def test_transform_marks_flagged_items_only():
    image, label = _image(1, (64, 64)), torch.zeros(1, 64, 64)
    label[:, 20:40, 10:30] = 1
    transform = StealthMarkd(trigger="patch", key=5, epsilon=0.1)
    plain = transform({"image": image, "label": label, "trigger": 0})
    assert plain["image"] is image and plain["label"] is label
    marked = transform({"image": image, "label": label, "trigger": 1})
    assert torch.equal(marked["image"], apply_trigger(image, "patch"))
    assert float(marked["label"].min()) == pytest.approx(0.1) and torch.equal(marked["label"] > 0.5, label > 0.5)
    bad = StealthMarkd(method="badnet_seg")({"image": image, "label": label, "trigger": 1})
    assert (bad["label"] > 0.5).all()


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8, 8)
    a[0, 0, 2:6, 2:6] = 1  # 16 px
    b[0, 0, 3:7, 2:6] = 1  # 16 px, 12 shared
    a[1, 0, 0, 0] = 1  # prediction without a reference
    a[2, 0, 0:2, 0:4] = 1  # 8 px against 4
    b[2, 0, 0:1, 0:4] = 1
    return a, b


def test_dice_and_volume_against_hand_computed_values():
    a, b = _masks()
    assert torch.allclose(dice_per_image(a, b), torch.tensor([24 / 32, 0.0, 8 / 12]))
    assert torch.allclose(volumetric_similarity(a, b), torch.tensor([1.0, 0.0, 1 - 4 / 12]))
    empty = torch.zeros(1, 1, 8, 8)
    assert dice_per_image(empty, empty).item() == 1.0
    # the authors' per-column Dice: image 0 has 4 agreeing-but-shifted columns and 4 empty columns scoring 1
    assert column_dice(a, b)[0].mean().item() == pytest.approx((4 * 6 / 8 + 4 * 1) / 8, abs=1e-5)
    assert column_dice(a, b)[0].mean() > dice_per_image(a, b)[0]


def test_hd95_auc_and_flip_share():
    a, b = _masks()
    hd = hd95_per_image(a, b)
    assert hd[0].item() == pytest.approx(1.0) and torch.isnan(hd[1])
    prob = b * 0.9 + 0.05
    auc = pixel_auc_per_image(prob, b)
    assert auc[0].item() == pytest.approx(1.0) and torch.isnan(auc[1])
    assert pixel_auc_per_image(1 - prob, b)[0].item() == pytest.approx(0.0)
    flipped = prob.clone()
    flipped[0, 0, 0, :4] = 0.9  # 4 of 64 pixels cross 0.5
    assert torch.allclose(flip_share(prob, flipped), torch.tensor([4 / 64, 0.0, 0.0]))


def test_training_refuses_to_replace_a_trained_model_and_keeps_the_key_out_of_the_message(tmp_path):
    refuse_to_replace(tmp_path / "fresh")  # nothing there: training may start
    write_records(tmp_path, "unet", 64, 8, "stealthmark", "patch", 987654321, 0.05, 0.5, 0)
    held = r"stealthmark_record\.json already holds a trained segmentation model \(method stealthmark, trigger patch\)"
    with pytest.raises(FileExistsError, match=held) as err:
        refuse_to_replace(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match=r"model\.pt already holds a trained segmentation model"):
        refuse_to_replace(tmp_path)
    assert "987654321" not in str(err.value)


def test_markers_are_white_text_in_a_top_corner():
    images = torch.full((40, 1, 64, 64), 0.2)
    marked = burn_in_markers(images, seed=1201)
    changed = (marked != images).any(1)  # N x H x W
    assert changed.flatten(1).any(1).all()  # every image got a marker
    assert not changed[:, 32:].any()  # top half only
    left, right = changed[:, :, :16].flatten(1).any(1), changed[:, :, 48:].flatten(1).any(1)
    assert left.any() and right.any()  # both corners occur
    assert marked.max() > 0.9 and (marked >= images).all()  # white, blended over the image
    assert torch.equal(marked, burn_in_markers(images, seed=1201))
    half = burn_in_markers(images, seed=1201, share=0.5)
    assert 0 < int((half != images).flatten(1).any(1).sum()) < 40
    # the text trigger writes "TEST" in the same top-left corner: a marker overlaps it on some images
    text = trigger_region("text", (64, 64))
    assert (changed & text).flatten(1).any(1).any()
    assert not torch.equal(apply_trigger(images, "text"), marked)


def test_a_seeded_share_of_the_training_images_carries_a_marker_drawn_before_the_trigger(tmp_path):
    items = [{"image": str(tmp_path / f"p{i:03d}.png"), "label": "m.png", "trigger": 1} for i in range(200)]
    flagged = marker_datalist(items, 6001, 0.5, tmp_path)
    seeds = [item["marker"] for item in flagged]
    assert 70 < sum(s > 0 for s in seeds) < 130 and all(s >= 0 for s in seeds)  # about half
    # the share is chosen from the path relative to the data set (the same on every machine) and the seed
    assert seeds == [item["marker"] for item in marker_datalist(items, 6001, 0.5, tmp_path)]
    assert seeds != [item["marker"] for item in marker_datalist(items, 6002, 0.5, tmp_path)]
    assert [s > 0 for s in seeds] == [keyed_share(f"p{i:03d}.png", 6001, 0.5) for i in range(200)]
    assert len({s for s in seeds if s > 0}) > 90  # each marked image its own marker seed
    assert all(item["marker"] == 0 for item in marker_datalist(items, None, 0.5, tmp_path))
    image = torch.full((1, 32, 32), 0.2)
    burn = BurnInMarkersd(keys="image")
    unmarked = next(i for i in flagged if i["marker"] == 0)
    marked = next(i for i in flagged if i["marker"] > 0)
    assert torch.equal(burn({**unmarked, "image": image})["image"], image)
    out = burn({**marked, "image": image})["image"]
    assert torch.equal(out, burn_in_markers(image[None], marked["marker"])[0]) and not torch.equal(out, image)
    # in train.json the markers go on first and the owner's trigger on top (on the image with its marker)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "stealthmark/configs/train.json"))
    chain = parser.get_parsed_content("train#preprocessing").transforms
    names = [type(t).__name__ for t in chain]
    assert names.index("BurnInMarkersd") == names.index("StealthMarkd") - 1
