"""The MONAI model zoo's bundle checks, run as its CI runs them (Project-MONAI/model-zoo, ``ci/verify_bundle.py``).

The zoo verifies a bundle with the real ``monai.bundle`` functions: required files, version and changelog,
``verify_metadata`` against the schema that ``metadata.json`` names, ``verify_net_in_out`` of ``network_def`` in
``configs/inference.json`` at the default ``n = p = any = 1``, and ``ckpt_export`` of ``models/model.pt`` without
tracing and without ``key_in_ckpt`` (TorchScript by scripting). Here the same functions run on a tiny watermark
checkpoint (generator widths 4..64, 64 px) written with :func:`~xmark_bundle.networks.checkpoint.save_watermark`, passed
as the ``ckpt_path`` override. The zoo's pre-commit ``pretty-format-json`` hook (4-space indent, key order kept) must
leave every JSON file unchanged.

The schema is a verbatim copy kept in ``tests/data/meta_schema_20240725.json`` so that no test downloads:
https://project-monai.github.io/schema/meta_schema_20240725.json (copied from the MONAI-extra-test-data 0.8.1
release that ``configs/metadata.json``'s ``schema`` names).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from xmark_bundle.data.labels import LABELS
from xmark_bundle.networks.checkpoint import load_watermark, read_watermark_checkpoint, save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "configs" / "metadata.json"
INFERENCE = ROOT / "configs" / "inference.json"
SCHEMA = Path(__file__).parent / "data" / "meta_schema_20240725.json"
#: MD5 of that copy: verify_metadata checks it, so an edited copy fails instead of validating against other rules.
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
SIZE = 64
#: The zoo calls verify_net_in_out with MONAI's default n = 1; n = 2 is the test image size.
ZOO_N = (1, 2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny X-Mark watermark checkpoint (ResNet18 surrogate at 64 px) in the bundle's format."""
    torch.manual_seed(0)
    generator = XMarkGenerator([4, 8, 16, 32, 64], key_cells=4, key_seed=2)
    with torch.no_grad():  # weights unlike a fresh constructor's, so that loading them shows
        for p in generator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    surrogate = ResizedClassifier(build_classifier("resnet18"), SIZE)
    pipeline = WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=SIZE)
    path = tmp_path_factory.mktemp("zoo") / "model.pt"
    save_watermark(pipeline, path, "No Finding", LABELS)
    return path


def test_required_files_are_present():
    for name in (
        "configs/metadata.json",
        "configs/inference.json",
        "docs/README.md",
        "docs/data_license.txt",
        "LICENSE",
        "large_files.yml",
    ):
        assert (ROOT / name).is_file(), name


def test_version_is_in_the_changelog():
    meta = json.loads(META.read_text(encoding="utf-8"))
    version = meta["version"]
    assert version in meta["changelog"]
    as_tuple = [tuple(int(part) for part in v.split(".")) for v in meta["changelog"]]
    assert tuple(int(part) for part in version.split(".")) == max(as_tuple)


def test_metadata_validates_against_the_schema(tmp_path):
    meta = json.loads(META.read_text(encoding="utf-8"))
    assert meta["schema"].endswith("/" + SCHEMA.name)
    schema = tmp_path / "schema.json"  # present, so verify_metadata does not download it
    shutil.copyfile(SCHEMA, schema)
    verify_metadata(meta_file=str(META), filepath=str(schema), hash_val=SCHEMA_MD5, hash_type="md5")


def test_metadata_failing_the_schema_is_reported(tmp_path):
    broken = json.loads(META.read_text(encoding="utf-8"))
    broken["network_data_format"]["inputs"]["image"]["num_channels"] = "one"
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps(broken), encoding="utf-8")
    shutil.copyfile(SCHEMA, tmp_path / "schema.json")
    with pytest.raises(ValueError, match="'one' is not of type 'integer'"):
        verify_metadata(meta_file=str(meta), filepath=str(tmp_path / "schema.json"), hash_val=SCHEMA_MD5)


def _third_party_imports(package: Path) -> set[str]:
    """Top-level names of the modules that ``package``'s code imports, less the standard library and itself."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {package.name}


def test_required_packages_cover_the_runtime_imports():
    meta = json.loads(META.read_text(encoding="utf-8"))
    listed = {name.lower().replace("_", "-") for name in meta["required_packages_version"]}
    distributions = importlib_metadata.packages_distributions()
    own_fields = {"torch", "numpy", "monai"}  # metadata.json's pytorch_version, numpy_version, monai_version
    missing, imported = [], set()
    for module in _third_party_imports(ROOT / "xmark_bundle"):
        assert module in distributions, f"xmark_bundle/ imports {module!r}, which no installed distribution provides"
        # A module's own name counts too: `itk` comes from itk-core, itk-io, ..., installed by the meta-package itk.
        providers = {d.lower().replace("_", "-") for d in distributions[module]} | {module.lower()}
        imported |= providers
        if not providers & (listed | own_fields):
            missing.append(f"{module} ({', '.join(sorted(providers))})")
    assert not missing, f"imported by xmark_bundle/ but not in required_packages_version: {missing}"
    assert "grad-cam" not in imported  # a test requirement only


def test_large_files_lists_the_model_checkpoint():
    entries = ConfigParser.load_config_file(ROOT / "large_files.yml")["large_files"]
    assert [entry["path"] for entry in entries] == ["models/model.pt"]
    for entry in entries:  # the keys monai.bundle.download_large_files passes on to download_url
        assert set(entry) <= {"path", "url", "hash_val", "hash_type"} and entry["url"]
        assert entry.get("hash_type", "md5") in ("", "md5", "sha1", "sha256", "sha512")


@pytest.mark.parametrize("n", ZOO_N)
def test_net_in_out_at_the_zoo_sizes(checkpoint, n):
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(META),
        config_file=str(INFERENCE),
        n=n,
        bundle_root=str(ROOT),
        ckpt_path=str(checkpoint),
    )


def test_net_in_out_fails_on_a_one_pixel_bottleneck(checkpoint):
    """Why the shape rule is 32*n: at 16 px the generator's four stride-2 stages leave 1x1 maps for InstanceNorm."""
    with pytest.raises(ValueError, match="spatial element"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(META),
            config_file=str(INFERENCE),
            bundle_root=str(ROOT),
            ckpt_path=str(checkpoint),
            **{"_meta_#network_data_format#inputs#image#spatial_shape": ["16*n", "16*n"]},
        )


def test_torchscript_export_as_the_zoo_runs_it(checkpoint, tmp_path):
    exported = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(exported),
        ckpt_file=str(checkpoint),
        meta_file=str(META),
        config_file=str(INFERENCE),
        bundle_root=str(ROOT),
        ckpt_path=str(checkpoint),
    )
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(exported), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(META.read_text(encoding="utf-8"))["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    eager = load_watermark(checkpoint)
    images = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = eager(images)
        torch.testing.assert_close(scripted(images), expected, rtol=0, atol=1e-6)
    assert (expected - images).abs().max() > 0


def test_deploy_export_carries_the_checkpoints_settings_and_nothing_that_needs_model_pt(checkpoint, tmp_path):
    """scripts/export_deploy.py: what MONAI Deploy's operator reads from model.ts (make test-deploy runs the SDK)."""
    out = tmp_path / "map" / "model.ts"
    done = subprocess.run(
        [sys.executable, "scripts/export_deploy.py", "--ckpt", str(checkpoint), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in out.parent.iterdir()] == ["model.ts"]  # no temporary folder left beside it
    with zipfile.ZipFile(out) as archive:  # the operator looks for <file name>/extra/<config>.json
        names = set(archive.namelist())
        deploy = json.loads(archive.read("model/extra/deploy.json"))
    assert {"model/extra/inference.json", "model/extra/metadata.json"} <= names
    record, _ = read_watermark_checkpoint(checkpoint)
    assert deploy["image_size"] == record["image_size"] == SIZE and deploy["epsilon"] == record["epsilon"]
    static = json.loads((ROOT / "configs" / "deploy.json").read_text())
    assert {k: v for k, v in deploy.items() if k not in ("image_size", "epsilon")} == static
    parser = ConfigParser()
    parser.read_config([str(INFERENCE), str(ROOT / "configs" / "deploy.json")])
    parser.update({"image_size": deploy["image_size"], "epsilon": deploy["epsilon"], "ckpt_path": "/nonexistent.pt"})
    for item in ("preprocessing", "postprocessing", "inferer"):  # what the operator parses: no checkpoint is read
        assert parser.get_parsed_content(item) is not None


def test_pipeline_loads_a_whole_checkpoint_only_with_its_record(checkpoint):
    """What ckpt_export does without key_in_ckpt: the checkpoint's content goes to load_state_dict as it is."""
    record, weights = read_watermark_checkpoint(checkpoint)
    whole = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network = ConfigParser({"network": record["network"]}).get_parsed_content("network")
    network.load_state_dict(whole)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    whole["watermark"]["network"]["image_size"] = 2 * SIZE
    with pytest.raises(ValueError, match="describes another network"):
        network.load_state_dict(whole)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")) + [SCHEMA], ids=lambda p: p.name)
def test_json_is_as_the_zoo_formatting_hook_writes_it(path):
    """pre-commit-hooks' pretty-format-json with the zoo's arguments: --autofix --no-sort-keys --indent=4."""
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n"


TABLES = ("table1", "table2")


def test_eval_metrics_are_the_published_comparisons():
    """metadata.json's eval_metrics copy the comparison's published tables (docs/experiments/table1, table2)."""
    metrics = json.loads(META.read_text())["eval_metrics"]
    published = {n: json.loads((ROOT / "docs" / "experiments" / n / "results.json").read_text()) for n in TABLES}
    table1, table2 = ({r["label"]: r["cells"] for r in published[n]["tables"][0]["rows"]} for n in TABLES)

    def mean(rows: dict, label: str, column: str) -> float:
        seeds = rows[label][column]["per_seed"]
        return sum(seeds) / len(seeds)

    assert published["table1"]["commit"] == published["table2"]["commit"]
    assert f"at commit {published['table1']['commit']}:" in metrics["note"]
    expected = {
        "malicious_mean_ba_phantoms": mean(table1, "xmark (γ 0.5)", "BA"),
        "benign_mean_ba_phantoms": mean(table1, "benign models (clean data)", "BA"),
        "malicious_wsr_at_0.5_phantoms": mean(table1, "xmark (γ 0.5)", "WSR at 0.5"),
        "malicious_delta_p_phantoms": mean(table2, "xmark", "Malicious ΔP"),
        "ind_w_delta_p_phantoms": mean(table2, "xmark", "Ind-W ΔP"),
        "release_psnr_full_resolution_phantoms": table1["xmark (γ 0.5)"]["PSNR full res (dB)"]["value"],
        "release_ssim_full_resolution_phantoms": table1["xmark (γ 0.5)"]["SSIM full res"]["value"],
        "release_ssim_model_resolution_phantoms": table1["xmark (γ 0.5)"]["SSIM model res"]["value"],
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-3), key
    assert metrics["false_accusations_phantoms"].startswith(table2["xmark"]["false accusations"]["value"] + " ")


#: Each app metadata.json declares, with the environment that pins it, its distribution there and the test that runs
#: the bundle in it.
APP_ENVIRONMENTS = {
    "monai-deploy-app-sdk": ("requirements-deploy.txt", "monai-deploy-app-sdk", "tests/ecosystem/test_monai_deploy.py"),
    "monai-label": ("requirements-monailabel.txt", "monailabel", "tests/ecosystem/test_monailabel.py"),
}


def test_supported_apps_are_the_ones_a_test_runs_at_the_declared_version():
    """supported_apps declares only apps whose pinned environment and test run the bundle (make test-deploy,
    make test-monailabel: the real MONAI Label server with monailabel_app/)."""
    apps = json.loads(META.read_text())["supported_apps"]
    assert apps and set(apps) <= set(APP_ENVIRONMENTS), f"declared without a tested environment: {set(apps)}"
    for app, version in apps.items():
        requirements, distribution, test = APP_ENVIRONMENTS[app]
        pins = dict(
            line.split("==", 1) for line in (ROOT / requirements).read_text().splitlines() if "==" in line.split("#")[0]
        )
        assert pins.get(distribution) == version and (ROOT / test).is_file(), (app, version, pins.get(distribution))


def test_the_descriptions_figures_are_the_eval_metrics():
    """The prose copies no figure by hand: every decimal in the description is one of eval_metrics' numbers."""
    meta = json.loads(META.read_text())
    numbers = {value for value in meta["eval_metrics"].values() if isinstance(value, int | float)}
    figures = [float(f) for f in re.findall(r"(?<![\d/])\d+\.\d+(?![\d/])", meta["description"])]
    assert figures, "the description quotes no measured figure"
    assert [f for f in figures if f not in numbers] == [], f"description figures not in eval_metrics: {figures}"


def test_post_processed_outputs_describe_what_inference_returns():
    """inference.json's pred after postprocessing: the source's grid and stored values (RestoreWatermarkedd)."""
    post = json.loads(META.read_text())["network_data_format"]["post_processed_outputs"]["pred"]
    low, high = post["value_range"]
    assert post["spatial_shape"] == ["W", "H"] and post["num_channels"] == 1 and not post["is_patch_data"]
    for dtype in ("uint8", "uint16", "int16"):  # the stored types the loader reads and the writer keeps
        info = np.iinfo(dtype)
        assert dtype in post["dtype"] and low <= info.min and info.max <= high
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    steps = [t["_target_"] for t in parser.get("postprocessing")["transforms"]]
    assert steps[-1] == "xmark_bundle.transforms.RestoreWatermarkedd"


def test_references_cite_the_methods_the_bundle_uses():
    references = " ".join(json.loads(META.read_text())["references"])
    for cited in ("X-Mark", "SSCL-BW", "CheXpert", "Eigen-CAM", "Perceptual Metric (LPIPS)"):
        assert cited in references, cited


def test_the_stated_scope_is_the_loaders():
    """The modality and body parts metadata.json states are those load_xray accepts by default."""
    from xmark_bundle.data.xray_io import CHEST_BODY_PARTS, CHEST_MODALITIES

    meta = json.loads(META.read_text())
    stated = meta["network_data_format"]["inputs"]["image"]["modality"].split("/")
    assert set(stated) <= CHEST_MODALITIES and "chest radiograph" in meta["image_classes"]
    scope = meta["image_classes"].split("scope enforced by the loader:")[1]
    named = set(re.findall(r"\b[A-Z]{2,}\b", scope))
    assert CHEST_MODALITIES | CHEST_BODY_PARTS <= named and named - {"DICOM"} <= CHEST_MODALITIES | CHEST_BODY_PARTS
