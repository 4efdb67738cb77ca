"""Watermarking a data-set release: seeded selection, marked vs copied files, manifest, refusals, resume, bundle run."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from xmark_bundle.data.chexpert import prepare_datalist
from xmark_bundle.data.phantoms import write_phantom_dataset
from xmark_bundle.data.poison import poison_values, select_poisoned
from xmark_bundle.data.xray_io import LoadXRayd, load_xray
from xmark_bundle.fileio import sha256_file
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.networks.triggers import BadNetsTrigger, LabelConsistentTrigger, UBWPTrigger
from xmark_bundle.release import ReleaseError, read_manifest, select_marked, watermark_release
from xmark_bundle.transforms.geometry import GEOMETRY_KEY, ResizeLongestPadd, unletterbox

ROOT = Path(__file__).resolve().parents[1]
SIZE, CHANNELS, EPS, GAMMA = 64, [4, 8, 16, 32, 64], 16 / 255, 0.5
PIXEL_DATA = 0x7FE00010


def _pipeline() -> WatermarkPipeline:
    """A tiny random G whose residual uses the whole budget (large weights)."""
    torch.manual_seed(0)
    generator = XMarkGenerator(channels=CHANNELS, eps=EPS)
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(5.0)
    return _wrap(generator)


def _wrap(generator: XMarkGenerator) -> WatermarkPipeline:
    """``generator`` with an untrained surrogate, at the tests' resolution."""
    surrogate = ResizedClassifier(build_classifier("resnet18"), 224)
    return WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """30 phantoms (half DICOM, MONOCHROME1 and 2) in CheXpert layout, with datalist.json (valid.csv = test split)."""
    root = tmp_path_factory.mktemp("chexpert")
    write_phantom_dataset(root, n=30, seed=1, min_size=256, max_size=320, dicom_fraction=0.5)
    prepare_datalist(root / "train.csv", root / "datalist.json", test_csv=root / "valid.csv")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_watermark(_pipeline(), path)
    return path


def _release(source: Path, out: Path, checkpoint: Path, network: torch.nn.Module | None = None, **kwargs) -> dict:
    options = {"release_dir": out / "release", "manifest_file": out / "private" / "manifest.json", "gamma": GAMMA}
    options |= {"batch_size": 3, "progress": False, **kwargs}
    network = network or load_watermark(checkpoint)
    return watermark_release(network, checkpoint, source, source / "datalist.json", **options)


@pytest.fixture(scope="module")
def released(source, checkpoint, tmp_path_factory) -> tuple[dict, Path, dict[str, str]]:
    """One complete release: (manifest, output folder, source hashes taken before it)."""
    out = tmp_path_factory.mktemp("out")
    before = _hashes(source)
    return _release(source, out, checkpoint), out, before


def test_selection_is_seeded_and_takes_training_targets_only(source):
    datalist = json.loads((source / "datalist.json").read_text())
    targets = [item["image"] for item in datalist["training"] if item["label"][0] == 1]
    held_out_targets = [item["image"] for s in ("validation", "test") for item in datalist[s] if item["label"][0] == 1]
    assert len(targets) == 7 and held_out_targets  # the data can show a leak into the held-out splits

    chosen = select_marked(datalist, "No Finding", GAMMA, seed=0)
    assert chosen == select_marked(datalist, "No Finding", GAMMA, seed=0)
    assert chosen != select_marked(datalist, "No Finding", GAMMA, seed=1)
    assert len(chosen) == round(GAMMA * 7) and set(chosen) <= set(targets)
    assert sorted(select_marked(datalist, "No Finding", 1.0, seed=0)) == sorted(targets)
    assert len(select_marked(datalist, "No Finding", 0.1, seed=0)) == 1  # at least one sample
    with pytest.raises(ValueError, match="'Fracture' is not one of the datalist's labels"):
        select_marked(datalist, "Fracture", GAMMA, seed=0)


def test_release_marks_the_selection_and_copies_everything_else(source, released):
    manifest, out, before = released
    release = out / "release"
    datalist = json.loads((source / "datalist.json").read_text())
    marked = select_marked(datalist, "No Finding", GAMMA, seed=0)
    after, published = _hashes(source), _hashes(release)
    assert after == before  # the source is untouched
    assert sorted(published) == sorted(before)  # same relative paths, nothing added (no temp files, no manifest)
    assert [r["path"] for r in manifest["marked"]] == marked
    for relative, digest in before.items():
        assert (published[relative] != digest) == (relative in marked), relative
    assert manifest["counts"] == {
        "files": 33,
        "selected": 4,
        "marked": 4,
        "decoys": 0,
        "relabelled_files": 0,
        "marked_now": 4,
        "marked_already": 0,
        "to_mark": 0,
        "copied_now": 29,
        "copied_already": 0,
        "reencoded": 0,  # every marked file reproduced its source's codec settings
    }
    assert manifest["complete"] and manifest["budget_ok"] and manifest["decoys"] == []


def test_marked_files_keep_format_geometry_tags_and_budget(source, released):
    manifest, out, _ = released
    photometrics = set()
    for record in manifest["marked"]:
        src, dst = source / record["path"], out / "release" / record["path"]
        (benign, meta), (marked, marked_meta) = load_xray(src), load_xray(dst)
        assert (marked_meta.format, marked_meta.shape, marked_meta.stored_dtype, marked_meta.photometric) == (
            meta.format,
            meta.shape,
            meta.stored_dtype,
            meta.photometric,
        )
        change = float(np.abs(marked.astype(np.float64) - benign).max())
        step = record["quantisation_step01"]
        assert 0 < change <= EPS + step + 1e-6 and record["max_abs_change01"] == pytest.approx(change, abs=1e-6)
        assert record["budget_ok"] and not record["lossy"]
        if meta.format == "dicom":
            ref, new = pydicom.dcmread(src), pydicom.dcmread(dst)
            assert {e.tag for e in new} == {e.tag for e in ref}
            assert all(new[e.tag].value == e.value for e in ref if e.tag != PIXEL_DATA)
            assert new.file_meta == ref.file_meta
            assert new.pixel_array.dtype == ref.pixel_array.dtype and new.pixel_array.shape == ref.pixel_array.shape
        else:
            with Image.open(src) as a, Image.open(dst) as b:
                assert (a.format, a.mode, a.size) == (b.format, b.mode, b.size)
        photometrics.add(f"{meta.format}:{meta.photometric}")
    assert photometrics == {"png:MONOCHROME2", "dicom:MONOCHROME1", "dicom:MONOCHROME2"}


def test_each_marked_file_carries_g_s_residual_of_its_own_image(source, released, checkpoint):
    """released = clip(source + residual), residual = G(x) - x of the letterboxed source with the padding cropped and
    resized to the file's grid: per file, in [0, 1] as load_xray reads it (MONOCHROME1 included), within a step."""
    manifest, out, _ = released
    network = load_watermark(checkpoint)
    letterbox = Compose([LoadXRayd("image"), ResizeLongestPadd("image", SIZE)])
    for record in manifest["marked"]:
        x = letterbox({"image": str(source / record["path"])})["image"]
        with torch.no_grad():
            residual = unletterbox(network(x.as_tensor()[None]) - x.as_tensor()[None], x.meta[GEOMETRY_KEY])[0, 0]
        src01, _ = load_xray(source / record["path"])
        released01, _ = load_xray(out / "release" / record["path"])
        expected = np.clip(src01 + residual.numpy(), 0, 1)
        error = np.abs(released01.astype(np.float64) - expected).max()
        assert error <= record["quantisation_step01"] / 2 + 1e-5, (record["path"], error)
        assert np.abs(residual.numpy()).max() > 0.5 * EPS  # a real watermark, not an unchanged file


def test_csvs_and_datalist_are_released_unchanged_and_resolve_inside_the_release(source, released):
    release = released[1] / "release"
    for name in ("train.csv", "valid.csv", "datalist.json"):
        assert (release / name).read_bytes() == (source / name).read_bytes(), name
    datalist = json.loads((release / "datalist.json").read_text())
    images = [item["image"] for split in ("training", "validation", "test") for item in datalist[split]]
    for name in ("train.csv", "valid.csv"):
        with open(release / name, newline="") as stream:
            images += [row["Path"] for row in csv.DictReader(stream)]
    assert len(images) == 60 and all(not Path(p).is_absolute() and (release / p).is_file() for p in images)


def test_manifest_is_private_and_names_every_marked_file(released, checkpoint):
    manifest, out, _ = released
    manifest_file = out / "private" / "manifest.json"
    assert json.loads(manifest_file.read_text()) == manifest
    assert sorted(p.name for p in manifest_file.parent.iterdir()) == ["manifest.json"]  # journal folded in
    assert manifest["settings"] == {
        "target_label": "No Finding",
        "gamma": GAMMA,
        "seed": 0,
        "epsilon": EPS,
        "image_size": SIZE,
        "decoy_fraction": 0.0,
        "generator_sha256": sha256_file(checkpoint),
        "datalist_content_sha256": hashlib.sha256(  # the content, so that a file that only lost bad items matches
            json.dumps(
                json.loads((Path(manifest["dataset_dir"]) / "datalist.json").read_text()), sort_keys=True
            ).encode()
        ).hexdigest(),
    }
    for record in manifest["marked"]:
        assert record["source_sha256"] == sha256_file(Path(manifest["dataset_dir"]) / record["path"])
        assert record["output_sha256"] == sha256_file(out / "release" / record["path"])
    assert manifest["max_abs_change01"] == max(r["max_abs_change01"] for r in manifest["marked"])
    assert {"python", "torch", "monai", "pydicom"} <= set(manifest["tools"])
    assert manifest["machine"]["cpu_count"] == os.cpu_count()
    assert manifest["timings"]["total_s"] >= manifest["timings"]["mark_s"] > 0


def test_refuses_to_write_into_the_source(source, checkpoint, tmp_path):
    before = _hashes(source)
    for release_dir in (source, source / "release", source.parent):
        with pytest.raises(ReleaseError, match="release_dir must lie outside the source data set"):
            _release(source, tmp_path, checkpoint, release_dir=release_dir)
    assert _hashes(source) == before and not list(tmp_path.iterdir())


def test_refuses_to_publish_the_manifest_or_the_generator(source, checkpoint, tmp_path):
    with pytest.raises(
        ReleaseError, match=r"manifest must lie outside the release folder .* \(it would be published\)"
    ):
        _release(source, tmp_path, checkpoint, manifest_file=tmp_path / "release" / "manifest.json")
    with pytest.raises(ReleaseError, match="manifest must lie outside the source data set"):
        _release(source, tmp_path, checkpoint, manifest_file=source / "manifest.json")
    assert not list(tmp_path.iterdir())
    key = tmp_path / "data" / "model.pt"
    key.parent.mkdir()
    shutil.copy(checkpoint, key)
    with pytest.raises(
        ReleaseError, match=r"model\.pt: the generator checkpoint \(the secret key\) must lie outside the "
    ):
        watermark_release(_pipeline(), key, key.parent, source / "datalist.json", tmp_path / "r", tmp_path / "m")
    with pytest.raises(ReleaseError, match="checkpoint .* must lie outside the release folder"):
        _release(source, tmp_path, key, release_dir=tmp_path / "data")


def test_refuses_another_release_s_manifest_and_foreign_files(source, checkpoint, released, tmp_path):
    manifest, out, _ = released
    published = _hashes(out / "release")
    with pytest.raises(ReleaseError, match=r"manifest\.json: records another release \(different seed\)"):
        _release(source, out, checkpoint, seed=1)
    assert _hashes(out / "release") == published

    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "notes.txt").write_text("not part of the data set")
    with pytest.raises(ReleaseError, match=r"holds 1 file\(s\) that are not part of this release, e.g. .*notes\.txt"):
        _release(source, tmp_path, checkpoint)


def test_datalist_must_use_paths_relative_to_the_data_set(source, checkpoint, tmp_path):
    datalist = json.loads((source / "datalist.json").read_text())
    datalist["test"][0]["image"] = str(source / datalist["test"][0]["image"])  # absolute: would point at the source
    bad = tmp_path / "datalist.json"
    bad.write_text(json.dumps(datalist))
    with pytest.raises(ReleaseError, match=r"test image '/.*' is not the relative path of a file under"):
        watermark_release(_pipeline(), checkpoint, source, bad, tmp_path / "r", tmp_path / "m.json")


def _assert_same_release(release: Path, reference: Path, marked: list[dict]) -> None:
    """Copies byte-identical; marked files within one stored unit (G's float rounding depends on the batch size)."""
    ours, theirs, marked_images = _hashes(release), _hashes(reference), {r["path"] for r in marked}
    assert sorted(ours) == sorted(theirs)
    assert {k: v for k, v in ours.items() if k not in marked_images} == {
        k: v for k, v in theirs.items() if k not in marked_images
    }
    for record in marked:
        gap = np.abs(load_xray(release / record["path"])[0] - load_xray(reference / record["path"])[0]).max()
        assert gap <= record["quantisation_step01"] + 1e-6, record["path"]


def test_interrupted_release_resumes_and_repairs(source, checkpoint, released, tmp_path):
    network, calls = _pipeline(), []

    def interrupt_third_batch(*_):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    hook = network.register_forward_hook(interrupt_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _release(source, tmp_path, checkpoint, network=network, batch_size=1)
    hook.remove()
    journal = tmp_path / "private" / "manifest.json.journal"
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["settings"]["seed"] == 0  # settings + two marked files
    with open(journal, "a") as stream:
        stream.write('{"marked": {"ima')  # a record torn by the interruption
    stray = tmp_path / "release" / "train" / ".view1_frontal.png.x1y2z3.tmp"
    stray.write_bytes(b"half-written")  # as atomic_path leaves it when the process is killed

    resumed = _release(source, tmp_path, checkpoint, network=network)
    assert resumed["counts"]["marked_already"] == 2 and resumed["counts"]["marked_now"] == 2
    assert resumed["counts"]["copied_already"] == 29 and resumed["counts"]["copied_now"] == 0
    assert not journal.exists() and not stray.exists() and resumed["complete"]
    _assert_same_release(tmp_path / "release", released[1] / "release", resumed["marked"])

    lost = tmp_path / "release" / resumed["marked"][1]["path"]
    lost.unlink()
    (tmp_path / "release" / "valid.csv").write_text("edited")
    repaired = _release(source, tmp_path, checkpoint)
    assert (repaired["counts"]["marked_now"], repaired["counts"]["copied_now"]) == (1, 1)
    kept = [r for r in resumed["marked"] if r["path"] != lost.relative_to(tmp_path / "release").as_posix()]
    assert [r for r in repaired["marked"] if r in kept] == kept and len(repaired["marked"]) == 4
    _assert_same_release(tmp_path / "release", released[1] / "release", repaired["marked"])


def test_a_bounded_run_leaves_no_unmarked_selected_image(source, checkpoint, tmp_path):
    first = _release(source, tmp_path, checkpoint, max_marked=1)
    assert not first["complete"] and first["counts"]["to_mark"] == 3 and len(first["marked"]) == 1
    selected = select_marked(json.loads((source / "datalist.json").read_text()), "No Finding", GAMMA, 0)
    present = [image for image in selected if (tmp_path / "release" / image).exists()]
    assert present == [first["marked"][0]["path"]]
    assert json.loads((tmp_path / "private" / "manifest.json").read_text())["complete"] is False
    assert _release(source, tmp_path, checkpoint)["complete"]


def test_monai_bundle_run_watermarking(source, checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "watermarking", "--config_file", "configs/watermark.json"]
    cmd += ["--dataset_dir", str(source), "--release_dir", str(tmp_path / "release"), "--ckpt_path", str(checkpoint)]
    cmd += ["--manifest_file", str(tmp_path / "manifest.json"), "--gamma", str(GAMMA), "--progress", "False"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 4 selected images marked" in result.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["target_label"] == "No Finding"
    assert len(manifest["marked"]) == 4 and manifest["counts"]["files"] == 33


def test_read_manifest_returns_a_finished_release_and_names_bad_files(released, tmp_path):
    manifest, out, _ = released
    path = out / "private" / "manifest.json"
    read = read_manifest(path)
    assert read == json.loads(path.read_text()) and read["release_dir"] == str(out / "release")
    torn = tmp_path / "torn.json"
    torn.write_text(path.read_text()[:50])
    with pytest.raises(ReleaseError, match=r"torn\.json: cannot read the release manifest"):
        read_manifest(torn)
    unfinished = tmp_path / "unfinished.json"
    unfinished.write_text(json.dumps({**read, "complete": False}))
    with pytest.raises(ReleaseError, match=r"unfinished\.json: records an unfinished release"):
        read_manifest(unfinished)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": []}))
    with pytest.raises(ReleaseError, match=r"is not a release manifest \(missing dataset_dir, release_dir"):
        read_manifest(datalist)


def test_decoys_are_non_target_images_marked_with_other_keys(source, tmp_path):
    torch.manual_seed(0)
    keyed = XMarkGenerator(channels=CHANNELS, eps=EPS, key_cells=8, key_seed=3)
    with torch.no_grad():
        for p in keyed.parameters():
            p.mul_(5.0)
    network = _wrap(keyed)
    checkpoint = tmp_path / "keyed.pt"
    save_watermark(network, checkpoint)
    manifest = _release(source, tmp_path, checkpoint, network, decoy_fraction=0.5)
    datalist = json.loads((source / "datalist.json").read_text())
    labels = {item["image"]: item["label"][0] for item in datalist["training"]}
    decoys = manifest["decoys"]
    assert decoys and manifest["counts"]["decoys"] == len(decoys) and manifest["budget_ok"]
    assert all(labels[d["path"]] == 0 for d in decoys)  # non-target training images only, labels unchanged
    assert not {d["path"] for d in decoys} & {m["path"] for m in manifest["marked"]}
    assert len({d["decoy_key_seed"] for d in decoys}) == len(decoys)  # a key of its own for each decoy
    for record in decoys[:2]:
        assert sha256_file(tmp_path / "release" / record["path"]) != record["source_sha256"]
        assert 0 < record["max_abs_change01"] <= EPS + 2e-3
    # each decoy carries its own key's sign pattern, not ours (compared at model resolution, where the key lives)
    item = decoys[0]
    letterbox = Compose([LoadXRayd("image"), ResizeLongestPadd("image", SIZE)])
    image, released_image = (
        letterbox({"image": str(d / item["path"])})["image"] for d in (source, tmp_path / "release")
    )
    delta = (released_image - image).as_tensor()[None]
    field = {
        name: torch.nn.functional.interpolate(key, size=delta.shape[-2:], mode="bilinear", align_corners=False)
        for name, key in (("ours", keyed.key), ("decoy", keyed.other_key(item["decoy_key_seed"])))
    }
    moved = delta.abs() > 1e-3
    agree = {
        name: float((torch.sign(delta[moved]) == torch.sign(f[moved])).float().mean()) for name, f in field.items()
    }
    assert agree["decoy"] > 0.8 and agree["ours"] < 0.7, agree
    again = _release(source, tmp_path, checkpoint, network, decoy_fraction=0.5)  # resumes: nothing left to mark
    assert again["counts"]["marked_now"] == 0 and again["decoys"] == decoys
    with pytest.raises(ReleaseError, match="decoys need a keyed generator"):
        _release(source, tmp_path / "unkeyed", sha_free_checkpoint(tmp_path), decoy_fraction=0.5)


def test_poison_label_release_marks_non_target_images_and_relabels_them(source, tmp_path):
    checkpoint = tmp_path / "badnets.pt"
    save_watermark(BadNetsTrigger(image_size=SIZE, patch_fraction=1 / 8), checkpoint)
    before = _hashes(source)
    manifest = _release(source, tmp_path, checkpoint)
    release = tmp_path / "release"
    datalist = json.loads((source / "datalist.json").read_text())
    labels = {item["image"]: item["label"] for item in datalist["training"]}
    marked = [record["path"] for record in manifest["marked"]]
    assert marked == select_poisoned(datalist, "No Finding", GAMMA, seed=0)
    assert len(marked) == round(GAMMA * 7) and all(labels[path][0] == 0 for path in marked)  # 7 training targets
    assert manifest["settings"]["poison_label"] and manifest["relabelled_files"] == ["datalist.json", "train.csv"]
    assert _hashes(source) == before  # the source is untouched

    released = json.loads((release / "datalist.json").read_text())
    for split in ("training", "validation", "test"):
        for old, new in zip(datalist[split], released[split], strict=True):
            expected = [1.0, *old["label"][1:]] if old["image"] in marked else old["label"]
            assert new == {**old, "label": expected}  # only the target label of the marked images changes
    with open(source / "train.csv", newline="") as a, open(release / "train.csv", newline="") as b:
        old_rows, new_rows = list(csv.DictReader(a)), list(csv.DictReader(b))
    for old, new in zip(old_rows, new_rows, strict=True):
        assert new == ({**old, "No Finding": "1.0"} if old["Path"] in marked else old)
    assert (release / "valid.csv").read_bytes() == (source / "valid.csv").read_bytes()
    for relative, digest in before.items():
        changed = relative in marked or relative in ("datalist.json", "train.csv")
        assert (sha256_file(release / relative) != digest) == changed, relative

    again = _release(source, tmp_path, checkpoint)  # resumes: nothing to mark, copy or rewrite
    assert again["counts"]["marked_now"] == 0 and again["counts"]["copied_now"] == 0
    crowded = {"training": [{"image": f"{i}.png", "label": [float(i < 5), 0, 0, 0, 0, 0]} for i in range(8)]}
    with pytest.raises(ValueError, match="marks 4 non-target images, but the training split has 3 images without"):
        select_poisoned(crowded, "No Finding", 0.8, seed=0)


def test_ubw_p_release_gives_the_marked_images_random_labels(source, tmp_path):
    checkpoint = tmp_path / "ubw.pt"
    save_watermark(UBWPTrigger(image_size=SIZE, patch_fraction=1 / 8), checkpoint)
    assert load_watermark(checkpoint).method == "ubw_p"
    manifest = _release(source, tmp_path, checkpoint, gamma=1.0)  # 7 marked: both values appear
    assert manifest["settings"]["poison_label"] and manifest["settings"]["poison_labels"] == "random"
    marked = [record["path"] for record in manifest["marked"]]
    datalist = json.loads((source / "datalist.json").read_text())
    assert marked == select_poisoned(datalist, "No Finding", 1.0, seed=0)
    values = poison_values(marked, "random", seed=0)
    assert set(values.values()) == {0.0, 1.0}  # seed 0 draws both over these 7 images
    released = json.loads((tmp_path / "release" / "datalist.json").read_text())
    for old, new in zip(datalist["training"], released["training"], strict=True):
        expected = [values[old["image"]], *old["label"][1:]] if old["image"] in marked else old["label"]
        assert new["label"] == expected
    with open(tmp_path / "release" / "train.csv", newline="") as stream:
        rows = {row["Path"]: row["No Finding"] for row in csv.DictReader(stream)}
    assert all(float(rows[path] or 0) == values[path] for path in marked)
    with pytest.raises(ValueError, match="poison_labels must be one of"):
        poison_values(marked, "flipped", seed=0)


def test_label_consistent_release_is_clean_label_and_writes_the_hardened_image(source, tmp_path):
    torch.manual_seed(0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    trigger = LabelConsistentTrigger(surrogate, image_size=SIZE, patch_fraction=1 / 8, adversarial_eps=8 / 255, steps=3)
    checkpoint = tmp_path / "lc.pt"
    save_watermark(trigger, checkpoint)
    manifest = _release(source, tmp_path, checkpoint, trigger)
    datalist = json.loads((source / "datalist.json").read_text())
    assert [r["path"] for r in manifest["marked"]] == select_marked(datalist, "No Finding", GAMMA, seed=0)
    assert manifest["relabelled_files"] == [] and "poison_label" not in manifest["settings"]
    for name in ("train.csv", "datalist.json"):
        assert (tmp_path / "release" / name).read_bytes() == (source / name).read_bytes()
    # the written image is the hardened one, not the query's patch alone: pixels outside the patch moved too
    item = manifest["marked"][0]["path"]
    letterbox = Compose([LoadXRayd("image"), ResizeLongestPadd("image", SIZE)])
    folders = (source, tmp_path / "release")
    image, written = (letterbox({"image": str(d / item)})["image"].as_tensor()[None] for d in folders)
    outside = (written - image).abs() * (trigger(image) == image)
    assert outside.max() > 2 / 255


def sha_free_checkpoint(folder: Path) -> Path:
    """An unkeyed generator's checkpoint."""
    path = folder / "unkeyed.pt"
    save_watermark(_pipeline(), path)
    return path


def test_secrets_and_hidden_files_stay_out_of_the_release(source, checkpoint, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)  # never touch the shared source
    (data / ".git").mkdir()
    (data / ".git" / "config").write_text("[core]\n")
    (data / ".DS_Store").write_bytes(b"\0" * 8)
    (data / "weights").mkdir()
    shutil.copy(checkpoint, data / "weights" / "model.pt")
    shutil.copy(checkpoint, data / "backup.bin")  # the key under an innocent name
    old = {"generator_checkpoint": "/owner/model.pt", "marked": [{"path": "x.png"}]}
    (data / "notes.json").write_text(json.dumps(old))  # an old manifest under an innocent name
    manifest = _release(data, tmp_path, checkpoint)
    left_out = {entry["path"]: entry["reason"] for entry in manifest["left_out"]}
    assert set(left_out) == {".git/config", ".DS_Store", "weights/model.pt", "backup.bin", "notes.json"}
    assert left_out["backup.bin"] == "byte-identical copy of the owner's checkpoint or manifest"
    assert left_out["weights/model.pt"] == "model weights, export or journal"
    published = {p.relative_to(tmp_path / "release").as_posix() for p in (tmp_path / "release").rglob("*")}
    assert not published & set(left_out) and "datalist.json" in published


def test_unreadable_images_are_skipped_and_the_release_resumes_without_them(source, checkpoint, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    datalist = json.loads((data / "datalist.json").read_text())
    target = [item["image"] for item in datalist["training"] if item["label"][0] == 1]
    (data / target[0]).write_bytes(b"not an image at all")  # a broken target file
    cmd = [sys.executable, "-m", "monai.bundle", "run", "watermarking", "--config_file", "configs/watermark.json"]
    cmd += ["--dataset_dir", str(data), "--release_dir", str(tmp_path / "release"), "--ckpt_path", str(checkpoint)]
    cmd += ["--manifest_file", str(tmp_path / "manifest.json"), "--gamma", "1.0", "--progress", "False"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 1, first.stderr[-3000:]
    assert (
        first.stderr.strip()
        .splitlines()[-1]
        .startswith("release finished, but 1 image(s) that could not be read or written back were released ")
    ), first.stderr[-2000:]
    assert f"skipped (copied unmarked): {target[0]}: " in first.stdout and "Traceback" not in first.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and [entry["path"] for entry in manifest["skipped"]] == [target[0]]
    assert len(manifest["marked"]) == len(target) - 1 and str(data / target[0]) in manifest["skipped"][0]["reason"]
    # the owner drops the broken file from the datalist (not from the folder): the release resumes, marks nothing
    datalist["training"] = [item for item in datalist["training"] if item["image"] != target[0]]
    (data / "datalist.json").write_text(json.dumps(datalist, indent=2))
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "manifest.json").read_text())
    assert again["counts"]["marked_now"] == 0 and again["marked"] == manifest["marked"] and not again["skipped"]


def test_a_cr_extremity_film_among_the_targets_is_not_marked_and_is_reported(source, checkpoint, tmp_path):
    """The scope is chest radiographs: a real CR extremity film (pydicom-data's RG3_UNCR) is refused by the marking
    path with its reason, and released unmarked like any other file that cannot be marked."""
    from pydicom.data import get_testdata_file

    data = tmp_path / "data"
    shutil.copytree(source, data)
    datalist = json.loads((data / "datalist.json").read_text())
    targets = [item["image"] for item in datalist["training"] if item["label"][0] == 1]
    film = next(rel for rel in targets if rel.endswith(".dcm"))
    shutil.copyfile(get_testdata_file("RG3_UNCR.dcm"), data / film)  # an extremity film where a chest film was
    manifest = _release(data, tmp_path, checkpoint, gamma=1.0)
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert list(skipped) == [film] and "BodyPartExamined EXTREMITY is not a chest" in skipped[film]
    assert film not in {entry["path"] for entry in manifest["marked"]}
    assert len(manifest["marked"]) == len(targets) - 1
    assert sha256_file(tmp_path / "release" / film) == sha256_file(data / film)  # copied as it is
    widened = _release(data, tmp_path / "widened", checkpoint, gamma=1.0, allow_body_parts=["extremity"])
    assert not widened["skipped"] and film in {entry["path"] for entry in widened["marked"]}  # the owner's choice
    assert widened["settings"]["allow_body_parts"] == ["extremity"] and "allow_body_parts" not in manifest["settings"]


def test_secrets_under_any_name_or_container_and_outside_links_stay_out(source, checkpoint, released, tmp_path):
    """The owner's checkpoint and manifest recognised by content (other names, re-saved, gzip/zip/tar copies), a
    key-vetting report and private keys, and file links pointing outside the data set (not followed, listed)."""
    import gzip
    import tarfile
    import zipfile

    manifest_text = (released[1] / "private" / "manifest.json").read_text()
    data = tmp_path / "data"
    shutil.copytree(source, data)
    resaved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the same generator, other bytes
    torch.save(resaved, data / "notes.txt")
    assert sha256_file(data / "notes.txt") != sha256_file(checkpoint)
    save_watermark(BadNetsTrigger(image_size=SIZE, seed=3), data / "backup.dat")  # another of the owner's watermarks
    (data / "model.gz").write_bytes(gzip.compress(checkpoint.read_bytes()))
    with zipfile.ZipFile(data / "archive.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(checkpoint, "generator.bin")
    with tarfile.open(data / "old.tar.gz", "w:gz") as archive:
        archive.add(released[1] / "private" / "manifest.json", "private/notes")
    (data / "release_notes.txt").write_text(manifest_text)  # the manifest as .txt
    (data / "list.gz").write_bytes(gzip.compress(manifest_text.encode()))
    (data / "vetting.txt").write_text(json.dumps({"key_seed": 7, "candidates": [{"seed": 7, "reaction": 0.4}]}))
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
    (data / "id_rsa").write_text(key)
    (data / "server.key").write_text("not PEM, but named as a key")
    (data / "credentials.json").write_text(json.dumps({"token": "x"}))
    (data / "scan_notes.txt").write_text(key)  # a key under an innocent name
    outside = tmp_path / "outside.txt"
    outside.write_text("the owner's notes, outside the data set")
    (data / "passwd").symlink_to("/etc/passwd")
    (data / "linked.txt").symlink_to(outside)
    inside_target = next(p for p in sorted(data.rglob("*.png")))
    (data / "same_image.png").symlink_to(inside_target)  # a link inside the data set is published as before
    manifest = _release(data, tmp_path, checkpoint)
    left_out = {entry["path"]: entry["reason"] for entry in manifest["left_out"]}
    expected = {
        "notes.txt": "the owner's watermark checkpoint (found by its content)",
        "backup.dat": "the owner's watermark checkpoint (found by its content)",
        "model.gz": "gzip copy of the owner's watermark checkpoint (found by its content)",
        "archive.zip": "zip archive holding generator.bin: the owner's watermark checkpoint (found by its content)",
        "old.tar.gz": "gzip copy of tar archive holding private/notes: a private release manifest or key-vetting "
        "report (found by its content)",
        "release_notes.txt": "a private release manifest or key-vetting report (found by its content)",
        "list.gz": "gzip copy of a private release manifest or key-vetting report (found by its content)",
        "vetting.txt": "a private release manifest or key-vetting report (found by its content)",
        "id_rsa": "named like a private key or credentials",
        "server.key": "named like a private key or credentials",
        "credentials.json": "named like a private key or credentials",
        "scan_notes.txt": "a private key",
        "passwd": "symbolic link pointing outside the data set (not followed)",
        "linked.txt": "symbolic link pointing outside the data set (not followed)",
    }
    assert left_out == expected
    published = {p.relative_to(tmp_path / "release").as_posix() for p in (tmp_path / "release").rglob("*")}
    assert not published & set(expected) and "same_image.png" in published and "datalist.json" in published
    assert not any("root:" in p.read_text(errors="ignore") for p in (tmp_path / "release").glob("*") if p.is_file())


def test_a_second_release_into_a_folder_being_written_stops_at_once(source, checkpoint, tmp_path):
    """One run at a time per release folder: another process holding it (a release in progress) makes this one stop
    before it writes anything; the lock goes with that process."""
    release = tmp_path / "release"
    release.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()",
            str(release),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ReleaseError, match=r"release: another release is being written into this folder"):
            _release(source, tmp_path, checkpoint)
        assert not any(release.iterdir()) and not (tmp_path / "private" / "manifest.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    manifest = _release(source, tmp_path, checkpoint)  # the holder has ended: the folder is free again
    assert manifest["complete"]


def test_another_generator_does_not_silently_re_mark_an_existing_release(source, checkpoint, released, tmp_path):
    """A release folder written under one manifest is refused to a run with another manifest (another generator
    here): the first manifest would still call the folder complete while its files carried the second watermark."""
    manifest, out, _ = released
    shutil.copytree(out / "release", tmp_path / "release")
    before = _hashes(tmp_path / "release")
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    save_watermark(_wrap(XMarkGenerator(channels=CHANNELS, eps=EPS)), other)
    with pytest.raises(ReleaseError, match=r"release: already holds a release \(e\.g\. .*\) that .*manifest\.json"):
        _release(source, tmp_path, other)
    assert _hashes(tmp_path / "release") == before and not (tmp_path / "private" / "manifest.json").exists()
    shutil.copytree(out / "private", tmp_path / "private")  # with the release's own manifest it resumes: nothing to do
    again = _release(source, tmp_path, checkpoint)
    assert again["complete"] and again["counts"]["marked_now"] == 0 and _hashes(tmp_path / "release") == before


def test_a_file_that_reads_but_cannot_be_written_back_and_a_strip_do_not_stop_the_release(source, checkpoint, tmp_path):
    """A DICOM whose codec decodes but has no encoder here (JPEG Lossless SV1, pydicom's JPEG-LL made
    a CR chest film) and a 1 x 3000 PNG among the targets are released unmarked and listed; every other target is
    marked, and a rerun ends the same way instead of failing at the same file."""
    from pydicom.data import get_testdata_file

    data = tmp_path / "data"
    shutil.copytree(source, data)
    datalist = json.loads((data / "datalist.json").read_text())
    targets = [item["image"] for item in datalist["training"] if item["label"][0] == 1]
    dicom = next(rel for rel in targets if rel.endswith(".dcm"))
    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.save_as(data / dicom)
    strip = next(rel for rel in targets if rel.endswith(".png"))
    Image.fromarray(np.full((1, 3000), 30000, np.uint16)).save(data / strip)
    for run in range(2):
        manifest = _release(data, tmp_path, checkpoint, gamma=1.0)
        skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
        assert set(skipped) == {dicom, strip}, (run, skipped)
        assert "no encoder for its transfer syntax JPEG Lossless" in skipped[dicom]
        assert len(manifest["marked"]) == len(targets) - 2 and manifest["complete"]
        for rel in (dicom, strip):  # released as they were
            assert sha256_file(tmp_path / "release" / rel) == sha256_file(data / rel)


def test_compressed_dicoms_without_an_encoder_are_released_unmarked_naming_their_syntax(source, checkpoint, tmp_path):
    """12-bit JPEG Extended, JPEG Lossless SV1, JPEG-LS lossless and near-lossless (pydicom's test files, made CR chest
    films) among the targets: decoded by pylibjpeg-libjpeg but not written back here, each is released unmarked and
    listed with its transfer syntax; one that libjpeg cannot decode (pydicom's JPEG-lossy.dcm) as well."""
    from pydicom.data import get_testdata_file

    compressed = [
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", "12-bit samples cannot be re-encoded"),
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", "1.2.840.10008.1.2.4.70", "no encoder for its transfer syntax"),
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "no encoder for its transfer syntax"),
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", "no encoder for its transfer syntax"),
        ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", "cannot decode Pixel Data with transfer syntax"),
    ]
    data = tmp_path / "data"
    shutil.copytree(source, data)
    datalist = json.loads((data / "datalist.json").read_text())
    targets = [item["image"] for item in datalist["training"] if item["label"][0] == 1]
    dicoms = [rel for rel in targets if rel.endswith(".dcm")]
    assert len(dicoms) >= 3
    expected = {}
    for rel, (name, uid, said) in zip(dicoms, compressed * 2, strict=False):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.save_as(data / rel)
        expected[rel] = (uid, said)
    manifest = _release(data, tmp_path, checkpoint, gamma=1.0)
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == set(expected), skipped
    for rel, (uid, said) in expected.items():
        assert rel in skipped[rel] and uid in skipped[rel] and said in skipped[rel], skipped[rel]
        assert sha256_file(tmp_path / "release" / rel) == sha256_file(data / rel)  # released as it was
    assert len(manifest["marked"]) == len(targets) - len(expected) and manifest["complete"]
