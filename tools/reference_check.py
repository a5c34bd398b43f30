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
import json
import os
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
SETUP = os.path.join(TOOLS, "reference", "setup.sh")
SCRIPT = os.path.join(TOOLS, "reference", "mmdet_queryinst.py")
VARIANTS = ("100", "300")


class ReferenceError(RuntimeError):
    """The reference could not be set up or run; the message says why and what to do."""


def default_venv() -> str:
    """``$QUERYINST_REFERENCE_VENV``, else ``$QUERYINST_CACHE/mmdet_reference`` (the cache
    defaulting to ``~/.cache/queryinst``): where tools/reference/setup.sh puts the venv."""
    if os.environ.get("QUERYINST_REFERENCE_VENV"):
        return os.environ["QUERYINST_REFERENCE_VENV"]
    from queryinst.data.package_files import cache_root  # the project's one cache root

    return os.path.join(cache_root(), "mmdet_reference")


def reference_python(venv: str) -> str:
    """The reference venv's interpreter.

    Raises:
        ReferenceError: if ``venv`` has none (not set up yet), naming the command that does it.
    """
    python = os.path.join(venv, "bin", "python")
    if not os.access(python, os.X_OK):
        raise ReferenceError(
            f"no reference venv at {venv} (no bin/python): set it up with "
            f"'bash tools/reference/setup.sh' (QUERYINST_REFERENCE_VENV={venv}), or run "
            "without --no-setup"
        )
    return python


def torch_requirement() -> str:
    """pip requirements pinning the reference's torch and torchvision to this venv's
    versions (local labels such as ``+cpu`` dropped): both then run the same kernels."""
    import torch
    import torchvision

    def public(version):
        return str(version).split("+")[0]

    return f"torch=={public(torch.__version__)} torchvision=={public(torchvision.__version__)}"


def setup_reference(venv: str | None = None, quiet: bool = False) -> str:
    """Run tools/reference/setup.sh (a no-op when done) and return the reference's python.

    Args:
        venv: the venv's directory (default: ``default_venv()``).
        quiet: hide the script's output unless it fails.

    Raises:
        ReferenceError: if the script fails (e.g. the package index is unreachable); the
            message ends with the script's own error.
    """
    venv = venv or default_venv()
    env = dict(os.environ, QUERYINST_REFERENCE_VENV=venv)
    env.setdefault("QUERYINST_REFERENCE_TORCH", torch_requirement())
    proc = subprocess.run(["bash", SETUP], env=env, text=True,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None)
    if proc.returncode != 0:
        tail = (proc.stdout or "").strip().splitlines()[-15:]
        raise ReferenceError("tools/reference/setup.sh failed" + (
            ":\n" + "\n".join(tail) if tail else " (its error is above)"))
    return reference_python(venv)


def reference_command(python: str, variant: str, checkpoint: str, *, seed: int = 0,
                      threads: int = 2, image: str | None = None, dump: str | None = None,
                      aux: bool = True, serve: str | None = None) -> list[str]:
    """The command line of tools/reference/mmdet_queryinst.py (see its docstring).

    Raises:
        ValueError: for a variant other than "100" / "300", or ``dump`` without ``image``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: the reference has {', '.join(VARIANTS)} queries")
    if dump and not image:
        raise ValueError("dump needs image")
    cmd = [python, SCRIPT, "--variant", variant, "--seed", str(seed), "--threads", str(threads),
           "--checkpoint", checkpoint]
    if image:
        cmd += ["--image", image]
    if dump:
        cmd += ["--dump", dump] + ([] if aux else ["--no-aux"])
    if serve:
        cmd += ["--serve", serve]
    return cmd


def run_reference(cmd: list[str]) -> None:
    """Run the reference to completion (its log on stderr).

    Raises:
        ReferenceError: on a non-zero exit.
    """
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise ReferenceError(f"the reference exited with {proc.returncode}: {' '.join(cmd)}")


class ReferenceServer:
    """The reference held in a subprocess that runs one inference per ``infer()`` call.

    What ``tools/benchmark.py --reference`` times: the process builds the model, writes
    ``checkpoint`` and loads ``images_npy`` (uint8 (B, 3, H, W) BGR, run without resize),
    then waits. ``infer()`` returns once the reference has run ``model.test_step`` on that
    batch (normalisation, padding, forward, mask pasting), so wall time around it is the
    reference's inference plus a pipe round trip (well under a millisecond).

    Args:
        python: the reference venv's interpreter.
        variant: "100" or "300".
        checkpoint: where the reference writes its official-layout weights.
        images_npy: the batch.
        seed, threads: as tools/reference/mmdet_queryinst.py takes them.

    Raises:
        ReferenceError: if the process exits or answers something unexpected.
    """

    def __init__(self, python: str, variant: str, checkpoint: str, images_npy: str,
                 seed: int = 0, threads: int = 2):
        cmd = reference_command(python, variant, checkpoint, seed=seed, threads=threads,
                                serve=images_npy)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        try:
            self.ready = self._reply()
            if not self.ready.get("ready"):
                raise ReferenceError(f"the reference did not start: {self.ready}")
        except BaseException:
            self.close()
            raise

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise ReferenceError(f"the reference process ended (exit code {code}); its log "
                                 "is above")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise ReferenceError(f"the reference wrote {line.strip()[:200]!r} where its "
                                 "protocol expects a JSON line") from None

    def infer(self) -> float:
        """One inference of the batch; returns the seconds the reference measured itself."""
        self.proc.stdin.write("infer\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "seconds" not in reply:
            raise ReferenceError(f"the reference answered {reply}")
        return reply["seconds"]

    def close(self) -> None:
        """End the process (politely, then by force after 30 s)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def default_image() -> str:
    """The Grace Hopper photo shipped in matplotlib's sample data (517x600 JPEG)."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


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
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import parity_check

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
