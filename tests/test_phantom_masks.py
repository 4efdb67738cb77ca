"""Lung masks of the phantoms: same image bytes with and without them, on the image grid, in their own tree."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from xmark_bundle.data.labels import LABELS
from xmark_bundle.data.phantoms import MASK_DIR, SEG_DATALIST, mask_path, render_phantom, write_phantom_dataset
from xmark_bundle.data.xray_io import load_xray

# SHA-256 of render_phantom's float32 bytes, recorded at commit ed44d07 (before lung masks existed) on this project's
# CPU machine: the masks must not move a single draw from the generator nor change one pixel.
_BEFORE_MASKS = {
    (3, (96, 80)): "0071ea12de774f1e4a3380575532a22483f3ca89e89eec53832e30db5c4bcd7c",
    (11, (130, 151)): "e06070c99ec657cb1152d92e2e1a4aef2bb8a3cf40ee5e7bae28afe7cde0f686",
}


def _labels() -> dict[str, float | None]:
    labels = dict.fromkeys(LABELS)
    labels["Pleural Effusion"] = 1.0
    return labels


@pytest.mark.parametrize(("seed", "shape"), list(_BEFORE_MASKS))
def test_image_bytes_unchanged_by_the_mask(seed, shape):
    plain = render_phantom(_labels(), np.random.default_rng(seed), shape)
    image, mask = render_phantom(_labels(), np.random.default_rng(seed), shape, return_lung_mask=True)
    assert image.tobytes() == plain.tobytes()
    assert hashlib.sha256(plain.tobytes()).hexdigest() == _BEFORE_MASKS[(seed, shape)]
    assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}


def test_mask_covers_two_dark_lungs():
    image, mask = render_phantom(dict.fromkeys(LABELS), np.random.default_rng(5), (256, 224), return_lung_mask=True)
    assert 0.1 < mask.mean() < 0.4
    # two lungs, one on each side of the midline, none of it at the image border
    left, right = mask[:, :112], mask[:, 112:]
    assert left.sum() > 0.2 * mask.sum() and right.sum() > 0.2 * mask.sum()
    assert mask[0].sum() == mask[-1].sum() == mask[:, 0].sum() == mask[:, -1].sum() == 0
    # the mediastinum between them is not lung
    assert mask[:, 108:116].mean() < 0.05
    # inside the lungs the film is darker (air) than in the thorax's soft tissue just below them
    rows = np.nonzero(mask.any(axis=1))[0]
    below = image[rows.max() + 10 : rows.max() + 40, 40:184]
    assert image[mask == 1].mean() < below.mean() - 0.05


def test_dataset_masks_in_their_own_tree(tmp_path):
    plain, with_masks = tmp_path / "plain", tmp_path / "masks"
    options = {"dicom_fraction": 0.5, "min_size": 64, "max_size": 96, "valid_fraction": 0.3}
    write_phantom_dataset(plain, 6, 5, **options)
    write_phantom_dataset(with_masks, 6, 5, masks=True, **options)
    images = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    for rel in images:  # every image and CSV byte for byte as without masks
        assert (with_masks / rel).read_bytes() == (plain / rel).read_bytes()
    written = sorted(p.relative_to(with_masks) for p in with_masks.rglob("*") if p.is_file())
    extra = [p for p in written if p not in images]
    assert len(extra) == 7 and all(p.parts[0] == MASK_DIR for p in extra if p.name != SEG_DATALIST)
    assert not any(p.name.startswith(".") for p in extra)

    datalist = json.loads((with_masks / SEG_DATALIST).read_text())
    train_rows = (with_masks / "train.csv").read_text().splitlines()[1:]
    assert [item["image"] for item in datalist["training"]] == [row.split(",")[0] for row in train_rows]
    assert len(datalist["training"]) + len(datalist["validation"]) == 6 and datalist["validation"]
    patients = {name: {item["image"].split("/")[1] for item in datalist[name]} for name in ("training", "validation")}
    assert not patients["training"] & patients["validation"]
    for item in load_decathlon_datalist(with_masks / SEG_DATALIST, data_list_key="validation"):
        image, _ = load_xray(item["image"])
        with Image.open(item["label"]) as png:
            assert png.mode == "L"
            mask = np.asarray(png)
        assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 1} and mask.any()
        assert item["label"].endswith(mask_path(item["image"].split(str(with_masks) + "/")[1]))


def test_make_phantoms_script_writes_masks(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import make_phantoms

    make_phantoms.main(["--out", str(tmp_path), "--n", "3", "--min-size", "64", "--max-size", "80", "--masks"])
    datalist = json.loads((tmp_path / SEG_DATALIST).read_text())
    items = datalist["training"] + datalist["validation"]
    assert len(items) == 3 and all((tmp_path / item["label"]).is_file() for item in items)
    make_phantoms.main(["--out", str(tmp_path / "plain"), "--n", "3", "--min-size", "64", "--max-size", "80"])
    assert not (tmp_path / "plain" / MASK_DIR).exists() and not (tmp_path / "plain" / SEG_DATALIST).exists()
