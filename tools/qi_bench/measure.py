"""Measuring primitives of tools/benchmark.py: timing, memory, FLOPs, profiles, calibration.

Model-agnostic helpers (they take any Detectron2 model or plain ``nn.Module``); the
QueryInst-versus-baselines logic and the report live in ``models``, ``runner`` and ``report``.
"""
from __future__ import annotations

import gc
import os
import platform
import threading
import time

import torch
from detectron2.utils.analysis import FlopCountAnalysis

from .results import cpu_model


def interleaved_times(fns: list, iters: int, warmup: int, device: str) -> list[list[float]]:
    """Wall seconds of ``iters`` calls of each function, after ``warmup`` untimed rounds.

    The functions take turns (f0, f1, ..., f0, f1, ...), so a change in the machine's speed
    during the run (other tenants, clock changes) affects every model alike.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, spent in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            spent.append(time.perf_counter() - start)
    return times


def current_rss_bytes() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """Context manager: peak memory in bytes while the block runs, and the start value.

    On CUDA, ``torch.cuda.max_memory_allocated`` (reset on entry), and in ``peak_reserved``
    ``torch.cuda.max_memory_reserved`` (allocated plus the caching allocator's free blocks).
    Neither counts the CUDA context. On the CPU, the process RSS sampled by a thread every
    ``interval_s`` (PyTorch ops release the GIL, so sampling continues during them); a peak
    shorter than the interval can be missed.
    """

    def __init__(self, device: str, interval_s: float = 0.001):
        self.device, self.interval_s = device, interval_s
        self.start = self.peak = self.peak_reserved = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = current_rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.peak_reserved = torch.cuda.max_memory_reserved()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss_bytes())


def _mha_flop_jit(inputs, outputs) -> int:
    """FLOPs (multiply-adds) of ``aten::_native_multi_head_attention``.

    The fused attention that ``nn.MultiheadAttention`` runs in inference; fvcore has no
    handle for it. Inputs: query (B, Lq, D), key and value (B, Lk, D), ... Counted: the
    q/k/v and output projections (B*Lq*D*D each for q and out, B*Lk*D*D for k and v) and
    the two attention products (B*Lq*Lk*D each); softmax is not counted, as in fvcore.
    """
    from fvcore.nn.jit_handles import get_shape

    batch, len_q, dim = get_shape(inputs[0])
    len_k = get_shape(inputs[1])[1]
    projections = batch * dim * dim * (2 * len_q + 2 * len_k)
    return projections + 2 * batch * len_q * len_k * dim


def count_flops(model: torch.nn.Module, inputs) -> FlopCountAnalysis:
    """Detectron2's FlopCountAnalysis of ``model(inputs)``, plus a handle for fused attention.

    Args:
        model: a Detectron2 model in eval mode (or any module taking ``inputs``).
        inputs: what ``model`` is called with (``list[dict]`` for Detectron2 models).

    Returns:
        FlopCountAnalysis: ``.total()`` in multiply-adds (fvcore's "flops"), ``.by_module()``
        (module names prefixed with "model.", the attribute of Detectron2's TracingAdapter),
        ``.unsupported_ops()``.
    """
    flops = FlopCountAnalysis(model, inputs)
    flops.set_op_handle("aten::_native_multi_head_attention", _mha_flop_jit)
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return flops


def phase_seconds(model: torch.nn.Module, fn) -> dict[str, float]:
    """Wall seconds of ``model``'s backbone, proposal generator and ROI heads in one ``fn()``.

    "rest" is everything else in the call: preprocessing and post-processing (mask pasting).
    """
    phases = ("backbone", "proposal_generator", "roi_heads")
    spent = dict.fromkeys(phases, 0.0)
    starts = {}
    handles = []
    for name in phases:
        module = getattr(model, name)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, name=name: starts.__setitem__(name, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda mod, args, out, name=name: spent.__setitem__(
                name, spent[name] + time.perf_counter() - starts[name])))
    start = time.perf_counter()
    fn()
    total = time.perf_counter() - start
    for h in handles:
        h.remove()
    spent["rest"] = total - sum(spent.values())
    return {k: round(v, 4) for k, v in spent.items()}


def profile_top(fn, k: int, device: str) -> list[dict]:
    """Run ``fn`` once under torch.profiler; the ``k`` ops with the most self time.

    Sorted by self CPU time on the CPU and by self device (kernel) time on CUDA; each row
    has the op name, the self CPU time in milliseconds (and on CUDA the self device time)
    and the number of calls.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()

    def device_us(event) -> float:  # renamed from self_cuda_time_total in PyTorch 2.4
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))

    key = device_us if device == "cuda" else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=key, reverse=True)
    rows = []
    for e in events[:k]:
        row = {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count}
        if device == "cuda":
            row["self_device_ms"] = round(device_us(e) / 1000, 2)
        rows.append(row)
    return rows


def calibrate_frozen_bn(model: torch.nn.Module, inputs: list[dict]) -> int:
    """Set every ``FrozenBatchNorm2d``'s statistics to those of its input on ``inputs``.

    A randomly initialised ResNet with identity FrozenBN multiplies the activations at every
    block (FPN outputs ~1e4 here). Then Mask R-CNN's RPN decodes every anchor to the whole
    image, NMS leaves a couple of proposals, and saturated softmax scores fall below any
    threshold: the baselines would skip most of their work. Normalising each FrozenBN by its
    input's per-channel mean and variance (one pass, layer by layer, applied to every
    model alike) gives activations of a trained model's scale, so the RPN keeps its 1000
    proposals and the ROI heads score every class.

    Args:
        model: a Detectron2 model with ``preprocess_image`` and ``backbone``.
        inputs: Detectron2 inputs (``list[dict]`` with "image").

    Returns:
        int: the number of FrozenBN layers calibrated.
    """
    from detectron2.layers import FrozenBatchNorm2d

    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(set_stats) for m in layers]
    try:
        with torch.no_grad():
            model.backbone(model.preprocess_image(inputs).tensor)
    finally:
        for h in handles:
            h.remove()
    return len(layers)


def release_freed_memory() -> None:
    """Hand memory freed by earlier models back to the OS (glibc) and empty CUDA's cache.

    So that RSS growth, and CUDA's reserved peak, start from live memory only.
    """
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def machine_info(device: str) -> dict:
    """What the numbers were measured on: CPU model (:func:`qi_bench.results.cpu_model`) and
    count, torch, Python, and the GPU."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
