#!/usr/bin/env python
"""Output parity with the reference implementation, MMDetection 3.3.0's QueryInst.

``tools/reference_check.py`` runs the whole check from a clone: it sets up the reference
(``tools/reference/setup.sh``), runs it (``tools/reference/mmdet_queryinst.py``) and then this
script. The reference, with random but fully exercised weights on the CPU, writes a
checkpoint in the official layout (``--ckpt``) and an ``.npz`` (``--reference-npz``) with its
preprocessed input (``input_tensor`` (1, 3, Hp, Wp) normalised RGB padded to /32,
``img_shape``, ``ori_shape``, ``input_resized_uint8_bgr`` (3, H, W)), every stage's internals
(``rpn_proposals``, ``rpn_features``, ``stage{s}_rois`` (N, 5), ``stage{s}_cls_logits``,
``stage{s}_bbox_deltas``, ``stage{s}_decoded_bboxes``, ``stage{s}_object_feats``,
``stage{s}_attn_feats``, ``stage{s}_mask_logits_diag_argmaxcls``, ``final_mask_logits``
(N, C, 28, 28)), its detections (``det_scores``, ``det_bboxes`` in original-image pixels,
``det_labels``, ``det_masks``, ``det_mask_logits``, ``det_sort_order``, ``topk_inds``) and
``versions_json``; :func:`required_arrays` lists them and a dump without one is refused. This
script builds our model from ``configs/Base-QueryInst.yaml`` plus the config the checkpoint
implies, loads the checkpoint through ``QueryInstCheckpointer`` (the converter), feeds the
reference's own input tensor (bypassing our preprocessing, with the reference's unpadded
image size) and compares, tensor by tensor:

- with the reference's ``_aux.npz`` (if present): backbone C2-C5, FPN P2-P5, RoI features;
- the proposals, each stage's input boxes (rois), class logits, box deltas, decoded boxes,
  ``object_feats``, ``attn_feats``; each stage's mask head on its own boxes;
- the final detections sorted by score: scores and boxes (original image), labels
  (identical), mask logits, and masks in the original image (IoU per mask).

A tensor passes when max|ours - reference| / max|reference| <= --rtol (1e-4): a relative
measure, since the random weights make some activations large.

With ``--image`` it also runs the whole path from the image file through our own
preprocessing (ResizeShortestEdge(800, 1333), RGB, normalisation) and reports how close
that gets (resize interpolation differs between the frameworks: reported, not required).

    python tools/parity_check.py --reference-npz reference_100.npz --ckpt reference_100.pth \
        --variant 100
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import queryinst  # noqa: E402,F401  isort: skip  (before Detectron2: no torch.jit warning)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from qi_bench.parity import (  # noqa: E402
    Table,
    build,
    check_arrays,
    run_full_path,
    run_on_reference_input,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reference-npz", "--peer-npz", dest="reference_npz", required=True,
                   help="the reference's .npz (see above for its arrays)")
    p.add_argument("--ckpt", required=True, help="the official-layout .pth the reference ran with")
    p.add_argument("--variant", choices=["100", "300"], default=None,
                   help="expected number of queries (checked against the checkpoint)")
    p.add_argument("--aux-npz", default=None,
                   help="the reference's _aux.npz (default: next to --reference-npz, if present)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "Base-QueryInst.yaml"))
    p.add_argument("--image", default=None,
                   help="the image the reference ran on: also check the full path from the file")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--min-iou", type=float, default=0.999,
                   help="a mask passes with this IoU, or if every pixel that differs is within "
                        "--mask-margin of the 0.5 threshold in our pasted probabilities")
    p.add_argument("--mask-margin", type=float, default=1e-5,
                   help="see --min-iou (a pixel on the threshold flips with float rounding)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for path in (args.reference_npz, args.ckpt):
        if not os.path.isfile(path):
            sys.exit(f"parity_check.py: error: {path}: no such file (tools/reference_check.py "
                     "makes both the checkpoint and the .npz)")
    ref = np.load(args.reference_npz)
    aux_path = args.aux_npz or args.reference_npz[:-4] + "_aux.npz"
    aux = np.load(aux_path) if os.path.exists(aux_path) else None
    print(f"reference: {args.reference_npz} (aux: {aux_path if aux is not None else 'none'})")
    print("reference versions:", json.loads(str(ref["versions_json"])))
    model, cfg = build(args.config, args.ckpt, args.variant)
    stages = cfg.MODEL.QUERYINST.NUM_STAGES
    check_arrays(args.reference_npz, ref.files, stages)
    if aux is not None:
        check_arrays(aux_path, aux.files, stages, aux=True)

    table = Table(args.rtol, args.min_iou, args.mask_margin)
    run_on_reference_input(model, ref, aux, table)
    print("\n== the reference's preprocessed input -> our model ==")
    ok = table.print()
    if args.image:
        full = Table(args.rtol, args.min_iou)
        run_full_path(model, cfg, args.image, ref, full)
        print(f"\n== {args.image} -> our preprocessing -> our model (informative) ==")
        full.print()
    print(f"\nPARITY (reference input): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
