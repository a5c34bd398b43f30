"""The models tools/benchmark.py measures: configs of QueryInst and of Detectron2's
baselines at the same depth, random inputs, and the built models (``Bench``; an exported
graph, ``ExportedBench``; the MMDetection reference process, ``ReferenceBench``).
"""
from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from queryinst import add_queryinst_config
from queryinst.checkpoint import QueryInstCheckpointer
from queryinst.config_loading import merge_config, merge_config_file

from .measure import calibrate_frozen_bn
from .reference import ReferenceServer

# Baseline name -> model-zoo config of that architecture; the depth comes from the name.
BASELINE_ZOO = {
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
    "cascade_mask_rcnn": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
}
_BASELINE_NAME = re.compile(r"^(?P<arch>[a-z_]+)_R_(?P<depth>18|34|50|101|152)_FPN$")


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
    cfg = get_cfg()  # as model_zoo.get_config, with yaml.safe_load only
    merge_config_file(cfg, model_zoo.get_config_file(BASELINE_ZOO[match["arch"]]))
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
        fmt: "onnx", "torchscript" or "int8" (the ONNX graph quantized by
            ``queryinst.export.quantize_int8``, calibrated on the benchmark's own images:
            its scales fit random pixels, which changes what it detects, not its speed).
        out_dir: where the export is written (kept: ``path`` names the file).
        threads: onnxruntime's intra-op threads (torch's for TorchScript are the process's).
    """

    def __init__(self, source: Bench, fmt: str, out_dir: str, threads: int):
        from queryinst.export import ExportedPredictor, export_model

        images = [x["image"] for x in source.inputs]
        start = time.perf_counter()
        path = export_model(source.model, source.cand.cfg, "onnx" if fmt == "int8" else fmt,
                            out_dir, images[0])
        if fmt == "int8":
            path = _quantize_on_images(path, images, source.cand.cfg.INPUT.FORMAT)
        self.export_s = time.perf_counter() - start
        self.path = path
        self.predictor = ExportedPredictor(path, num_threads=threads)
        self.images = [im.numpy().astype("float32") for im in images]
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


def _quantize_on_images(path: str, images: list[torch.Tensor], input_format: str) -> str:
    """``path`` quantized to int8, calibrated on ``images`` (uint8 (3, H, W), written as
    PNGs and read back unchanged); returns the int8 file's path."""
    import cv2

    from queryinst.export.quantize import CalibrationImages, quantize_int8, quantized_path

    dicts = []
    for i, image in enumerate(images):
        file_name = os.path.join(os.path.dirname(path), f"calibration_{i}.png")
        cv2.imwrite(file_name, image.permute(1, 2, 0).numpy())  # channels kept as they are
        dicts.append({"file_name": file_name})
    height, width = images[0].shape[1:]
    # "BGR" reads the PNG's channels back in the written order; the sizes resize nothing
    reader = CalibrationImages(dicts, len(dicts), "image", "BGR", min(height, width),
                               max(height, width))
    quantize_int8(path, reader, calibration_dataset="the benchmark's random images")
    return quantized_path(path)


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
