"""configs/inference.json watermarks real files at full resolution; ckpt_export gives a matching model.ts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose
from PIL import Image
from pydicom.data import get_testdata_file

from xmark_bundle.data import LoadXRayd, load_xray
from xmark_bundle.data.xray_writer import quantisation_step
from xmark_bundle.networks.checkpoint import load_watermark, save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline
from xmark_bundle.transforms.geometry import GEOMETRY_KEY, ResizeLongestPadd, unletterbox
from xmark_bundle.transforms.watermark import watermarked_path

ROOT = Path(__file__).resolve().parents[1]
SIZE, CHANNELS = 64, [4, 8, 16, 32, 64]


def _pipeline(**key: object) -> WatermarkPipeline:
    torch.manual_seed(0)
    generator = XMarkGenerator(channels=CHANNELS, **key)
    with torch.no_grad():  # large weights so that the residual uses the whole budget
        for p in generator.parameters():
            p.mul_(5.0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), 224)
    return WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_watermark(_pipeline(), path)
    return path


def test_inference_watermarks_real_cr_radiograph(tmp_path, checkpoint):
    source = Path(get_testdata_file("RG1_UNCR.dcm"))  # real CR chest film, MONOCHROME1, 15 bit, 1955 x 1841
    inputs = tmp_path / "in"
    (inputs / "chest").mkdir(parents=True)
    shutil.copy(source, inputs / "chest" / "cr.dcm")
    Image.fromarray((np.arange(90 * 70).reshape(90, 70) * 9).astype(np.uint16)).save(inputs / "small.png")
    before = (inputs / "chest" / "cr.dcm").read_bytes()

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(ROOT),
        dataset_dir=str(inputs),
        output_dir=str(tmp_path / "out"),
        ckpt_path=str(checkpoint),
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    workflow.run()

    out = tmp_path / "out" / "chest" / "cr.dcm"
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) == [
        ".xmark-inference.jsonl",  # the journal a rerun resumes from
        "chest/cr.dcm",
        "small.png",
    ]
    assert (inputs / "chest" / "cr.dcm").read_bytes() == before  # source untouched
    ref, new = pydicom.dcmread(source), pydicom.dcmread(out)
    # written as a derived image (it may go back to the PACS that holds the source): its own SOP Instance UID,
    # ImageType DERIVED, a Derivation Description and a reference to the source; every other element is the source's
    derived = {"SOPInstanceUID", "ImageType", "DerivationDescription", "SourceImageSequence"}
    for element in ref:
        if element.tag != 0x7FE00010 and element.keyword not in derived:
            assert new[element.tag].value == element.value, element.name
    assert {e.keyword for e in new} == {e.keyword for e in ref} | derived
    assert new.SOPInstanceUID != ref.SOPInstanceUID and new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
    assert new.SourceImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID
    assert new.SourceImageSequence[0].ReferencedSOPClassUID == ref.SOPClassUID
    assert new.ImageType[0] == "DERIVED" and new.DerivationDescription.startswith("X-Mark")
    assert new.PhotometricInterpretation == "MONOCHROME1" and new.BitsStored == ref.BitsStored
    assert new.pixel_array.shape == ref.pixel_array.shape == (1955, 1841)
    benign01, meta = load_xray(source)
    marked01, _ = load_xray(out)
    change = np.abs(marked01 - benign01).max()
    assert 0 < change <= 16 / 255 + quantisation_step(meta) + 1e-6
    assert not np.array_equal(new.pixel_array, ref.pixel_array)
    # the written film is the source plus G's residual of its own letterboxed image, cropped and resized
    x = Compose([LoadXRayd("image"), ResizeLongestPadd("image", SIZE)])({"image": str(source)})["image"]
    with torch.no_grad():
        network = load_watermark(checkpoint)
        residual = unletterbox(network(x.as_tensor()[None]) - x.as_tensor()[None], x.meta[GEOMETRY_KEY])[0, 0]
    expected = np.clip(benign01.astype(np.float64) + residual.numpy(), 0, 1)
    assert np.abs(marked01.astype(np.float64) - expected).max() <= quantisation_step(meta) / 2 + 1e-5


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_exported_torchscript_matches_eager(tmp_path, checkpoint, keyed):
    key = {"key_cells": 128, "key_seed": 2, "key_pattern": "grating"} if keyed else {}
    if keyed:  # the checkpoint alone says that the generator is keyed, and with which key
        checkpoint = tmp_path / "keyed.pt"
        save_watermark(_pipeline(**key), checkpoint)
    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts)]
    cmd += ["--ckpt_file", str(checkpoint), "--ckpt_path", str(checkpoint), "--key_in_ckpt", "model"]
    cmd += ["--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]
    cmd += ["--use_trace", "True", "--input_shape", f"[1,1,{SIZE},{SIZE}]"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"]
    eager = _pipeline(**key).eval()
    assert eager.generator.keyed == keyed
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=0)


def _infer(inputs: Path, output: Path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--dataset_dir", str(inputs), "--output_dir", str(output), "--ckpt_path", str(checkpoint)]
    cmd += ["--progress", "False", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_unreadable_files_are_skipped_and_reported_and_overlapping_folders_refused(tmp_path, checkpoint):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((np.arange(90 * 70).reshape(90, 70) * 9).astype(np.uint16)).save(inputs / "good.png")
    (inputs / "broken.dcm").write_bytes(b"DICM but not really")
    done = _infer(inputs, tmp_path / "out", checkpoint)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "terminating due to exception" not in done.stderr + done.stdout, done.stderr[-3000:]  # read as a crash
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("1 input file(s) could not be read or written back and were skipped: broken.dcm")
    )
    assert "skipped: " in done.stdout and "broken.dcm" in done.stdout
    assert "watermarked 1 file(s)" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".xmark-inference.jsonl", "good.png"]
    written = (tmp_path / "out" / "good.png").stat().st_ino  # a rewrite renames a new file in
    (inputs / "broken.dcm").unlink()
    again = _infer(inputs, tmp_path / "out", checkpoint)  # resumes: the journal says good.png is done
    assert again.returncode == 0, again.stderr[-3000:]
    assert "watermarked 0 file(s)" in again.stdout and "1 already written" in again.stdout
    assert (tmp_path / "out" / "good.png").stat().st_ino == written
    (inputs / "broken.dcm").write_bytes(b"DICM but not really")  # the source as it was, for the checks below

    for output in (inputs / "marked", tmp_path):  # inside the input, or holding it
        refused = _infer(inputs, output, checkpoint)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1].startswith("inference failed: ValueError: output_dir")
    assert sorted(p.name for p in inputs.iterdir()) == ["broken.dcm", "good.png"]  # nothing written into the source


def test_a_file_that_reads_but_cannot_be_written_back_is_skipped_not_fatal(tmp_path, checkpoint):
    """A chest DICOM in a syntax with no encoder here (pydicom's JPEG-LL as a CR film) is named and
    skipped; the other files are written and the run ends with status 1, without a traceback."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((np.arange(90 * 70).reshape(90, 70) * 9).astype(np.uint16)).save(inputs / "good.png")
    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.save_as(inputs / "lossless.dcm")
    done = _infer(inputs, tmp_path / "out", checkpoint)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "terminating due to exception" not in done.stderr + done.stdout, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("1 input file(s) could not be read or written back and were skipped: lossless.dcm"), last
    assert "no encoder for its transfer syntax JPEG Lossless" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".xmark-inference.jsonl", "good.png"]


@pytest.mark.parametrize("save", [True, False], ids=["saved", "not_saved"])
def test_pred_is_the_released_image_on_the_source_grid(tmp_path, checkpoint, save):
    """The config's pieces as MONAI Label and MONAI Deploy use them (preprocessing, network, postprocessing, each
    taken from the parsed config): ``pred`` holds the watermarked image on the source's grid (MONAI's x, y order) in
    its stored type, the pixels of the file that SaveWatermarkedd writes; a source outside dataset_dir is written under
    the output's external/ folder, in a folder of its own source folder."""
    source = tmp_path / "elsewhere" / "cr.dcm"  # outside dataset_dir, as an image from MONAI Label's datastore
    source.parent.mkdir()
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), source)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update(
        {
            "bundle_root": str(ROOT),
            "ckpt_path": str(checkpoint),
            "dataset_dir": str(tmp_path / "in"),
            "output_dir": str(tmp_path / "out"),
            "save_watermarked": save,
        }
    )
    data = parser.get_parsed_content("preprocessing")({"image": str(source)})
    network, device = parser.get_parsed_content("network"), parser.get_parsed_content("device")
    with torch.no_grad():
        data["pred"] = network(data["image"][None].to(device))[0].cpu()
    residual = unletterbox(data["pred"][None] - data["image"].as_tensor()[None], data["image"].meta[GEOMETRY_KEY])
    data = parser.get_parsed_content("postprocessing")(data)

    pred = data["pred"]
    stored = pydicom.dcmread(source).pixel_array
    assert isinstance(pred, np.ndarray) and pred.dtype == stored.dtype and pred.shape == stored.shape[::-1]  # x, y
    assert tuple(data["image"].meta["spatial_shape"]) == pred.shape  # what MONAI Label's Restored compares with
    change = np.abs(pred.T.astype(np.int64) - stored).max()
    assert 0 < change <= np.ceil(16 / 255 * (2**15 - 1)) + 1  # the budget in 15-bit stored units (linear mapping)
    written = watermarked_path(source, tmp_path / "in", tmp_path / "out")
    assert written.parent.parent == tmp_path / "out" / "external" and written.name == "cr.dcm"
    if save:
        assert [p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.dcm")] == [
            written.relative_to(tmp_path / "out")
        ]
        np.testing.assert_array_equal(pydicom.dcmread(written).pixel_array, pred.T)
        # and those pixels are the source plus G's residual of this image, as load_xray reads them (within half a step)
        (src01, meta), (marked01, _) = load_xray(source), load_xray(written)
        expected = np.clip(src01 + residual[0, 0].numpy(), 0, 1)
        assert np.abs(marked01.astype(np.float64) - expected).max() <= quantisation_step(meta) / 2 + 1e-5
    else:
        assert not (tmp_path / "out").exists()


def test_sources_of_one_name_outside_the_dataset_keep_separate_copies(tmp_path):
    """MONAI Label hands over images from its datastore: two named view1_frontal.png must not share one copy."""
    first, second = tmp_path / "a" / "view1_frontal.png", tmp_path / "b" / "view1_frontal.png"
    paths = {watermarked_path(source, tmp_path / "in", tmp_path / "out") for source in (first, second)}
    assert len(paths) == 2 and {p.name for p in paths} == {"view1_frontal.png"}
    assert watermarked_path(first, tmp_path / "in", tmp_path / "out") in paths  # the same source, the same place
    inside = watermarked_path(tmp_path / "in" / "p1" / "s1" / "x.png", tmp_path / "in", tmp_path / "out")
    assert inside == tmp_path / "out" / "p1" / "s1" / "x.png"  # inside the data set: its relative path, as before


def test_the_chest_scope_is_widened_from_the_command_line(tmp_path, checkpoint):
    """A CR extremity film (pydicom-data's RG3_UNCR) is skipped by default and marked with --allow_body_parts."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(get_testdata_file("RG3_UNCR.dcm"), inputs / "knee.dcm")
    refused = _infer(inputs, tmp_path / "out", checkpoint)
    assert refused.returncode == 1 and "BodyPartExamined EXTREMITY is not a chest" in refused.stdout
    assert not (tmp_path / "out" / "knee.dcm").exists()
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(checkpoint)]
    cmd += ["--progress", "False", "--allow_body_parts", "['EXTREMITY']"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "watermarked 1 file(s)" in done.stdout and (tmp_path / "out" / "knee.dcm").is_file()


# pydicom's test files in syntaxes that the installed decoders (pylibjpeg-libjpeg) read but nothing here writes back,
# and one 12-bit JPEG Extended file that libjpeg cannot decode either: (file, transfer syntax UID, what is said)
COMPRESSED = [
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", "JPEG process SOF1 with 12-bit samples cannot be re-encoded"),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "1.2.840.10008.1.2.4.70", "no encoder for its transfer syntax JPEG Lossless"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "no encoder for its transfer syntax JPEG-LS Lossless"),
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", "no encoder for its transfer syntax JPEG-LS Lossy"),
    ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", "cannot decode Pixel Data with transfer syntax JPEG Extended"),
]


def chest_copies(names: list[str], folder: Path) -> list[Path]:
    """pydicom test files relabelled as CR chest films (the loader's scope), saved under ``folder``."""
    written = []
    for name in names:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.save_as(folder / name)
        written.append(folder / name)
    return written


def test_12_bit_jpeg_jpeg_lossless_and_jpeg_ls_are_skipped_naming_file_and_syntax(tmp_path, checkpoint):
    """Each compressed DICOM that cannot be written back in its own syntax (or not decoded) is skipped with its name
    and transfer syntax; the run goes on, writes the PNG beside them and ends with status 1 listing them."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray((np.arange(90 * 70).reshape(90, 70) * 9).astype(np.uint16)).save(inputs / "good.png")
    chest_copies([name for name, _, _ in COMPRESSED], inputs)
    done = _infer(inputs, tmp_path / "out", checkpoint)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{len(COMPRESSED)} input file(s) could not be read or written back and were skipped"), last
    for name, uid, said in COMPRESSED:
        lines = [line for line in done.stdout.splitlines() if name in line and uid in line]
        assert lines and said in lines[0], (name, done.stdout[-3000:])
        assert name in last
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".xmark-inference.jsonl", "good.png"]


@pytest.mark.parametrize("configs", [["inference"], ["inference", "deploy"]], ids=["inference", "deploy"])
def test_inference_and_deploy_write_derived_dicoms_unless_told_to_keep_the_uid(tmp_path, checkpoint, configs):
    """configs/inference.json and the MONAI Deploy app's inference + deploy: SaveWatermarkedd writes a derived image
    (new SOP Instance UID) by default; ``--sop_instance_uid keep`` keeps the source's with a warning."""
    import warnings

    from xmark_bundle.transforms import KeptInstanceUIDWarning

    inputs = tmp_path / "in"
    inputs.mkdir()
    source = chest_copies(["MR_small_RLE.dcm"], inputs)[0]
    original = pydicom.dcmread(source)
    for mode in ("new", "keep"):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / f"{name}.json") for name in configs])
        parser.update({"bundle_root": str(ROOT), "ckpt_path": str(checkpoint), "dataset_dir": str(inputs)})
        parser["output_dir"] = str(tmp_path / mode)  # deploy.json reads it from HOLOSCAN_OUTPUT_PATH
        if mode == "keep":
            parser["sop_instance_uid"] = "keep"
        preprocessing = parser.get_parsed_content("preprocessing")
        postprocessing = parser.get_parsed_content("postprocessing")
        network = parser.get_parsed_content("network_def").eval()
        item = preprocessing({"image": str(source)})
        with torch.no_grad():
            item["pred"] = network(item["image"].as_tensor()[None])[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            postprocessing(item)
        written = pydicom.dcmread(tmp_path / mode / source.name)
        kept = [w for w in caught if issubclass(w.category, KeptInstanceUIDWarning)]
        assert (written.SOPInstanceUID == original.SOPInstanceUID) == (mode == "keep") == bool(kept)
        assert ("SourceImageSequence" in written) == (mode == "new")


def test_a_rerun_with_the_other_uid_choice_writes_the_dicom_again(tmp_path, checkpoint):
    """The journal records the UID choice: files written with ``--sop_instance_uid keep`` (warned) are written again
    as derived images by a default rerun, and a third run finds them done."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    source = chest_copies(["MR_small_RLE.dcm"], inputs)[0]
    out = tmp_path / "out" / source.name
    kept = _infer(inputs, tmp_path / "out", checkpoint, "--sop_instance_uid", "keep")
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert f"{out}: keeps the SOP Instance UID of its source" in kept.stderr
    assert pydicom.dcmread(out).SOPInstanceUID == pydicom.dcmread(source).SOPInstanceUID
    derived = _infer(inputs, tmp_path / "out", checkpoint)
    assert derived.returncode == 0 and "watermarking 1 files" in derived.stdout, derived.stdout[-2000:]
    assert "keeps the SOP Instance UID" not in derived.stderr
    written = pydicom.dcmread(out)
    assert written.SOPInstanceUID != pydicom.dcmread(source).SOPInstanceUID and "SourceImageSequence" in written
    again = _infer(inputs, tmp_path / "out", checkpoint)
    assert again.returncode == 0 and "watermarking 0 files" in again.stdout and "(1 already done" in again.stdout
