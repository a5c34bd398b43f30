#!/usr/bin/env python
"""Output parity with MMDetection 3.3.0's QueryInst (the reference), from a fresh clone.

Run from the project's venv. For each ``--variant`` (100 and 300 queries by default):

1. sets up the reference once (``tools/reference/setup.sh``: MMDetection 3.3.0, mmengine
   0.10.7 and mmcv-lite 2.2.0 on the CPU, in a venv of its own, from the package index;
   ``$QUERYINST_REFERENCE_VENV``, default ``$QUERYINST_CACHE/mmdet_reference`` =
   ``~/.cache/queryinst/mmdet_reference``; torch pinned to this venv's version unless
   ``$QUERYINST_REFERENCE_TORCH`` says otherwise);
2. runs the reference in a subprocess (``tools/reference/mmdet_queryinst.py``): random but
   fully exercised weights saved as an official-layout checkpoint, and its outputs on
   ``--image`` (default: the Grace Hopper photo of matplotlib's sample data);
3. runs ``tools/parity_check.py`` on them: our model loads the same checkpoint through the
   converter, takes the reference's preprocessed input and is compared tensor by tensor.

Exits 0 only if every variant passes; 1 if one fails; 2 on a usage or set-up error.

    python tools/reference_check.py [--image photo.jpg] [--variant 100 300] [--out-dir DIR]

The files (a 660 MiB checkpoint and 240-390 MiB of arrays per variant) go to a temporary
directory removed at the end, unless ``--out-dir`` keeps them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qi_bench.reference import (  # noqa: E402
    VARIANTS,
    ReferenceError,
    default_image,
    default_venv,
    reference_command,
    reference_python,
    run_reference,
    setup_reference,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=None,
                   help="photo to run on (default: matplotlib's sample grace_hopper.jpg)")
    p.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="numbers of queries to check (default: both)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference's random weights")
    p.add_argument("--threads", type=int, default=2, help="torch threads of both sides")
    p.add_argument("--out-dir", default=None,
                   help="keep the checkpoints and arrays here (default: a temporary directory)")
    p.add_argument("--venv", default=None,
                   help="the reference's venv (default: $QUERYINST_REFERENCE_VENV or "
                        "$QUERYINST_CACHE/mmdet_reference)")
    p.add_argument("--no-setup", action="store_true",
                   help="do not run tools/reference/setup.sh; the venv must exist")
    p.add_argument("--rtol", type=float, default=None, help="passed to tools/parity_check.py")
    p.add_argument("--min-iou", type=float, default=None, help="passed to tools/parity_check.py")
    args = p.parse_args(argv)
    if args.image is not None and not os.path.isfile(args.image):
        p.error(f"--image {args.image}: no such file")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"--out-dir {args.out_dir} exists and is not a directory")
    return args


def check_variant(python: str, variant: str, args, out_dir: str) -> bool:
    """Run the reference for ``variant`` and the parity check on its outputs."""
    import parity_check  # beside this script

    ckpt = os.path.join(out_dir, f"reference_{variant}.pth")
    dump = os.path.join(out_dir, f"reference_{variant}.npz")
    print(f"\n=== {variant} queries: MMDetection 3.3.0 reference ===", flush=True)
    start = time.perf_counter()
    run_reference(reference_command(python, variant, ckpt, seed=args.seed, threads=args.threads,
                                    image=args.image, dump=dump))
    print(f"(reference: {time.perf_counter() - start:.0f} s)\n=== {variant} queries: "
          "parity check ===", flush=True)
    opts = ["--reference-npz", dump, "--ckpt", ckpt, "--variant", variant,
            "--threads", str(args.threads)]
    if args.rtol is not None:
        opts += ["--rtol", str(args.rtol)]
    if args.min_iou is not None:
        opts += ["--min-iou", str(args.min_iou)]
    return parity_check.main(opts) == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.image = args.image or default_image()
    try:
        venv = args.venv or default_venv()
        python = reference_python(venv) if args.no_setup else setup_reference(venv)
        with tempfile.TemporaryDirectory(prefix="queryinst_reference_") as tmp:
            out_dir = args.out_dir or tmp
            os.makedirs(out_dir, exist_ok=True)
            results = {v: check_variant(python, v, args, out_dir) for v in args.variant}
    except ReferenceError as e:
        print(f"reference_check.py: error: {e}", file=sys.stderr)
        return 2
    print("\n" + "\n".join(f"{v} queries: {'PASS' if ok else 'FAIL'}" for v, ok in results.items()))
    if args.out_dir:
        print(f"files kept in {args.out_dir}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
