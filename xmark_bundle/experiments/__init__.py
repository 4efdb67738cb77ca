"""Experiment results: one ``results.json`` per experiment under ``docs/experiments/<name>/`` and the page
``docs/experiments.md`` generated from them (``scripts/experiments_page.py``, with ``--check``)."""

from .page import render_page
from .results import ResultsError, load_results, read_all_results

__all__ = ["ResultsError", "load_results", "read_all_results", "render_page"]
