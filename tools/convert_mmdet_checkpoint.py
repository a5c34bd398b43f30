#!/usr/bin/env python
"""Convert an official QueryInst checkpoint (hustvl/QueryInst or MMDetection) to Detectron2.

    python tools/convert_mmdet_checkpoint.py --input queryinst_r50_fpn_1x_coco_*.pth \\
        --output queryinst_d2.pth

The logic lives in ``queryinst.checkpoint``. The script detects the number of queries,
classes, stages and the ResNet depth from the tensors, prints them, checks that the
converted tensors fill exactly the model those values build (built on the ``meta`` device:
no memory, no time), and writes ``{"model": state_dict, "__author__": ...,
"matching_heuristics": False}``, which ``DetectionCheckpointer`` loads. Use the printed
values as config overrides (or a config with the same values) with the converted file.

Exit status 0 on success; 1 with one ``ERROR: <file>: ...`` line when the input is missing,
not a readable checkpoint (truncated, corrupt, not a PyTorch file), refused because it names
Python functions or classes that could run code (``queryinst.checkpoint.safe_load``; nothing in it is
run), not an official QueryInst checkpoint, or the output cannot be written; or when
``--config`` is not plain yaml (read with ``yaml.safe_load`` only).
"""
from __future__ import annotations

import argparse
import os
import sys

import queryinst  # noqa: F401  isort: skip  (before Detectron2: no torch.jit warning)
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from queryinst import add_queryinst_config
from queryinst.checkpoint import (
    CheckpointError,
    config_as_opts,
    convert_official_checkpoint,
    format_config_summary,
)
from queryinst.config_loading import ConfigFileError, merge_config_file, missing_config_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_state_for(config_file: str):
    """Returns f(detected config) -> state dict of that model, built on the meta device."""

    def build(detected):
        cfg = get_cfg()
        add_queryinst_config(cfg)
        merge_config_file(cfg, config_file)  # yaml.safe_load only
        cfg.merge_from_list(config_as_opts(detected) + ["MODEL.DEVICE", "meta"])
        with torch.device("meta"):
            return build_model(cfg).state_dict()

    return build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="official .pth ({'state_dict', 'meta'})")
    p.add_argument("--output", required=True, help="Detectron2 checkpoint to write (.pth)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "Base-QueryInst.yaml"),
                   help="config the converted tensors are checked against (plus the detected "
                        "values)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.config):
        print(f"ERROR: --config {missing_config_message(args.config)}", file=sys.stderr)
        return 2
    try:
        converted, detected = convert_official_checkpoint(
            args.input, args.output, build_model_state=model_state_for(args.config)
        )
    # unreadable, refused, missing, or not an official checkpoint; a --config not plain yaml
    except (CheckpointError, ConfigFileError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. --output in a folder that does not exist
        print(f"ERROR: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    n = sum(v.numel() for k, v in converted.items() if not k.endswith("num_batches_tracked"))
    print(f"converted {args.input}\n  -> {args.output}: {len(converted)} tensors, "
          f"{n / 1e6:.2f} M values (num_batches_tracked of the backbone's BN dropped)")
    print("detected config (use with the converted file):\n" + format_config_summary(detected))
    print("as command-line options: " + " ".join(map(str, config_as_opts(detected))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
