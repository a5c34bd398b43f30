#!/usr/bin/env python
"""COCO box and mask AP of an exported graph (``model.onnx``, ``model.int8.onnx`` or
``model.ts``) on a registered dataset, as ``train_net.py --eval-only`` measures the PyTorch
model (``queryinst.export.evaluation``)::

    python tools/eval_exported.py --exported exported/model.int8.onnx --dataset nuclei_dsb_val

Prints one JSON line ``{"exported", "dataset", "bbox_AP", "segm_AP", ...}``. Exit status 2
with one ``ERROR:`` line for a missing file or an unknown dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "QueryInst"))
import queryinst  # noqa: E402,F401  isort: skip  (registers the bundled datasets)
from detectron2.data import DatasetCatalog  # noqa: E402

from queryinst.export import ExportedPredictor  # noqa: E402
from queryinst.export.evaluation import evaluate_exported  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exported", required=True, metavar="FILE")
    p.add_argument("--dataset", required=True, metavar="NAME", help="a registered dataset")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = p.parse_args(argv)
    if args.dataset not in DatasetCatalog.list():
        print(f"ERROR: --dataset {args.dataset} is not registered", file=sys.stderr)
        return 2
    try:
        predictor = ExportedPredictor(args.exported, num_threads=args.threads)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as out:
        results = evaluate_exported(predictor, args.dataset, out)
    line = {"exported": os.path.abspath(args.exported), "dataset": args.dataset,
            **{f"{task}_{k}": round(v, 3) for task, r in results.items() for k, v in r.items()
               if k in ("AP", "AP50", "AP75")}}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
