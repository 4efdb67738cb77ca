"""Secrets recognised by content (xmark_bundle.data.secret_content), and ordinary data-set files left alone."""

import gzip
import io
import json
import zipfile

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from xmark_bundle.data.secret_content import content_reason
from xmark_bundle.networks.checkpoint import save_watermark
from xmark_bundle.networks.triggers import BlendedTrigger


def _png(path) -> None:
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(path)


def test_ordinary_data_set_files_are_not_secrets(tmp_path):
    _png(tmp_path / "a.png")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "b.nii.gz")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": "a.png", "label": [1, 0]}]}))
    (tmp_path / "train.csv").write_text("Path,Sex\na.png,Male\n")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.write(tmp_path / "a.png", "a.png")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # not a readable zip: not ours to judge
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (tmp_path / "empty.txt").write_bytes(b"")
    for name in ("a.png", "b.nii.gz", "datalist.json", "train.csv", "images.zip", "broken.zip", "broken.gz"):
        assert content_reason(tmp_path / name) is None, name
    assert content_reason(tmp_path / "empty.txt") is None and content_reason(tmp_path / "missing") is None


def test_pytorch_archives_are_told_apart_from_the_owners_checkpoint(tmp_path):
    save_watermark(BlendedTrigger(image_size=16, seed=1), tmp_path / "w.bin")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "plain.bin")
    assert content_reason(tmp_path / "w.bin") == "the owner's watermark checkpoint (found by its content)"
    assert content_reason(tmp_path / "plain.bin") == "PyTorch model weights (found by their content)"


def test_containers_are_opened_to_a_bounded_depth(tmp_path):
    save_watermark(BlendedTrigger(image_size=16, seed=1), tmp_path / "w.bin")
    once = gzip.compress((tmp_path / "w.bin").read_bytes())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("inner/w.gz", once)
    (tmp_path / "nested.zip").write_bytes(buffer.getvalue())
    assert content_reason(tmp_path / "nested.zip") == (
        "zip archive holding inner/w.gz: gzip copy of the owner's watermark checkpoint (found by its content)"
    )
    deep = once
    for _ in range(4):  # gzip of gzip of ...: deeper than MAX_DEPTH is not opened
        deep = gzip.compress(deep)
    (tmp_path / "deep.gz").write_bytes(deep)
    assert content_reason(tmp_path / "deep.gz") is None
