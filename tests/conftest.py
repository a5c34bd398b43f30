"""Fixtures and helpers shared by the test modules (``from conftest import load_script``)."""
import importlib.util
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath, name):
    """A script of the repository (e.g. ``tools/benchmark.py``) imported as a fresh module.

    Args:
        relpath: the script's path relative to the repository root.
        name: the module's name; it is put in ``sys.modules`` (dataclasses look it up there).
    """
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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
