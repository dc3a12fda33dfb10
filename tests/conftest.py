"""Shared fixtures. `make test` sets LOWBIT_OUTPUT_DIR to a temporary folder; when pytest is
run directly we set one here too, so tests never write over committed figures or caches."""
import os
import tempfile

import pytest
import torch

if not os.environ.get("LOWBIT_OUTPUT_DIR"):
    os.environ["LOWBIT_OUTPUT_DIR"] = tempfile.mkdtemp(prefix="lowbit-test-")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def out_dir(tmp_path, monkeypatch):
    """A private LOWBIT_OUTPUT_DIR for one test."""
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one torch thread is much faster than two on a shared 2-core machine
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
