#!/usr/bin/env python3
"""Install Detectron2 0.6 as a pure-Python distribution into the running Python.

Detectron2's authors publish no package on PyPI and its git source cannot be reached from
every machine. PyPI does carry a third-party upload of the 0.6 source (``pb1-detectron2``),
complete except for the C++/CUDA ops. This script:

1. leaves any importable detectron2 alone (for example a full build with compiled ops), unless
   it is an older build made by this script;
2. downloads the ``pb1-detectron2==0.6`` sdist with pip (a pinned pip, run from its wheel,
   because newer pips refuse that sdist's direct-URL extra);
3. takes only its ``detectron2/`` package, applies the small patches listed in ``PATCHES``
   (each must apply exactly once, or the script stops) and replaces the NumPy aliases that
   NumPy 1.24 / 2 removed (``np.int``, ``np.float``, ...; exact counts per file checked), and installs it as a distribution
   named ``detectron2`` version 0.6 (``pip uninstall detectron2`` removes it), with the
   model-zoo configs as package data.

Without ``detectron2._C``, what QueryInst needs (RoIAlign, NMS and box ops come from
torchvision) works; rotated boxes and deformable convolution raise ``RuntimeError`` naming
the missing ops, and ``COCOEvaluator`` uses pycocotools' own COCOeval.

Usage: ``python tools/install_detectron2.py [--cache DIR] [--force]``. Exit code 0 on success.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap

SDIST = "pb1-detectron2==0.6"
# The newest pip that still downloads this sdist: pip >= 26 rejects its metadata because the
# optional "all" extra names a direct URL (panopticapi on GitHub).
DOWNLOAD_PIP = "pip==25.0.1"
# Bump when PATCHES or the layout changes, so that older builds of this script get replaced.
BUILD_TAG = "queryinst-pure-python-3"
MARKER = "_queryinst_build.txt"

_COMPILED_OPS = '''\
"""Access to detectron2's compiled ops, or a clear error where they were not built.

Written by QueryInst's tools/install_detectron2.py: this detectron2 is the pure-Python
distribution of the 0.6 source, without the C++/CUDA extension ``detectron2._C``.
"""
try:
    from detectron2 import _C  # noqa: F401
    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    class _MissingCompiledOps:
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise RuntimeError(
                f"detectron2 compiled op '{name}' is not available: this detectron2 is the "
                "pure-Python install made by QueryInst's tools/install_detectron2.py, without "
                "the C++/CUDA extension detectron2._C. Rotated boxes, deformable convolution and "
                "the fast COCO evaluation need it. For a full build, install detectron2 from its "
                "source: https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
            )

    _C = _MissingCompiledOps()
'''

# (file inside detectron2/, old text, new text, why)
PATCHES = [
    (
        "data/transforms/transform.py",
        "interp=Image.LINEAR",
        "interp=Image.BILINEAR",
        "Pillow 10 removed Image.LINEAR (an alias of BILINEAR); detectron2 main made the same change",
    ),
    (
        "model_zoo/model_zoo.py",
        "import pkg_resources\n",
        "import importlib.resources\n",
        "setuptools >= 81 no longer ships pkg_resources",
    ),
    (
        "model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'cfg_file = str(importlib.resources.files("detectron2.model_zoo") / "configs" / config_path)',
        "same as above",
    ),
    (
        "evaluation/coco_evaluation.py",
        "        self._use_fast_impl = use_fast_impl\n",
        "        from detectron2._compiled_ops import AVAILABLE as _has_compiled_ops\n\n"
        "        if use_fast_impl and not _has_compiled_ops:\n"
        "            self._logger.info(\"detectron2._C is missing: using pycocotools' COCOeval\")\n"
        "        self._use_fast_impl = use_fast_impl and _has_compiled_ops\n",
        "the fast evaluator is C++; fall back to pycocotools' official COCOeval",
    ),
    (
        "export/__init__.py",
        "from .api import *\n",
        "import importlib.util as _importlib_util\n\n"
        "if _importlib_util.find_spec(\"caffe2\") is not None:\n"
        "    from .api import *\n",
        "the Caffe2 export API needs caffe2, which PyTorch 2 no longer ships; without this guard "
        "TracingAdapter (and so detectron2.utils.analysis, FLOP counting) cannot be imported",
    ),
    (
        "layers/nms.py",
        "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)\n",
        "    from detectron2._compiled_ops import _C\n\n"
        "    _C.nms_rotated  # raises a clear RuntimeError without the extension\n"
        "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)\n",
        "the op is registered by detectron2._C; without it torch raises a bare AttributeError",
    ),
] + [
    (
        path,
        "from detectron2 import _C\n",
        "from detectron2._compiled_ops import _C\n",
        "import works without the extension; calling an op raises a clear RuntimeError",
    )
    for path in (
        "layers/deform_conv.py",
        "layers/roi_align_rotated.py",
        "layers/rotated_boxes.py",
        "evaluation/fast_eval_api.py",
    )
]

# NumPy removed the aliases np.int, np.float, np.str (1.24) and np.bool (1.24; 2.0 brought it
# back); they always meant the Python builtins, which is what detectron2's main branch uses now.
# Without this, print_instances_class_histogram raises AttributeError, which detectron2 0.6
# swallows: the class histogram silently disappears from training logs. Regex: the alias not
# followed by a word character (np.int64, np.float32 are left alone).
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|bool|str)(?!\w)")
# file -> the exact number of aliases in the 0.6 source (any other count stops the script).
NUMPY_ALIAS_COUNTS = {
    "data/build.py": 2,  # print_instances_class_histogram
    "data/datasets/pascal_voc.py": 1,
    "evaluation/pascal_voc_evaluation.py": 2,
    "evaluation/sem_seg_evaluation.py": 7,
    "structures/masks.py": 3,
    "utils/visualizer.py": 3,
    "utils/video_visualizer.py": 1,
}

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "detectron2"
version = "0.6"
description = "Detectron2 0.6 (FAIR), pure-Python build without compiled ops, made by QueryInst's tools/install_detectron2.py"
license = {text = "Apache-2.0"}
requires-python = ">=3.8"
dependencies = [
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8",
    "tabulate", "cloudpickle", "tqdm>4.29.0", "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1", "hydra-core>=1.1", "tensorboard", "packaging",
]

[tool.setuptools.packages.find]
include = ["detectron2*"]

[tool.setuptools.package-data]
"detectron2.model_zoo" = ["configs/**/*.yaml", "configs/**/*.py"]
"detectron2" = ["%s"]
""" % MARKER


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    """Run a command, raising ``SystemExit`` with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def existing_detectron2() -> tuple[str | None, str | None]:
    """Return (location, build tag) of an importable detectron2, or (None, None).

    The check runs in a subprocess so that a broken install cannot break this script.
    """
    code = textwrap.dedent(
        f"""
        import os, detectron2, detectron2.modeling, detectron2.data
        d = os.path.dirname(detectron2.__file__)
        m = os.path.join(d, {MARKER!r})
        print(d); print(open(m).read().strip() if os.path.exists(m) else "")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, None
    location, tag = (proc.stdout.strip().splitlines() + [""])[:2]
    return location, tag


def download_sdist(cache: str) -> str:
    """Download the detectron2 0.6 source upload into ``cache``; return the sdist path."""
    found = glob.glob(os.path.join(cache, "pb1-detectron2-0.6.tar.gz"))
    if found:
        return found[0]
    os.makedirs(cache, exist_ok=True)
    pip_dir = os.path.join(cache, "pip")
    if not glob.glob(os.path.join(pip_dir, "pip-*.whl")):
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", pip_dir, DOWNLOAD_PIP])
    pip_wheel = glob.glob(os.path.join(pip_dir, "pip-*.whl"))[0]
    log(f"downloading {SDIST} (its setup.py imports torch: torch must be installed)")
    env = dict(os.environ, PYTHONPATH=pip_wheel)  # run pip from its wheel, as pip supports
    run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation",
         "--no-binary", ":all:", "-d", cache, SDIST],
        env=env,
    )
    return glob.glob(os.path.join(cache, "pb1-detectron2-0.6.tar.gz"))[0]


def apply_patches(pkg_dir: str) -> None:
    """Apply ``PATCHES`` and the NumPy alias fixes to the extracted ``detectron2/`` package.

    Each patch must match exactly once and each file must hold exactly the listed number of
    NumPy aliases (``NUMPY_ALIAS_COUNTS``), else ``SystemExit`` names the file: a patch never
    applies to a source it was not written for.
    """
    for rel, old, new, why in PATCHES:
        path = os.path.join(pkg_dir, rel)
        with open(path) as f:
            text = f.read()
        if text.count(old) != 1:
            raise SystemExit(f"patch for {rel} ({why}) does not apply: source changed?")
        with open(path, "w") as f:
            f.write(text.replace(old, new))
    patch_numpy_aliases(pkg_dir)
    with open(os.path.join(pkg_dir, "_compiled_ops.py"), "w") as f:
        f.write(_COMPILED_OPS)
    with open(os.path.join(pkg_dir, MARKER), "w") as f:
        f.write(BUILD_TAG + "\n")


def patch_numpy_aliases(pkg_dir: str, counts: dict[str, int] = NUMPY_ALIAS_COUNTS) -> None:
    """Replace ``np.int``/``np.float``/``np.bool``/``np.str`` by the builtins, in place.

    Args:
        pkg_dir: the extracted ``detectron2/`` package.
        counts: file (relative to ``pkg_dir``) -> the exact number of aliases it must hold.

    Raises:
        SystemExit: naming the file whose count differs (nothing is written for it).
    """
    for rel, expected in counts.items():
        path = os.path.join(pkg_dir, rel)
        with open(path) as f:
            text, count = NUMPY_ALIAS.subn(r"\1", f.read())
        if count != expected:
            raise SystemExit(
                f"NumPy alias patch for {rel} found {count} aliases, expected {expected}: "
                "source changed?"
            )
        with open(path, "w") as f:
            f.write(text)


def build_and_install(sdist: str) -> None:
    """Extract ``detectron2/`` from the sdist, patch it and pip-install it as ``detectron2``."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/detectron2/" in m.name]
            # the "data" filter refuses absolute paths and links out of tmp (Python >= 3.11.4)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kwargs)
        (top,) = os.listdir(tmp)
        src = os.path.join(tmp, "src")
        shutil.move(os.path.join(tmp, top), src)
        apply_patches(os.path.join(src, "detectron2"))
        with open(os.path.join(src, "pyproject.toml"), "w") as f:
            f.write(PYPROJECT)
        log("installing detectron2 0.6 (pure Python)")
        run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", src])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = os.path.join(
        os.environ.get("QUERYINST_CACHE", os.path.expanduser("~/.cache/queryinst")), "packages"
    )
    parser.add_argument("--cache", default=default_cache, help="download cache directory")
    parser.add_argument("--force", action="store_true", help="reinstall even if one works")
    args = parser.parse_args(argv)

    location, tag = existing_detectron2()
    if location and not args.force:
        if not tag:
            log(f"using the detectron2 already installed at {location} (left untouched)")
            return 0
        if tag == BUILD_TAG:
            log(f"detectron2 pure-Python build {tag} already installed at {location}")
            return 0
        log(f"replacing older pure-Python build {tag} at {location}")
    build_and_install(download_sdist(args.cache))
    location, tag = existing_detectron2()
    if tag != BUILD_TAG:
        raise SystemExit("detectron2 was installed but does not import; see the output above")
    log(f"detectron2 installed at {location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
