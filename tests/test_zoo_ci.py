"""The MONAI model zoo's CI steps before it verifies a bundle: its large-file download and its pre-commit hooks.

Download: the zoo's CI (Project-MONAI/model-zoo, ``ci/utils.py``'s ``download_large_files``) and MONAI's own
``monai.bundle.download_large_files`` read ``large_files.yml`` and call ``monai.apps.download_url`` for each entry,
which checks ``hash_val``. Here it runs on a copy of ``large_files.yml`` whose url points at a local ``http.server``
on 127.0.0.1 serving a fresh build of ``scripts/make_model_zoo_model.py``: the md5 in ``large_files.yml`` must be what
the script writes now.

Pre-commit: the zoo's ``.pre-commit-config.yaml`` runs pre-commit-hooks v5.0.0, among them ``pretty-format-json``
(``--autofix --no-sort-keys --indent=4``) and ``check-docstring-first`` on every file of a bundle. The package is not
in this environment (requirements-dev.txt lists it for later), so both checks are written here after the hooks'
definitions: a JSON file must equal ``json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\\n"`` with its key
order kept; a Python file must have no string token in column 0 after code or after a first such string.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import tokenize
from pathlib import Path

import pytest
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser, download_large_files

ROOT = Path(__file__).resolve().parents[1]
#: Tokens that are not code for check-docstring-first.
_NON_CODE = {tokenize.COMMENT, tokenize.ENDMARKER, tokenize.NEWLINE, tokenize.NL, tokenize.ENCODING}


def docstring_not_first(source: bytes) -> str | None:
    """check-docstring-first: why ``source`` fails (a column-0 string after code or after another one), else None."""
    docstring_line = code_line = None
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type == tokenize.STRING and token.start[1] == 0:
            if docstring_line is not None:
                return f"{token.start[0]}: Multiple module docstrings (first docstring on line {docstring_line})"
            if code_line is not None:
                return f"{token.start[0]}: Module docstring appears after code (code seen on line {code_line})"
            docstring_line = token.start[0]
        elif token.type not in _NON_CODE and code_line is None:
            code_line = token.start[0]
    return None


def pretty_json(text: str) -> str:
    """pretty-format-json with the zoo's arguments (--no-sort-keys --indent=4; ASCII escapes as by default)."""
    return json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n"


def repository_files() -> list[Path]:
    """What pre-commit runs on: the files git tracks (``--all-files``)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def is_python(path: Path) -> bool:
    """identify's ``python`` tag: a .py file, or an executable file whose shebang names python."""
    if path.suffix in (".py", ".pyi"):
        return True
    if path.suffix or not os.access(path, os.X_OK):
        return False
    with open(path, "rb") as stream:
        first = stream.readline()
    return first.startswith(b"#!") and b"python" in first


def test_the_two_hook_checks_flag_what_the_hooks_flag():
    assert docstring_not_first(b'"""Module."""\nX = 1\n"""Attribute doc."""\n').startswith("3: Multiple")
    assert docstring_not_first(b'import os\n"""Late."""\n').startswith("2: Module docstring appears after code")
    assert docstring_not_first(b'"""Module."""\n\n\ndef f():\n    """Indented: fine."""\n') is None
    assert pretty_json('{"b": 1, "a": [1, 2]}') == '{\n    "b": 1,\n    "a": [\n        1,\n        2\n    ]\n}\n'
    assert pretty_json('{"x": "\u00e9"}') == '{\n    "x": "\\u00e9"\n}\n'


def test_every_json_file_is_as_pretty_format_json_writes_it():
    files = [p for p in repository_files() if p.suffix == ".json"]
    assert len(files) >= 40 and any(p.name == "results.json" for p in files)
    unformatted = [str(p.relative_to(ROOT)) for p in files if (text := p.read_text("utf-8")) != pretty_json(text)]
    assert not unformatted, f"pretty-format-json --indent=4 would rewrite: {unformatted}"


def test_every_python_file_has_its_docstring_first():
    files = [p for p in repository_files() if is_python(p)]
    assert len(files) >= 100
    failing = [f"{p.relative_to(ROOT)}:{why}" for p in files if (why := docstring_not_first(p.read_bytes()))]
    assert not failing, f"check-docstring-first fails: {failing}"


def test_the_hooks_themselves_agree_when_installed():
    """With pre-commit-hooks installed (requirements-dev.txt), the hooks' own entry points pass on the repository."""
    check_docstring_first = pytest.importorskip("pre_commit_hooks.check_docstring_first")
    pretty_format_json = pytest.importorskip("pre_commit_hooks.pretty_format_json")
    files = repository_files()
    jsons = [str(p) for p in files if p.suffix == ".json"]
    assert pretty_format_json.main(["--no-sort-keys", "--indent=4", *jsons]) == 0  # no --autofix: report only
    assert check_docstring_first.main([str(p) for p in files if is_python(p)]) == 0


def test_published_results_are_written_as_the_formatter_leaves_them(tmp_path):
    """The publisher (xmark_bundle.experiments.results.write_results) writes what pretty-format-json keeps."""
    from xmark_bundle.experiments.results import load_results, write_results

    published = ROOT / "docs" / "experiments" / "table1" / "results.json"
    results = json.loads(published.read_text())
    (tmp_path / "table1").mkdir()
    for figure in results.get("figures", []):
        shutil.copyfile(published.parent / figure, tmp_path / "table1" / figure)
    written = write_results(tmp_path / "table1" / "results.json", results)
    text = (tmp_path / "table1" / "results.json").read_text()
    assert text == pretty_json(text) == published.read_text() and written == load_results(published)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A fresh build of the zoo's models/model.pt (scripts/make_model_zoo_model.py, default settings)."""
    out = tmp_path_factory.mktemp("zoo_build") / "model.pt"
    done = subprocess.run(
        [sys.executable, "scripts/make_model_zoo_model.py", "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def local_server(tmp_path, monkeypatch):
    """An http.server on 127.0.0.1 serving ``tmp_path / 'served'``; yields (folder, base url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # the request must reach the loopback server itself
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _bundle_copy(tmp_path: Path, url: str) -> Path:
    """A bundle folder holding a copy of large_files.yml with only the url changed."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    listed = yaml.safe_load((ROOT / "large_files.yml").read_text())
    (entry,) = listed["large_files"]
    assert entry["path"] == "models/model.pt" and entry["hash_type"] == "md5" and len(entry["hash_val"]) == 32
    listed["large_files"][0] = entry | {"url": url}
    (bundle / "large_files.yml").write_text(yaml.safe_dump(listed, sort_keys=False))
    return bundle


def test_the_zoo_download_step_fetches_the_stand_in_and_checks_its_md5(stand_in, local_server, tmp_path):
    served, base = local_server
    shutil.copyfile(stand_in, served / "model.pt")
    bundle = _bundle_copy(tmp_path, f"{base}/model.pt")
    download_large_files(bundle_path=str(bundle))  # what `python -m monai.bundle download_large_files` runs
    fetched = bundle / "models" / "model.pt"
    expected = ConfigParser.load_config_file(ROOT / "large_files.yml")["large_files"][0]["hash_val"]
    assert hashlib.md5(fetched.read_bytes()).hexdigest() == expected
    assert fetched.read_bytes() == stand_in.read_bytes()


def test_the_zoo_download_step_refuses_a_file_with_another_md5(stand_in, local_server, tmp_path):
    served, base = local_server
    damaged = bytearray(stand_in.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    (served / "model.pt").write_bytes(bytes(damaged))
    bundle = _bundle_copy(tmp_path, f"{base}/model.pt")
    with pytest.raises(HashCheckError, match="md5 hash check of downloaded file failed"):
        download_large_files(bundle_path=str(bundle))


@pytest.mark.parametrize("name", ["large_files.yml", "scripts/make_model_zoo_model.py", "README.md", "docs/README.md"])
def test_one_documented_way_to_make_the_deploy_model_ts(name):
    """MONAI Deploy's operator needs the deploy.json that scripts/export_deploy.py embeds; a plain ckpt_export's
    model.ts fails there ("Failed to extract content for these config(s): ['deploy']"). The files that tell how to
    make the Deploy model.ts name the script, and the zoo's own ckpt_export command, where shown, says it is not it."""
    text = (ROOT / name).read_text(encoding="utf-8")
    assert "scripts/export_deploy.py" in text
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if "ckpt_export network_def" in line and "model.ts" in line:
            context = " ".join(lines[max(0, number - 2) : number])
            assert "Not for MONAI Deploy" in context, f"{name}:{number + 1} offers plain ckpt_export without saying so"
