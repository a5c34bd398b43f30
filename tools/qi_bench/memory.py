"""Peak RSS of one inference, each model in its own process (``tools/benchmark.py --memory``).

Each of our models runs in a fresh Python process started with this file as a script: it
builds the PyTorch model from a config and a checkpoint (or opens an exported graph with
onnxruntime), runs one warm-up inference, resets the kernel's high-water mark of the
process's resident set (``/proc/self/clear_refs``, value 5), runs one more inference and
reads the high-water mark back (``VmHWM`` of ``/proc/self/status``). The reference
(MMDetection, already in its own process, ``ReferenceServer``) is measured the same way from
outside, through ``/proc/PID``. Every number is the whole process: the interpreter, the
libraries, the weights and what one inference adds, exact (the kernel's count, not sampled).
Linux only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["measure_in_process", "measure_pid", "rss_status_mib", "reset_peak"]

_MIB = 1024  # /proc/*/status gives kB


def rss_status_mib(pid: int | str = "self") -> dict[str, float]:
    """``{"rss": VmRSS, "hwm": VmHWM}`` of a process, in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key[2:].lower()] = round(int(rest.split()[0]) / _MIB, 1)
    return values


def reset_peak(pid: int | str = "self") -> None:
    """Set the process's ``VmHWM`` back to its current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def measure_pid(pid: int | str, infer) -> dict[str, float]:
    """Peak RSS of ``infer()`` (one inference in process ``pid``), after one warm-up call.

    Returns:
        dict: ``rss_before_mib`` (resident before the measured call), ``peak_mib`` (the
        high-water mark during it) and ``infer_mem_mib`` (their difference), in MiB.
    """
    infer()
    before = rss_status_mib(pid)["rss"]
    reset_peak(pid)
    infer()
    peak = rss_status_mib(pid)["hwm"]
    return {"rss_before_mib": before, "peak_mib": peak, "infer_mem_mib": round(peak - before, 1)}


def measure_in_process(spec: dict, timeout: float = 1800) -> dict[str, float]:
    """Run this file on ``spec`` in a fresh process and return its :func:`measure_pid` dict.

    Args:
        spec: ``{"kind": "pytorch", "config", "opts", "weights", "images", "threads"}`` or
            ``{"kind": "exported", "path", "images", "threads"}``; ``images`` is a ``.npy``
            of float32 (B, 3, H, W) inputs in ``INPUT.FORMAT`` order.

    Raises:
        RuntimeError: the process failed (its stderr's end in the message).
    """
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory process for {spec.get('path') or spec.get('opts')} "
                           f"failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(spec: dict) -> dict[str, float]:
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    images = np.load(spec["images"])
    if spec["kind"] == "exported":
        from queryinst.export import ExportedPredictor

        predictor = ExportedPredictor(spec["path"], num_threads=spec["threads"])

        def infer():
            for image in images:
                predictor.run_graph(image)
    else:
        from detectron2.modeling import build_model

        from queryinst.checkpoint import QueryInstCheckpointer
        from qi_bench.models import queryinst_cfg

        cfg = queryinst_cfg(spec["config"], spec["opts"], "cpu", weights=spec["weights"])
        model = build_model(cfg).eval()
        QueryInstCheckpointer(model).load(spec["weights"])
        height, width = images.shape[2:]
        inputs = [{"image": torch.from_numpy(im), "height": height, "width": width}
                  for im in images]

        def infer():
            with torch.no_grad():
                model(inputs)
    return measure_pid(os.getpid(), infer)


if __name__ == "__main__":
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(tools.parent / "projects" / "QueryInst"), str(tools)]
    import queryinst  # noqa: F401  (registers the config keys and the model)

    print(json.dumps(_worker(json.loads(sys.argv[1]))))
