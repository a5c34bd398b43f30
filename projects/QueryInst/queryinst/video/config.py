"""Config keys of QueryInst-VIS, the video instance segmentation model (docs/method.md §6).

Called by ``add_queryinst_config``, so every QueryInst config has them; they are read only by
the video code (``queryinst.video``).
"""
from detectron2.config import CfgNode as CN


def add_queryinst_vis_config(cfg: CN) -> None:
    """Add the video keys to a Detectron2 config that has QueryInst's keys, in place.

    Args:
        cfg: a Detectron2 config.
    """
    cfg.MODEL.QUERYINST_VIS = CN()
    _C = cfg.MODEL.QUERYINST_VIS
    # Which online tracker links per-frame detections into tracks (TRACKER_REGISTRY):
    # "EmbeddingTracker" scores track-head embeddings as MaskTrack R-CNN does;
    # "QueryCosineTracker" needs no training: cosine similarity of the last stage's object
    # queries (MinVIS), so it works with any image-trained QueryInst checkpoint.
    _C.TRACKER = "EmbeddingTracker"

    # Track head (docs/method.md §6.1): an MLP from the last stage's object query (D) to the
    # association embedding, trained with MaskTrack R-CNN's cross-entropy over the
    # reference frame's matched queries plus one "new object" slot.
    _C.TRACK_HEAD = CN()
    _C.TRACK_HEAD.ON = True  # False: no track head (only QueryCosineTracker can run)
    _C.TRACK_HEAD.NUM_FCS = 2  # Linear(+ReLU) layers; the last one has no ReLU
    _C.TRACK_HEAD.EMBED_DIM = 256  # width of the hidden layers and of the embedding
    _C.TRACK_HEAD.LOSS_WEIGHT = 1.0  # weight of the matching cross-entropy (MaskTrack: 1)

    # Training (docs/method.md §6.1): True, both frames of a (key, reference) pair take
    # QueryInst's image losses and gradients; False, only the key frame does, and the
    # reference frame runs forward only, under no_grad, to give the track loss its targets
    # (the embeddings of its matched queries). False skips the reference frame's backward
    # pass and mask heads: an iteration costs about two thirds, for half the image
    # supervision of two nearly equal frames.
    _C.SUPERVISE_REFERENCE_FRAME = True

    # Online tracking, frame by frame (docs/method.md §6.2). The association score of a
    # detection and a track is: embedding match + SCORE_WEIGHT * log(detection score)
    # + IOU_WEIGHT * IoU(track's last box, box) + LABEL_WEIGHT * [same class]
    # (MaskTrack R-CNN's form and weights); a one-to-one Hungarian assignment maximises it.
    _C.TRACKING = CN()
    _C.TRACKING.SCORE_WEIGHT = 1.0  # weight of log(detection score)
    _C.TRACKING.IOU_WEIGHT = 2.0  # weight of the box IoU with the track's last box
    _C.TRACKING.LABEL_WEIGHT = 10.0  # bonus when the classes agree
    # Detections scoring below this never enter the tracker (one detection per query is
    # kept, its best class; the rest of the image model's output is ignored for tracking).
    _C.TRACKING.DET_SCORE_THRESH = 0.05
    # Duplicates: a detection whose box overlaps a higher-scoring one of its class with IoU
    # above this is not tracked (per-frame NMS of the tracker's input; 0 = off, as QueryInst
    # predicts without NMS). A briefly trained model gives several detections per object,
    # each of which would become a track.
    _C.TRACKING.NMS_THRESH = 0.0
    # An unmatched detection starts a new track only if it scores at least this.
    _C.TRACKING.INIT_SCORE_THRESH = 0.3
    # A track ends once it has gone more than this many consecutive frames (K) without a
    # detection; after a gap of up to K frames it can still take one (occlusions).
    _C.TRACKING.MAX_MISSED = 5
    # Motion gate: a detection may continue a track only if the IoU of its box and the track's
    # last box is at least this (0 = no gate, MaskTrack R-CNN's rule). Objects that look alike
    # (cells, one class) need it: their embeddings barely tell them apart (docs/method.md §6.2).
    _C.TRACKING.MIN_IOU = 0.0
    # QueryCosineTracker: a detection may continue a track only if the cosine similarity of
    # their queries is at least this (the EmbeddingTracker's rule is its "new object" slot).
    _C.TRACKING.COSINE_THRESH = 0.5

    # Training pairs (docs/method.md §6.1): the reference frame is drawn uniformly among
    # the video's frames at most this many frames from the key frame (the key excluded
    # when the video has more than one frame).
    cfg.INPUT.SAMPLING_FRAME_RANGE = 20
    # What the training sampler draws: "video", a video, whose key frame the mapper draws
    # uniformly; "frame", a key frame, each frame once an epoch (MaskTrack R-CNN's indexing;
    # every frame seen equally often, which a short schedule on one video needs).
    cfg.INPUT.KEY_FRAME_SAMPLING = "video"


def use_query_tracker(cfg: CN) -> CN:
    """A copy of an image config that tracks with the training-free ``QueryCosineTracker``.

    The model becomes ``QueryInstVIS`` without a track head, so an image checkpoint (the
    official COCO weights included) fills it exactly; a config that already has a track head
    is returned as a copy, unchanged.

    Args:
        cfg: a QueryInst config (frozen or not).

    Returns:
        CfgNode: the copy, frozen if ``cfg`` was.
    """
    out = cfg.clone()
    if out.MODEL.META_ARCHITECTURE == "QueryInstVIS":
        return out
    frozen = out.is_frozen()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = "QueryInstVIS"
    out.MODEL.QUERYINST_VIS.TRACK_HEAD.ON = False
    out.MODEL.QUERYINST_VIS.TRACKER = "QueryCosineTracker"
    if frozen:
        out.freeze()
    return out
