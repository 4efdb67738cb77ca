"""The journal and end-of-run summary of a watermarking run over a folder (configs/inference.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ignite.engine import Engine, Events

from xmark_bundle.data.screening import JOURNAL_NAME, ScreenedInputs
from xmark_bundle.fileio import sha256_file

__all__ = ["InferenceJournal"]


class InferenceJournal:
    """After each iteration, append every written file to the output folder's journal (flushed and fsynced), so a
    rerun skips it; at ``COMPLETED``, print the counts; :meth:`finish` (the config's last ``run`` step) exits with
    status 1 if unreadable files were skipped.

    ``output_key`` names the per-sample report of :class:`~xmark_bundle.transforms.watermark.SaveWatermarkedd`.
    """

    def __init__(self, inputs: ScreenedInputs, output_key: str = "watermark") -> None:
        self.inputs = inputs
        self.output_key = output_key
        self.written = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.summarise)

    def record(self, engine: Engine) -> None:
        """Journal the files this iteration wrote."""
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        lines = []
        for item in items:
            report = item.get(self.output_key)
            if report is None:  # saving switched off (save_watermarked false): nothing to journal
                continue
            if "unwritable" in report:  # read, but cannot be written back: skipped like an unreadable file
                source = Path(report["source"]).resolve()
                relative = source.relative_to(self.inputs.dataset_dir).as_posix()
                self.inputs.skipped[relative] = report["unwritable"]
                print(f"skipped: {report['unwritable']}")
                continue
            relative = Path(report["path"]).relative_to(self.inputs.output_dir).as_posix()
            lines.append(
                {
                    "path": relative,
                    "source_sha256": sha256_file(report["source"]),
                    "output_sha256": sha256_file(report["path"]),
                    "generator_sha256": self.inputs.generator_sha256,
                    **(
                        {}
                        if self.inputs.sop_instance_uid is None
                        else {"sop_instance_uid": self.inputs.sop_instance_uid}
                    ),
                }
            )
        self.inputs.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.inputs.output_dir / JOURNAL_NAME, "a", encoding="utf-8") as stream:
            stream.writelines(json.dumps(line) + "\n" for line in lines)
            stream.flush()
            os.fsync(stream.fileno())
        self.written += len(lines)

    def summarise(self, engine: Engine) -> None:
        """Print written / unchanged / skipped (at ``COMPLETED``; :meth:`finish` sets the exit status after the run)."""
        print(
            f"watermarked {self.written} file(s) into {self.inputs.output_dir}; {len(self.inputs.unchanged)} "
            f"already written by an earlier run with this checkpoint; skipped {len(self.inputs.skipped)} file(s) that "
            "could not be read or written back"
        )

    def finish(self) -> None:
        """After the engine has returned: a run that skipped files ends with exit status 1 and their names.

        Raised here, not in an engine handler, where Ignite would log it as "Engine run is terminating due to
        exception" with a traceback, and a user would read a finished run as a crash.
        """
        skipped = self.inputs.skipped
        if skipped:
            problem = f"{len(skipped)} input file(s) could not be read or written back and were skipped"
            raise SystemExit(f"{problem}: {', '.join(skipped)}")
