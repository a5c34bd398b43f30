"""Distributed evaluation on the CPU: two gloo processes give exactly the one-process numbers.

Each process evaluates its share of the images / videos (Detectron2's ``InferenceSampler``:
contiguous halves); the evaluators gather the per-process results on rank 0. The truth is the
same evaluation in one process. Compared to every digit (``==``, NaN where both are NaN):

- ``train_net.py --eval-only`` of a tiny model (random weights, so its AP is 0) on the bundled
  nuclei images and on the nuclei pseudo-videos (``YTVISEvaluator``): the metrics, and the
  predictions the main process writes (every box, score and RLE);
- COCOEvaluator and YTVISEvaluator on predictions made from the ground truth (shifted masks,
  left-out and invented instances, distinct scores), whose AP is far from 0 and from 1.

Each process's accumulated results are compact: RLE masks (``counts`` str or bytes), no arrays.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.samplers import InferenceSampler
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from queryinst.engine.launch import launch
from queryinst.video import YTVISEvaluator
from queryinst.video.structures import VideoTrack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train_net  # noqa: E402
from test_torchrun import CONFIG, TINY  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

IMAGES = ("nuclei_dsb_train", "nuclei_dsb_val")  # 5 + 1 images
VIDEOS = ("nuclei_dsb_video_train", "nuclei_dsb_video_val")  # 5 + 1 videos
VIS = ["MODEL.META_ARCHITECTURE", "QueryInstVIS", "MODEL.QUERYINST_VIS.TRACK_HEAD.EMBED_DIM",
       "32", "DATASETS.TRAIN", "('nuclei_dsb_video_train',)",
       "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
       # a random model's scores are low: track them all, so that there are tracks to compare
       "MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH", "0.0",
       "MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH", "0.0"]


def _opts(kind: str, out_dir: str) -> list:
    test_sets = VIDEOS if kind == "vis" else IMAGES
    return [*TINY, *(VIS if kind == "vis" else []), "DATASETS.TEST", repr(test_sets),
            "OUTPUT_DIR", os.path.join(out_dir, kind)]


def _score(*keys) -> float:
    """A score in (0, 1) from integers, distinct for nearby keys."""
    return float(np.random.default_rng(list(keys)).uniform(0.05, 0.95))


def _fake_mask(mask: np.ndarray, k: int) -> np.ndarray:
    """The GT mask shifted by -2..2 pixels (by k): IoUs spread around the AP thresholds."""
    return np.roll(mask, (k % 5) - 2, axis=k % 2)


def _image_predictions(record: dict) -> Instances:
    """Predictions of one image from its GT: every 4th instance missed, the others with a
    shifted mask, and for every 3rd a second, worse copy (a false positive)."""
    h, w = record["height"], record["width"]
    masks, scores = [], []
    for k, ann in enumerate(record["annotations"]):
        if k % 4 == 3:
            continue
        gt = mask_util.decode(ann["segmentation"]).astype(bool)
        masks.append(_fake_mask(gt, k))
        scores.append(_score(record["image_id"], k))
        if k % 3 == 0:
            masks.append(_fake_mask(gt, k + 7) & np.roll(gt, 3, axis=0))
            scores.append(_score(record["image_id"], k, 1))
    inst = Instances((h, w))
    inst.pred_masks = torch.from_numpy(np.stack(masks))
    inst.pred_boxes = Boxes(torch.tensor(np.stack(
        [mask_util.toBbox(mask_util.encode(np.asfortranarray(m.astype(np.uint8))))
         for m in masks]), dtype=torch.float32))
    inst.pred_boxes.tensor[:, 2:] += inst.pred_boxes.tensor[:, :2]  # xywh -> xyxy
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
    return inst


def _video_tracks(gt: dict, video_id: int) -> list:
    """Tracks of one video from its GT: each GT track with shifted masks, every 3rd cut short
    (absent in its last frames), every 4th left out."""
    tracks = []
    anns = [a for a in gt["annotations"] if a["video_id"] == video_id]
    for k, ann in enumerate(anns):
        if k % 4 == 3:
            continue
        masks = [None if s is None else torch.from_numpy(
            _fake_mask(mask_util.decode(s).astype(bool), k)) for s in ann["segmentations"]]
        if k % 3 == 0:
            masks[len(masks) // 2:] = [None] * (len(masks) - len(masks) // 2)
        tracks.append(VideoTrack(track_id=k, category=0, score=_score(video_id, k),
                                 boxes=[None] * len(masks), masks=masks))
    return tracks


def _rle_only(rows) -> bool:
    """Every mask of the accumulated rows is a compressed RLE (no array)."""
    for row in rows:
        segs = row.get("segmentations", [row.get("segmentation")])
        for s in segs:
            if s is not None and not (isinstance(s, dict) and isinstance(s["counts"], (str, bytes))):
                return False
    return True


def _synthetic_evaluations() -> dict:
    """COCOEvaluator and YTVISEvaluator over this process's share of GT-made predictions."""
    out = {}
    dicts = DatasetCatalog.get("nuclei_dsb_train")
    coco = COCOEvaluator("nuclei_dsb_train", tasks=("bbox", "segm"), distributed=True,
                         output_dir=None)
    coco.reset()
    for i in InferenceSampler(len(dicts)):
        r = dicts[i]
        coco.process([{"image_id": r["image_id"], "height": r["height"], "width": r["width"]}],
                     [{"instances": _image_predictions(r)}])
    out["coco_compact"] = _rle_only(p for pred in coco._predictions for p in pred["instances"])
    out["coco_gt"] = coco.evaluate()
    meta = MetadataCatalog.get("nuclei_dsb_video_train")
    with open(meta.json_file) as f:
        gt = json.load(f)
    vis = YTVISEvaluator("nuclei_dsb_video_train", output_dir=None)
    vis.reset()
    videos = [v["id"] for v in gt["videos"]]
    for i in InferenceSampler(len(videos)):
        vis.process([{"video_id": videos[i]}], [{"tracks": _video_tracks(gt, videos[i])}])
    out["vis_compact"] = _rle_only(vis._results)
    out["vis_gt"] = vis.evaluate()
    return out


def _predictions(out_dir: str, kind: str) -> dict:
    """What the main process wrote: COCO predictions per test set, sorted; the YouTube-VIS
    submission."""
    found = {}
    for root, _, files in os.walk(os.path.join(out_dir, kind)):
        for name in ("coco_instances_results.json", "results.json"):
            if name in files:
                with open(os.path.join(root, name)) as f:
                    rows = json.load(f)
                key = os.path.relpath(os.path.join(root, name), out_dir)
                found[key] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return found


def _evaluate_all(out_dir: str) -> dict:
    """Everything compared, in this process (one process or one of the two)."""
    res = {kind: train_net.main(train_net.parse_args(
        ["--config-file", CONFIG, "--eval-only", *_opts(kind, out_dir), "MODEL.WEIGHTS",
         os.path.join(out_dir, f"{kind}.pth")])) for kind in ("coco", "vis")}
    res.update(_synthetic_evaluations())
    return res


def _worker(out_dir: str):
    res = _evaluate_all(out_dir)
    if comm.is_main_process():
        torch.save(res, os.path.join(out_dir, "results.pt"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny models (image and video), saved as checkpoints for --eval-only."""
    base = tmp_path_factory.mktemp("eval")
    for kind in ("coco", "vis"):
        cfg = train_net.setup(train_net.parse_args(
            ["--config-file", CONFIG, *_opts(kind, str(base / "setup"))]))
        torch.manual_seed(0)
        torch.save({"model": train_net.Trainer.build_model(cfg).state_dict()},
                   base / f"{kind}.pth")
    return base


def _run_dir(weights, name: str):
    """A folder for one evaluation run, with links to the weights."""
    out_dir = weights / name
    out_dir.mkdir()
    for kind in ("coco", "vis"):
        os.symlink(weights / f"{kind}.pth", out_dir / f"{kind}.pth")
    return out_dir


@pytest.fixture(scope="module")
def one_process(weights):
    out_dir = _run_dir(weights, "one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes on this 2-CPU machine
    try:
        res = _evaluate_all(str(out_dir))
    finally:
        torch.set_num_threads(threads)
    res["written"] = _predictions(str(out_dir), "coco") | _predictions(str(out_dir), "vis")
    return res


@pytest.fixture(scope="module")
def two_processes(weights):
    out_dir = _run_dir(weights, "two")
    launch(_worker, 2, dist_url=f"file://{out_dir}/rendezvous", args=(str(out_dir),),
           backend="gloo")
    res = torch.load(out_dir / "results.pt", weights_only=False)
    res["written"] = _predictions(str(out_dir), "coco") | _predictions(str(out_dir), "vis")
    return res


def _same(a, b, path="") -> None:
    """a == b to every digit, recursively; NaN equals NaN."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def test_eval_only_of_two_processes_is_the_one_process_evaluation(one_process, two_processes):
    for kind, sets in (("coco", IMAGES), ("vis", VIDEOS)):
        assert list(one_process[kind]) == list(sets)
        _same(two_processes[kind], one_process[kind], kind)
    # The predictions themselves, gathered on rank 0 (OUTPUT_DIR/inference holds those of
    # the last test set: one image, one video).
    written = one_process["written"]
    assert sorted(written) == ["coco/inference/coco_instances_results.json",
                               "vis/inference/results.json"]
    assert all(len(rows) >= 5 for rows in written.values())
    assert two_processes["written"] == written


def test_gathered_coco_and_ytvis_ap_is_the_one_process_ap(one_process, two_processes):
    for kind in ("coco_gt", "vis_gt"):
        _same(two_processes[kind], one_process[kind], kind)
    # Predictions from the GT: AP well inside (0, 100), so the digits carry information.
    for task in ("bbox", "segm"):
        assert 20 < one_process["coco_gt"][task]["AP"] < 95
    assert 20 < one_process["vis_gt"]["segm"]["AP"] < 95


def test_accumulated_results_are_compact(one_process, two_processes):
    for res in (one_process, two_processes):
        assert res["coco_compact"] and res["vis_compact"]
