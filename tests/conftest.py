"""Shared test setup."""

import importlib.util
import os

import pytest
import torch

#: tests with an ecosystem package that conflicts with the pinned environment (make test-monailabel and make
#: test-deploy build their own)
ECOSYSTEM = {"ecosystem/test_monailabel.py": "monailabel", "ecosystem/test_monai_deploy.py": "holoscan"}
collect_ignore = [test for test, package in ECOSYSTEM.items() if not importlib.util.find_spec(package)]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Small models on a shared 2-core CPU: one torch thread avoids OpenMP spin-waiting between tiny kernels."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the bundle runs a test starts, too (two test workers share 2 cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the quick demo (the longest file, minutes) first, so that the two `make test` workers end together."""
    items.sort(key=lambda item: item.path.name != "test_experiment_runner.py")  # stable: the rest keep their order
