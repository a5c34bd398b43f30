"""Fixtures and helpers shared by the test modules (``from conftest import load_script``)."""
import importlib.util
import os
import shutil
import subprocess
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


def run_together(cmds, env, timeout):
    """Start every command at once (e.g. the machines of one distributed job), wait for all,
    and assert that each exited with 0 (its stderr's end in the message)."""
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module", autouse=True)
def _remove_module_temp_dirs(tmp_path_factory):
    """Delete the folders a module's fixtures made with ``tmp_path_factory.mktemp`` when the
    module ends.

    pytest keeps them until the session ends, and the checkpoints in them add up to about
    10 GB over the suite: CI once ran out of disk in ``torch.save``. Folders of single tests
    (named after the test, ``test_*``) are left to ``tmp_path_retention_policy = failed``
    in setup.cfg, which keeps those of failed tests for debugging.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for path in set(base.iterdir()) - before:
        if not path.name.startswith("test_"):
            shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="session")
def stardist_arrays():
    """(image, labels) of the bundled nuclei source, read straight from the cached stardist
    wheel (not via the converters under test)."""
    import io
    import zipfile

    import tifffile

    from queryinst.data import bundled_sources as src
    from queryinst.data import download_package

    wheel = download_package(src.STARDIST, pip_args=src.STARDIST_PIP_ARGS)
    with zipfile.ZipFile(wheel) as zf:
        image = tifffile.imread(io.BytesIO(zf.read("stardist/data/images/img2d.tif")))
        labels = tifffile.imread(io.BytesIO(zf.read("stardist/data/images/mask2d.tif")))
    return image, labels


def uncompressed_rle(mask):
    """Uncompressed COCO RLE written from its definition (independent of pycocotools):
    run lengths of the column-major pixels, starting with a run of zeros (the format of
    many YouTube-VIS GT files). ``mask``: (H, W) array of {0, 1}."""
    import numpy as np

    flat = np.asarray(mask).flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(np.asarray(mask).shape), "counts": [int(c) for c in counts]}
