"""End-of-run summary of a watermarking run over a folder: written, skipped, and a non-zero exit when skipped."""

from __future__ import annotations

from ignite.engine import Engine, Events

from bundle.data.screening import ScreenedInputs

__all__ = ["InputSummary"]


class InputSummary:
    """At ``COMPLETED``: print how many files were written and skipped; exit with status 1 if any was skipped."""

    def __init__(self, inputs: ScreenedInputs, output_dir: str) -> None:
        self.inputs = inputs
        self.output_dir = output_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        written, skipped = len(self.inputs.readable), len(self.inputs.skipped)
        print(f"watermarked {written} file(s) into {self.output_dir}; skipped {skipped} unreadable file(s)")
        if skipped:
            raise SystemExit(
                f"{skipped} input file(s) could not be read and were skipped: " + ", ".join(self.inputs.skipped)
            )
