#!/usr/bin/env python
"""MMDetection 3.3.0's QueryInst R50-FPN on the CPU: the reference of the parity check and
the benchmark.

Runs inside the reference's venv (``tools/reference/setup.sh``), not the project's:
``tools/reference_check.py`` and ``tools/benchmark.py --reference`` start it. It

1. builds QueryInst from MMDetection's own config file, shipped in the mmdet wheel under
   ``mmdet/.mim/configs/queryinst/`` (where ``mim`` finds configs): ``--variant 100``,
   ``queryinst_r50_fpn_1x_coco.py``; ``--variant 300``,
   ``queryinst_r50_fpn_300-proposals_crop-ms-480-800-3x_coco.py``. No pretrained download:
   ``torch.manual_seed(--seed)``, MMDetection's ``init_weights()``, then ``exercise_weights``
   (below) so that every tensor of the checkpoint changes the output;
2. saves the weights in the official layout, ``{"state_dict", "meta"}`` (``--checkpoint``),
   and loads them back through ``mmdet.apis.init_detector``, checking they are bit-identical;
3. with ``--image`` and ``--dump OUT.npz``: runs ``mmdet.apis.inference_detector`` on the
   image and saves its preprocessed input, every stage's internals and its detections in the
   arrays ``tools/parity_check.py`` reads (its docstring lists them), and the large feature
   maps in ``OUT_aux.npz`` (unless ``--no-aux``);
4. with ``--time N``: times ``model.test_step`` (normalisation, padding, forward, mask
   pasting; the image is decoded and resized once, before) N times after one warm-up and
   prints the median as a JSON line;
5. with ``--serve IMAGES.npy`` (what ``tools/benchmark.py --reference`` uses): loads uint8
   BGR images (B, 3, H, W), which run without any resize, writes one JSON line
   ``{"ready": ...}`` to stdout and then answers each line ``infer`` on stdin with one
   inference of that batch and a line ``{"seconds": ...}``; ``quit`` or end of input ends it.
   Everything else the process prints goes to stderr.

Every ``--threads`` (default 2) holds for all of it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmcv_ext_standin  # noqa: E402

CONFIGS = {
    "100": "queryinst_r50_fpn_1x_coco.py",
    "300": "queryinst_r50_fpn_300-proposals_crop-ms-480-800-3x_coco.py",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=sorted(CONFIGS), default="100",
                   help="number of queries: MMDetection's 1x config (100) or its 300-proposal one")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--checkpoint", required=True, help="official-layout .pth to write")
    p.add_argument("--image", default=None, help="image file for --dump and --time")
    p.add_argument("--dump", default=None, metavar="OUT.npz",
                   help="write the outputs (needs --image)")
    p.add_argument("--no-aux", action="store_true",
                   help="skip OUT_aux.npz (feature maps, 200-300 MiB)")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="time N inferences of --image after one warm-up")
    p.add_argument("--serve", default=None, metavar="IMAGES.npy",
                   help="answer 'infer' requests on stdin with this uint8 (B,3,H,W) BGR batch")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if (args.dump or args.time) and not args.image:
        p.error("--dump and --time need --image")
    if args.image and not os.path.isfile(args.image):
        p.error(f"--image {args.image}: no such file")
    if args.time < 0 or args.threads < 1:
        p.error("--time must be >= 0 and --threads >= 1")
    return args


def log(msg: str) -> None:
    """One progress line on stderr, prefixed ``[reference]`` (stdout carries the protocol)."""
    print(f"[reference] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- weights


def exercise_weights(model: torch.nn.Module, seed: int, calib_size: int = 320) -> None:
    """Random weights under which every tensor of the state dict changes the output.

    MMDetection's own initialisation leaves much of the checkpoint without effect at
    inference: BatchNorm is the identity (weight 1, bias 0, mean 0, variance 1; the last BN
    of each bottleneck even has weight 0, which cuts its residual branch), biases are zero
    or one constant, and all proposals start as the whole image. A converter that dropped,
    swapped or mis-transposed such a tensor would go unnoticed. Here, from a generator
    seeded with ``seed`` (independent of torch's global one):

    - every BatchNorm: weight ~ U(0.6, 1.4), bias ~ N(0, 0.2^2), running mean
      ~ N(0, 0.2^2), running variance ~ U(0.6, 1.6); then the backbone's BNs take the
      statistics of their input on a random ``calib_size`` x ``calib_size`` image (the
      affine part stays random), so activations keep a trained network's scale (O(1-10)
      instead of 1e3) and a bias-sized error stays visible in a relative comparison;
    - every LayerNorm: weight ~ U(0.6, 1.4), bias ~ N(0, 0.2^2);
    - every other float tensor whose elements are all equal (zero biases, the focal-loss
      prior of the classifiers): its value plus N(0, 0.05^2) per element;
    - the initial proposal boxes (cx, cy, w, h, relative): centres ~ U(0.2, 0.8), sizes
      ~ U(0.15, 0.5);
    - the box regressors' weights x 0.1: with O(1) deltas at each of the six stages the
      boxes wander off the image, and MMDetection's CPU mask pasting fails on a box that
      lies wholly outside it.

    Args:
        model: MMDetection's QueryInst after ``init_weights()``, modified in place.
        seed: seed of the generator.
        calib_size: side in pixels of the calibration image.
    """
    gen = torch.Generator().manual_seed(10007 + seed)

    def uniform(t, lo, hi):
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))

    def normal(t, std, mean=0.0):
        t.copy_(mean + std * torch.randn(t.shape, generator=gen))

    done = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                uniform(module.weight, 0.6, 1.4)
                normal(module.bias, 0.2)
                normal(module.running_mean, 0.2)
                uniform(module.running_var, 0.6, 1.6)
            elif isinstance(module, torch.nn.LayerNorm):
                uniform(module.weight, 0.6, 1.4)
                normal(module.bias, 0.2)
            else:
                continue
            done.update(f"{name}.{k}" for k, _ in module.named_parameters(recurse=False))
            done.update(f"{name}.{k}" for k, _ in module.named_buffers(recurse=False))
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in done or not t.is_floating_point() or t.numel() < 1:
                continue
            if bool((t == t.flatten()[0]).all()):
                normal(t, 0.05, mean=t.flatten()[0].item())
        boxes = model.rpn_head.init_proposal_bboxes.weight
        uniform(boxes[:, :2], 0.2, 0.8)
        uniform(boxes[:, 2:], 0.15, 0.5)
        for head in model.roi_head.bbox_head:
            head.fc_reg.weight.mul_(0.1)
        calibrate_backbone_bn(model.backbone, torch.randn(1, 3, calib_size, calib_size,
                                                          generator=gen))


def calibrate_backbone_bn(backbone: torch.nn.Module, image: torch.Tensor) -> int:
    """Set each BatchNorm's running mean and variance to those of its input on ``image``.

    Layer by layer in one eval-mode forward pass (a forward pre-hook sets the statistics
    before the layer normalises with them). Returns the number of layers set.
    """
    def set_stats(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    layers = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(set_stats) for m in layers]
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(image)
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    return len(layers)


def build_initialised(cfg, seed: int) -> torch.nn.Module:
    """``cfg.model`` built after ``torch.manual_seed(seed)``, with MMDetection's
    ``init_weights()`` (its per-tensor log silenced)."""
    from mmengine.logging import MMLogger

    from mmdet.registry import MODELS

    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("ERROR")  # init_weights logs every tensor
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model


def build_and_save(cfg, seed: int, variant: str, path: str) -> dict:
    """Build the model with exercised random weights and save it in the official layout.

    Returns:
        dict: the saved state dict (name -> CPU tensor).
    """
    model = build_initialised(cfg, seed)
    exercise_weights(model, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "meta": checkpoint_meta(cfg, seed, variant)}, path)
    log(f"checkpoint {path}: {len(state)} tensors, {os.path.getsize(path) / 2**20:.1f} MiB")
    return state


def checkpoint_meta(cfg, seed: int, variant: str) -> dict:
    """The ``meta`` of the checkpoint: plain types only (readable with weights_only=True)."""
    import mmengine

    import mmdet
    from mmdet.datasets import CocoDataset

    info = CocoDataset.METAINFO
    return {
        "mmdet_version": mmdet.__version__,
        "mmengine_version": mmengine.__version__,
        "torch_version": str(torch.__version__),
        "config": cfg.pretty_text,
        "variant": variant,
        "seed": seed,
        "weights": "random: mmdet init_weights() + exercise_weights() of "
                   "tools/reference/mmdet_queryinst.py",
        "dataset_meta": {"classes": tuple(info["classes"]),
                         "palette": [tuple(c) for c in info["palette"]]},
    }


def versions(ops: str) -> dict:
    """The reference's library versions for the dump's ``versions_json``; ``ops`` says where
    mmcv's compiled ops come from ("stand-in": tools/reference/mmcv_ext_standin.py)."""
    import mmcv
    import mmengine
    import torchvision

    import mmdet

    return {"python": sys.version.split()[0], "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": np.__version__,
            "mmcv": mmcv.__version__, "mmcv_ops": ops, "mmengine": mmengine.__version__,
            "mmdet": mmdet.__version__}


# ----------------------------------------------------------------------------- capture


class Capture:
    """Records the model's internals during one inference (hooks and method wrappers).

    ``data`` afterwards: "input_uint8" (3, H, W), "input_tensor" (1, 3, Hp, Wp), "metainfo",
    "backbone" and "fpn" (lists of maps), "proposals" / "proposal_feats" (N, 4) / (N, 256),
    per stage s "rois{s}" (N, 5), "bbox_feats{s}", "cls{s}" (N, C), "deltas{s}" (N, 4),
    "boxes{s}" (N, 4), "object_feats{s}" and "attn_feats{s}" (N, 256); "mask_feats" and
    "mask_logits" (N, C, 28, 28) of the last stage and "topk_inds" (K,).
    """

    def __init__(self, model):
        self.data: dict = {}
        self.model = model
        rh = model.roi_head
        keep = self._keep
        self.handles = [
            model.data_preprocessor.register_forward_pre_hook(
                lambda m, a: keep("input_uint8", a[0]["inputs"][0])),
            model.data_preprocessor.register_forward_hook(self._preprocessed),
            model.backbone.register_forward_hook(lambda m, a, o: keep("backbone", list(o))),
            model.neck.register_forward_hook(lambda m, a, o: keep("fpn", list(o))),
            rh.mask_roi_extractor[-1].register_forward_hook(lambda m, a, o: keep("mask_feats", o)),
            rh.mask_head[-1].register_forward_hook(lambda m, a, o: keep("mask_logits", o)),
        ]
        for s in range(rh.num_stages):
            self.handles += [
                rh.bbox_roi_extractor[s].register_forward_hook(
                    lambda m, a, o, s=s: keep(f"bbox_feats{s}", o)),
                rh.bbox_head[s].register_forward_hook(self._stage_outputs(s)),
            ]
        self.originals = {}
        self._wrap(model.rpn_head, "predict", self._after_rpn)
        self._wrap(rh, "_bbox_forward", self._after_bbox_forward)
        self._wrap_before(rh, "predict_mask", self._before_predict_mask)

    def _keep(self, key, value):
        if torch.is_tensor(value):
            value = value.detach().clone()
        elif isinstance(value, list):
            value = [v.detach().clone() for v in value]
        self.data[key] = value

    def _preprocessed(self, module, args, out):
        self._keep("input_tensor", out["inputs"])
        self.data["metainfo"] = out["data_samples"][0].metainfo

    def _stage_outputs(self, s):
        def hook(module, args, out):  # DIIHead: cls_score, bbox_delta, object_feats, attn_feats
            for key, t in zip(("cls", "deltas", "object_feats", "attn_feats"), out):
                self._keep(f"{key}{s}", t.reshape(-1, t.shape[-1]))
        return hook

    def _wrap(self, obj, name, after):
        original = getattr(obj, name)
        self.originals[(obj, name)] = original

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            after(args, out)
            return out
        setattr(obj, name, wrapper)

    def _wrap_before(self, obj, name, before):
        original = getattr(obj, name)
        self.originals[(obj, name)] = original

        def wrapper(*args, **kwargs):
            before(args)
            return original(*args, **kwargs)
        setattr(obj, name, wrapper)

    def _after_rpn(self, args, out):
        self._keep("proposals", out[0].bboxes)
        self._keep("proposal_feats", out[0].features)

    def _after_bbox_forward(self, args, out):
        stage, rois = args[0], args[2]
        self._keep(f"rois{stage}", rois)
        self._keep(f"boxes{stage}", out["decoded_bboxes"])

    def _before_predict_mask(self, args):
        self._keep("topk_inds", args[2][0].topk_inds)

    def remove(self):
        for h in self.handles:
            h.remove()
        for (obj, name) in self.originals:
            delattr(obj, name)  # the instance attribute; the class's method shows again


# ----------------------------------------------------------------------------- dump


def dump(model, image: str, path: str, aux: bool, ops: str) -> None:
    """Run ``inference_detector`` on ``image`` and save the arrays of tools/parity_check.py.

    Boxes of the detections are in original-image pixels (``rescale=True``), masks are
    (K, H0, W0) bool at threshold 0.5, ``det_mask_logits`` (K, 28, 28) pre-sigmoid.
    MMDetection's top-k is unsorted: ``det_sort_order`` sorts by score descending, then
    by ``topk_inds`` (query * classes + label) ascending.
    """
    from mmdet.apis import inference_detector
    from mmdet.structures.bbox import bbox2roi

    cap = Capture(model)
    try:
        with torch.no_grad():
            result = inference_detector(model, image)
    finally:
        cap.remove()
    d = cap.data
    pred = result.pred_instances
    rh = model.roi_head
    stages = rh.num_stages
    out = {}
    meta = d["metainfo"]
    out["input_tensor"] = d["input_tensor"].numpy()
    out["input_resized_uint8_bgr"] = d["input_uint8"].numpy()
    for key in ("ori_shape", "img_shape", "batch_input_shape"):
        out[key] = np.asarray(meta[key])
    out["scale_factor"] = np.asarray(meta["scale_factor"], np.float64)
    out["rpn_proposals"] = d["proposals"].numpy()
    out["rpn_features"] = d["proposal_feats"].numpy()
    fpn = tuple(d["fpn"])
    with torch.no_grad():
        for s in range(stages):
            for name, key in (("rois", "rois"), ("cls_logits", "cls"), ("bbox_deltas", "deltas"),
                              ("decoded_bboxes", "boxes"), ("object_feats", "object_feats"),
                              ("attn_feats", "attn_feats")):
                out[f"stage{s}_{name}"] = d[f"{key}{s}"].numpy()
            # Not part of MMDetection's inference (it runs the last mask head only): mask
            # head s on stage s's boxes and attention features, the training pairing.
            logits = rh._mask_forward(s, fpn, bbox2roi([d[f"boxes{s}"]]),
                                      d[f"attn_feats{s}"][None])["mask_preds"]
            cls = d[f"cls{s}"].argmax(-1)
            picked = logits[torch.arange(len(cls)), cls]
            out[f"stage{s}_mask_logits_diag_argmaxcls"] = picked.numpy()
    topk = d["topk_inds"]
    out["final_mask_logits"] = d["mask_logits"].numpy()
    out["topk_inds"] = topk.numpy()
    out["det_bboxes"] = pred.bboxes.numpy()
    out["det_scores"] = pred.scores.numpy()
    out["det_labels"] = pred.labels.numpy()
    out["det_mask_logits"] = d["mask_logits"].flatten(0, 1)[topk].numpy()
    out["det_masks"] = pred.masks.numpy()
    out["det_sort_order"] = np.lexsort((out["topk_inds"], -out["det_scores"]))
    out["num_classes"] = np.asarray(rh.bbox_head[-1].num_classes)
    out["versions_json"] = np.asarray(json.dumps(versions(ops)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **out)
    log(f"wrote {path} ({len(pred.scores)} detections, top score {pred.scores.max():.4f})")
    if aux:
        extra = {f"backbone_c{i + 2}": t.numpy() for i, t in enumerate(d["backbone"])}
        extra.update({f"fpn_p{i + 2}": t.numpy() for i, t in enumerate(d["fpn"])})
        extra.update({f"stage{s}_bbox_roi_feats": d[f"bbox_feats{s}"].numpy()
                      for s in range(stages)})
        extra["final_mask_roi_feats"] = d["mask_feats"].numpy()
        aux_path = path[:-4] + "_aux.npz" if path.endswith(".npz") else path + "_aux.npz"
        np.savez(aux_path, **extra)
        log(f"wrote {aux_path}")


# ----------------------------------------------------------------------------- timing


def image_batch(model, image: str) -> dict:
    """The test pipeline's output for ``image`` (decoded, resized), as test_step takes it."""
    from mmcv.transforms import Compose

    from mmdet.utils import get_test_pipeline_cfg

    pipeline = Compose(get_test_pipeline_cfg(model.cfg.copy()))
    sample = pipeline({"img_path": image, "img_id": 0})
    return {"inputs": [sample["inputs"]], "data_samples": [sample["data_samples"]]}


def array_batch(images: np.ndarray) -> dict:
    """uint8 (B, 3, H, W) BGR images as a test_step batch, without any resize."""
    from mmdet.datasets.transforms import PackDetInputs

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"--serve: expected uint8 (B, 3, H, W), got {images.dtype} {images.shape}")
    pack = PackDetInputs()
    batch = {"inputs": [], "data_samples": []}
    for i, chw in enumerate(images):
        h, w = chw.shape[1:]
        packed = pack({"img": np.ascontiguousarray(chw.transpose(1, 2, 0)), "img_id": i,
                       "img_path": f"array{i}", "ori_shape": (h, w), "img_shape": (h, w),
                       "scale_factor": (1.0, 1.0)})
        batch["inputs"].append(packed["inputs"])
        batch["data_samples"].append(packed["data_samples"])
    return batch


def infer_seconds(model, batch: dict) -> float:
    """Wall seconds of one ``model.test_step`` on a fresh copy of ``batch``."""
    import copy

    data = {"inputs": list(batch["inputs"]), "data_samples": copy.deepcopy(batch["data_samples"])}
    start = time.perf_counter()
    with torch.no_grad():
        model.test_step(data)
    return time.perf_counter() - start


def protocol_stdout():
    """A text stream on the original stdout; from now on the process's stdout (Python's
    and file descriptor 1, so C code's too) goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def serve(model, images_path: str, proto) -> None:
    """The benchmark's protocol on stdin / ``proto`` (see the module docstring)."""
    batch = array_batch(np.load(images_path))
    proto.write(json.dumps({"ready": True, "images": len(batch["inputs"]),
                            "threads": torch.get_num_threads()}) + "\n")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "infer":
            proto.write(json.dumps({"seconds": infer_seconds(model, batch)}) + "\n")
        elif cmd in ("quit", ""):
            break
        else:
            proto.write(json.dumps({"error": f"unknown command {cmd!r}"}) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    proto = protocol_stdout() if args.serve else None  # MMEngine's logger prints to stdout
    torch.set_num_threads(args.threads)
    ops = mmcv_ext_standin.install()

    import mmdet
    from mmengine.config import Config

    from mmdet.apis import init_detector
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg_path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "queryinst",
                            CONFIGS[args.variant])
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"{cfg_path} is missing: is this mmdet 3.3.0 from its wheel?")
    cfg = Config.fromfile(cfg_path)
    cfg.model.backbone.init_cfg = None  # no ImageNet download: the weights are random anyway
    log(f"versions {json.dumps(versions(ops))}; config {os.path.basename(cfg_path)}")

    state = build_and_save(cfg, args.seed, args.variant, args.checkpoint)
    model = init_detector(cfg, args.checkpoint, device="cpu")
    loaded = model.state_dict()
    differ = [k for k in state if not torch.equal(state[k], loaded[k])]
    if list(loaded) != list(state) or differ:
        raise SystemExit(f"init_detector did not load {args.checkpoint} exactly: {differ[:5]}")
    model.eval()

    if args.dump:
        dump(model, args.image, args.dump, not args.no_aux, ops)
    if args.time:
        batch = image_batch(model, args.image)
        infer_seconds(model, batch)  # warm-up
        times = [infer_seconds(model, batch) for _ in range(args.time)]
        print(json.dumps({"variant": args.variant, "threads": torch.get_num_threads(),
                          "median_s": round(statistics.median(times), 4),
                          "times_s": [round(t, 4) for t in times]}), flush=True)
    if args.serve:
        serve(model, args.serve, proto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
