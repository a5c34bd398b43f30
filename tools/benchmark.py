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
- with ``--exported onnx`` / ``torchscript`` (repeatable), the first QueryInst model exported
  in this process (``queryinst.export``, to a temporary directory) and its graph timed by
  onnxruntime / torch.jit on the same input tensors with the same thread count, taking turns
  with the PyTorch models; its row (``exported onnx``) also records the largest score and
  box differences from the PyTorch model's detections of the first image.

Fair comparison (README, "Benchmark"): the baselines get QueryInst's ResNet depth, stride
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
import datetime
import functools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "QueryInst"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_optimizer as build_detectron2_optimizer  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from reference_check import ReferenceServer, setup_reference  # noqa: E402

from benchmark_measure import (  # noqa: E402
    PeakMemory,
    calibrate_frozen_bn,
    count_flops,
    interleaved_times,
    machine_info,
    phase_seconds,
    profile_top,
    release_freed_memory,
)
from queryinst import add_queryinst_config  # noqa: E402
from queryinst.checkpoint import (  # noqa: E402
    QueryInstCheckpointer,
    config_as_opts,
    detect_official_config,
    load_official_state_dict,
)
from queryinst.config_loading import CONFIG_ERRORS, merge_config  # noqa: E402
from queryinst.fast_inference import resolve_memory_format  # noqa: E402
from queryinst.solver import build_optimizer as build_queryinst_optimizer  # noqa: E402

# Baseline name -> model-zoo config of that architecture; the depth comes from the name.
BASELINE_ZOO = {
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "cascade_mask_rcnn": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
}
_BASELINE_NAME = re.compile(r"^(?P<arch>[a-z_]+)_R_(?P<depth>18|34|50|101|152)_FPN$")


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
        "--exported", action="append", default=[], choices=("onnx", "torchscript"),
        help="also time QueryInst exported to this format (queryinst.export) in the same "
        "rounds, with as many onnxruntime / torch threads; repeatable",
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


# ----------------------------------------------------------------------------- configs


def queryinst_cfg(config_file: str, opts: list[str], device: str, weights: str = "") -> CfgNode:
    """The QueryInst config of ``config_file`` with ``opts`` on ``device``; random weights
    unless ``weights`` names a checkpoint (``Bench`` then loads it)."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config(cfg, config_file, opts)  # a misspelled key gets a hint
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    return cfg


def baseline_cfg(name: str, reference: CfgNode, device: str) -> CfgNode:
    """Model-zoo config of baseline ``name``, made comparable with QueryInst's ``reference``.

    Args:
        name: ``{mask_rcnn,cascade_mask_rcnn}_R_<depth>_FPN`` (checked by ``parse_args``).
        reference: QueryInst's frozen config.
        device: "cpu" or "cuda".

    Returns:
        CfgNode: frozen; its model-zoo source is ``BASELINE_ZOO[arch]``.

    Raises:
        ValueError: if the depth in ``name`` differs from QueryInst's (unfair comparison).
    """
    match = _BASELINE_NAME.match(name)
    depth = int(match["depth"])
    if not is_resnet(reference):
        raise ValueError(
            f"baseline {name} has a ResNet, QueryInst {backbone_label(reference)}: the "
            "baselines need QueryInst's backbone; use --baselines none"
        )
    if depth != reference.MODEL.RESNETS.DEPTH:
        raise ValueError(
            f"baseline {name} has ResNet-{depth}, QueryInst ResNet-{reference.MODEL.RESNETS.DEPTH}"
            f": compare the same depth (e.g. {match['arch']}_R_"
            f"{reference.MODEL.RESNETS.DEPTH}_FPN)"
        )
    cfg = model_zoo.get_config(BASELINE_ZOO[match["arch"]])
    ref = reference.MODEL
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = ref.RESNETS.RES2_OUT_CHANNELS
    # The same ResNet as QueryInst's: stride placement changes the FLOPs of every block.
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = ref.RESNETS.STRIDE_IN_1X1
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = ref.QUERYINST.NUM_CLASSES
    # Keep every detection up to QueryInst's top-k, so the mask head sees as many boxes.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = ref.QUERYINST.TEST_TOPK
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def is_queryinst(cfg: CfgNode) -> bool:
    """Whether the config builds one of our models (QueryInst, QueryInstVIS)."""
    return cfg.MODEL.META_ARCHITECTURE.startswith("QueryInst")


def is_resnet(cfg: CfgNode) -> bool:
    """Whether the config's backbone is a ResNet (the only one the baselines can share)."""
    return "resnet" in cfg.MODEL.BACKBONE.NAME


def backbone_label(cfg: CfgNode) -> str:
    """"R50", "R101", ... for ResNets, "MNV2" for MobileNetV2 (width 1.0; else "MNV2x0.5")."""
    if is_resnet(cfg):
        return f"R{cfg.MODEL.RESNETS.DEPTH}"
    if "mobilenetv2" in cfg.MODEL.BACKBONE.NAME:
        width = cfg.MODEL.MOBILENET.WIDTH_MULT
        return "MNV2" if width == 1.0 else f"MNV2x{width:g}"
    return cfg.MODEL.BACKBONE.NAME


# ----------------------------------------------------------------------------- inputs


def random_image(height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 (3, H, W) uniform noise."""
    return torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)


def synthetic_instances(height: int, width: int, num_classes: int, n: int, gen: torch.Generator):
    """``n`` random boxes, each with a filled-rectangle bitmask and a random class."""
    x0 = torch.rand(n, generator=gen) * width * 0.7
    y0 = torch.rand(n, generator=gen) * height * 0.7
    x1 = x0 + 16 + torch.rand(n, generator=gen) * width * 0.3
    y1 = y0 + 16 + torch.rand(n, generator=gen) * height * 0.3
    boxes = torch.stack([x0, y0, x1.clamp(max=width), y1.clamp(max=height)], 1)
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for m, (a, b, c, d) in zip(masks, boxes.round().long().tolist()):
        m[b:d, a:c] = True
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(num_classes, (n,), generator=gen)
    inst.gt_masks = BitMasks(masks)
    return inst


_START = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr, with the seconds since the tool started."""
    print(f"[benchmark {time.perf_counter() - _START:7.1f} s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models


@dataclass
class Candidate:
    """One model to measure: its name, config and optimiser recipe."""

    name: str
    cfg: CfgNode
    build_optimizer: Callable
    extra: dict = field(default_factory=dict)


class Bench:
    """A built model with its inputs; ``result`` collects its numbers.

    Random weights with calibrated FrozenBN statistics, or the checkpoint of
    ``cand.cfg.MODEL.WEIGHTS`` (loaded through ``QueryInstCheckpointer``, not calibrated).

    Args:
        cand: what to build.
        inputs: Detectron2 inference inputs (the same tensors for every model).
        seed: seed of the random weights.
        channels_last: convert the backbone's conv weights to channels-last memory format.
        convs_channels_last: convert every conv weight of a model that is not QueryInst
            (a baseline) to channels-last: the layout QueryInst's inference swaps in on the
            CPU (``MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT``), for a like-for-like timing.
    """

    def __init__(self, cand: Candidate, inputs: list[dict], seed: int, channels_last: bool,
                 convs_channels_last: bool = False):
        torch.manual_seed(seed)
        self.cand, self.inputs = cand, inputs
        self.model = build_model(cand.cfg).eval()
        weights = cand.cfg.MODEL.WEIGHTS
        if weights:
            QueryInstCheckpointer(self.model).load(weights)
        if channels_last:  # what MODEL.QUERYINST.CHANNELS_LAST does, for every model alike
            self.model.backbone.to(memory_format=torch.channels_last)
        if convs_channels_last and not is_queryinst(cand.cfg):
            self.model.to(memory_format=torch.channels_last)  # 4-D weights only
        self.outputs = None
        self.proposals: list[int] = []
        self.model.proposal_generator.register_forward_hook(self._count_proposals)
        self.result = {
            "name": cand.name,
            "meta_architecture": cand.cfg.MODEL.META_ARCHITECTURE,
            "resnet_depth": cand.cfg.MODEL.RESNETS.DEPTH if is_resnet(cand.cfg) else None,
            "backbone": backbone_label(cand.cfg),
            "params": sum(p.numel() for p in self.model.parameters()),
            **cand.extra,
            "frozen_bn_calibrated": 0 if weights else calibrate_frozen_bn(self.model, inputs),
        }

    def _count_proposals(self, module, args, out) -> None:
        self.proposals = [len(p) for p in out[0]]

    def infer(self) -> None:
        with torch.no_grad():
            self.outputs = self.model(self.inputs)

    def start_training(self, batch: list[dict], amp: bool = False) -> None:
        """Switch to training on ``batch``; ``amp``: fp16 autocast and a gradient scaler."""
        self.model.train()
        self.batch = batch
        self.optimizer = self.cand.build_optimizer(self.cand.cfg, self.model)
        self.device = self.cand.cfg.MODEL.DEVICE
        self.scaler = torch.amp.GradScaler(self.device) if amp else None
        self.result["train_optimizer"] = type(self.optimizer).__name__

    def train_step(self, autocast_dtype: torch.dtype | None = None) -> None:
        """One iteration in the order of Detectron2's SimpleTrainer / AMPTrainer.

        Args:
            autocast_dtype: run forward and loss under ``torch.autocast`` in this dtype
                (e.g. torch.bfloat16), without a gradient scaler; ignored with ``--amp``,
                whose fp16 autocast and scaler apply.
        """
        amp = self.scaler is not None
        dtype = torch.float16 if amp else autocast_dtype
        with torch.autocast(self.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = self.model(self.batch)
            loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if amp:  # the scaler unscales the gradients before the optimiser clips them
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        key = "train_bf16_last_loss" if dtype == torch.bfloat16 and not amp else "train_last_loss"
        self.result[key] = round(loss.item(), 4)

    def forward_backward(self) -> None:
        """Forward and backward of one training step, without the optimiser step (what the
        training profile measures; the weights stay as they are)."""
        losses = self.model(self.batch)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()


class ExportedBench:
    """QueryInst exported (``queryinst.export``) from a built :class:`Bench`, run by
    ``ExportedPredictor``'s graph runner on the same images (one call per image).

    Args:
        source: the built, calibrated QueryInst whose model is exported.
        fmt: "onnx" or "torchscript".
        out_dir: where the export is written.
        threads: onnxruntime's intra-op threads (torch's for TorchScript are the process's).
    """

    def __init__(self, source: Bench, fmt: str, out_dir: str, threads: int):
        from queryinst.export import export_model
        from queryinst.exported_predictor import ExportedPredictor

        images = [x["image"] for x in source.inputs]
        start = time.perf_counter()
        path = export_model(source.model, source.cand.cfg, fmt, out_dir, images[0])
        self.export_s = time.perf_counter() - start
        self.predictor = ExportedPredictor(path, num_threads=threads)
        self.images = [im.numpy() for im in images]
        self.result = {"name": f"exported {fmt}", "backbone": source.result["backbone"],
                       "params": source.result["params"], "export_s": round(self.export_s, 1)}
        self.result.update(self._differences(source))

    def _differences(self, source: Bench) -> dict:
        """Largest differences from the PyTorch model on the first image (before pasting)."""
        with torch.no_grad():
            truth = source.model.inference(source.inputs[:1], do_postprocess=False)[0]
        ours = self.predictor.run_graph(self.images[0])
        return {
            "max_score_diff": float((ours["scores"] - truth.scores).abs().max()),
            "max_box_diff_px": float((ours["pred_boxes"] - truth.pred_boxes.tensor).abs().max()),
            "labels_equal": bool(torch.equal(ours["pred_classes"], truth.pred_classes)),
        }

    def infer(self) -> None:
        for image in self.images:
            self.predictor.run_graph(image)


class ReferenceBench:
    """MMDetection 3.3.0's QueryInst in its own process, timed like a ``Bench``.

    Only inference latency is measured (memory, FLOPs and training are the other process's).
    ``result["reference_self_times_s"]`` keeps the reference's own clock of each call, which
    leaves out the pipe round trip.

    Args:
        server: a started ``reference_check.ReferenceServer``.
        variant: its number of queries, "100" or "300".
    """

    def __init__(self, server: ReferenceServer, variant: str):
        self.server = server
        self.self_times: list[float] = []
        self.result = {
            "name": "mmdet 3.3.0 reference",
            "meta_architecture": "mmdet QueryInst (tools/reference/mmdet_queryinst.py)",
            "backbone": "R50",
            "num_queries": int(variant),
        }

    def infer(self) -> None:
        self.self_times.append(self.server.infer())


def reference_variant(cfg: CfgNode) -> str:
    """The reference variant ("100" / "300") matching QueryInst's config.

    Raises:
        ValueError: if the config is not one the reference has (ResNet-50, 80 classes,
            100 or 300 queries), saying which value differs.
    """
    q = cfg.MODEL.QUERYINST
    if not is_resnet(cfg) or cfg.MODEL.RESNETS.DEPTH != 50:
        raise ValueError(
            f"--reference: the reference is ResNet-50, the config {backbone_label(cfg)}")
    if q.NUM_CLASSES != 80:
        raise ValueError(f"--reference: the reference has 80 classes, the config {q.NUM_CLASSES}")
    if q.NUM_PROPOSALS not in (100, 300):
        raise ValueError(
            f"--reference: the reference has 100 or 300 queries, the config {q.NUM_PROPOSALS}")
    return str(q.NUM_PROPOSALS)


def _under_peak_memory(device: str, step: Callable[[], None]):
    """Run ``step`` alone under ``PeakMemory``: (the sampler, peak MiB, growth MiB)."""
    release_freed_memory()
    with PeakMemory(device) as mem:
        step()
    return mem, round(mem.peak / 2**20, 1), round((mem.peak - mem.start) / 2**20, 1)


def measure_memory_and_outputs(bench: Bench, device: str) -> None:
    """One inference under ``PeakMemory``; records memory, detections and proposals."""
    _, peak, grown = _under_peak_memory(device, bench.infer)
    bench.result.update(
        peak_mem_mib=peak,
        infer_mem_mib=grown,
        detections_per_image=[len(o["instances"]) for o in bench.outputs],
        proposals_per_image=bench.proposals,
    )
    first = bench.outputs[0]["instances"]
    if first.has("query_indices") and first.has("pred_masks"):
        # QueryInst's mask head runs once per distinct query among the top-k detections.
        bench.result["mask_head_rois_per_image"] = [
            len(torch.unique(o["instances"].query_indices)) for o in bench.outputs
        ]
    bench.outputs = None


def measure_train_memory(bench: Bench, device: str) -> None:
    """One more training step under ``PeakMemory``; records its peak and growth in MiB."""
    mem, peak, grown = _under_peak_memory(device, bench.train_step)
    bench.result.update(train_peak_mem_mib=peak, train_mem_mib=grown)
    if device == "cuda":
        bench.result["train_peak_reserved_mib"] = round(mem.peak_reserved / 2**20, 1)


def measure_flops(bench: Bench) -> None:
    """FLOPs of one image (the first input), in total and per top-level module."""
    with torch.no_grad():
        flops = count_flops(bench.model, bench.inputs[:1])
        by_module = flops.by_module()
        total = flops.total()
    bench.result.update(
        gflops=round(total / 1e9, 2),
        # Detectron2 traces the model inside a TracingAdapter: names start with "model.".
        gflops_by_module={
            k: round(by_module.get(f"model.{k}", 0) / 1e9, 2)
            for k in ("backbone", "proposal_generator", "roi_heads")
        },
        flops_uncounted_ops=dict(flops.unsupported_ops()),
    )


def summarise(times: list[float], prefix: str) -> dict:
    """Median, p90 (numpy's linear interpolation) and all times, in seconds, of timed calls."""
    return {
        f"{prefix}_median_s": round(statistics.median(times), 4),
        f"{prefix}_p90_s": round(float(np.percentile(times, 90)), 4),
        f"{prefix}_times_s": [round(t, 4) for t in times],
    }


def queryinst_infers_channels_last(cfg: CfgNode, device: str) -> bool:
    """Whether QueryInst's inference runs its convolutions channels-last on ``device``
    (``MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT``); the baselines then get the same layout."""
    fmt = resolve_memory_format(cfg.MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT, device)
    return fmt is torch.channels_last


def measure_all(candidates: list[Candidate], args, images, train_batch,
                others: tuple = ()) -> list[dict]:
    """Build every model, then measure them; timed calls alternate between the models.

    ``others`` (e.g. a ``ReferenceBench``) and the ``--exported`` graphs take part in the
    inference rounds only.
    """
    height, width = args.input_size
    inputs = [{"image": im, "height": height, "width": width} for im in images]
    benches = []
    baselines_channels_last = queryinst_infers_channels_last(candidates[0].cfg, args.device)
    for cand in candidates:
        log(f"building {cand.name}")
        benches.append(Bench(cand, inputs, args.seed, args.channels_last,
                             baselines_channels_last))
    for bench in benches:
        log(f"memory and outputs of {bench.cand.name}")
        measure_memory_and_outputs(bench, args.device)
        if not args.no_flops:
            measure_flops(bench)
    exported = []
    for fmt in args.exported:
        log(f"exporting {benches[0].cand.name} to {fmt}")
        out_dir = tempfile.mkdtemp(prefix="queryinst_export_")
        try:  # the runtimes hold the whole graph in memory once loaded
            exported.append(ExportedBench(benches[0], fmt, out_dir, torch.get_num_threads()))
        finally:
            shutil.rmtree(out_dir)
    log(f"timing inference: {args.warmup} warm-up + {args.iters} rounds")
    extras = exported + list(others)  # inference rounds only
    times = interleaved_times([b.infer for b in benches + extras], args.iters, args.warmup,
                              args.device)
    for extra, t in zip(extras, times[len(benches):]):
        median = statistics.median(t)
        extra.result.update(summarise(t, "infer"),
                            infer_per_image_s=round(median / len(images), 4),
                            images_per_s=round(len(images) / median, 3))
        if isinstance(extra, ReferenceBench):  # its own clock, without the pipe round trip
            extra.result["reference_self_times_s"] = [
                round(x, 4) for x in extra.self_times[-len(t):]]
    for bench, t in zip(benches, times):
        median = statistics.median(t)
        bench.result.update(
            summarise(t, "infer"),
            infer_per_image_s=round(median / len(images), 4),
            images_per_s=round(len(images) / median, 3),
        )
        if args.profile:
            log(f"profiling {bench.cand.name}")
            bench.result["profile_top"] = profile_top(bench.infer, args.profile, args.device)
            phases = [phase_seconds(bench.model, bench.infer) for _ in range(args.iters)]
            bench.result["phase_s"] = {
                k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]
            }
    if args.train:
        for bench in benches:
            bench.start_training(train_batch, args.amp)
        log(f"timing training: {args.warmup} warm-up + {args.iters} rounds")
        steps = [b.train_step for b in benches]
        if args.bf16:  # each model's fp32 step, then its bf16 step, in every round
            steps = [s for b in benches
                     for s in (b.train_step, functools.partial(b.train_step, torch.bfloat16))]
        with EventStorage():  # Detectron2's RPN and ROI heads log training statistics into it
            if args.profile:  # before any optimiser step: random baselines diverge after a few
                for bench in benches:
                    log(f"profiling forward + backward of a training step of {bench.cand.name}")
                    bench.forward_backward()  # warm-up (the first backward allocates)
                    bench.result["train_profile_top"] = profile_top(
                        bench.forward_backward, args.profile, args.device
                    )
            times = interleaved_times(steps, args.iters, args.warmup, args.device)
            for bench in benches:
                log(f"training memory of {bench.cand.name}")
                measure_train_memory(bench, args.device)
        if args.bf16:
            for bench, fp32, bf16 in zip(benches, times[::2], times[1::2]):
                bench.result.update(summarise(bf16, "train_bf16"))
                bench.result["train_bf16_vs_fp32"] = round(
                    statistics.median(b / f for b, f in zip(bf16, fp32)), 3
                )
            times = times[::2]
        for bench, t in zip(benches, times):
            bench.result.update(train_batch=len(train_batch), **summarise(t, "train"))
    results = [b.result for b in benches + extras]
    for r in results:
        r["latency_vs_queryinst"] = round(r["infer_median_s"] / results[0]["infer_median_s"], 3)
        r["round_ratio_vs_queryinst"] = round(statistics.median(
            a / b for a, b in zip(r["infer_times_s"], results[0]["infer_times_s"])), 3)
    return results


# ----------------------------------------------------------------------------- report


COLUMNS = [  # (header, key, format)
    ("model", "name", "{}"),
    ("backbone", "backbone", "{}"),
    ("params (M)", "params", lambda v: f"{v / 1e6:.1f}"),
    ("GFLOPs", "gflops", "{:.1f}"),
    ("median (s)", "infer_median_s", "{:.3f}"),
    ("p90 (s)", "infer_p90_s", "{:.3f}"),
    ("per image (s)", "infer_per_image_s", "{:.3f}"),
    ("img/s", "images_per_s", "{:.2f}"),
    ("vs QueryInst", "latency_vs_queryinst", "{:.2f}x"),
    ("per round", "round_ratio_vs_queryinst", "{:.2f}x"),
    ("infer mem (MiB)", "infer_mem_mib", "{:.0f}"),
    ("dets/img", "detections_per_image", lambda v: "/".join(map(str, sorted(set(v))))),
    ("train iter (s)", "train_median_s", "{:.3f}"),
    ("train bf16 (s)", "train_bf16_median_s", "{:.3f}"),
    ("train mem (MiB)", "train_mem_mib", "{:.0f}"),
    ("train peak (MiB)", "train_peak_mem_mib", "{:.0f}"),
]


def format_table(models: list[dict]) -> str:
    """A plain-text table with one row per model; missing values print as '-'."""

    def cell(model, key, fmt):
        if key not in model:
            return "-"
        return fmt(model[key]) if callable(fmt) else fmt.format(model[key])

    rows = [[h for h, _, _ in COLUMNS]] + [[cell(m, k, f) for _, k, f in COLUMNS] for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def start_reference(args, qcfg: CfgNode, images: list[torch.Tensor], workdir: str):
    """Set up and start the reference on ``images``; QueryInst's config on its checkpoint.

    The reference gets the images in BGR (MMDetection's input order), so both models see the
    same picture whatever ``INPUT.FORMAT`` is.

    Returns:
        (ReferenceBench, CfgNode): the running reference, and ``qcfg``'s config file and
        options plus the checkpoint's shape options, with ``MODEL.WEIGHTS`` the checkpoint.

    Raises:
        SystemExit: if the config does not match a reference variant, or the reference cannot
            be set up or started (the message says why).
    """
    from reference_check import ReferenceError

    try:
        variant = reference_variant(qcfg)
        log("setting up the reference (tools/reference/setup.sh; quick once done)")
        python = setup_reference(quiet=True)
        batch = np.stack([im.numpy() for im in images])
        if qcfg.INPUT.FORMAT == "RGB":
            batch = batch[:, ::-1]
        np.save(Path(workdir) / "images.npy", np.ascontiguousarray(batch))
        ckpt = str(Path(workdir) / f"reference_{variant}.pth")
        log(f"starting the reference ({variant} queries): builds and saves its checkpoint")
        server = ReferenceServer(python, variant, ckpt, str(Path(workdir) / "images.npy"),
                                 seed=args.seed, threads=torch.get_num_threads())
    except (ValueError, ReferenceError) as e:
        raise SystemExit(f"benchmark.py: error: {e}") from None
    shape_opts = config_as_opts(detect_official_config(load_official_state_dict(ckpt)))
    cfg = queryinst_cfg(args.config_file, args.opts + shape_opts, args.device, weights=ckpt)
    return ReferenceBench(server, variant), cfg


def reference_summary(models: list[dict]) -> dict:
    """Ours against the reference (the first and the last model): the median of the
    per-round latency ratios, ours / reference, and the ratio of the medians."""
    ours, ref = models[0], models[-1]
    per_round = [o / r for o, r in zip(ours["infer_times_s"], ref["infer_times_s"])]
    return {
        "ours_over_reference_per_round_median": round(statistics.median(per_round), 3),
        "ours_over_reference_of_medians": round(ours["infer_median_s"] / ref["infer_median_s"], 3),
        "per_round": [round(x, 3) for x in per_round],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        return _run(args, stack)


def _run(args, stack: contextlib.ExitStack) -> dict:
    height, width = args.input_size
    gen = torch.Generator().manual_seed(args.seed)
    images = [random_image(height, width, gen) for _ in range(args.batch_size)]
    qcfg = queryinst_cfg(args.config_file, args.opts, args.device)
    others = ()
    if args.reference:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="queryinst_reference_"))
        reference, qcfg = start_reference(args, qcfg, images, workdir)
        stack.callback(reference.server.close)
        others = (reference,)
    candidates = [
        Candidate(
            "queryinst", qcfg, build_queryinst_optimizer,
            {"config": args.config_file, "opts": args.opts,
             "num_queries": qcfg.MODEL.QUERYINST.NUM_PROPOSALS,
             "weights": ("the reference's random checkpoint" if args.reference
                         else "random, FrozenBN calibrated")},
        )
    ]
    variants = [(f"queryinst {d}", ["MODEL.QUERYINST.INFERENCE_DTYPE", d])
                for d in args.inference_dtype]
    if args.unfolded:
        variants.append(("queryinst unfolded", ["MODEL.QUERYINST.FUSE_BN_INFERENCE", "False"]))
    for opts in args.also_opts:
        extra = opts.split()
        variants.append(("queryinst " + " ".join(
            f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(extra[::2], extra[1::2])), extra))
    for name, extra in variants:  # the same config and weights, one inference setting changed
        cfg = qcfg.clone()  # with --reference, its checkpoint too
        cfg.defrost()
        cfg.merge_from_list(extra)
        cfg.freeze()
        candidates.append(Candidate(name, cfg, build_queryinst_optimizer,
                                    {**candidates[0].extra, "opts": args.opts + extra}))
    for config_file in args.also_config:
        cfg = queryinst_cfg(config_file, args.opts, args.device)
        name = "queryinst " + Path(config_file).stem.replace("queryinst_", "")
        candidates.append(Candidate(
            name, cfg, build_queryinst_optimizer,
            {"config": config_file, "opts": args.opts,
             "num_queries": cfg.MODEL.QUERYINST.NUM_PROPOSALS}))
    if args.baselines is None:  # both at QueryInst's depth; none for another backbone
        args.baselines = ([f"{arch}_R_{qcfg.MODEL.RESNETS.DEPTH}_FPN" for arch in BASELINE_ZOO]
                          if is_resnet(qcfg) else [])
    for name in args.baselines:
        try:
            cfg = baseline_cfg(name, qcfg, args.device)
        except ValueError as e:
            raise SystemExit(f"benchmark.py: error: {e}") from None
        zoo = {"config": BASELINE_ZOO[_BASELINE_NAME.match(name)["arch"]]}
        candidates.append(Candidate(name, cfg, build_detectron2_optimizer, zoo))

    train_batch = [
        {"image": random_image(height, width, gen),
         "instances": synthetic_instances(
             height, width, qcfg.MODEL.QUERYINST.NUM_CLASSES, args.train_instances, gen)}
        for _ in range(args.train_batch_size)
    ] if args.train else None

    models = measure_all(candidates, args, images, train_batch, others)

    report = {
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "machine": machine_info(args.device),
        "settings": {
            "input_size": [height, width],
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "iters": args.iters,
            "warmup": args.warmup,
            "seed": args.seed,
            "channels_last": args.channels_last,
            "baselines_convs_channels_last": queryinst_infers_channels_last(
                candidates[0].cfg, args.device),
            "exported": args.exported,
            "inference_dtype_variants": args.inference_dtype,
            "unfolded_variant": args.unfolded,
            "train_batch_size": args.train_batch_size if args.train else None,
            "train_instances_per_image": args.train_instances if args.train else None,
            "amp": args.amp,
            "bf16": args.bf16,
            "flops": "fvcore via detectron2.utils.analysis; 1 multiply-add = 1 flop; 1 image",
        },
        "models": models,
    }
    if args.reference:
        report["reference"] = reference_summary(models)
    machine = report["machine"]
    print(
        f"{args.device} ({machine.get('gpu', machine['cpu'])}), {report['settings']['threads']} "
        f"threads, input {height}x{width}, batch {args.batch_size}, {args.iters} timed + "
        f"{args.warmup} warm-up iterations"
        + (", channels-last" if args.channels_last else "")
        + (f", training batch {args.train_batch_size}" if args.train else "")
        + (", AMP" if args.amp else "")
        + (", bf16 training step beside fp32" if args.bf16 else "")
        + f", torch {torch.__version__}, {report['date']}"
    )
    print(format_table(models))
    if args.reference:
        r = report["reference"]
        print(f"  ours / MMDetection 3.3.0 reference latency: "
              f"{r['ours_over_reference_per_round_median']:.3f} (median of the per-round ratios), "
              f"{r['ours_over_reference_of_medians']:.3f} (ratio of the medians)")
    for m in models:
        if "phase_s" in m:
            print(f"  {m['name']:<28} phases (s): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in m["phase_s"].items()))
        for key, label in (("profile_top", ""), ("train_profile_top", " [train]")):
            for row in m.get(key, []):
                ms = row.get("self_device_ms", row["self_cpu_ms"])
                print(f"  {m['name'] + label:<28} {row['op']:<44} {ms:>10.1f} ms x{row['calls']}")
    line = json.dumps(report)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return report


if __name__ == "__main__":
    try:
        main()
    except CONFIG_ERRORS as e:  # a missing --config-file, a misspelled key: one line
        sys.exit(f"ERROR: {e}")
