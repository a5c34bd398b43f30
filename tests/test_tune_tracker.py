"""tools/tune_tracker.py: replaying the tracker over detections kept once (masks as RLE, set
aside) gives exactly the result rows of tracking the frames with their masks (the tracker's
own path, ``results_from_tracks``); the grid is every combination of the given values."""
import pytest
import torch
from detectron2.structures import Boxes, Instances

from conftest import REPO, load_script
from queryinst.video import EmbeddingTracker, encode_mask, results_from_tracks

H, W = 24, 32


def _video(seed, frames=6, objects=5):
    """Frames of drifting boxes, embeddings of near-orthogonal objects plus one duplicate
    per frame (a second, lower-scoring detection of object 0 shifted by a pixel), random
    masks; the query index of row r is r + 10 (any distinct numbers)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:objects] * 4
    xy = torch.rand(objects, 2, generator=g) * 12
    out = []
    for t in range(frames):
        perm = torch.randperm(objects, generator=g)
        boxes = torch.cat([xy + t, xy + t + 8], dim=1)[perm]
        boxes = torch.cat([boxes, boxes[:1] + 1])
        e = torch.cat([emb[perm], emb[perm][:1]]) + 0.05 * torch.randn(objects + 1, 8, generator=g)
        inst = Instances((H, W))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.cat([0.5 + 0.5 * torch.rand(objects, generator=g), torch.tensor([0.35])])
        inst.pred_classes = torch.zeros(objects + 1, dtype=torch.int64)
        inst.track_embeddings = e
        inst.pred_masks = torch.rand(objects + 1, H, W, generator=g) > 0.5
        inst.query_indices = torch.arange(objects + 1) + 10
        out.append(inst)
    return out


@pytest.mark.parametrize("kw", [dict(), dict(nms_thresh=0.5), dict(init_score_thresh=0.6)])
def test_replay_equals_tracking_with_masks(kw):
    tune = load_script("tools/tune_tracker.py", "tune_tracker")
    videos, expected = [], []
    for vid, seed in ((1, 0), (2, 1)):
        frames = _video(seed)
        tracker = EmbeddingTracker(**kw)
        for f in frames:
            tracker.update(f)
        expected += results_from_tracks(vid, tracker.finish(), {0: 7})
        kept = []
        rles = []
        for f in frames:
            rles.append([encode_mask(m) for m in f.pred_masks])
            g = Instances(f.image_size, **{k: v for k, v in f.get_fields().items()
                                           if k != "pred_masks"})
            kept.append(g)
        videos.append({"video_id": vid, "frames": kept, "rles": rles})
    got = tune.replay(EmbeddingTracker(**kw), videos, {0: 7})
    assert len(got) == len(expected) > 5  # tracks of both videos
    for a, b in zip(got, expected):
        assert {k: a[k] for k in b} == b


def test_parse_grid():
    tune = load_script("tools/tune_tracker.py", "tune_tracker")
    grid = tune.parse_grid(["NMS_THRESH=0.3,0.5", "MAX_MISSED=1,2,4"])
    assert len(grid) == 6 and {"NMS_THRESH": 0.5, "MAX_MISSED": 4.0} in grid
    assert tune.parse_grid([]) == [{}]
    with pytest.raises(ValueError, match="NMS_TRESH"):
        tune.parse_grid(["NMS_TRESH=0.3"])


def test_grid_below_the_kept_detections_is_refused():
    """DET_SCORE_THRESH under the config's value cannot be replayed (the model dropped those
    detections): a ValueError that names the option to lower; at or above it passes."""
    from detectron2.config import get_cfg

    from queryinst import add_queryinst_config

    tune = load_script("tools/tune_tracker.py", "tune_tracker")
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH = 0.05
    tune.check_grid(tune.parse_grid(["DET_SCORE_THRESH=0.05,0.2", "MIN_IOU=0,0.1"]), cfg)
    with pytest.raises(ValueError, match=r"\[0.01\].*DET_SCORE_THRESH 0.01"):
        tune.check_grid(tune.parse_grid(["DET_SCORE_THRESH=0.01,0.2"]), cfg)


def test_an_image_dataset_is_refused_before_the_model_is_built():
    tune = load_script("tools/tune_tracker.py", "tune_tracker")
    with pytest.raises(ValueError, match="--datasets ctc_psc_val: not a registered video"):
        tune.main(["--config-file", f"{REPO}/configs/bundled/queryinst_vis_MNV2_FPN_ctc_psc.yaml",
                   "--datasets", "ctc_psc_video_val", "ctc_psc_val",
                   "--opts", "MODEL.WEIGHTS", "no_such_file.pth"])
