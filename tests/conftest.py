"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's models on one intra-op thread, restoring the setting afterwards.

    The test models and tensors are small: threads gain nothing, and on a busy 2-core
    machine OpenMP threads waiting for each other made test_model.py ~7x slower (68 s
    against 9 s) and stacking masks in test_dataset_mapper.py ~50x slower. Restoring also
    undoes ``torch.set_num_threads`` calls made by the code under test (tools/benchmark.py).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
