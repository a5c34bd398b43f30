#!/usr/bin/env python
"""Speed, memory and FLOPs of QueryInst side by side with Detectron2's Mask R-CNN / Cascade.

All models are built in one process with random weights (no checkpoint is read; FrozenBN
statistics calibrated on the input, see ``calibrate_frozen_bn``) and run on the same random
images of a fixed size, taking turns call by call:

- inference latency (median, p90, per image) and throughput, warm-up iterations excluded;
- peak memory during inference: process RSS on the CPU (sampled every millisecond),
  ``torch.cuda.max_memory_allocated`` on CUDA;
- parameters, and FLOPs of one image counted by fvcore through Detectron2's
  ``FlopCountAnalysis`` (the counter of Detectron2's ``tools/analyze_model.py``; one fused
  multiply-add counts as one flop);
- with ``--train``, one training iteration of ``--train-batch-size`` images (default 2;
  forward + backward + optimiser step, each model with its own recipe's optimiser) on random
  images with ``--train-instances`` synthetic instances each (default 5): its time, and the
  peak memory of one more such step, taken in the same way as inference's (``--amp``: on
  CUDA, the step in fp16 autocast with a gradient scaler, as Detectron2's ``AMPTrainer``
  runs it); with ``--bf16`` also the same step in bf16 autocast (no gradient scaler), timed
  in the same rounds as the fp32 one, taking turns;
- with ``--profile K``, the K PyTorch-profiler entries with the most self time and the wall
  time of each phase (backbone, proposal generator, ROI heads, the rest); with ``--train``
  also the K entries of one training step's forward and backward (fp32, no optimiser step);
- with ``--channels-last``, every backbone in channels-last memory format;
- with ``--reference``, MMDetection 3.3.0's QueryInst (the reference, ``tools/reference/``)
  in its own process, timed in the same rounds as ours, call by call: both run the
  reference's random checkpoint (ours loads it through the converter, without FrozenBN
  calibration), on the same images (no resize) with the same threads. The JSON's
  ``reference`` holds the median of the per-round latency ratios, ours / reference.
- with ``--inference-dtype DTYPE`` (repeatable), ``--unfolded`` and ``--also-opts 'KEY
  VALUE ...'`` (repeatable), the first QueryInst config again with
  ``MODEL.QUERYINST.INFERENCE_DTYPE DTYPE`` / with ``MODEL.QUERYINST.FUSE_BN_INFERENCE
  False`` / with those overrides (rows ``queryinst DTYPE``, ``queryinst unfolded``,
  ``queryinst NAME=VALUE ...``), same weights, in the same rounds;
  ``round_ratio_vs_queryinst`` is the median of the per-round latency ratios to the first
  model.
- with ``--exported onnx`` / ``torchscript`` / ``int8`` (repeatable), the first QueryInst model
  exported in this process (``queryinst.export``, to a temporary directory; ``int8``: the
  ONNX graph quantized statically by ONNX Runtime, calibrated on the benchmark's own images)
  and its graph timed by onnxruntime / torch.jit on the same input tensors with the same
  thread count, taking turns with the PyTorch models; its row (``exported onnx``) also
  records the largest score and box differences from the PyTorch model's detections of the
  first image.
- with ``--memory``, the peak RSS of one inference of every QueryInst setting (fp32, each
  ``--inference-dtype``, ...), every ``--exported`` graph and the reference, each in its own
  process (``qi_bench/memory.py``: one warm-up call, the kernel's high-water mark reset,
  one measured call): keys ``process_peak_mib``, ``process_rss_before_mib``,
  ``process_infer_mem_mib``; with ``--reference`` also ``reference.fp32_peak_over_reference``.

Fair comparison (docs/benchmark.md, "Fair comparison rules"): the baselines get QueryInst's ResNet depth, stride
placement and class count; their score threshold is 0 and ``TEST.DETECTIONS_PER_IMAGE`` is
QueryInst's top-k, so their mask head also sees 100 detections whatever the random weights
score. The same threads, input and warm-up hold for all. The default baselines are both
architectures at QueryInst's depth. A table is printed, then one JSON line (also written to
``--json-out``). Results and method: ``docs/benchmark.md``.

Example::

    python tools/benchmark.py --config-file configs/queryinst_R50_FPN_1x_coco.yaml \\
        --baselines mask_rcnn_R_50_FPN,cascade_mask_rcnn_R_50_FPN \\
        --input-size 800 1333 --iters 5 --warmup 1 --threads 2 --train

Extra ``KEY VALUE`` pairs override the QueryInst config, as in ``train_net.py``.

Memory keys of each model in the JSON, in MiB (2**20 bytes):

- ``peak_mem_mib``, ``infer_mem_mib``: the peak during one inference, and that peak minus
  the value when the call started;
- with ``--train``, ``train_peak_mem_mib`` and ``train_mem_mib``: the same for one training
  step, measured after the timed steps (so gradients of the step before and the optimiser's
  state are resident, as in a running training), and ``train_batch`` (images in the step).

On the CPU the values are the process RSS: Python, libraries, every model built in the run
(``--baselines none`` for one model alone) and freed memory that the allocator keeps. On
CUDA they are ``torch.cuda.max_memory_allocated``, reset before the call: tensors only,
without the CUDA context or the allocator's cache; the training step also gets
``train_peak_reserved_mib``, ``torch.cuda.max_memory_reserved`` (tensors plus the cache).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "QueryInst"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
from queryinst.config_loading import CONFIG_ERRORS  # noqa: E402
import torch  # noqa: E402

from qi_bench.models import _BASELINE_NAME, BASELINE_ZOO  # noqa: E402
from qi_bench.report import print_report  # noqa: E402
from qi_bench.runner import run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="path to a QueryInst yaml config")
    parser.add_argument(
        "--also-config", action="append", default=[], metavar="FILE",
        help="another QueryInst config measured in the same rounds (repeatable; the KEY "
        "VALUE overrides apply to it too), e.g. the MobileNetV2 one beside R50",
    )
    parser.add_argument(
        "--baselines", default=None,
        help="comma-separated Detectron2 baselines: {mask_rcnn,cascade_mask_rcnn}_R_<depth>_FPN "
        "(depth must equal QueryInst's); 'none' for QueryInst alone; default: both at "
        "QueryInst's depth",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--input-size", nargs=2, type=int, default=(800, 1333), metavar=("H", "W"),
        help="height and width of the input images in pixels (no resize is applied)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per inference call")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument(
        "--train", action="store_true",
        help="also time a training iteration and measure its peak memory",
    )
    parser.add_argument(
        "--train-batch-size", type=int, default=2, help="images per training iteration",
    )
    parser.add_argument(
        "--train-instances", type=int, default=5,
        help="synthetic ground-truth instances per training image (QueryInst's mask head "
        "trains on min(queries, instances) of them per stage)",
    )
    parser.add_argument(
        "--amp", action="store_true",
        help="train in fp16 autocast with a gradient scaler, as Detectron2's AMPTrainer "
        "(SOLVER.AMP.ENABLED); needs --train and --device cuda",
    )
    parser.add_argument(
        "--bf16", action="store_true",
        help="also time the training step in bf16 autocast (torch.autocast, no gradient "
        "scaler), taking turns with the fp32 step of the same model; needs --train",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--channels-last", action="store_true",
        help="run every model's backbone with channels-last conv weights (what "
        "MODEL.QUERYINST.CHANNELS_LAST does); faster on CPUs, where QueryInst's inference "
        "is channels-last anyway (MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT auto)",
    )
    parser.add_argument(
        "--inference-dtype", action="append", default=[],
        choices=("float32", "bfloat16", "float16"),
        help="also time the first QueryInst config with MODEL.QUERYINST.INFERENCE_DTYPE set "
        "to this (repeatable), in the same rounds",
    )
    parser.add_argument(
        "--unfolded", action="store_true",
        help="also time the first QueryInst config with MODEL.QUERYINST.FUSE_BN_INFERENCE "
        "False (BatchNorm not folded), in the same rounds",
    )
    parser.add_argument(
        "--also-opts", action="append", default=[], metavar="'KEY VALUE ...'",
        help="also time the first QueryInst config with these overrides (one quoted "
        "string; repeatable), same weights, in the same rounds, e.g. "
        "'MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT contiguous'",
    )
    parser.add_argument(
        "--exported", action="append", default=[], choices=("onnx", "torchscript", "int8"),
        help="also time QueryInst exported to this format (queryinst.export) in the same "
        "rounds, with as many onnxruntime / torch threads; int8: the ONNX graph quantized "
        "(queryinst.export.quantize_int8), calibrated on the benchmark's images; repeatable",
    )
    parser.add_argument(
        "--memory", action="store_true",
        help="also measure the peak RSS of one inference of each QueryInst setting, exported "
        "graph and the reference, each in its own process (qi_bench/memory.py; Linux, CPU)",
    )
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument(
        "--reference", action="store_true",
        help="also time MMDetection 3.3.0's QueryInst (set up by tools/reference/setup.sh in "
        "its own venv) in the same rounds, both with its random checkpoint; CPU, a ResNet-50 "
        "config with 100 or 300 queries and 80 classes",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="K",
        help="also profile one inference (and with --train one training step) and report "
        "the K ops with the most self time",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="QueryInst overrides: KEY VALUE")
    args = parser.parse_args(argv)
    if (args.iters < 1 or args.warmup < 0 or args.batch_size < 1 or args.profile < 0
            or args.train_batch_size < 1 or args.train_instances < 1):
        parser.error("--iters and the batch sizes must be >= 1, --warmup and --profile >= 0")
    if args.amp and not (args.train and args.device == "cuda"):
        parser.error("--amp applies to the training step on CUDA: add --train --device cuda")
    if args.bf16 and (args.amp or not args.train):
        parser.error("--bf16 times a bf16 step beside the fp32 one: add --train, without --amp")
    if min(args.input_size) < 32:
        parser.error("--input-size must be at least 32 x 32 pixels")
    if args.memory and args.device != "cpu":
        parser.error("--memory measures process RSS on the CPU: use --device cpu")
    if args.exported and args.device != "cpu":
        parser.error("--exported times the exported graph on the CPU: use --device cpu")
    if args.reference and args.device != "cpu":
        parser.error("--reference runs MMDetection's QueryInst on the CPU: use --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device on this machine")
    for opts in args.also_opts:  # checked here, before any model or the reference starts
        if not opts.split() or len(opts.split()) % 2:
            raise SystemExit(f"--also-opts {opts!r}: expected KEY VALUE pairs")
    if args.baselines is not None:  # None: chosen in main() from QueryInst's depth
        args.baselines = [] if args.baselines in ("", "none") else args.baselines.split(",")
    for name in args.baselines or []:
        match = _BASELINE_NAME.match(name)
        if match is None or match["arch"] not in BASELINE_ZOO:
            parser.error(
                f"unknown baseline {name!r}; expected "
                f"{{{','.join(BASELINE_ZOO)}}}_R_<18|34|50|101|152>_FPN"
            )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        report = run(args, stack)
        print_report(report, args)
    return report


if __name__ == "__main__":
    try:
        main()
    except CONFIG_ERRORS as e:  # a missing --config-file, a misspelled key: one line
        sys.exit(f"ERROR: {e}")
