"""Online trackers (queryinst/video/modeling/tracker.py, docs/method.md §6.2) on synthetic
detections: identities under permutation, births, deaths, occlusion gaps, one-to-one assignment against
brute force, the association score and the track summaries computed by hand."""

import itertools
import os
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from queryinst import add_queryinst_config
from queryinst.video.structures import decode_mask
from queryinst.video.modeling.tracker import (
    TRACKER_REGISTRY,
    EmbeddingTracker,
    QueryCosineTracker,
    assign_allowed,
    build_tracker,
)

H, W = 32, 48


def _frame(boxes, scores, classes, emb, masks=True, device="cpu"):
    """One frame's detections as the video model gives them to the tracker."""
    inst = Instances((H, W))
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
    inst.pred_boxes = Boxes(boxes.reshape(-1, 4))
    inst.scores = torch.as_tensor(scores, dtype=torch.float32, device=device)
    inst.pred_classes = torch.as_tensor(classes, dtype=torch.int64, device=device)
    emb = torch.as_tensor(emb, dtype=torch.float32, device=device)
    inst.track_embeddings = emb if emb.dim() == 2 else emb.reshape(len(inst.scores), -1)
    if masks:
        g = torch.Generator().manual_seed(len(inst.scores) * 7 + int(sum(scores) * 1000))
        inst.pred_masks = (torch.rand(len(inst.scores), H, W, generator=g) > 0.5).to(device)
    return inst


def _make(kind, **kw):
    if kind == "embedding":
        return EmbeddingTracker(**kw)
    return QueryCosineTracker(**kw)


def _world(num_objects, seed, dim=16):
    """Objects with near-orthogonal embeddings (self dot 16, cross dots ~0), boxes, classes."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:num_objects] * 4.0
    xy = torch.rand(num_objects, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + 8 + torch.rand(num_objects, 2, generator=g) * 8], dim=1)
    classes = torch.randint(0, 3, (num_objects,), generator=g)
    scores = 0.5 + 0.5 * torch.rand(num_objects, generator=g)
    return g, basis, boxes, classes, scores


@pytest.mark.parametrize("kind", ["embedding", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cues", ["all", "embedding only"])
def test_identities_kept_under_permutation(kind, seed, cues, device="cpu"):
    weights = {} if cues == "all" else dict(iou_weight=0.0, label_weight=0.0, score_weight=0.0)
    tracker = _make(kind, **weights)
    g, emb, boxes, classes, scores = _world(6, seed)
    id_of = None
    for t in range(5):
        perm = torch.randperm(6, generator=g)
        noise = 0.05 * torch.randn(emb.shape, generator=g)
        jitter = torch.randn(boxes.shape, generator=g)
        frame = _frame(boxes[perm] + jitter[perm] + t, scores[perm], classes[perm],
                       emb[perm] + noise[perm], device=device)
        out = tracker.update(frame)
        assert len(out) == 6 and out.track_ids.dtype == torch.int64
        assert out.track_ids.device == frame.scores.device
        # output rows are the input rows, in input order
        assert torch.equal(out.scores, frame.scores)
        ids = out.track_ids.tolist()
        got = {int(perm[r]): ids[r] for r in range(6)}  # object -> id
        if id_of is None:
            id_of = got
            assert sorted(got.values()) == list(range(6))
        assert got == id_of
    tracks = tracker.finish()
    assert [tr.track_id for tr in tracks] == list(range(6))
    assert all(len(tr.present()) == 5 and tr.num_frames == 5 for tr in tracks)


def test_births_get_new_ids_in_order_of_score():
    tracker = EmbeddingTracker()
    e = torch.eye(4) * 3
    out = tracker.update(_frame([[0, 0, 5, 5], [10, 0, 15, 5], [20, 0, 25, 5]],
                                [0.5, 0.9, 0.7], [0, 0, 0], e[:3]))
    assert out.track_ids.tolist() == [2, 0, 1]  # births by descending score, rows in input order
    out = tracker.update(_frame([[30, 0, 35, 5], [0, 0, 5, 5], [10, 0, 15, 5], [20, 0, 25, 5]],
                                [0.6, 0.5, 0.9, 0.7], [0, 0, 0, 0], torch.cat([e[3:], e[:3]])))
    assert out.track_ids.tolist() == [3, 2, 0, 1]
    assert len(tracker.finish()) == 4


@pytest.mark.parametrize("kind", ["embedding", "cosine"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_occlusion_gap_of_k_keeps_id_and_k_plus_1_ends_track(kind, k):
    box, emb = [[0, 0, 10, 10]], [[2.0, 0.0]]
    other = _frame([[30, 20, 40, 30]], [0.9], [1], [[0.0, 2.0]])  # another object, always there
    for gap, same in [(k, True), (k + 1, False)]:
        tracker = _make(kind, max_missed=k)
        both = lambda: _frame(box + [[30, 20, 40, 30]], [0.9, 0.9], [0, 1], emb + [[0.0, 2.0]])
        assert tracker.update(both()).track_ids.tolist() == [0, 1]
        for _ in range(gap):
            assert tracker.update(other).track_ids.tolist() == [1]
        out = tracker.update(both())
        assert out.track_ids.tolist() == ([0, 1] if same else [2, 1])
        tracks = tracker.finish()
        T = gap + 2
        assert tracks[0].present() == ([0, T - 1] if same else [0])
        assert tracks[1].present() == list(range(T))
        assert tracks[0].boxes[1:T - 1] == [None] * gap and tracks[0].masks[1:T - 1] == [None] * gap
        if not same:
            assert tracks[2].present() == [T - 1]


def test_no_track_taken_twice():
    """Two detections both closest to the one track: one continues it, the other is born."""
    tracker = QueryCosineTracker()
    tracker.update(_frame([[0, 0, 10, 10]], [0.9], [0], [[1.0, 0.0]]))
    out = tracker.update(_frame([[1, 0, 11, 10], [0, 0, 10, 10]], [0.8, 0.9], [0, 0],
                                [[1.0, 0.1], [1.0, 0.05]]))
    assert sorted(out.track_ids.tolist()) == [0, 1]
    # second frame's detection 1 is closer in query, IoU, score: it continues; 0 is new
    assert out.track_ids.tolist() == [1, 0]
    # the same with the second detection below INIT_SCORE_THRESH: it is dropped, not a copy of 0
    tracker.reset()
    tracker.update(_frame([[0, 0, 10, 10]], [0.9], [0], [[1.0, 0.0]]))
    out = tracker.update(_frame([[0, 0, 10, 10], [1, 0, 11, 10]], [0.2, 0.9], [0, 0],
                                [[1.0, 0.1], [1.0, 0.05]]))
    assert out.track_ids.tolist() == [0] and out.scores.tolist() == [pytest.approx(0.9)]


def _brute_force(scores, allowed):
    """(most pairs, best sum) over every one-to-one set of allowed pairs."""
    D, N = scores.shape
    best = (0, 0.0)
    for n in range(1, min(D, N) + 1):
        for rows in itertools.combinations(range(D), n):
            for cols in itertools.permutations(range(N), n):
                if all(allowed[r, c] for r, c in zip(rows, cols)):
                    cand = (n, sum(scores[r, c] for r, c in zip(rows, cols)))
                    if cand[0] > best[0] or (cand[0] == best[0] and cand[1] > best[1]):
                        best = cand
    return best


@pytest.mark.parametrize("seed", range(20))
def test_assign_allowed_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    D, N = rng.integers(1, 5, size=2)
    scores = rng.normal(0, 5, size=(D, N))
    allowed = rng.random((D, N)) < 0.5
    scores[~allowed] = rng.choice([np.nan, 1e9, -1e9])  # disallowed entries never count
    rows, cols = assign_allowed(scores, allowed)
    assert len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
    assert all(allowed[r, c] for r, c in zip(rows, cols))
    n, best = _brute_force(scores, allowed)
    assert len(rows) == n
    assert scores[rows, cols].sum() == pytest.approx(best)


def test_embedding_tracker_rejects_pair_when_new_slot_wins():
    tracker = EmbeddingTracker()
    tracker.update(_frame([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.9], [0, 1],
                          [[1.0, 0.0], [0.0, 1.0]]))
    # det a: dots (0.5, -1) -> logits [0, 0.5, -1]; det b: dots (-0.5, -0.25) -> new slot wins
    det = _frame([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.8], [0, 1],
                 [[0.5, -1.0], [-0.5, -0.25]])
    m, allowed = tracker.match_scores(det.track_embeddings, tracker._emb)
    z_a = 1 + math.exp(0.5) + math.exp(-1)
    z_b = 1 + math.exp(-0.5) + math.exp(-0.25)
    expected = [[0.5 - math.log(z_a), -1 - math.log(z_a)],
                [-0.5 - math.log(z_b), -0.25 - math.log(z_b)]]
    assert m.tolist() == [[pytest.approx(v, abs=1e-6) for v in row] for row in expected]
    assert allowed.tolist() == [[True, False], [False, False]]
    # b has the same box and class as track 1 (IoU 1, label bonus 10) but still starts a new track
    out = tracker.update(det)
    assert out.track_ids.tolist() == [0, 2]


@pytest.mark.parametrize("thresh,continues", [(0.59, True), (0.61, False)])
def test_cosine_tracker_threshold(thresh, continues):
    """cos((1, 0), (3, 4)) = 0.6: the pair is allowed only when 0.6 >= COSINE_THRESH, whatever
    the box and class bonuses say."""
    tracker = QueryCosineTracker(cosine_thresh=thresh)
    tracker.update(_frame([[0, 0, 10, 10]], [0.9], [0], [[1.0, 0.0]]))
    det = _frame([[0, 0, 10, 10]], [0.9], [0], [[3.0, 4.0]])
    m, allowed = tracker.match_scores(det.track_embeddings, tracker._emb)
    assert m.item() == pytest.approx(0.6) and allowed.item() == continues
    assert tracker.update(det).track_ids.tolist() == ([0] if continues else [1])


def test_low_scores_neither_start_nor_continue():
    tracker = EmbeddingTracker(det_score_thresh=0.05, init_score_thresh=0.3, max_missed=0)

    def ids(score):
        out = tracker.update(_frame([[0, 0, 10, 10]], [score], [0], [[1.0, 0.0]]))
        return out.track_ids.tolist()

    assert ids(0.2) == []  # too low to start a track
    assert ids(0.6) == [0]
    assert ids(0.2) == [0]  # 0.2 >= DET_SCORE_THRESH continues the track
    assert ids(0.04) == []  # < DET_SCORE_THRESH: ignored, the track misses the frame and ends
    assert ids(0.6) == [1]
    tracks = tracker.finish()
    assert tracks[0].frame_scores == [None, pytest.approx(0.6), pytest.approx(0.2), None, None]


def test_total_score_by_hand_iou_and_label_flip_the_assignment():
    """Tracks A (box [0,0,10,10], class 0, query (1,0)) and B ([20,0,30,10], class 1, (0,1)).
    Detection x has A's query but B's class and a box overlapping B's; y the other way round."""
    def tracker_with_tracks(**kw):
        tr = QueryCosineTracker(cosine_thresh=-1.0, **kw)
        tr.update(_frame([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.9], [0, 1],
                         [[1.0, 0.0], [0.0, 1.0]]))
        return tr

    det = _frame([[18, 0, 28, 10], [0, 0, 10, 10]], [0.8, 0.5], [1, 0], [[1.0, 0.0], [0.0, 1.0]])
    iou_xb = 80 / 120  # [18,0,28,10] vs [20,0,30,10]: 8x10 over 100 + 100 - 80
    # rows x, y; columns A, B: cos + 1*log(score) + 2*IoU + 10*[same class]
    expected = [[1 + math.log(0.8) + 0 + 0, 0 + math.log(0.8) + 2 * iou_xb + 10],
                [0 + math.log(0.5) + 2 * 1 + 10, 1 + math.log(0.5) + 0 + 0]]
    tracker = tracker_with_tracks()
    total, allowed = tracker.association_scores(det.track_embeddings, det.pred_boxes.tensor,
                                                det.scores, det.pred_classes)
    assert total.tolist() == [[pytest.approx(v, abs=1e-5) for v in row] for row in expected]
    assert allowed.all()
    assert tracker.update(det).track_ids.tolist() == [1, 0]  # x -> B, y -> A
    # the queries alone give the other assignment
    tracker = tracker_with_tracks(iou_weight=0.0, label_weight=0.0)
    assert tracker.update(det).track_ids.tolist() == [0, 1]
    # IoU alone flips it too: x-B + y-A = 2 * 2/3 + 2 + logs > x-A + y-B = 1 + 1 + logs
    tracker = tracker_with_tracks(label_weight=0.0)
    assert tracker.update(det).track_ids.tolist() == [1, 0]


def test_category_vote_and_mean_score_by_hand():
    tracker = EmbeddingTracker(label_weight=0.0)
    for cls, s in [(2, 0.9), (1, 0.4), (1, 0.3)]:  # votes: class 2 0.9, class 1 0.7
        tracker.update(_frame([[0, 0, 10, 10]], [s], [cls], [[1.0, 0.0]]))
    tracker.update(_frame([[0, 0, 10, 10]], [0.01], [0], [[1.0, 0.0]]))  # ignored (< 0.05)
    (track,) = tracker.finish()
    assert track.category == 2  # the majority of frames says 1; the scores say 2
    assert track.score == pytest.approx((0.9 + 0.4 + 0.3) / 3)
    assert track.frame_scores == [pytest.approx(0.9), pytest.approx(0.4), pytest.approx(0.3), None]
    tracker.reset()
    for cls, s in [(3, 0.5), (1, 0.25), (1, 0.25)]:  # exact tie 0.5 / 0.5 -> smaller class
        tracker.update(_frame([[0, 0, 10, 10]], [s], [cls], [[1.0, 0.0]]))
    (track,) = tracker.finish()
    assert track.category == 1 and track.score == pytest.approx(1 / 3)


def test_masks_and_boxes_pass_through_untouched():
    tracker = QueryCosineTracker()
    frames = [_frame([[0, 0, 10, 10], [20, 0, 30, 10], [5, 5, 9, 9]], [0.9, 0.8, 0.01], [0, 1, 0],
                     [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]) for _ in range(3)]
    inputs = [(f.pred_masks.clone(), f.pred_boxes.tensor.clone()) for f in frames]
    outs = [tracker.update(f) for f in frames]
    tracks = tracker.finish()
    for t, (f, out, (masks, boxes)) in enumerate(zip(frames, outs, inputs)):
        assert torch.equal(f.pred_masks, masks) and torch.equal(f.pred_boxes.tensor, boxes)
        assert torch.equal(out.pred_masks, masks[:2])
        for row, tr in enumerate(tracks):
            # the track keeps its mask as compressed RLE; it decodes to the input mask
            assert isinstance(tr.masks[t]["counts"], str)
            assert torch.equal(decode_mask(tr.masks[t]), masks[row])
            assert torch.equal(tr.boxes[t], boxes[row])
    # box-only frames: masks None everywhere
    tracker.reset()
    tracker.update(_frame([[0, 0, 10, 10]], [0.9], [0], [[1.0, 0.0]], masks=False))
    (track,) = tracker.finish()
    assert track.masks == [None] and track.boxes[0].tolist() == [0, 0, 10, 10]


def test_empty_frames_and_missing_fields():
    tracker = EmbeddingTracker()
    out = tracker.update(_frame(torch.zeros(0, 4), [], [], torch.zeros(0, 8)))
    assert len(out) == 0 and out.track_ids.dtype == torch.int64
    tracker.update(_frame([[0, 0, 10, 10]], [0.9], [0], torch.ones(1, 8)))
    tracker.update(_frame(torch.zeros(0, 4), [], [], torch.zeros(0, 8)))
    (track,) = tracker.finish()
    assert track.present() == [1] and track.num_frames == 3
    bad = _frame([[0, 0, 10, 10]], [0.9], [0], torch.ones(1, 8))
    bad.remove("track_embeddings")
    with pytest.raises(ValueError, match="track_embeddings"):
        tracker.update(bad)
    with pytest.raises(ValueError, match="width 4"):
        tracker.update(_frame([[0, 0, 10, 10]], [0.9], [0], torch.ones(1, 4)))
    with pytest.raises(ValueError, match="max_missed"):
        EmbeddingTracker(max_missed=-1)


def test_build_tracker_from_config():
    cfg = get_cfg()
    add_queryinst_config(cfg)
    t = cfg.MODEL.QUERYINST_VIS.TRACKING
    assert type(build_tracker(cfg)) is TRACKER_REGISTRY.get(cfg.MODEL.QUERYINST_VIS.TRACKER)
    cfg.MODEL.QUERYINST_VIS.TRACKER = "QueryCosineTracker"
    t.COSINE_THRESH, t.MAX_MISSED, t.IOU_WEIGHT, t.INIT_SCORE_THRESH = 0.7, 2, 3.0, 0.4
    tracker = build_tracker(cfg)
    assert isinstance(tracker, QueryCosineTracker)
    assert (tracker.cosine_thresh, tracker.max_missed, tracker.iou_weight,
            tracker.init_score_thresh) == (0.7, 2, 3.0, 0.4)
    assert tracker.label_weight == t.LABEL_WEIGHT and tracker.score_weight == t.SCORE_WEIGHT
    assert tracker.det_score_thresh == t.DET_SCORE_THRESH
    cfg.MODEL.QUERYINST_VIS.TRACKER = "EmbedingTracker"
    with pytest.raises(ValueError, match="EmbedingTracker.*EmbeddingTracker, QueryCosineTracker"):
        build_tracker(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["embedding", "cosine"])
def test_cuda(kind):
    test_identities_kept_under_permutation(kind, 0, "all", device="cuda")
    tracker = _make(kind)
    f = _frame([[0, 0, 10, 10]], [0.9], [0], [[1.0, 0.0]], device="cuda")
    tracker.update(f)
    tracker.update(f)
    (track,) = tracker.finish()
    assert track.masks[1].is_cuda and torch.equal(track.masks[1], f.pred_masks[0])


def test_motion_gate_refuses_far_pairs():
    """With MIN_IOU, a detection whose box barely overlaps the track's last box starts a new
    track even though its embedding is the track's own; without the gate it continues."""
    emb = [[1.0, 0.0]]
    first = _frame([[0, 0, 10, 10]], [0.9], [0], emb)
    shifted = _frame([[9, 0, 19, 10]], [0.9], [0], emb)  # IoU with the last box: 10 / 190
    for min_iou, same_id in ((0.0, True), (0.1, False), (0.05, True)):
        tracker = QueryCosineTracker(min_iou=min_iou)
        a = tracker.update(first).track_ids.tolist()
        b = tracker.update(shifted).track_ids.tolist()
        assert (a == b) == same_id, min_iou


def test_nms_keeps_the_best_of_overlapping_detections_per_class():
    """NMS_THRESH: of two same-class detections with box IoU 81/100 = 0.81 only the higher
    scoring one is tracked; another class at the same place and a far one are kept."""
    boxes = [[0, 0, 10, 10], [0, 0, 9, 9], [0, 0, 10, 10], [30, 0, 40, 10]]
    frame = _frame(boxes, [0.6, 0.9, 0.5, 0.7], [0, 0, 1, 0], torch.eye(4))
    out = QueryCosineTracker(nms_thresh=0.8).update(frame)
    assert out.scores.tolist() == pytest.approx([0.9, 0.5, 0.7])  # input order, row 0 gone
    assert len(QueryCosineTracker(nms_thresh=0.85).update(frame)) == 4
    assert len(QueryCosineTracker().update(frame)) == 4  # 0 = off


def test_keep_masks_false_frees_the_masks_of_finished_frames():
    """keep_masks False (long streams): update still returns the frame's masks, finish()
    keeps boxes and scores but no masks."""
    tracker = QueryCosineTracker()
    tracker.keep_masks = False
    frame = _frame([[0, 0, 10, 10]], [0.9], [0], [[1.0, 0.0]])
    out = tracker.update(frame)
    assert out.has("pred_masks") and torch.equal(out.pred_masks, frame.pred_masks)
    (track,) = tracker.finish()
    assert track.masks == [None] and torch.equal(track.boxes[0], frame.pred_boxes.tensor[0])
    assert track.frame_scores == pytest.approx([0.9])



_STREAM = """
import json, math, os, sys
import torch
from detectron2.structures import Boxes, Instances
from queryinst.video.structures import decode_mask, encode_mask
from queryinst.video.modeling.tracker import EmbeddingTracker

def rss():  # resident set size now, bytes (Linux)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

height, width, n, frames, warmup = 576, 720, 20, 300, 30
g = torch.Generator().manual_seed(0)
emb = torch.linalg.qr(torch.randn(32, 32, generator=g))[0][:n] * 4.0
origin = torch.rand(n, 2, generator=g) * torch.tensor([width - 80.0, height - 80.0])
tracker = EmbeddingTracker(nms_thresh=0.0)
tracker.keep_masks = sys.argv[1] == "keep"
rle_bytes, start, last = 0, None, None
for t in range(frames):
    inst = Instances((height, width))
    xy = origin + torch.tensor([math.sin(t / 20.0), math.cos(t / 20.0)]) * 10.0
    boxes = torch.cat([xy, xy + 40.0], dim=1)
    inst.pred_boxes = Boxes(boxes)
    inst.scores = torch.full((n,), 0.9)
    inst.pred_classes = torch.zeros(n, dtype=torch.int64)
    inst.track_embeddings = emb
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
        masks[i, y0:y1, x0 + (t % 7):x1] = True  # cell-like blobs of changing width
    inst.pred_masks = masks
    assert len(tracker.update(inst)) == n
    if t == warmup:
        start = rss()
    elif t > warmup:
        rle_bytes += sum(len(encode_mask(m)["counts"]) for m in masks)
    last = masks[0].clone()
    del inst, masks
growth = rss() - start
tracks = tracker.finish()
ok = tracker.keep_masks and torch.equal(decode_mask(tracks[0].masks[-1]), last)
print(json.dumps({"growth": growth, "rle_bytes": rle_bytes, "tracks": len(tracks),
                  "last_mask_ok": bool(ok)}))
"""


@pytest.mark.parametrize("keep", [True, False])
def test_long_stream_memory_grows_by_the_rle_only(tmp_path, keep):
    """A 300-frame stream at 576x720 with 20 cell-like detections per frame, in a fresh
    process: the tracks keep every mask as compressed RLE, and resident memory over the last
    270 frames grows by the RLE strings and their small dicts only (a dense history would
    grow by 20 * 576 * 720 bytes = 8.3 MB a frame, 2.2 GB in all). glibc is told to mmap
    every buffer over 1 MB (MALLOC_MMAP_THRESHOLD_), so a freed frame's masks go back to the
    system and the resident size counts what is kept, not the allocator's reuse."""
    import json
    import subprocess
    import sys

    script = tmp_path / "stream.py"
    script.write_text(_STREAM)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1000000", MALLOC_ARENA_MAX="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "keep" if keep else "drop"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tracks"] == 20
    kept_masks = 270 * 20
    if keep:
        assert result["last_mask_ok"]
        # the strings, plus < 1 KB of dict / list / str overhead per kept mask, plus 2 MB
        assert result["growth"] < result["rle_bytes"] + 1024 * kept_masks + 2 * 2**20, result
    else:  # no masks kept: boxes, scores, classes, ids only
        assert result["growth"] < 2 * 2**20, result
