"""The parity check of tools/parity_check.py: our model on the reference's preprocessed input
(and, informatively, on an image through our own preprocessing), compared array by array
with the MMDetection 3.3.0 reference's dump (the script's docstring lists the arrays and the
tolerances).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.structures import ImageList

from queryinst import add_queryinst_config, queryinst_postprocess
from queryinst.checkpoint import (
    QueryInstCheckpointer,
    config_as_opts,
    detect_official_config,
    format_config_summary,
    load_official_state_dict,
)
from queryinst.config_loading import merge_config_file

# The arrays of the reference's dump that this check reads (tools/reference/mmdet_queryinst.py
# writes them); per stage s of ``num_stages``.
_FIXED_ARRAYS = ("input_tensor", "img_shape", "ori_shape", "input_resized_uint8_bgr",
                 "rpn_proposals", "rpn_features", "final_mask_logits", "topk_inds", "det_scores",
                 "det_bboxes", "det_labels", "det_masks", "det_mask_logits", "det_sort_order",
                 "versions_json")
_STAGE_ARRAYS = ("rois", "cls_logits", "bbox_deltas", "decoded_bboxes", "object_feats",
                 "attn_feats", "mask_logits_diag_argmaxcls")
_AUX_ARRAYS = tuple(f"backbone_c{i}" for i in range(2, 6)) + tuple(
    f"fpn_p{i}" for i in range(2, 6)) + ("final_mask_roi_feats",)


def required_arrays(num_stages: int, aux: bool = False) -> list[str]:
    """Names of the arrays the reference's ``.npz`` (``aux=True``: its ``_aux.npz``) must hold."""
    if aux:
        return list(_AUX_ARRAYS) + [f"stage{s}_bbox_roi_feats" for s in range(num_stages)]
    return list(_FIXED_ARRAYS) + [f"stage{s}_{k}" for s in range(num_stages) for k in _STAGE_ARRAYS]


def check_arrays(path: str, names, num_stages: int, aux: bool = False) -> None:
    """Raise ValueError naming ``path`` and the arrays it lacks, if it lacks any."""
    missing = [k for k in required_arrays(num_stages, aux) if k not in set(names)]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(
            f"{path} lacks {', '.join(missing[:8])}{more}: not a dump of the reference for a "
            f"{num_stages}-stage model (tools/reference/mmdet_queryinst.py --dump writes one)")


class Table:
    """Rows of (name, shape, max abs diff, max rel diff, verdict)."""

    def __init__(self, rtol: float, min_iou: float, mask_margin: float = 0.0):
        self.rtol, self.min_iou, self.mask_margin = rtol, min_iou, mask_margin
        self.rows: list[tuple[str, str, str, str, bool]] = []

    def compare(self, name: str, ours, ref) -> bool:
        ours = np.asarray(ours.detach().cpu() if torch.is_tensor(ours) else ours, np.float64)
        ref = np.asarray(ref, np.float64)
        if ours.shape != ref.shape:
            self.rows.append((name, f"{ours.shape} vs {ref.shape}", "-", "-", False))
            return False
        diff = np.abs(ours - ref).max() if ours.size else 0.0
        scale = np.abs(ref).max() if ref.size else 0.0
        rel = diff / max(scale, 1e-12)
        ok = bool(rel <= self.rtol)
        self.rows.append((name, "x".join(map(str, ref.shape)), f"{diff:.3g}", f"{rel:.3g}", ok))
        return ok

    def check(self, name: str, shape: str, value: str, ok: bool) -> bool:
        self.rows.append((name, shape, value, "-", bool(ok)))
        return bool(ok)

    def print(self) -> bool:
        w = max(len(r[0]) for r in self.rows)
        print(f"{'tensor':<{w}}  {'shape':<16} {'max abs':>10} {'max rel':>10}  result")
        for name, shape, a, r, ok in self.rows:
            print(f"{name:<{w}}  {shape:<16} {a:>10} {r:>10}  {'PASS' if ok else 'FAIL'}")
        ok = all(r[4] for r in self.rows)
        print(f"{sum(r[4] for r in self.rows)}/{len(self.rows)} passed (rtol {self.rtol:g}): "
              f"{'PASS' if ok else 'FAIL'}")
        return ok


def build(cfg_path: str, ckpt: str, variant: str | None):
    """Our model in eval mode with the official checkpoint loaded through the converter."""
    detected = detect_official_config(load_official_state_dict(ckpt))
    print("config detected from the checkpoint:\n" + format_config_summary(detected))
    if variant is not None and detected["MODEL.QUERYINST.NUM_PROPOSALS"] != int(variant):
        sys.exit(f"--variant {variant} but the checkpoint has "
                 f"{detected['MODEL.QUERYINST.NUM_PROPOSALS']} queries")
    cfg = get_cfg()
    add_queryinst_config(cfg)
    merge_config_file(cfg, cfg_path)  # yaml.safe_load only
    cfg.merge_from_list(config_as_opts(detected) + ["MODEL.DEVICE", "cpu"])
    cfg.freeze()
    model = build_model(cfg)
    QueryInstCheckpointer(model).load(ckpt)
    return model.eval(), cfg


class Recorder:
    """Forward hooks that keep our internals: backbone outputs, pooled boxes and features."""

    def __init__(self, model):
        self.data: dict[str, list] = {"bottom_up": [], "box_rois": [], "box_feats": [],
                                      "mask_feats": [], "mask_logits": [], "deltas": []}
        heads = model.roi_heads
        self.handles = [
            model.backbone.bottom_up.register_forward_hook(self._keep("bottom_up")),
            heads.box_pooler.register_forward_hook(self._pooled("box_rois", "box_feats")),
            heads.mask_pooler.register_forward_hook(self._pooled(None, "mask_feats")),
            heads.mask_heads[-1].register_forward_hook(self._keep("mask_logits")),
        ] + [h.register_forward_hook(self._delta) for h in heads.box_heads]

    def _keep(self, key):
        return lambda m, a, o: self.data[key].append(o)

    def _pooled(self, rois_key, feats_key):
        def hook(m, args, out):
            if rois_key:
                self.data[rois_key].append(torch.cat([b.tensor for b in args[1]]))
            self.data[feats_key].append(out)
        return hook

    def _delta(self, m, a, out):
        self.data["deltas"].append(out[1])

    def remove(self):
        for h in self.handles:
            h.remove()


def sorted_detections(scores, flat_idx):
    """Score descending, then (query * C + label) ascending: the reference's det_sort_order."""
    return np.lexsort((np.asarray(flat_idx), -np.asarray(scores)))


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@torch.no_grad()
def run_on_reference_input(model, ref, aux, table: Table):
    """Feed the reference's preprocessed tensor; compare every stage and the detections."""
    h, w = (int(x) for x in ref["img_shape"][:2])
    if tuple(ref["input_resized_uint8_bgr"].shape[1:]) != (h, w):
        raise ValueError("img_shape and input_resized_uint8_bgr disagree")
    ori_h, ori_w = (int(x) for x in ref["ori_shape"][:2])
    images = ImageList(torch.from_numpy(ref["input_tensor"]), [(h, w)])
    rec = Recorder(model)
    t0 = time.perf_counter()
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    heads = model.roi_heads
    stages = heads.forward_stages(features, proposals)
    results = heads.inference(stages, features, [(h, w)])
    out = queryinst_postprocess(results[0], ori_h, ori_w)
    print(f"our forward + postprocess: {time.perf_counter() - t0:.2f}s")
    d = rec.data
    C = stages[-1].cls_logits.shape[-1]

    if aux is not None:
        for i, name in enumerate(("res2", "res3", "res4", "res5")):
            table.compare(f"backbone_c{i + 2}", d["bottom_up"][0][name], aux[f"backbone_c{i + 2}"])
        for i in range(4):
            table.compare(f"fpn_p{i + 2}", features[f"p{i + 2}"], aux[f"fpn_p{i + 2}"])
    table.compare("rpn_proposals", proposals[0].proposal_boxes.tensor, ref["rpn_proposals"])
    table.compare("rpn_features", proposals[0].proposal_features, ref["rpn_features"])
    for s, st in enumerate(stages):
        table.compare(f"stage{s}_rois", d["box_rois"][s], ref[f"stage{s}_rois"][:, 1:])
        if aux is not None:
            table.compare(f"stage{s}_bbox_roi_feats", d["box_feats"][s],
                          aux[f"stage{s}_bbox_roi_feats"])
        table.compare(f"stage{s}_cls_logits", st.cls_logits[0], ref[f"stage{s}_cls_logits"])
        table.compare(f"stage{s}_bbox_deltas", d["deltas"][s][0], ref[f"stage{s}_bbox_deltas"])
        table.compare(f"stage{s}_decoded_bboxes", st.pred_boxes[0],
                      ref[f"stage{s}_decoded_bboxes"])
        table.compare(f"stage{s}_object_feats", st.object_feats[0], ref[f"stage{s}_object_feats"])
        table.compare(f"stage{s}_attn_feats", st.attn_feats[0], ref[f"stage{s}_attn_feats"])
    # The inference ran the last mask head once per distinct selected query; the reference's
    # final mask tensors cover all N queries. Run ours on all N as well (records [1]), then
    # check that the inference rows are those of the distinct queries.
    last = stages[-1]
    final_logits = heads.mask_logits(-1, features, [last.pred_boxes[0]], last.attn_feats[0])
    distinct = torch.unique(results[0].query_indices)
    table.compare("inference_mask_logits_vs_all_queries", d["mask_logits"][0],
                  final_logits[distinct])
    if aux is not None:
        table.compare("final_mask_roi_feats", d["mask_feats"][1], aux["final_mask_roi_feats"])
    table.compare("final_mask_logits", final_logits, ref["final_mask_logits"])
    # Diagnostic of the reference: mask head s on stage s's boxes and attn_feats (the training
    # pairing).
    for s, st in enumerate(stages):
        logits = heads.mask_logits(s, features, [st.pred_boxes[0]], st.attn_feats[0])
        cls = torch.from_numpy(ref[f"stage{s}_cls_logits"]).argmax(-1)
        table.compare(f"stage{s}_mask_logits_diag", logits[torch.arange(len(cls)), cls],
                      ref[f"stage{s}_mask_logits_diag_argmaxcls"])
    rec.remove()

    compare_detections(table, "det", out, results[0], final_logits, C, ref)


def compare_detections(table: Table, prefix: str, out, resized, final_logits, C, ref):
    """Final detections of both, each sorted by (score desc, query*C+label asc)."""
    ours_flat = (resized.query_indices * C + resized.pred_classes).numpy()
    ours_order = sorted_detections(resized.scores.numpy(), ours_flat)
    ref_order = ref["det_sort_order"]
    k = min(len(ours_order), len(ref_order))
    table.check(f"{prefix}_count", "", f"{len(ours_order)} vs {len(ref_order)}",
                len(ours_order) == len(ref_order))
    o, p = ours_order[:k], ref_order[:k]
    table.compare(f"{prefix}_scores", out.scores[o], ref["det_scores"][p])
    table.compare(f"{prefix}_bboxes", out.pred_boxes.tensor[o], ref["det_bboxes"][p])
    same = (out.pred_classes.numpy()[o] == ref["det_labels"][p])
    table.check(f"{prefix}_labels", str(k), f"{(~same).sum()} differ", same.all())
    same_q = ours_flat[o] == ref["topk_inds"][p]
    table.check(f"{prefix}_query_x_label", str(k), f"{(~same_q).sum()} differ", same_q.all())
    if final_logits is not None:
        q = resized.query_indices.numpy()[o]
        lab = resized.pred_classes.numpy()[o]
        table.compare(f"{prefix}_mask_logits", final_logits[q, lab], ref["det_mask_logits"][p])
    ours_masks, ref_masks = out.pred_masks.numpy()[o], ref["det_masks"][p]
    ious = mask_ious(ours_masks, ref_masks)
    i = int(ious.argmin())
    low = np.flatnonzero(ious < table.min_iou)
    note, ok = "", len(low) == 0
    if len(low) and final_logits is not None:
        # Below --min-iou only through pixels on the threshold: float rounding, not a difference.
        probs = final_logits[q[low], lab[low]].sigmoid()
        boxes = out.pred_boxes.tensor[o][low]
        worst = max(margin_of_flipped_pixels(probs[j], boxes[j], ours_masks[k], ref_masks[k])
                    for j, k in enumerate(low))
        ok = worst <= table.mask_margin
        note = f"; {len(low)} below, differing pixels within {worst:.1g} of 0.5"
    table.check(f"{prefix}_masks_iou", "x".join(map(str, ref["det_masks"].shape)),
                f"min {ious.min():.5f} (#{i}){note}", ok)


def margin_of_flipped_pixels(prob, box, ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest |p - 0.5| over the pixels where the two binary masks differ.

    Args:
        prob: our (M, M) mask probabilities of one detection.
        box: its (4,) box in original-image pixels, as pasted.
        ours, ref: the (H, W) bool masks of both.

    Returns:
        float: 0.0 if no pixel differs; our probabilities are pasted as Detectron2's
        ``paste_masks_in_image`` does before it thresholds.
    """
    from detectron2.layers.mask_ops import _do_paste_mask

    differ = ours != ref
    if not differ.any():
        return 0.0
    pasted, _ = _do_paste_mask(prob[None, None], box[None], ours.shape[0], ours.shape[1],
                               skip_empty=False)
    return float(np.abs(pasted[0].numpy()[differ] - 0.5).max())


@torch.no_grad()
def run_full_path(model, cfg, image_path: str, ref, table: Table):
    """Image file -> our preprocessing (Detectron2 resize, RGB, normalisation) -> detections."""
    bgr = read_image(image_path, format="BGR")
    ori_h, ori_w = bgr.shape[:2]
    if (ori_h, ori_w) != tuple(int(x) for x in ref["ori_shape"][:2]):
        raise ValueError(
            f"{image_path} is {ori_h}x{ori_w}, the reference ran on {ref['ori_shape']}")
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(bgr).apply_image(bgr)
    ours_hw, ref_hw = tuple(resized.shape[:2]), tuple(int(x) for x in ref["img_shape"][:2])
    table.check("full_resized_size", "", f"{ours_hw} vs {ref_hw}", ours_hw == ref_hw)
    diff = np.abs(resized.astype(np.int16).transpose(2, 0, 1)
                  - ref["input_resized_uint8_bgr"].astype(np.int16))
    table.check("full_resized_uint8", "", f"max {diff.max()}, mean {diff.mean():.3f}",
                diff.max() == 0)

    def as_input(bgr_hwc):
        rgb = bgr_hwc[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else bgr_hwc
        image = torch.as_tensor(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return [{"image": image, "height": ori_h, "width": ori_w}]

    # Our normalisation and padding on the reference's resized pixels: isolates the resize.
    ref_resized = as_input(ref["input_resized_uint8_bgr"].transpose(1, 2, 0))
    table.compare("full_input_from_reference_pixels", model.preprocess_image(ref_resized).tensor,
                  ref["input_tensor"])
    inputs = as_input(resized)
    table.compare("full_input_tensor", model.preprocess_image(inputs).tensor, ref["input_tensor"])
    results = model.inference(inputs, do_postprocess=False)
    out = queryinst_postprocess(results[0], ori_h, ori_w)
    num_classes = model.roi_heads.box_heads[-1].cls_score.out_features
    compare_detections(table, "full_det", out, results[0], None, num_classes, ref)
