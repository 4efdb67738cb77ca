"""Poison-label releases: the label files that make marked non-target images targets, and nothing else."""

import csv
import io

from xmark_bundle.data.poison import relabelled_csv, relabelled_datalist

HEADER = "Path,Sex,No Finding,Edema,Note\r\n"


def test_only_the_target_column_of_the_marked_rows_changes_and_line_endings_stay():
    rows = [
        "CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg,Male,,1.0,plain\r\n",
        'CheXpert-v1.0/train/patient2/study1/view1_frontal.jpg,Female,,0.0,"a, quoted note"\r\n',
        "CheXpert-v1.0/train/patient3/study1/view1_frontal.jpg,Female,1.0,,x\r\n",
    ]
    marked = {"train/patient2/study1/view1_frontal.jpg"}
    out = relabelled_csv(HEADER + "".join(rows), marked, "No Finding", path_prefix_strip="CheXpert-v1.0/")
    lines = out.splitlines(keepends=True)
    assert lines[0] == HEADER and lines[1] == rows[0] and lines[3] == rows[2]  # byte for byte
    assert lines[2].endswith("\r\n")
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert parsed[1] == {
        "Path": "CheXpert-v1.0/train/patient2/study1/view1_frontal.jpg",
        "Sex": "Female",
        "No Finding": "1.0",
        "Edema": "0.0",  # the other labels are left as they were
        "Note": "a, quoted note",
    }
    # without the prefix no row matches; a CSV that is not a label file is left alone
    assert relabelled_csv(HEADER + "".join(rows), marked, "No Finding") is None
    assert relabelled_csv("name,value\na,1\n", marked, "No Finding") is None
    assert relabelled_csv("", marked, "No Finding") is None


def test_datalist_items_of_any_split_get_the_target_label_and_the_input_is_not_changed():
    datalist = {
        "labels": ["Edema", "No Finding"],
        "training": [{"image": "a.png", "label": [1.0, 0.0]}, {"image": "b.png", "label": [0.0, 0.0]}],
        "test": [{"image": "c.png", "label": [1.0, 0.0]}],
    }
    out = relabelled_datalist(datalist, {"a.png", "c.png"}, "No Finding")
    assert [item["label"] for item in out["training"]] == [[1.0, 1.0], [0.0, 0.0]]
    assert out["test"][0]["label"] == [1.0, 1.0] and datalist["training"][0]["label"] == [1.0, 0.0]
