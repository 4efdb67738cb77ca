"""Resumable stages of an experiment: each is a command a user could type, skipped when its output exists.

A stage prints one progress line before it runs (its number, name and command) and one when it is done, and records
its wall time in ``stage_times.json`` of the experiment's folder, so a resumed run still reports what every part
cost on this machine.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from xmark_bundle.fileio import write_json

__all__ = ["StageFailed", "Stages", "bundle_cmd"]


class StageFailed(RuntimeError):
    """A stage's command exited with an error; the message names the stage and the exit code."""


def bundle_cmd(run_id: str, configs: Sequence[str], **overrides: object) -> list[str]:
    """A ``python -m monai.bundle run`` command line for ``configs`` with ``--key value`` overrides."""
    config_arg = configs[0] if len(configs) == 1 else json.dumps(list(configs)).replace('"', "'")
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


class Stages:
    """Runs the stages of one experiment from ``root`` (the bundle root), keeping their wall times under ``out``."""

    def __init__(self, root: Path, out: Path, label: str) -> None:
        self.root, self.out, self.label = root, out, label
        self.times_file = out / "stage_times.json"
        self.times: dict[str, float] = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        self.count = 0

    def _where(self, path: Path) -> str:
        return str(path.relative_to(self.out) if path.is_relative_to(self.out) else path)

    def run(self, name: str, cmd: list[str], done: Path) -> None:
        """Run ``cmd`` unless ``done`` exists; raise :class:`StageFailed` naming the stage when it fails."""
        self.count += 1
        prefix = f"[{self.label} {self.count}] {name}"
        if done.exists():
            print(f"{prefix}: already done ({self._where(done)})", flush=True)
            return
        print(f"{prefix}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(cmd, cwd=self.root)
        if result.returncode != 0:
            raise StageFailed(f"stage '{name}' failed (exit code {result.returncode}); fix the error above and rerun")
        seconds = time.perf_counter() - start
        self.times[name] = round(seconds, 1)
        write_json(self.times_file, self.times)
        print(f"{prefix}: done in {seconds:.0f} s", flush=True)
