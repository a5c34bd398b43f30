#!/usr/bin/env python
"""oneDNN's float32 rate on this CPU for the convolutions of QueryInst R50-FPN at 800x1333,
with the weights as inference passes them and pre-packed once in oneDNN's blocked layout.

Why it exists (docs/benchmark.md, "fp32 on the AMD kind"): about three quarters of a float32
inference is oneDNN convolutions. This script answers two questions about what is left:

- How close do those convolutions run to the machine's limit? Each shape below is timed
  alone (channels-last input and weight, as ``MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT auto``
  runs them on the CPU, through ``torch.nn.functional.conv2d``), beside a square float32
  GEMM (``torch.mm``); the model's own rate is its FLOP count over its time
  (``tools/benchmark.py``).
- Does pre-packing help? The same convolution with its weight reordered once by
  ``torch.ops.mkldnn._reorder_convolution_weight`` and run by
  ``torch.ops.mkldnn._convolution_pointwise`` (the kernels PyTorch's Inductor calls for frozen
  weights), instead of oneDNN reordering the plain weight on every call. Both outputs are
  compared, so a faster but different kernel cannot pass unnoticed.

The two variants of a shape take turns round by round; the report gives the median time of
each, its rate in GFLOP/s (2 flops per multiply-add, as CPU peak figures count them; fvcore
and ``tools/benchmark.py`` count 1) and the pre-packed / plain time ratio. Shapes use the
padded 800x1344 input (Detectron2's size divisibility 32) and 75 mask-head RoIs (what
``tools/benchmark.py`` reported for this input). ``--scale`` shrinks every spatial size
(tests).

Example::

    python tools/conv_peak.py --threads 2 --rounds 7 --json-out conv_peak.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from qi_bench.measure import interleaved_times  # tools/qi_bench
from qi_bench.results import cpu_model

# name -> (batch, in channels, out channels, kernel, height, width) at 800x1344.
SHAPES = {
    "res2 3x3 64->64": (1, 64, 64, 3, 200, 336),
    "res2 1x1 64->256": (1, 64, 256, 1, 200, 336),
    "res3 3x3 128->128": (1, 128, 128, 3, 100, 168),
    "res4 3x3 256->256": (1, 256, 256, 3, 50, 84),
    "res5 3x3 512->512": (1, 512, 512, 3, 25, 42),
    "FPN P2 output 3x3 256->256": (1, 256, 256, 3, 200, 336),
    "mask head 3x3 256->256, 75 RoIs": (75, 256, 256, 3, 14, 14),
}
GEMM_SIZE = 2048


def conv_flops(batch: int, cin: int, cout: int, k: int, h: int, w: int) -> int:
    """Flops of one stride-1 'same' convolution: 2 per multiply-add, ``batch*h*w*cin*cout*k*k``
    multiply-adds (bias not counted)."""
    return 2 * batch * h * w * cin * cout * k * k


def _median_ms(fns: list, rounds: int) -> list:
    """Median wall time of each function in milliseconds, after one untimed call of each;
    the functions take turns (``qi_bench.measure.interleaved_times``)."""
    times = interleaved_times(fns, iters=rounds, warmup=1, device="cpu")
    return [statistics.median(t) * 1e3 for t in times]


def _prepacked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pad: int):
    """``conv2d(x, weight, bias, padding=pad)`` with the weight reordered once; None where this
    PyTorch build lacks the oneDNN pointwise kernels (then the reason is printed)."""
    try:
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, [pad, pad], [1, 1], [1, 1], 1, list(x.shape))
        run = lambda: torch.ops.mkldnn._convolution_pointwise(  # noqa: E731
            x, packed, bias, [pad, pad], [1, 1], [1, 1], 1, "none", [], "")
        run()
        return run
    except (AttributeError, RuntimeError) as e:
        print(f"pre-packed oneDNN convolution unavailable: {e}")
        return None


@torch.no_grad()
def measure_shape(shape, rounds: int, scale: float = 1.0, seed: int = 0) -> dict:
    """Time one convolution shape, plain and pre-packed, and compare their outputs.

    Args:
        shape: (batch, in channels, out channels, kernel, height, width), height and width in
            pixels of the feature map; ``scale`` multiplies them (at least 1 pixel).
        rounds: timed rounds after one untimed call of each variant.

    Returns:
        dict: ``shape`` (as run), ``gflop`` (2 per multiply-add), ``plain_ms``,
        ``plain_gflops_per_s``, and, where the kernels exist, ``prepacked_ms``,
        ``prepacked_gflops_per_s``, ``prepacked_over_plain`` and ``max_abs_diff`` between the
        two outputs.
    """
    n, cin, cout, k, h, w = shape
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, generator=gen) / math.sqrt(cin * k * k)).contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(cout, generator=gen)
    pad = k // 2
    plain = lambda: F.conv2d(x, weight, bias, padding=pad)  # noqa: E731
    packed = _prepacked(x, weight, bias, pad)
    times = _median_ms([plain] if packed is None else [plain, packed], rounds)
    plain_ms = times[0]
    gflop = conv_flops(n, cin, cout, k, h, w) / 1e9
    row = {"shape": [n, cin, cout, k, h, w], "gflop": round(gflop, 3), "plain_ms": round(plain_ms, 2),
           "plain_gflops_per_s": round(gflop / plain_ms * 1e3, 1)}
    if packed is not None:
        packed_ms = times[1]
        row.update(prepacked_ms=round(packed_ms, 2),
                   prepacked_gflops_per_s=round(gflop / packed_ms * 1e3, 1),
                   prepacked_over_plain=round(packed_ms / plain_ms, 3),
                   max_abs_diff=float((packed() - plain()).abs().max()))
    return row


@torch.no_grad()
def measure_gemm(size: int, rounds: int) -> dict:
    """Median time and rate of a ``size`` x ``size`` float32 ``torch.mm``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    (ms,) = _median_ms([lambda: a @ b], rounds)
    gflop = 2 * size ** 3 / 1e9
    return {"size": size, "gflop": round(gflop, 3), "ms": round(ms, 2),
            "gflops_per_s": round(gflop / ms * 1e3, 1)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per shape")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every feature-map height and width (tests: 0.1)")
    parser.add_argument("--gemm-size", type=int, default=GEMM_SIZE, help="square GEMM size")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.scale <= 0 or args.gemm_size < 1:
        parser.error("--rounds and --gemm-size must be >= 1 and --scale > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "scale": args.scale,
              "gemm": measure_gemm(args.gemm_size, args.rounds), "convolutions": {}}
    print(f"{report['cpu']}, {report['threads']} threads, torch {report['torch']}")
    print(f"GEMM {args.gemm_size}^3: {report['gemm']['ms']} ms, "
          f"{report['gemm']['gflops_per_s']} GFLOP/s")
    for name, shape in SHAPES.items():
        row = measure_shape(shape, args.rounds, args.scale)
        report["convolutions"][name] = row
        line = f"{name:34s} {row['plain_ms']:8.2f} ms {row['plain_gflops_per_s']:7.1f} GFLOP/s"
        if "prepacked_ms" in row:
            line += (f" | pre-packed {row['prepacked_ms']:8.2f} ms "
                     f"({row['prepacked_over_plain']:.3f}x), max |diff| {row['max_abs_diff']:.1e}")
        print(line)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
