#!/usr/bin/env python
"""Export a QueryInst model to ONNX (onnxruntime) or TorchScript, for deployment.

    python tools/export_model.py --config-file configs/queryinst_R50_FPN_1x_coco.yaml \\
        --format onnx --output exported/ MODEL.WEIGHTS model_final.pth
    python demo/demo.py --exported exported/model.onnx --input photo.jpg --output out/

Writes ``--output``/``model.onnx`` (or ``model.ts``), ``model.json`` beside it (input format,
test sizes, score threshold, the model's class names, output names, opset: all
that ``queryinst.export.predictor.ExportedPredictor`` and ``demo/demo.py --exported`` need)
and ``config.yaml`` (the full config, for the record). The graph takes one image
(float32 (3, H, W) in ``INPUT.FORMAT``, 0-255, resized by the test transform, H and W
dynamic) and returns ``pred_boxes``, ``scores``, ``pred_classes`` and ``pred_masks``; see
``queryinst/export/exporter.py`` and docs/deployment.md.

The model is traced on one sample input: ``--sample-image`` resized as at test time, or by
default a random image of ``INPUT.MIN_SIZE_TEST`` x ``INPUT.MIN_SIZE_TEST`` pixels (the
graph does not depend on the sample's content or size). Extra ``KEY VALUE`` pairs override
the config, as in ``train_net.py``. ``MODEL.WEIGHTS`` loads strictly (an official ``.pth``
is converted on load); an empty one exports the untrained model with a warning.

Exit status 0 on success; 1 with one ``ERROR:`` line for unusable weights or a sample image
that cannot be read; 2 for command-line errors, including a setting the export does not
support (the line names the key or flag and the fix, e.g. ``--opset 11``), and a
``--config-file`` that does not exist (with the nearest config files).

int8: ``--quantize int8 --calibration-dataset NAME [--calibration-images N]`` (``--format
onnx`` only) also writes ``model.int8.onnx`` beside ``model.onnx``: ONNX Runtime's
``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations (U8S8, ONNX
Runtime's x86 int8 kernels) calibrated on N images of the training dataset NAME; RoIAlign,
box decoding, the sigmoids and the layers feeding them stay float32), recorded under ``"int8"`` in ``model.json``; see
``queryinst/export/quantize.py``. ``--reduce-range auto`` (default) quantizes the weights to
7 bits on x86 CPUs without VNNI, whose int8 kernels saturate with 8-bit weights. NAME must not be, nor share an image with, a dataset of
``DATASETS.TEST`` (exit 2 with one ``ERROR:`` line, as for a TorchScript format or an opset
the quantizer does not take). ``demo/demo.py --exported DIR/model.int8.onnx`` runs it.

Class names: ``MODEL.QUERYINST.CLASS_NAMES`` (``train_net.py`` writes them into its
``config.yaml``), else those stored in the checkpoint, else the metadata of
``DATASETS.TEST[0]`` (``--dataset NAME:JSON:IMAGES`` registers a COCO json, as in
``train_net.py``); without any, one warning and ``"thing_classes": null``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "QueryInst"))
import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
import torch  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from queryinst.checkpoint import CheckpointError, QueryInstCheckpointer  # noqa: E402
from queryinst.config_loading import CONFIG_ERRORS, inference_config  # noqa: E402
from queryinst.data import (  # noqa: E402
    add_dataset_argument,
    model_metadata,
    read_image,
    register_dataset_specs,
)
from queryinst.export import (  # noqa: E402
    EXPORT_FORMATS,
    MIN_ONNX_OPSET,
    ExportError,
    check_exportable,
    export_model,
)
from queryinst.export.quantize import (  # noqa: E402
    CalibrationImages,
    QuantizeError,
    calibration_dicts,
    check_quantizable,
    quantize_int8,
)
from queryinst.engine.defaults import console_color  # noqa: E402

logger = logging.getLogger("queryinst.export")
DEFAULT_OPSET = 17


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="a yaml config")
    p.add_argument("--format", required=True, choices=sorted(EXPORT_FORMATS),
                   help="onnx (model.onnx, run with onnxruntime) or torchscript (model.ts)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write to")
    p.add_argument("--sample-image", metavar="IMG",
                   help="image to trace with (default: a random MIN_SIZE_TEST square)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, >= {MIN_ONNX_OPSET} (default {DEFAULT_OPSET})")
    p.add_argument("--quantize", metavar="int8",
                   help="also write model.int8.onnx, statically quantized (--format onnx)")
    p.add_argument("--calibration-dataset", metavar="NAME",
                   help="with --quantize: a registered training dataset to calibrate on "
                        "(never one of DATASETS.TEST), e.g. nuclei_dsb_train")
    p.add_argument("--calibration-images", type=int, default=16, metavar="N",
                   help="with --quantize: images of it, spread evenly (default 16)")
    p.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                   help="with --quantize: 7-bit weights, for x86 CPUs without VNNI whose "
                        "int8 kernels saturate with 8-bit ones; auto (default): on where "
                        "this CPU lacks VNNI (queryinst.export.quantize.u8s8_saturates)")
    p.add_argument("--fp32-nodes", action="append", default=[], metavar="REGEX",
                   help="with --quantize: also keep the Conv/MatMul/Gemm nodes whose name "
                        "matches in float32 (repeatable)")
    add_dataset_argument(p)  # before the KEY VALUE pairs
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides, e.g. MODEL.WEIGHTS model_final.pth")
    return p


def sample_input(cfg, image_path: str | None) -> torch.Tensor:
    """float32 (3, H, W): the image resized by the test transform, or a random square."""
    if image_path is None:
        size = cfg.INPUT.MIN_SIZE_TEST
        generator = torch.Generator().manual_seed(0)
        return torch.rand(3, size, size, generator=generator) * 255
    image = read_image(image_path, format=cfg.INPUT.FORMAT)
    size = cfg.INPUT.MIN_SIZE_TEST
    resize = T.ResizeShortestEdge([size, size], cfg.INPUT.MAX_SIZE_TEST)
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="queryinst", color=console_color())
    setup_logger(color=console_color())
    try:
        register_dataset_specs(args.dataset)
    except ValueError as exc:  # a --dataset name taken by another dataset
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    try:
        if args.quantize is not None:
            check_quantizable(args.format, args.opset, args.quantize)
            if not args.calibration_dataset:
                raise QuantizeError(f"--quantize {args.quantize} needs --calibration-dataset "
                                    f"NAME, a training dataset, e.g. nuclei_dsb_train")
            if args.calibration_images < 1:
                raise QuantizeError(f"--calibration-images {args.calibration_images}: "
                                    f"pass 1 or more")
        elif args.calibration_dataset or args.fp32_nodes or args.reduce_range != "auto":
            raise QuantizeError("--calibration-dataset, --fp32-nodes and --reduce-range go "
                                "with --quantize int8")
        cfg = inference_config(args.config_file, args.opts)
        check_exportable(cfg, args.format, args.opset)
        calibration = (calibration_dicts(cfg, args.calibration_dataset)
                       if args.quantize is not None else None)
    except (*CONFIG_ERRORS, ExportError, QuantizeError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    try:
        sample = sample_input(cfg, args.sample_image)
    except (OSError, ValueError, SyntaxError) as exc:
        print(f"ERROR: --sample-image {args.sample_image}: cannot read the image ({exc})",
              file=sys.stderr)
        return 1
    model = build_model(cfg).eval()
    extra = {}
    if cfg.MODEL.WEIGHTS:
        try:
            extra = QueryInstCheckpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
        except CheckpointError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 1
    else:
        logger.warning("UNTRAINED MODEL: MODEL.WEIGHTS is empty, exporting random weights")
    # The model's class names (config, checkpoint, else DATASETS.TEST[0]), for model.json.
    classes = model_metadata(cfg, extra.get("class_names")).get("thing_classes", None)
    path = export_model(model, cfg, args.format, args.output, sample, opset=args.opset,
                        thing_classes=classes)
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    logger.info(f"wrote {path} and its model.json (traced at {tuple(sample.shape[1:])})")
    if calibration is not None:
        reader = CalibrationImages(calibration, args.calibration_images, "image",
                                   cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST,
                                   cfg.INPUT.MAX_SIZE_TEST)
        reduce_range = {"auto": None, "on": True, "off": False}[args.reduce_range]
        quantize_int8(path, reader, extra_fp32=args.fp32_nodes,
                      calibration_dataset=args.calibration_dataset, reduce_range=reduce_range)
    return 0


if __name__ == "__main__":
    sys.exit(main())
