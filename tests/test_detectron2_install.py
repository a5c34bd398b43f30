"""The detectron2 that tools/setup_env.sh installs (or finds) is usable for this project."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import load_script

HAS_COMPILED_OPS = importlib.util.find_spec("detectron2._C") is not None
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _real_photo_bgr():
    """matplotlib's sample photo (Grace Hopper, 600x512), as detectron2 expects: BGR uint8."""
    import matplotlib
    import matplotlib.image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    rgb = matplotlib.image.imread(path)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3
    return np.ascontiguousarray(rgb[:, :, ::-1])


def test_mask_rcnn_from_model_zoo_runs_one_cpu_inference():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""  # random init: no model hub can be reached
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 320, 512
    # Random weights score everything near 0.5: keep everything so masks get pasted too.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    image = _real_photo_bgr()
    inst = predictor(image)["instances"]
    h, w = image.shape[:2]
    assert inst.image_size == (h, w)
    assert len(inst) > 0
    assert inst.pred_masks.shape == (len(inst), h, w) and inst.pred_masks.dtype == torch.bool
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()  # detector_postprocess clips
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all()


def test_model_zoo_configs_are_packaged():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
    assert os.path.isfile(path)
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        model_zoo.get_config_file("COCO-Detection/does_not_exist.yaml")


def test_pillow_resample_constants_used_by_detectron2_exist():
    from PIL import Image

    from detectron2.data.transforms import ExtentTransform

    t = ExtentTransform(src_rect=(0, 0, 10, 10), output_size=(5, 5))
    assert t.interp == Image.BILINEAR
    out = t.apply_image(np.zeros((10, 10, 3), dtype=np.uint8))
    assert out.shape == (5, 5, 3)


@pytest.mark.skipif(HAS_COMPILED_OPS, reason="a full detectron2 build with compiled ops")
def test_compiled_ops_fail_with_a_clear_message():
    from detectron2.layers import nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match=r"detectron2\._C.*full build|full build"):
        pairwise_iou_rotated(boxes, boxes)
    with pytest.raises(RuntimeError, match="nms_rotated.*not available"):
        nms_rotated(boxes, torch.ones(1), 0.5)


@pytest.mark.skipif(HAS_COMPILED_OPS, reason="a full detectron2 build with compiled ops")
def test_coco_evaluator_falls_back_to_pycocotools(tmp_path):
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    name = "_queryinst_test_fallback"
    json_file = tmp_path / "gt.json"
    json_file.write_text(
        '{"images":[{"id":1,"file_name":"a.png","height":4,"width":4}],'
        '"annotations":[],"categories":[{"id":1,"name":"x"}]}'
    )
    MetadataCatalog.get(name).set(json_file=str(json_file))
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path), use_fast_impl=True)
    assert evaluator._use_fast_impl is False


def test_collect_env_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "detectron2.utils.collect_env"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "detectron2" in proc.stdout and "PyTorch" in proc.stdout


def test_queryinst_and_detectron2_import_in_a_fresh_interpreter():
    proc = subprocess.run(
        [sys.executable, "-c", "import detectron2, queryinst; print(queryinst.__file__)"],
        capture_output=True, text=True, cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(os.path.join(REPO, "projects", "QueryInst"))


def test_flop_counter_imports_without_caffe2():
    """detectron2.export (TracingAdapter, hence FLOP counting) must not need caffe2."""
    from detectron2.export import TracingAdapter  # noqa: F401
    from detectron2.utils.analysis import FlopCountAnalysis

    model = torch.nn.Linear(4, 3)
    assert FlopCountAnalysis(model, (torch.rand(2, 4),)).total() == 2 * 4 * 3


def _load_installer():
    return load_script("tools/install_detectron2.py", "install_detectron2")


def test_numpy_alias_patch_replaces_exactly_the_removed_aliases(tmp_path):
    installer = _load_installer()
    src = "a = np.zeros(3, dtype=np.int)\nb = x.astype(np.float)  # np.bool\nc = np.int64(1)\n"
    (tmp_path / "m.py").write_text(src)
    installer.patch_numpy_aliases(str(tmp_path), {"m.py": 3})
    assert (tmp_path / "m.py").read_text() == (
        "a = np.zeros(3, dtype=int)\nb = x.astype(float)  # bool\nc = np.int64(1)\n"
    )


def test_numpy_alias_patch_refuses_a_source_it_was_not_written_for(tmp_path):
    installer = _load_installer()
    src = "a = np.zeros(3, dtype=np.int)\n"
    (tmp_path / "m.py").write_text(src)
    with pytest.raises(SystemExit, match=r"m\.py found 1 aliases, expected 2"):
        installer.patch_numpy_aliases(str(tmp_path), {"m.py": 2})
    assert (tmp_path / "m.py").read_text() == src  # nothing written


def test_class_histogram_is_logged_with_numpy_2():
    """detectron2 0.6 used np.int here; the AttributeError was swallowed, the table lost."""
    import logging

    from detectron2.data.build import print_instances_class_histogram

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("detectron2.data.build")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        annos = [{"category_id": 0}, {"category_id": 1}, {"category_id": 1, "iscrowd": 1}]
        print_instances_class_histogram([{"annotations": annos}], ["histo_cat", "histo_dog"])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    text = "\n".join(r.getMessage() for r in records)
    assert "Distribution of instances among all 2 categories" in text
    # one of each class (the crowd box is not counted), total 2
    assert "histo_cat" in text and "histo_dog" in text and "total" in text


def test_sem_seg_evaluator_runs_with_numpy_2(tmp_path):
    """detectron2 0.6 used np.int / np.float in SemSegEvaluator; mIoU checked by hand."""
    from PIL import Image

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    name = "_queryinst_test_semseg_numpy2"
    gt_file = str(tmp_path / "gt.png")
    Image.fromarray(np.array([[0, 0], [1, 1]], dtype=np.uint8)).save(gt_file)
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": "a.png", "sem_seg_file_name": gt_file}])
        MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255)
    evaluator = SemSegEvaluator(name, distributed=False, output_dir=None)
    evaluator.reset()
    pred = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])  # argmax 0 1 / 1 1
    evaluator.process([{"file_name": "a.png"}], [{"sem_seg": pred}])
    result = evaluator.evaluate()["sem_seg"]
    # class a: TP 1, FN 1, FP 0 -> IoU 1/2; class b: TP 2, FP 1 -> IoU 2/3
    assert result["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert result["pACC"] == pytest.approx(100 * 3 / 4)
