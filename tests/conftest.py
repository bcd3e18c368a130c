"""Test-session set-up: one torch thread per process.

The suite must pass on a busy 2-core machine. There, torch's default of one OpenMP thread per core
oversubscribes the CPU and its threads wait for each other: a tiny DiT training step measured
193 ms with 2 threads against 28.5 ms with 1 while two other CPU-bound processes ran. The models in
the tests are tiny, so one thread costs little on an idle machine. Subprocesses (notebooks, the
book build, the CLI) inherit OMP_NUM_THREADS=1 from here.
"""

import os


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402


torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def executed_cache(tmp_path_factory):
    """Where the notebooks' executed copies go: test_notebooks fills it, the book build reuses it."""
    return tmp_path_factory.getbasetemp() / "executed-notebooks"


def pytest_collection_modifyitems(config, items):
    """The book build last: by then every notebook has run once and sits in the shared cache."""
    items.sort(key=lambda item: item.path.name == "test_book.py")
