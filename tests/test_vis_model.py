"""QueryInst-VIS: the track head's targets and loss (hand cases), a training step on a frame
pair, and online tracking whose per-frame masks are the image model's (docs/method.md §6)."""
import math

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from queryinst.modeling.meta_arch.queryinst import QueryInst
from queryinst.video.modeling.meta_arch import one_detection_per_query
from queryinst.video.modeling.track_head import TrackHead, track_match_loss, track_match_targets
from queryinst.video.structures import decode_mask
from test_model import random_image, small_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_track_match_targets_hand_case():
    # Key frame: query 3 -> GT 1 (identity 11), query 0 -> GT 2 (12), query 4 -> GT 0 (10).
    key = (torch.tensor([3, 0, 4]), torch.tensor([1, 2, 0]))
    key_ids = torch.tensor([10, 11, 12])
    # Reference frame slots j = 0, 1, 2: queries 2, 1, 0 matched to identities 12, 13, 10.
    ref = (torch.tensor([2, 1, 0]), torch.tensor([0, 2, 1]))
    ref_ids = torch.tensor([12, 10, 13])
    targets = track_match_targets(5, key, key_ids, ref, ref_ids)
    # q0 (12) -> slot 0 -> 1; q1, q2 unmatched -> -1; q3 (11, not in ref) -> new = 0;
    # q4 (10) -> slot 2 -> 3.
    assert targets.tolist() == [1, -1, -1, 0, 3]


def test_track_match_targets_without_reference_matches():
    key = (torch.tensor([1]), torch.tensor([0]))
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    targets = track_match_targets(3, key, torch.tensor([7]), empty, torch.zeros(0, dtype=torch.int64))
    assert targets.tolist() == [-1, 0, -1]


def test_track_match_loss_hand_value():
    key = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    ref = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    targets = torch.tensor([1, 0, -1])
    loss, n = track_match_loss(key, ref, targets)
    # query 0: logits [0, 1, 0], target 1; query 1: logits [0, 2, -2], target 0 (new).
    ce0 = -1 + math.log(1 + math.e + 1)
    ce1 = math.log(1 + math.exp(2) + math.exp(-2))
    assert n == 2
    assert loss.item() == pytest.approx(ce0 + ce1, rel=1e-6)


def test_track_head_shapes_and_depth():
    head = TrackHead(32, 16, num_fcs=3)
    assert head(torch.randn(2, 5, 32)).shape == (2, 5, 16)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 3
    with pytest.raises(ValueError, match="NUM_FCS"):
        TrackHead(32, 16, num_fcs=0)


def vis_cfg(tracker="EmbeddingTracker", track_head=True):
    cfg = small_cfg(num_classes=2, num_proposals=8, num_stages=2)
    cfg.MODEL.META_ARCHITECTURE = "QueryInstVIS"
    cfg.MODEL.QUERYINST_VIS.TRACKER = tracker
    cfg.MODEL.QUERYINST_VIS.TRACK_HEAD.ON = track_head
    cfg.MODEL.QUERYINST_VIS.TRACK_HEAD.EMBED_DIM = 16
    return cfg


def frame_instances(boxes, ids, size=(64, 80)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.tensor([i % 2 for i in ids])
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[int(y0):int(y1), int(x0):int(x1)] = True
    inst.gt_masks = BitMasks(masks)
    inst.gt_ids = torch.tensor(ids)
    return inst


def test_training_step_reaches_track_head_and_queries():
    torch.manual_seed(0)
    model = build_model(vis_cfg())
    model.train()
    video = {
        "image": [random_image(64, 80, 1), random_image(64, 80, 2)],
        "instances": [frame_instances([[4, 4, 30, 40], [40, 10, 70, 50]], [5, 6]),
                      frame_instances([[8, 6, 34, 42], [20, 30, 50, 60]], [5, 9])],
    }
    losses = model([video, video])
    assert "loss_track" in losses and "s1_loss_mask" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_track"].backward()
    head_grads = [p.grad for p in model.track_head.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    query_grad = model.proposal_generator.init_proposal_features.weight.grad
    assert query_grad is not None and query_grad.abs().sum() > 0


def frame_pair(seed):
    return {
        "image": [random_image(64, 80, seed), random_image(64, 80, seed + 1)],
        "instances": [frame_instances([[4, 4, 30, 40], [40, 10, 70, 50]], [5, 6]),
                      frame_instances([[8, 6, 34, 42], [20, 30, 50, 60]], [5, 9])],
    }


def test_unsupervised_reference_frame_trains_on_key_frames_only():
    """SUPERVISE_REFERENCE_FRAME False: the image losses are the image model's on the key
    frames alone, the track loss is the one of the supervised mode (same embeddings), and the
    reference frames run forward without autograd."""
    torch.manual_seed(0)
    cfg = vis_cfg()
    cfg.MODEL.QUERYINST_VIS.SUPERVISE_REFERENCE_FRAME = False
    model = build_model(cfg)
    model.train()
    assert not model.supervise_reference_frame
    videos = [frame_pair(1), frame_pair(3)]
    backbone_calls = []
    model.backbone.register_forward_hook(
        lambda m, inp, out: backbone_calls.append((inp[0].shape[0], torch.is_grad_enabled()))
    )
    key_only = model(videos)
    assert backbone_calls == [(2, True), (2, False)]  # keys with autograd, references without

    keys = [{"image": v["image"][0], "instances": v["instances"][0]} for v in videos]
    image_losses = QueryInst.training_losses(model, keys)
    assert set(key_only) == set(image_losses) | {"loss_track"}
    for name, value in image_losses.items():
        torch.testing.assert_close(key_only[name], value, msg=name)

    model.supervise_reference_frame = True
    both = model(videos)
    torch.testing.assert_close(key_only["loss_track"], both["loss_track"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(key_only["s1_loss_mask"], both["s1_loss_mask"])  # 2 frames there

    key_only["loss_track"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.track_head.parameters())


def test_training_needs_pairs():
    model = build_model(vis_cfg())
    model.train()
    video = {"image": [random_image(64, 80, 1)],
             "instances": [frame_instances([[4, 4, 30, 40]], [5])]}
    with pytest.raises(ValueError, match="frame pairs"):
        model([video])


def test_embedding_tracker_needs_a_track_head():
    with pytest.raises(ValueError, match="TRACK_HEAD.ON"):
        build_model(vis_cfg(tracker="EmbeddingTracker", track_head=False))


def test_one_detection_per_query_keeps_best_class_above_threshold():
    inst = Instances((10, 10))
    inst.scores = torch.tensor([0.9, 0.8, 0.5, 0.04, 0.03])
    inst.query_indices = torch.tensor([2, 2, 0, 1, 3])
    kept = one_detection_per_query(inst, 0.05)
    assert kept.query_indices.tolist() == [2, 0]
    assert kept.scores.tolist() == pytest.approx([0.9, 0.5])


@pytest.mark.parametrize("tracker,head", [("EmbeddingTracker", True),
                                          ("QueryCosineTracker", False)])
def test_tracks_keep_the_image_models_masks(tracker, head):
    """Tracking changes ids, never per-frame masks: each track's mask in frame t is one of the
    image model's masks for frame t (same weights, same frame)."""
    cfg = vis_cfg(tracker, head)
    cfg.MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH = 0.0
    cfg.MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image_cfg = small_cfg(num_classes=2, num_proposals=8, num_stages=2)
    image_model = build_model(image_cfg).eval()
    image_model.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("track_head.")})
    frames = [random_image(64, 80, s) for s in (3, 3, 4)]
    with torch.no_grad():
        out = model([{"image": frames, "height": 128, "width": 160}])[0]
        image_out = [image_model([{"image": f, "height": 128, "width": 160}])[0]["instances"]
                     for f in frames]
    assert out["num_frames"] == 3 and out["image_size"] == (128, 160)
    tracks = out["tracks"]
    assert tracks, "the tracker started no track"
    for t, dets in enumerate(image_out):
        # With both thresholds 0 every query's best detection is tracked: the frame's tracked
        # masks are exactly those of the image model, one per query.
        expected = one_detection_per_query(dets, 0.0)
        present = [k for k in tracks if k.masks[t] is not None]
        assert len(present) == len(expected) > 0
        for track in present:
            same = [torch.equal(decode_mask(track.masks[t]), m)
                    and torch.equal(track.boxes[t], b)
                    for m, b in zip(expected.pred_masks, expected.pred_boxes.tensor)]
            assert sum(same) == 1
    # Frames 0 and 1 are the same image: every track of frame 0 continues in frame 1 (a
    # one-to-one assignment of identical detections exists). Cosine similarity is largest for
    # the query itself, so that tracker keeps each mask on its own track.
    for track in tracks:
        if track.masks[0] is not None:
            assert track.masks[1] is not None
            if tracker == "QueryCosineTracker":
                assert track.masks[0] == track.masks[1]  # the same RLE


def test_image_checkpoint_tracks_training_free_but_never_fills_a_track_head(tmp_path):
    """An image checkpoint fills the model of ``use_query_tracker(image config)`` exactly
    (strict inference load); a model with a track head is refused, not loaded partially."""
    from queryinst.checkpoint import CheckpointFormatError, QueryInstCheckpointer
    from queryinst.video import use_query_tracker

    image_cfg = small_cfg(num_classes=2, num_proposals=8, num_stages=2)
    torch.manual_seed(0)
    path = str(tmp_path / "image_model.pth")
    torch.save({"model": build_model(image_cfg).state_dict()}, path)
    tracking = build_model(use_query_tracker(image_cfg)).eval()
    QueryInstCheckpointer(tracking, strict=True).load(path)
    assert type(tracking.tracker).__name__ == "QueryCosineTracker"
    assert tracking.track_head is None
    with pytest.raises(CheckpointFormatError, match="track_head"):
        QueryInstCheckpointer(build_model(vis_cfg()), strict=True).load(path)


def test_each_track_is_drawn_in_its_own_stable_colour():
    """draw_tracked_frame fills a track's mask with track_color(id) (alpha 0.5 on a black
    frame): the same id gives the same colour in any frame, and ids 3 and 4 differ."""
    from detectron2.data import MetadataCatalog
    from queryinst.video import draw_tracked_frame, track_color

    def drawn_colour(track_id, x0):
        inst = Instances((64, 96))
        mask = torch.zeros(1, 64, 96, dtype=torch.bool)
        mask[0, 20:44, x0:x0 + 24] = True
        inst.pred_masks = mask
        inst.pred_boxes = Boxes(torch.tensor([[x0, 20.0, x0 + 24, 44.0]]))
        inst.scores = torch.tensor([0.9])
        inst.pred_classes = torch.tensor([0])
        inst.track_ids = torch.tensor([track_id])
        frame = np.zeros((64, 96, 3), np.uint8)
        image = draw_tracked_frame(frame, inst, MetadataCatalog.get("__unused"))
        return image[30:34, x0 + 10:x0 + 14].reshape(-1, 3).mean(0)

    for track_id in (3, 4):
        expected = 0.5 * 255 * np.asarray(track_color(track_id))
        assert np.abs(drawn_colour(track_id, 10) - expected).max() < 3
        assert np.abs(drawn_colour(track_id, 60) - expected).max() < 3  # another frame/place
    assert np.abs(np.asarray(track_color(3)) - np.asarray(track_color(4))).max() > 0.1


def test_tracking_runs_with_the_image_models_inference_speedups():
    """Frame-by-frame tracking runs under ``QueryInst.fast_inference``: on the CPU the stem
    conv runs folded (no norm) with a channels-last weight. The tracks equal those of the
    same weights run plain (no folding, NCHW): ids, categories, presence, boxes within
    float rounding."""
    cfg = vis_cfg()
    cfg.MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH = 0.0
    cfg.MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.QUERYINST.FUSE_BN_INFERENCE = False
    plain_cfg.MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT = "contiguous"
    plain = build_model(plain_cfg).eval()
    plain.load_state_dict(model.state_dict())
    stem = model.backbone.bottom_up.stem.conv1
    seen = []
    stem.register_forward_hook(
        lambda m, a, o: seen.append((m.norm is None, m.weight.stride(1) == 1)))
    video = [{"image": [random_image(64, 80, s) for s in (5, 5, 6)], "height": 64,
              "width": 80}]
    with torch.no_grad():
        got, want = model(video)[0]["tracks"], plain(video)[0]["tracks"]
    assert seen == [(True, True)] * 3
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert (a.track_id, a.category) == (b.track_id, b.category)
        assert [x is None for x in a.boxes] == [x is None for x in b.boxes]
        for x, y in zip(a.boxes, b.boxes):
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-3)
