"""The MMDetection 3.3.0 reference (tools/reference/): its venv, its command line, and a
long-running reference process that times inference call by call.

Library code of ``tools/reference_check.py`` (output parity from a fresh clone) and
``tools/benchmark.py --reference`` (latency side by side).
"""
from __future__ import annotations

import json
import os
import subprocess

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


class ServedProcess:
    """A reference script held in a subprocess that answers one JSON line per request line.

    The protocol of tools/reference/mmdet_queryinst.py ``--serve`` and
    tools/reference/mmdet_masktrack.py: the process first writes ``{"ready": true, ...}``
    (kept in ``ready``), then one JSON line for each line it reads; ``quit`` ends it.

    Args:
        cmd: the command line (the reference venv's python and a script).

    Raises:
        ReferenceError: if the process exits or answers something unexpected.
    """

    def __init__(self, cmd: list[str]):
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

    def request(self, line: str, key: str) -> dict:
        """Send one request line; its JSON answer, which must hold ``key``."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if key not in reply:
            raise ReferenceError(f"the reference answered {reply} to {line!r}")
        return reply

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


class ReferenceServer(ServedProcess):
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
        super().__init__(reference_command(python, variant, checkpoint, seed=seed,
                                           threads=threads, serve=images_npy))

    def infer(self) -> float:
        """One inference of the batch; returns the seconds the reference measured itself."""
        return self.request("infer", "seconds")["seconds"]


def default_image() -> str:
    """The Grace Hopper photo shipped in matplotlib's sample data (517x600 JPEG)."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
