"""Outputs never land inside the data set, whatever path leads there: names, symbolic links and bind mounts."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xmark_bundle.locations import is_inside

ROOT = Path(__file__).resolve().parents[1]


def test_inside_by_name_link_and_not_yet_created(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    (data / "sub").mkdir(parents=True)
    other.mkdir()
    (tmp_path / "link").symlink_to(data)
    assert is_inside(data, data) and is_inside(data / "sub", data) and is_inside(data / "new" / "deeper", data)
    assert is_inside(tmp_path / "link" / "out", data)  # through a symbolic link
    assert not is_inside(other / "out", data) and not is_inside(tmp_path / "new", data)
    assert not is_inside(data, data / "sub") and not is_inside(data, tmp_path / "missing")
    assert is_inside(data, tmp_path)  # the folder that holds the data set


def _bind_mount_works(tmp_path: Path) -> bool:
    """Whether this machine lets an unprivileged user namespace bind-mount a folder (util-linux unshare)."""
    if shutil.which("unshare") is None:
        return False
    (tmp_path / "probe_a").mkdir()
    (tmp_path / "probe_b").mkdir()
    probe = f"mount --bind {tmp_path / 'probe_a'} {tmp_path / 'probe_b'}"
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe], capture_output=True)
    return done.returncode == 0


def test_a_bind_mount_of_the_source_is_recognised_by_inference_and_release(tmp_path):
    """The same folder mounted at a second place: outputs there would be written into the source."""
    if not _bind_mount_works(tmp_path):
        pytest.skip("no unprivileged bind mounts on this machine (unshare --user --mount)")
    data, alias = tmp_path / "data", tmp_path / "alias"
    data.mkdir()
    alias.mkdir()
    (data / "a.png").write_bytes(b"")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from xmark_bundle.data.screening import screen_inputs
        from xmark_bundle.locations import is_inside
        from xmark_bundle.release import ReleaseError, _check_locations
        data, alias = Path({str(data)!r}), Path({str(alias)!r})
        assert (alias / "a.png").exists() and is_inside(alias / "out", data) and is_inside(data, alias)
        try:
            screen_inputs(data, alias / "out", progress=False)
        except ValueError as err:
            print("inference:", err)
        try:
            _check_locations(data, alias / "release", Path("/nonexistent/m.json"), Path("/nonexistent/g.pt"))
        except ReleaseError as err:
            print("release:", err)
        """
    )
    (tmp_path / "check.py").write_text(script)
    command = f"mount --bind {data} {alias} && {sys.executable} {tmp_path / 'check.py'}"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"inference: output_dir {alias / 'out'} and dataset_dir {data} overlap" in done.stdout, done.stdout
    assert f"release: {alias / 'release'}: release_dir must lie outside the source data set" in done.stdout
    assert not (data / "out").exists() and not (data / "release").exists()
