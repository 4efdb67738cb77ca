"""`experiment.py compact`: unmarked release files become hard links to their sources, never a marked file, never a
byte changed, and never before the release's detectability (which reads inode numbers) is measured."""

import json
import subprocess
import sys
from pathlib import Path

from xmark_bundle.experiments.compaction import compact_releases, link_unmarked
from xmark_bundle.fileio import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def _release(out: Path, owner: int, complete: bool = True) -> Path:
    """A release of the phantoms under ``out`` for ``owner``: two byte copies and one marked file; its manifest."""
    source, release = out / "phantoms", out / "release" / "xmark" / f"owner{owner}"
    for name, content in (("train/a.png", b"a" * 5000), ("train/b.png", b"b" * 7000), ("train/c.png", b"c" * 3000)):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        if not (source / name).exists():
            (source / name).write_bytes(content)
        (release / name).parent.mkdir(parents=True, exist_ok=True)
        (release / name).write_bytes(content if name != "train/c.png" else b"C" * 3000)  # c is marked
    manifest = out / "models" / "xmark" / f"owner{owner}" / "release_manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    entry = {"dataset_dir": str(source), "release_dir": str(release), "generator_checkpoint": "g.pt"}
    manifest.write_text(json.dumps(entry | {"marked": [{"path": "train/c.png"}], "complete": complete}))
    return manifest


def test_unmarked_copies_become_links_and_the_first_owner_waits_for_its_detectability(tmp_path):
    out = tmp_path / "experiment"
    first, second, unfinished = _release(out, 201), _release(out, 202), _release(out, 203, complete=False)
    release = out / "release" / "xmark" / "owner202"
    before = {p: sha256_file(p) for p in sorted(release.rglob("*.png"))}

    dry = compact_releases(out, first_owner=201, dry_run=True)
    assert [row.get("linked") for row in dry] == [None, 2, None]  # 201 waits, 202: a and b, 203 unfinished
    assert "not measured yet" in dry[0]["skipped"] and dry[2]["skipped"] == "the release is unfinished"
    assert dry[1]["freed"] == 12000 and (release / "train/a.png").stat().st_nlink == 1  # nothing changed

    rows = compact_releases(out, first_owner=201)
    assert rows[1] == {"release": "models/xmark/owner202", "linked": 2, "freed": 12000}
    for name in ("train/a.png", "train/b.png"):
        assert (release / name).stat().st_ino == (out / "phantoms" / name).stat().st_ino
    assert (release / "train/c.png").stat().st_nlink == 1 and (release / "train/c.png").read_bytes() == b"C" * 3000
    assert {p: sha256_file(p) for p in sorted(release.rglob("*.png"))} == before  # not a byte changed
    assert not list(release.rglob("*.tmp"))
    assert compact_releases(out, first_owner=201)[1]["linked"] == 0  # linked already: nothing to do

    (first.parent / "detectability.json").write_text("{}")  # measured: the first owner's release may be linked now
    assert compact_releases(out, first_owner=201)[0]["linked"] == 2
    assert link_unmarked(second) == (0, 0)
    del unfinished


def test_the_command_reports_each_release_and_what_it_freed(tmp_path):
    out = tmp_path / "experiment"
    _release(out, 201)
    _release(out, 202)
    cmd = [sys.executable, "scripts/experiment.py", "compact", "comparison_v2", "--out", str(out)]  # first owner 201
    dry = subprocess.run([*cmd, "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith("[comparison_v2] models/xmark/owner201: skipped: its detectability")
    assert lines[1] == "[comparison_v2] models/xmark/owner202: 2 files, 0.00 GiB"
    assert lines[2].startswith("[comparison_v2] would free 0.00 GiB under ") and lines[2].endswith("(2 releases)")
    assert (out / "release/xmark/owner202/train/a.png").stat().st_nlink == 1  # a dry run links nothing
    done = subprocess.run([*cmd, "--without-detectability"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.count(": 2 files, ") == 2, done.stdout
    assert (out / "release/xmark/owner201/train/a.png").stat().st_nlink == 3  # the source and both releases
