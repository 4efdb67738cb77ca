"""Tests for the CheXpert CSV -> datalist preparation, on the real CheXpert train.csv and on hand-written CSVs."""

import csv
import gzip
import importlib.resources
import json
import runpy
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from xmark_bundle.data.chexpert import (
    CheXpertCSVError,
    build_datalist,
    label_prevalence,
    prepare_datalist,
    read_chexpert_csv,
    split_by_patient,
)
from xmark_bundle.data.labels import LABELS

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_CSV = importlib.resources.files("torchxrayvision") / "data" / "chexpert_train.csv.gz"
HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,"
    "Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices"
)


@pytest.fixture(scope="module")
def real_counts() -> dict:
    """Row, frontal and per-label positive counts of the real file, computed independently with the csv module."""
    with gzip.open(REAL_CSV, "rt", newline="") as stream:
        rows = list(csv.DictReader(stream))
    return {
        "rows": len(rows),
        "frontal": sum(row["Frontal/Lateral"] == "Frontal" for row in rows),
        "positives": {name: sum(row[name] != "" and float(row[name]) == 1 for row in rows) for name in LABELS},
        "patients": len({row["Path"].split("/")[2] for row in rows}),
    }


@pytest.fixture(scope="module")
def real_items() -> list[dict]:
    """The real train.csv parsed once with the U-Zeros policy."""
    return read_chexpert_csv(REAL_CSV, policy="u-zeros", path_prefix_strip="CheXpert-v1.0-small/")


def test_real_file_every_row_lands_in_exactly_one_split(real_items, real_counts):
    datalist = build_datalist(real_items, seed=0)
    counts = datalist["metadata"]["counts"]
    assert real_counts["rows"] == 223_414
    assert sum(c["images"] for c in counts.values()) == real_counts["rows"]
    assert sum(c["patients"] for c in counts.values()) == real_counts["patients"]
    patients = {name: {item["patient"] for item in datalist[name]} for name in ("training", "validation", "test")}
    assert not patients["training"] & patients["validation"]
    assert not patients["training"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    for name in ("validation", "test"):  # fractions count patients
        assert abs(len(patients[name]) / real_counts["patients"] - 0.1) < 1e-4
    first = datalist["training"][0]
    assert first["image"].startswith("train/patient") and first["patient"] in first["image"]
    assert datalist["labels"] == list(LABELS)


def test_real_file_positive_prevalence_matches_independent_counts(real_items, real_counts):
    positives = {name: sum(item["label"][i] == 1.0 for item in real_items) for i, name in enumerate(LABELS)}
    assert positives == real_counts["positives"]
    assert all(value in (0.0, 1.0) for item in real_items for value in item["label"])  # u-zeros: no -1 left
    metadata = build_datalist(real_items, seed=0)["metadata"]
    for name in LABELS:
        recovered = sum(metadata["prevalence"][s][name] * metadata["counts"][s]["images"] for s in metadata["counts"])
        assert round(recovered) == real_counts["positives"][name]


def test_real_file_frontal_only(real_counts):
    items = read_chexpert_csv(REAL_CSV, frontal_only=True)
    assert len(items) == real_counts["frontal"] == 191_027
    assert all("lateral" not in item["image"] for item in items)


def test_same_seed_same_json_other_seed_differs(real_items):
    first = json.dumps(build_datalist(real_items, seed=3))
    assert json.dumps(build_datalist(real_items, seed=3)) == first
    assert json.dumps(build_datalist(real_items, seed=4)) != first


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    """Write a small CheXpert-style CSV (plain or gzip by suffix)."""
    text = "\n".join([header, *rows]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# LABELS order: No Finding, Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion.
SMALL_ROWS = [
    # Path, Sex, Age, view, AP/PA, No Finding, EnlCM, Cardiomegaly, LungOp, LungLes, Edema, Consolidation, Pneumonia,
    # Atelectasis, Pneumothorax, Pleural Effusion, PleuralOther, Fracture, SupportDevices
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,F,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,F,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,,",
    "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,F,83,Lateral,,,,1.0,,,0.0,1,,-1,,1.0,,,",
]


def make_row(path: str, findings: dict[str, str], view: str = "Frontal") -> str:
    """One CSV line under HEADER with the given finding cells (all others blank)."""
    cells = dict.fromkeys(HEADER.split(","), "") | {"Path": path, "Frontal/Lateral": view} | findings
    return ",".join(cells.values())


@pytest.mark.parametrize(("policy", "u"), [("u-ones", 1.0), ("u-zeros", 0.0), ("ignore", -1.0)])
def test_uncertainty_policies_and_blanks(tmp_path, policy, u):
    items = read_chexpert_csv(write_csv(tmp_path / "t.csv", SMALL_ROWS), policy=policy)
    assert [item["label"] for item in items] == [[1.0, 0, 0, 0, 0, 0], [0.0, u, u, u, u, u], [0, u, 1.0, 1.0, 0, 1.0]]
    assert [item["patient"] for item in items] == ["patient00001", "patient00002", "patient00002"]
    assert items[0]["image"] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"


def test_gzip_prefix_strip_and_frontal_filter(tmp_path):
    items = read_chexpert_csv(
        write_csv(tmp_path / "t.csv.gz", SMALL_ROWS), frontal_only=True, path_prefix_strip="CheXpert-v1.0-small/"
    )
    assert [item["image"] for item in items] == [
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study2/view1_frontal.jpg",
    ]


def test_split_by_patient_keeps_patients_together_and_order():
    items = [{"patient": f"patient{i % 20:05d}", "n": i} for i in range(100)]
    validation, test, training = split_by_patient(items, (0.1, 0.25), seed=7)
    assert [len({i["patient"] for i in part}) for part in (validation, test, training)] == [2, 5, 13]
    assert [len(part) for part in (validation, test, training)] == [10, 25, 65]
    assert [i["n"] for i in training] == sorted(i["n"] for i in training)
    with pytest.raises(ValueError, match="sum to less than 1"):
        split_by_patient(items, (0.5, 0.5), seed=0)


def test_label_prevalence_counts_only_ones():
    items = [{"label": [1.0, -1.0, 0, 0, 1.0, 0]}, {"label": [0.0, 1.0, 0, 0, 1.0, -1.0]}]
    assert label_prevalence(items) == dict(zip(LABELS, [0.5, 0.5, 0.0, 0.0, 1.0, 0.0], strict=True))


def test_test_csv_gives_the_test_split_and_must_not_share_patients(tmp_path):
    train_rows = [
        make_row(f"train/patient{i:05d}/study1/view1_frontal.jpg", {"No Finding": "1.0"}) for i in range(1, 31)
    ]
    train_csv = write_csv(tmp_path / "train.csv", train_rows)
    valid_csv = write_csv(tmp_path / "valid.csv", [SMALL_ROWS[0].replace("patient00001", "patient64541")])
    datalist = prepare_datalist(train_csv, tmp_path / "out" / "datalist.json", test_csv=valid_csv, val_fraction=0.2)
    assert [item["patient"] for item in datalist["test"]] == ["patient64541"]
    assert (len(datalist["training"]), len(datalist["validation"])) == (24, 6)
    metadata = datalist["metadata"]
    assert (metadata["source_csv"], metadata["test_csv"], metadata["test_fraction"]) == ("train.csv", "valid.csv", None)
    with pytest.raises(ValueError, match=r"1 patient\(s\) appear in both.*patient00001"):
        prepare_datalist(train_csv, tmp_path / "leak.json", test_csv=write_csv(tmp_path / "v2.csv", SMALL_ROWS[:1]))
    assert not (tmp_path / "leak.json").exists()


def test_written_datalist_loads_with_monai(tmp_path):
    out = tmp_path / "datalist.json"
    rows = [make_row(f"train/patient{i:05d}/study1/view1_frontal.jpg", {"Atelectasis": "1.0"}) for i in range(1, 21)]
    written = prepare_datalist(write_csv(tmp_path / "train.csv", rows), out, seed=1)
    assert json.loads(out.read_text()) == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    training = load_decathlon_datalist(out, is_segmentation=False, data_list_key="training", base_dir=tmp_path)
    assert len(training) == written["metadata"]["counts"]["training"]["images"] == 16
    assert training[0]["image"] == str(tmp_path / written["training"][0]["image"])
    assert training[0]["label"] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("Path,Sex,Age,No Finding,Edema", [], r"missing column\(s\) \['Atelectasis', 'Cardiomegaly', 'Consol"),
        (HEADER, [SMALL_ROWS[0].replace("1.0,,,,,,,,,0.0", "maybe,,,,,,,,,0.0")], "line 2: column 'No Finding'.*maybe"),
        (HEADER, [SMALL_ROWS[0].replace(",1.0,,,,,,,,,0.0", ",2.0,,,,,,,,,0.0")], "holds '2.0'; expected 1, 0, -1"),
        (HEADER, [SMALL_ROWS[0], make_row("train/p1/study1/view1_frontal.jpg", {})], "line 3: no 'patientNNNNN'"),
        (HEADER, [SMALL_ROWS[0] + ",extra"], "line 2: 20 fields where the header has 19"),
        (HEADER, [], "no images left"),
    ],
)
def test_bad_csvs_name_the_file_and_problem(tmp_path, header, rows, message):
    path = write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(CheXpertCSVError, match=message) as info:
        read_chexpert_csv(path)
    assert str(path) in str(info.value)


def test_bad_frontal_inputs_and_unreadable_files(tmp_path):
    laterals = write_csv(tmp_path / "lat.csv", SMALL_ROWS[2:])
    with pytest.raises(CheXpertCSVError, match="no images left after keeping frontal views"):
        read_chexpert_csv(laterals, frontal_only=True)
    odd_view = write_csv(tmp_path / "view.csv", [SMALL_ROWS[0].replace(",Frontal,", ",Oblique,")])
    with pytest.raises(CheXpertCSVError, match="Frontal/Lateral is 'Oblique'"):
        read_chexpert_csv(odd_view, frontal_only=True)
    no_view = write_csv(tmp_path / "noview.csv", [], "Path," + ",".join(LABELS))
    with pytest.raises(CheXpertCSVError, match=r"missing column\(s\) \['Frontal/Lateral'\]"):
        read_chexpert_csv(no_view, frontal_only=True)
    fake_gz = tmp_path / "train.csv.gz"
    fake_gz.write_text(HEADER)
    with pytest.raises(CheXpertCSVError, match="train.csv.gz: cannot be read as a CSV"):
        read_chexpert_csv(fake_gz)
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_chexpert_csv(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="Unknown uncertainty policy"):
        read_chexpert_csv(laterals, policy="u-maybe")


def test_cli_writes_datalist_and_reports_errors(tmp_path):
    csv_path = write_csv(tmp_path / "train.csv", SMALL_ROWS)
    out = tmp_path / "datalist.json"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "prepare_datalist.py"), "--csv", str(csv_path)]
    done = subprocess.run(
        [*command, "--out", str(out), "--policy", "ignore", "--val-fraction", "0", "--test-fraction", "0.5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "training: " in done.stdout and "wrote" in done.stdout
    datalist = json.loads(out.read_text())
    assert datalist["metadata"]["policy"] == "ignore"
    assert sum(c["patients"] for c in datalist["metadata"]["counts"].values()) == 2
    main = runpy.run_path(str(REPO_ROOT / "scripts" / "prepare_datalist.py"))["main"]  # error path in-process
    with pytest.raises(SystemExit, match="prepare_datalist: error: Split fractions"):
        main(["--csv", str(csv_path), "--out", str(out), "--val-fraction", "1.5"])
    assert Counter(p.suffix for p in tmp_path.iterdir()) == Counter({".csv": 1, ".json": 1})


def test_cli_refuses_to_overwrite_an_input_csv(tmp_path, monkeypatch):
    csv_path = write_csv(tmp_path / "train.csv", SMALL_ROWS)
    test_csv = write_csv(tmp_path / "valid.csv", SMALL_ROWS[:1])
    (tmp_path / "link.csv").symlink_to(csv_path)
    (tmp_path / "sub").mkdir()
    before = {path: path.read_bytes() for path in (csv_path, test_csv)}
    script = str(REPO_ROOT / "scripts" / "prepare_datalist.py")
    done = subprocess.run(
        [sys.executable, script, "--csv", str(csv_path), "--out", str(csv_path)], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert f"prepare_datalist: error: output {csv_path} is the input CSV {csv_path}: refusing to overwrite it" in (
        done.stderr
    )
    main = runpy.run_path(script)["main"]  # the other spellings of the same file, in-process
    monkeypatch.chdir(tmp_path)
    for out, extra in [
        ("./train.csv", []),  # relative to the working directory
        (str(tmp_path / "link.csv"), []),  # a symlink to it
        (str(tmp_path / "sub" / ".." / "valid.csv"), ["--test-csv", str(test_csv)]),  # the test CSV
    ]:
        with pytest.raises(SystemExit, match="prepare_datalist: error: output .* refusing to overwrite it"):
            main(["--csv", str(csv_path), "--out", out, *extra])
    assert {path: path.read_bytes() for path in before} == before


@pytest.mark.parametrize(
    "image",
    [
        "/data/chexpert/train/patient00009/study1/view1_frontal.jpg",
        "../other/patient00009/study1/view1_frontal.jpg",
        "train/../../patient00009/study1/view1_frontal.jpg",
        "C:/data/train/patient00009/study1/view1_frontal.jpg",
    ],
)
def test_image_paths_outside_the_data_set_are_refused_naming_file_and_line(tmp_path, image):
    """A datalist holds paths relative to the data set: an absolute or climbing one fails here, not at release."""
    rows = [SMALL_ROWS[0], make_row(image, {"No Finding": "1.0"})]
    with pytest.raises(CheXpertCSVError, match=r"t\.csv, line 3: image path .* is absolute or leaves the data set"):
        read_chexpert_csv(write_csv(tmp_path / "t.csv", rows))


def test_an_existing_file_that_is_not_a_datalist_is_never_overwritten(tmp_path):
    """prepare_datalist replaces only an earlier datalist: not the data set's own valid.csv given as --out."""
    csv_path = write_csv(tmp_path / "train.csv", SMALL_ROWS)
    valid = write_csv(tmp_path / "valid.csv", SMALL_ROWS[:1])
    before = valid.read_bytes()
    with pytest.raises(ValueError, match=r"valid\.csv exists and is not a datalist: refusing to overwrite it"):
        prepare_datalist(csv_path, valid, val_fraction=0, test_fraction=0.5)
    assert valid.read_bytes() == before
    out = tmp_path / "datalist.json"
    prepare_datalist(csv_path, out, val_fraction=0, test_fraction=0.5)
    prepare_datalist(csv_path, out, val_fraction=0, test_fraction=0.5, seed=1)  # its own earlier output: replaced
    assert json.loads(out.read_text())["metadata"]["seed"] == 1
