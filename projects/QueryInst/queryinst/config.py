"""Config keys of QueryInst. Defaults are the paper's R50-FPN 1x, 100-query setting.

Numbers come from ``docs/method.md`` (the project's digest of the paper, arXiv 2105.01928,
and the official code); each key says which section.
"""
import math

from detectron2.config import CfgNode as CN


def add_queryinst_config(cfg: CN) -> None:
    """Add QueryInst's keys to a Detectron2 config, in place.

    Keys that Detectron2 already has (backbone, input, solver schedule, ``MODEL.MASK_ON``,
    ``TEST.DETECTIONS_PER_IMAGE``) are set in ``configs/Base-QueryInst.yaml`` instead; only
    ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` gets QueryInst's default (0) here too, so that a
    config without the base file keeps all top-k detections.

    Args:
        cfg: a Detectron2 config, usually ``detectron2.config.get_cfg()``.
    """
    cfg.MODEL.QUERYINST = CN()
    _C = cfg.MODEL.QUERYINST
    # Detectron2's MODEL.ROI_HEADS.NUM_CLASSES is not read: train_net.py rejects a value other
    # than its default 80 or this one (queryinst.data.check_num_classes_keys).
    _C.NUM_CLASSES = 80  # C: foreground classes; sigmoid scores, no background logit
    # Names of the C classes, in row order; train_net.py fills it from DATASETS.TRAIN[0]
    # (saved in OUTPUT_DIR/config.yaml and the checkpoints) for the demo and the export.
    _C.CLASS_NAMES = ()
    _C.NUM_PROPOSALS = 100  # N: object queries per image (docs/method.md §1: 100 or 300)
    # Initial proposal boxes (docs/method.md §1.2): "image" (each the whole image, the
    # paper's) or "grid" (tiling the image; for many small objects). Checkpoints override it.
    _C.PROPOSAL_BOX_INIT = "image"
    _C.NUM_STAGES = 6  # box stages, each with its own dynamic mask head (docs/method.md §1)
    _C.HIDDEN_DIM = 256  # D: query and FPN/RoI feature channels
    _C.DIM_FEEDFORWARD = 2048  # FFN hidden width of each box stage
    _C.NUM_HEADS = 8  # self-attention heads over the queries of an image
    _C.DROPOUT = 0.0  # dropout in self-attention, instance interaction and FFN
    _C.DYNAMIC_DIM = 64  # inner width of DynamicConv: params (D x 64) then (64 x D)
    _C.NUM_CLS_FCS = 1  # [Linear, LayerNorm, ReLU] blocks before the class logits
    _C.NUM_REG_FCS = 3  # [Linear, LayerNorm, ReLU] blocks before the box deltas
    _C.IN_FEATURES = ["p2", "p3", "p4", "p5"]  # FPN levels pooled by RoIAlign (no P6)
    _C.BOX_POOLER_RESOLUTION = 7  # RoIAlign output side for the box stages
    _C.MASK_POOLER_RESOLUTION = 14  # RoIAlign output side for the mask heads (-> 28x28 masks)
    _C.POOLER_SAMPLING_RATIO = 2  # RoIAlign sampling points per bin side
    _C.POOLER_TYPE = "ROIAlignV2"  # aligned RoIAlign (half-pixel offset)
    _C.NUM_MASK_CONVS = 4  # 3x3 convs in each dynamic mask head
    _C.MASK_CONV_DIM = 256  # channels of those convs and of the 2x deconv
    _C.MASK_NORM = "BN"  # norm after each mask conv: "BN", "SyncBN" or ""
    # Box decoding: deltas divided by these weights (= stds 0.5, 0.5, 1, 1), class-agnostic.
    _C.BBOX_REG_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
    _C.SCALE_CLAMP = math.log(1000.0 / 16)  # box clamp: |dw|, |dh| <= log(1000/16) ~ 4.135
    # Initial foreground probability of every class logit (docs/method.md §2.3).
    _C.PRIOR_PROB = 0.01
    # Fine-tuning MODEL.WEIGHTS to other classes (queryinst/checkpoint/class_init.py, docs/method.md
    # §7), e.g. COCO -> Cityscapes: per class of this model, in order, the name of the
    # checkpoint class whose classifier and mask-logit rows it starts from; "" = the usual
    # initialisation. Applied when the checkpoint's class count differs from NUM_CLASSES
    # (never on --resume of this model's own checkpoints). Empty: the class-specific layers
    # of a checkpoint with another class count are dropped (random initialisation).
    _C.CLASS_INIT_FROM = ()
    # A registered dataset whose thing_classes are MODEL.WEIGHTS's classes, in row order;
    # the names of CLASS_INIT_FROM are looked up there.
    _C.CLASS_INIT_SOURCE = "coco_2017_train"

    # Loss weights (docs/method.md §2); every stage has weight 1 ("parallel supervision").
    _C.CLASS_WEIGHT = 2.0  # sigmoid focal loss over all queries x classes
    _C.L1_WEIGHT = 5.0  # L1 on boxes normalised by the unpadded image size
    _C.GIOU_WEIGHT = 2.0  # GIoU loss on absolute boxes
    _C.MASK_WEIGHT = 8.0  # Dice loss on the GT-class mask (28x28)
    _C.FOCAL_ALPHA = 0.25  # focal loss (and focal matching cost) alpha
    _C.FOCAL_GAMMA = 2.0  # focal loss (and focal matching cost) gamma
    _C.DICE_EPS = 1e-5  # Dice denominator epsilon

    # Hungarian matching cost weights (docs/method.md §2).
    _C.MATCHER = CN()
    _C.MATCHER.COST_CLASS = 2.0  # focal class cost
    _C.MATCHER.COST_BBOX = 5.0  # L1 on normalised xyxy boxes
    _C.MATCHER.COST_GIOU = 2.0  # -GIoU on absolute boxes

    # Inference (docs/method.md §3): top-k over (queries x classes) of the last stage,
    # k = N by default.
    # Detectron2's keys apply too: k = min(TEST_TOPK, TEST.DETECTIONS_PER_IMAGE), then
    # detections scoring < MODEL.ROI_HEADS.SCORE_THRESH_TEST are dropped.
    _C.TEST_TOPK = 100
    # Mask scoring: multiply each of the k detections' class score by its mask's "maskness"
    # (the mean probability of the pixels its mask head calls foreground) and sort again, so a
    # confident class with an unsure mask ranks lower (docs/method.md §3, "Mask scoring").
    # Off in the official model (its scores are the class probabilities).
    _C.TEST_MASK_SCORING = False
    # Official test rule: no score threshold, all k kept (Detectron2's default is 0.05).
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    # Keep the backbone's conv weights (and so its maps) in channels-last memory format. Same
    # outputs up to float rounding; on CPUs, oneDNN runs the ResNet-FPN ~25% faster this way
    # (docs/benchmark.md). This is the layout of training too; inference on the CPU is
    # channels-last anyway (INFERENCE_MEMORY_FORMAT). Off by default, as in Detectron2.
    _C.CHANNELS_LAST = False
    # With CHANNELS_LAST, the layout of the FPN's output (3x3) convolutions in training:
    # "auto" keeps them contiguous on CPUs without AVX-512, where oneDNN's channels-last
    # weight gradient of a dense 3x3 conv is 3-4x slower than the contiguous one (a training
    # step of make demo's config ~1.1x faster on an AMD Zen 3; docs/training.md,
    # "Channels-last training"), channels-last elsewhere; or "channels_last" / "contiguous".
    _C.FPN_OUTPUT_MEMORY_FORMAT = "auto"
    # Inference speed-ups (queryinst/modeling/fast_inference.py; docs/deployment.md;
    # measured in docs/benchmark.md). None of the three applies in training or changes state_dict().
    # Fold each BatchNorm with fixed statistics (FrozenBN, and BN in eval mode) into the conv
    # before it for the duration of an inference call (backbone and mask head): the same
    # outputs up to float rounding, one conv instead of conv + norm.
    _C.FUSE_BN_INFERENCE = True
    # Memory format of every convolution weight (backbone, FPN, mask heads) during an
    # inference call, so oneDNN runs those convolutions and returns their maps in it:
    # "auto" (channels-last on the CPU, where it is faster; elsewhere each weight's own),
    # "channels_last" or "contiguous". Same outputs up to float rounding; training keeps
    # CHANNELS_LAST's layout.
    _C.INFERENCE_MEMORY_FORMAT = "auto"
    # Autocast dtype of inference: "float32", "bfloat16" (CPUs with AVX512-BF16 or AMX, where
    # it is ~2x faster; elsewhere a warning and float32) or "float16" (CUDA only). RoIAlign,
    # box decoding, score sigmoid / top-k and mask pasting stay float32.
    _C.INFERENCE_DTYPE = "float32"
    # Autocast dtype of the training forward pass: "float32", "bfloat16" (mixed precision:
    # weights, gradients and optimizer state stay float32; CPUs with AVX512-BF16 or AMX,
    # elsewhere a warning and float32) or "auto" (bf16 where it is faster: AMD Zen 4, AMX,
    # CUDA with bf16; float32 on Intel CPUs without AMX, where bf16 was 1.18-1.28x slower).
    # 1.3-1.4x faster training iterations on the 2-core AMD EPYC (Zen 4) VM
    # (docs/training.md, "bf16 training"). CUDA fp16: SOLVER.AMP.ENABLED.
    _C.TRAIN_DTYPE = "float32"

    # MobileNetV2 bottom-up network (queryinst/modeling/backbone/mobilenet.py), used with
    # MODEL.BACKBONE.NAME "build_mobilenetv2_fpn_p2_p5_backbone" and MODEL.FPN.IN_FEATURES = OUT_FEATURES.
    # ImageNet weights: MODEL.WEIGHTS "queryinst://ImageNetPretrained/MobileNetV2".
    cfg.MODEL.MOBILENET = CN()
    # torchvision's channel width multiplier; the ImageNet weights exist for 1.0 only.
    cfg.MODEL.MOBILENET.WIDTH_MULT = 1.0
    # Stages given to the FPN: strides 4, 8, 16, 32 (24, 32, 96, 320 channels at width 1.0).
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["stage2", "stage3", "stage4", "stage5"]
    # Norm of every block: "FrozenBN" (pretrained statistics kept), "BN" or "SyncBN".
    cfg.MODEL.MOBILENET.NORM = "FrozenBN"
    # As MODEL.BACKBONE.FREEZE_AT for ResNet: 0 trains all; k >= 1 freezes the stem (the
    # stride-2 blocks) and stages 2..k (no gradient, FrozenBN). 2 = Detectron2's default.
    cfg.MODEL.MOBILENET.FREEZE_AT = 2

    # Optimiser (docs/method.md §2); read by queryinst.engine.solver.build_optimizer.
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" (paper) or "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # backbone lr factor (MMDetection's recipe: 0.1)
    # AdamW as torch's fused kernel (one pass over all parameters; the for-loop's update to
    # float rounding, several times faster on the CPU). Ignored with SOLVER.AMP.ENABLED.
    cfg.SOLVER.FUSED_ADAMW = True
    # Periodic checkpoints (model_<iter>.pth) kept on disk, newest first; 0 keeps all
    # (Detectron2's behaviour). model_final.pth is always kept. Read by train_net.py.
    cfg.SOLVER.CHECKPOINTS_TO_KEEP = 0

    # Probability of an extra vertical flip after all other training augmentations
    # (dataset_mapper.build_train_augmentation); for images without an up and down, such as
    # microscopy or aerial views. 0 (off) in the paper's recipe.
    cfg.INPUT.VERTICAL_FLIP_PROB = 0.0

    # Training crop policy of the 300-query configs (docs/method.md §2, from DETR); read by
    # dataset_mapper.build_train_augmentation. Flip, then with probability 0.5 either the
    # INPUT.MIN_SIZE_TRAIN resize, or [resize to PRE_RESIZE -> random crop -> that resize].
    cfg.INPUT.CROP_POLICY = CN()
    cfg.INPUT.CROP_POLICY.ENABLED = False
    # Shorter-side choices (pixels) of the resize before the crop; longer side <= MAX_SIZE_TRAIN.
    cfg.INPUT.CROP_POLICY.PRE_RESIZE = (400, 500, 600)
    # (min, max) crop height and width, pixels, each drawn uniformly ("absolute_range").
    cfg.INPUT.CROP_POLICY.SIZE = (384, 600)

    # The video model's keys (queryinst/video/config.py); imported here, not at the top, so
    # that importing this module does not import the video package.
    from .video.config import add_queryinst_vis_config

    add_queryinst_vis_config(cfg)
