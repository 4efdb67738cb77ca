"""Atomic writes: a failed write leaves the previous file and no temporary behind."""

import json

import pytest

from xmark_bundle.fileio import atomic_path, write_json


def test_write_json_replaces_atomically(tmp_path):
    out = tmp_path / "d.json"
    write_json(out, {"training": [1]})
    with pytest.raises(TypeError):
        write_json(out, {"training": [object()]})  # not JSON-serialisable: the old file must survive
    assert json.loads(out.read_text()) == {"training": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_atomic_path_never_exposes_partial_output(tmp_path):
    out = tmp_path / "sub" / "x.bin"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        assert not out.exists()
        raise RuntimeError("interrupted")
    assert not out.exists() and list(out.parent.iterdir()) == []
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole"
