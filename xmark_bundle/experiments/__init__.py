"""Experiments: declarations (``configs/experiments/<name>.json``), the resumable runner (``scripts/experiment.py``),
one ``results.json`` per experiment under ``docs/experiments/<name>/`` and the page ``docs/experiments.md`` generated
from them (``scripts/experiments_page.py``, with ``--check``)."""

from .page import render_page
from .plan import Experiment, ExperimentError, Method, load_experiment
from .results import ResultsError, load_results, read_all_results
from .runner import run_experiment
from .tables import false_accusations, plain_words, tables

__all__ = [
    "Experiment",
    "ExperimentError",
    "Method",
    "ResultsError",
    "false_accusations",
    "load_experiment",
    "load_results",
    "plain_words",
    "read_all_results",
    "render_page",
    "run_experiment",
    "tables",
]
