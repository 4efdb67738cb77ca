"""Resumable stages of an experiment: each is a command a user could type, skipped when its output exists.

A stage prints one progress line before it runs (its number, name and command) and one when it is done, and records
its wall time in ``stage_times.json``, the commit it ran at in ``stage_commits.json`` and its command line in
``stage_commands.json`` of the experiment's folder, so a resumed run still reports what every part cost on this
machine and which code made it, and refuses an output that another command made (:class:`StageChanged`: a setting
changed after a stage ran, or two declarations sharing a folder disagree on a shared stage); a run reports the
times of the stages it visited only, so experiments that share a folder's common stages (the same data, watermarks
and suspects) each report their own. On Linux a Python stage runs in a forked copy of the runner, which has
imported torch, MONAI, Ignite and this package once (about 7 s a stage on this machine's two cores): the child runs
exactly the printed command line (``runpy``, as ``python -m`` or ``python script`` would) and exits, so nothing it
changes reaches the next stage. Elsewhere, or with ``XMARK_STAGE_SUBPROCESS=1``, each stage is a fresh interpreter.

Several runners may share a folder (two declarations with common stages, run side by side): a runner holds a lock on
a stage while it runs it (``.stage_locks/`` in the folder), so another that reaches the same stage waits for it and
then finds it done, and the record files are updated under a lock of their own, so no runner's record is lost.

A model whose every consumer has recorded its output may be discarded to save disk (``run --discard-tuned-models``):
:meth:`Stages.discard` replaces ``model.pt`` with ``model.pt.discarded.json`` (its SHA-256 and size), which counts as
the stage's output; a stage that still needs a discarded file stops and says how to make it again.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import json
import os
import pkgutil
import runpy
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xmark_bundle.fileio import sha256_file, write_json

__all__ = [
    "MIN_FREE_GB",
    "StageChanged",
    "StageFailed",
    "Stages",
    "bundle_cmd",
    "discarded",
    "run_command",
    "tree_commit",
]


def discarded(path: Path) -> Path:
    """The record that stands for ``path`` once :meth:`Stages.discard` removed it (``NAME.discarded.json``)."""
    return path.with_name(path.name + ".discarded.json")


#: Free space (GB) under the output folder below which a run stops before its next stage (``--min-free-gb``).
MIN_FREE_GB = 2.0

#: What :meth:`Stages.run_commits` counts for a stage done before its commit was recorded.
UNRECORDED = "unrecorded"


def tree_commit(root: Path) -> str:
    """The commit checked out at ``root``, ``-dirty`` when its working tree has changes ("unknown" without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


class StageFailed(RuntimeError):
    """A stage's command exited with an error; the message names the stage and the exit code."""


class StageChanged(StageFailed):
    """A stage's output exists but was made by another command line than the one this run would run."""


def _changes(recorded: Sequence[str], now: Sequence[str], most: int = 4) -> str:
    """What differs between two command lines, e.g. ``--max_epochs 12 -> --max_epochs 10``."""
    matcher = difflib.SequenceMatcher(a=list(recorded), b=list(now), autojunk=False)
    parts = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        # the option a changed value belongs to, or the token an insertion follows, as context on both sides
        context = 1 if i1 > 0 and j1 > 0 and (i1 == i2 or j1 == j2 or recorded[i1 - 1].startswith("--")) else 0
        before, after = " ".join(recorded[i1 - context : i2]), " ".join(now[j1 - context : j2])
        parts.append(f"{before or '(nothing)'} -> {after or '(nothing)'}")
    shown = "; ".join(parts[:most])
    return shown + (f"; and {len(parts) - most} more" if len(parts) > most else "")


@contextlib.contextmanager
def _locked(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block; print ``waiting`` first when
    another process holds it. Without ``fcntl`` (not POSIX), a no-op: one runner per folder there."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def bundle_cmd(run_id: str, configs: Sequence[str], **overrides: object) -> list[str]:
    """A ``python -m monai.bundle run`` command line for ``configs`` with ``--key value`` overrides."""
    config_arg = configs[0] if len(configs) == 1 else json.dumps(list(configs)).replace('"', "'")
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


class Stages:
    """Runs the stages of one experiment from ``root`` (the bundle root), keeping their wall times under ``out``."""

    def __init__(
        self, root: Path, out: Path, label: str, dry_run: bool = False, min_free_gb: float = MIN_FREE_GB
    ) -> None:
        self.root, self.out, self.label, self.dry_run = root, out, label, dry_run
        self.min_free_gb = min_free_gb
        self.times_file = out / "stage_times.json"
        self.times: dict[str, float] = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        self.commits_file = out / "stage_commits.json"
        self.commits: dict[str, str] = json.loads(self.commits_file.read_text()) if self.commits_file.is_file() else {}
        self.commands_file = out / "stage_commands.json"
        self.commands: dict[str, list[str]] = (
            json.loads(self.commands_file.read_text()) if self.commands_file.is_file() else {}
        )
        self._commands_read = self.commands_file.stat().st_mtime_ns if self.commands_file.is_file() else None
        self.visited: list[str] = []  # this run's stages, in order, done now or before
        self.planned: list[tuple[str, list[str]]] = []  # a dry run's stages still to run: (name, command)
        self.seen: dict[str, tuple[list[str], Path]] = {}  # this run's stages by name: command and output
        self.count = 0

    def _stage_lock(self, name: str) -> Path:
        return self.out / ".stage_locks" / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".lock")

    def _recorded(self, name: str) -> list[str] | None:
        """The command that made ``name``'s output, read again from the folder when it changed since (another runner
        may have run the stage)."""
        if name not in self.commands and self.commands_file.is_file():
            changed = self.commands_file.stat().st_mtime_ns
            if changed != self._commands_read:
                self.commands, self._commands_read = json.loads(self.commands_file.read_text()), changed
        return self.commands.get(name)

    def _check_done(self, name: str, cmd: Sequence[str], done: Path) -> None:
        recorded = self._recorded(name)  # none for a stage run before commands were recorded
        if recorded is not None and recorded != self._normal(cmd):
            raise StageChanged(
                f"stage '{name}': its output {self._where(done)} was made by another command than this run's "
                f"({_changes(recorded, self._normal(cmd))}), so it is not this declaration's result; run into a "
                "new output folder (a report on a new report seed), or remove that output to run the stage again"
            )

    def _record(self, name: str, seconds: float, commit: str, cmd: Sequence[str]) -> None:
        """Add a finished stage to the three record files, merged with what other runners wrote meanwhile."""
        with _locked(self.out / ".stage_records.lock"):
            for attr, file, value in (
                ("times", self.times_file, round(seconds, 1)),
                ("commits", self.commits_file, commit),
                ("commands", self.commands_file, self._normal(cmd)),
            ):
                current = json.loads(file.read_text()) if file.is_file() else {}
                current[name] = value
                write_json(file, current)
                setattr(self, attr, current)
        self._commands_read = self.commands_file.stat().st_mtime_ns

    def _where(self, path: Path) -> str:
        return str(path.relative_to(self.out) if path.is_relative_to(self.out) else path)

    def _normal(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as recorded: the interpreter as ``python``, this folder as ``<out>`` and the bundle root as
        ``<root>``, so that a worktree or a moved output folder runs the same recorded command."""
        out, root = str(self.out), str(self.root)
        normal = ["python" if i == 0 and arg == sys.executable else arg for i, arg in enumerate(cmd)]
        return [arg.replace(out, "<out>").replace(root, "<root>") for arg in normal]

    def run(
        self,
        name: str,
        cmd: list[str],
        done: Path,
        prepare: Callable[[], None] | None = None,
        needs: Sequence[Path] = (),
        finished: Callable[[Path], bool] | None = None,
    ) -> None:
        """Run ``cmd`` unless ``done`` exists or was discarded (a dry run lists it instead); raise :class:`StageFailed`
        naming the stage when it fails or when a file it ``needs`` was discarded, and a ``ValueError`` when a run names
        two different stages alike (their wall times would mix). ``finished`` tells a ``done`` file that an interrupted
        run left (e.g. a release manifest saying ``"complete": false``) from a finished one: the stage then runs again.
        The same stage asked for again in one run (e.g. a phantom set two pre-trainings share) is visited once.
        ``prepare`` (e.g. removing what an interrupted run of the stage left) runs just before the command, while
        this runner holds the stage, so it never touches a stage another runner is running."""
        if name in self.seen:
            if self.seen[name] != (cmd, done):
                raise ValueError(f"two different stages of {self.label} are both named {name!r}")
            return
        self.seen[name] = (cmd, done)
        self.count += 1
        self.visited.append(name)
        prefix = f"[{self.label} {self.count}] {name}"
        if self._done(done, finished):
            self._check_done(name, cmd, done)
            print(f"{prefix}: already done ({self._where(done)})", flush=True)
            return
        gone = [path for path in needs if not path.exists() and discarded(path).is_file()]
        if gone and not self.dry_run:
            raise StageFailed(
                f"stage '{name}' needs {self._where(gone[0])}, which a run with --discard-tuned-models discarded "
                f"({self._where(discarded(gone[0]))}); delete the folder {self._where(gone[0].parent)} to make it "
                "again, then rerun"
            )
        print(f"{prefix}: {'(dry run) ' if self.dry_run else ''}{shlex.join(cmd)}", flush=True)
        if self.dry_run:
            self.planned.append((name, cmd))
            return
        with _locked(self._stage_lock(name), f"{prefix}: another runner of {self.out} is running it; waiting"):
            if self._done(done, finished):  # the other runner finished it
                self._check_done(name, cmd, done)
                print(f"{prefix}: done by another runner ({self._where(done)})", flush=True)
                return
            self._check_free(name)
            if prepare is not None:
                prepare()
            start, commit = time.perf_counter(), tree_commit(self.root)
            returncode = run_command(cmd, self.root)
            if returncode != 0:
                raise StageFailed(f"stage '{name}' failed (exit code {returncode}); fix the error above and rerun")
            seconds = time.perf_counter() - start
            self._record(name, seconds, commit, cmd)
        print(f"{prefix}: done in {seconds:.0f} s", flush=True)

    def _check_free(self, name: str) -> None:
        """Stop before ``name`` when the disk under the output folder has less than ``min_free_gb`` free: a stage
        that runs out of space midway leaves half-written output, and other work (CI) may need the room."""
        free = shutil.disk_usage(self.out).free / 1e9
        if free < self.min_free_gb:
            raise StageFailed(
                f"stage '{name}' not started: {free:.1f} GB free under {self.out}, below --min-free-gb "
                f"{self.min_free_gb:g}; free space (or lower the floor), then rerun to resume"
            )

    @staticmethod
    def _done(done: Path, finished: Callable[[Path], bool] | None) -> bool:
        """Whether a stage's output is there and finished, or was made and then discarded."""
        return (done.exists() and (finished is None or finished(done))) or discarded(done).is_file()

    def discard(self, path: Path) -> None:
        """Replace the file ``path`` by ``path.discarded.json`` (its SHA-256 and size; written first, so an interrupted
        discard leaves the file): for a model whose consumers have all recorded their outputs. A dry run keeps it."""
        if self.dry_run or not path.is_file():
            return
        stat = path.stat()
        record = {"sha256": sha256_file(path), "bytes": stat.st_size, "discarded": datetime.now(UTC).isoformat()}
        write_json(discarded(path), record)
        path.unlink()

    def finish(self, collected: dict[str, Any], out: Path) -> dict[str, Any]:
        """Add this run's stage times and commits to ``collected``; a dry run adds the stages still to run, a real
        one writes ``collected.json`` under ``out``. Returns ``collected``."""
        collected["stage_times_s"] = self.run_times()
        collected["stage_commits"] = self.run_commits()
        if self.dry_run:
            collected["planned_stages"] = self.planned
        else:
            write_json(out / "collected.json", collected)
        return collected

    def run_commits(self) -> dict[str, int]:
        """How many of the stages this run visited ran at each commit (:data:`UNRECORDED`: before commits were kept)."""
        counts: dict[str, int] = {}
        for name in self.visited:
            if name in self.times or name in self.commits:
                commit = self.commits.get(name, UNRECORDED)
                counts[commit] = counts.get(commit, 0) + 1
        return dict(sorted(counts.items()))

    def run_times(self) -> dict[str, float]:
        """The recorded wall times (s) of the stages this run visited, whether it ran them or found them done."""
        return {name: self.times[name] for name in self.visited if name in self.times}


#: Modules every stage imports; the runner imports them once before its first forked stage.
PRELOAD = ("torch", "torchvision", "monai.bundle", "monai.transforms", "monai.engines", "ignite.engine", "scipy.stats")


def _forking() -> bool:
    return sys.platform == "linux" and not os.environ.get("XMARK_STAGE_SUBPROCESS")


@functools.cache
def _preload() -> None:
    """Import the stages' libraries and every module of this package into the runner (once)."""
    for name in PRELOAD:
        importlib.import_module(name)
    package = importlib.import_module("xmark_bundle")
    for info in pkgutil.walk_packages(package.__path__, "xmark_bundle."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency missing here: the stage that needs it imports (and fails) itself
            continue


def run_command(cmd: list[str], cwd: Path) -> int:
    """Run ``cmd`` from ``cwd`` and return its exit code: a ``python -m MODULE ...`` or ``python SCRIPT ...`` line
    in a forked child of this (preloaded) interpreter, anything else as a subprocess."""
    python = len(cmd) >= 3 and cmd[0] == sys.executable and (cmd[1] == "-m" or cmd[1].endswith(".py"))
    if not (python and _forking()):
        return subprocess.run(cmd, cwd=cwd).returncode
    _preload()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run the command line as the interpreter would, then leave without cleanup handlers
        code = 1
        try:
            os.chdir(cwd)
            if cmd[1] == "-m":
                sys.argv = [cmd[2], *cmd[3:]]
                sys.path.insert(0, str(cwd))
                runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)
            else:
                sys.argv = cmd[1:]
                sys.path.insert(0, str(Path(cmd[1]).resolve().parent))
                runpy.run_path(cmd[1], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            if isinstance(exit_.code, int) or exit_.code is None:
                code = exit_.code or 0
            else:
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - the child reports every failure as the interpreter would
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
