"""Custom COCO datasets with train_net.py: --dataset, the checks against the config, the docs' recipe.

The data are generated: squares (category 1) and triangles (category 2) as polygons on small
images. Training runs use test_train_net's reduced model for 2 iterations on the CPU.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from PIL import Image, ImageDraw

from queryinst.data import (
    DatasetFormatError,
    add_dataset_argument,
    check_config_datasets,
    check_dataset,
    check_num_classes_keys,
    register_coco_instances_checked,
)
from test_train_net import CONFIG, REPO, TINY, nuclei_cfg, train_net

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*"),
    pytest.mark.usefixtures("one_torch_thread"),  # tests/conftest.py
]

QUICK = [*TINY, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100"]


def write_shapes(root, split, n_images=2, n_categories=2, masks=True, size=96):
    """Write ``root/images/{split}_{i}.png`` and ``root/{split}.json`` (COCO instances).

    Each image has 3 shapes cycling through the categories; ``masks=False`` leaves out the
    "segmentation" of every annotation (boxes only). Returns the json path."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(len(split))
    images, annotations = [], []
    for i in range(n_images):
        image = Image.new("RGB", (size, size), (20, 20, 20))
        draw = ImageDraw.Draw(image)
        for k in range(3):
            cat = k % n_categories + 1
            x, y = (int(v) for v in rng.integers(4, size - 34, 2))
            w = int(rng.integers(16, 30))
            poly = ([x, y, x + w, y, x + w, y + w, x, y + w] if cat % 2
                    else [x, y + w, x + w // 2, y, x + w, y + w])
            draw.polygon(poly, fill=(200, 40 * cat, 60))
            xs, ys = poly[0::2], poly[1::2]
            ann = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                   "iscrowd": 0, "area": float(w * w),
                   "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]}
            if masks:
                ann["segmentation"] = [[float(v) for v in poly]]
            annotations.append(ann)
        file_name = f"{split}_{i}.png"
        image.save(os.path.join(root, "images", file_name))
        images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
    categories = [{"id": c + 1, "name": f"shape{c + 1}"} for c in range(n_categories)]
    json_file = os.path.join(root, f"{split}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return json_file


def _parse(argv):
    return add_dataset_argument(default_argument_parser()).parse_args(argv)




@pytest.fixture
def registered(tmp_path):
    """Register datasets by name for one test: ``registered(name, **write_shapes kwargs)``."""
    names = []

    def register(name, **kwargs):
        json_file = write_shapes(str(tmp_path), name, **kwargs)
        register_coco_instances_checked(name, {}, json_file, str(tmp_path / "images"))
        names.append(name)
        return json_file

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ---- the documented recipe, end to end -------------------------------------------------------

def _readme_recipe():
    """The command of docs/datasets.md's "Custom datasets" section, as an argv list."""
    with open(os.path.join(REPO, "docs", "datasets.md")) as f:
        section = f.read().split("## Custom datasets", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_readme_recipe_trains_and_evaluates(tmp_path):
    data = tmp_path / "my_data"
    write_shapes(str(data), "train")
    write_shapes(str(data), "val")
    argv = _readme_recipe()
    assert argv[:2] == ["python", "train_net.py"]
    out_dir = tmp_path / "out"
    # Later options win: the reduced model, our folder, random weights (the ImageNet weights'
    # download and conversion are tested in test_mobilenet.py).
    argv = [sys.executable, os.path.join(REPO, "train_net.py"), *argv[2:], *QUICK,
            "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(out_dir)]
    argv = [a.replace("my_data/", f"{data}/") for a in argv]
    argv = [os.path.join(REPO, a) if a.startswith("configs/") else a for a in argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as one_torch_thread, in the subprocess
    run = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "Evaluation results for segm" in log and "Evaluation results for bbox" in log
    with open(out_dir / "inference" / "coco_instances_results.json") as f:
        predictions = json.load(f)
    assert {p["category_id"] for p in predictions} <= {1, 2}  # the json's category ids
    assert {p["image_id"] for p in predictions} == {1, 2}  # both val images were evaluated
    assert (out_dir / "model_final.pth").is_file()


def test_original_failure_test_set_of_other_classes_stops_before_training(tmp_path):
    """The issue's case: DATASETS.TEST left at nuclei_dsb_val (1 class), 2 classes trained.

    Before: training ran, then COCOEvaluator raised "A prediction has class=1, but the
    dataset only has 1 classes". Now: an error before the model is built."""
    json_file = write_shapes(str(tmp_path), "train")
    args = _parse(["--config-file", CONFIG, "--dataset",
                   f"issue_train:{json_file}:{tmp_path / 'images'}", *QUICK,
                   "DATASETS.TRAIN", "('issue_train',)", "MODEL.QUERYINST.NUM_CLASSES", "2",
                   "INPUT.MASK_FORMAT", "bitmask", "OUTPUT_DIR", str(tmp_path / "out")])
    try:
        with pytest.raises(ValueError) as info:
            train_net.main(args)
    finally:
        DatasetCatalog.remove("issue_train")
        MetadataCatalog.remove("issue_train")
    message = str(info.value)
    assert "(dataset 'nuclei_dsb_val'), named in DATASETS.TEST, has 1 class (nucleus)" in message
    assert "MODEL.QUERYINST.NUM_CLASSES is 2" in message
    assert "DATASETS.TEST \"('my_val',)\"" in message and "--dataset my_val:" in message
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_eval_only_checks_the_test_sets_before_loading_weights(tmp_path):
    args = _parse(["--config-file", CONFIG, "--eval-only", *QUICK,
                   "MODEL.QUERYINST.NUM_CLASSES", "2", "MODEL.WEIGHTS", str(tmp_path / "x.pth"),
                   "OUTPUT_DIR", str(tmp_path / "out")])  # the weights file does not exist
    with pytest.raises(ValueError, match="'nuclei_dsb_val'.*named in DATASETS.TEST, has 1 class"):
        train_net.main(args)


# ---- class counts ----------------------------------------------------------------------------

def test_more_categories_than_num_classes_is_an_error(registered):
    """Before: IndexError in the matcher at the first iteration."""
    json_file = registered("three_cls", n_categories=3)
    with pytest.raises(ValueError) as info:
        check_config_datasets(nuclei_cfg("DATASETS.TRAIN", "('three_cls',)", "DATASETS.TEST",
                                         "()", "MODEL.QUERYINST.NUM_CLASSES", "2"))
    assert str(info.value).startswith(f"{json_file} (dataset 'three_cls'), named in "
                                      "DATASETS.TRAIN, has 3 classes (shape1, shape2, shape3) "
                                      "but MODEL.QUERYINST.NUM_CLASSES is 2. Set "
                                      "MODEL.QUERYINST.NUM_CLASSES 3.")
    check_dataset(nuclei_cfg("MODEL.QUERYINST.NUM_CLASSES", "3"), "three_cls")  # matching: passes


def test_more_categories_through_train_net_fails_before_training(tmp_path):
    json_file = write_shapes(str(tmp_path), "train", n_categories=3)
    args = _parse(["--config-file", CONFIG, "--dataset",
                   f"cls3_train:{json_file}:{tmp_path / 'images'}", *QUICK,
                   "DATASETS.TRAIN", "('cls3_train',)", "DATASETS.TEST", "()",
                   "OUTPUT_DIR", str(tmp_path / "out")])  # the config's NUM_CLASSES: 1
    try:
        with pytest.raises(ValueError, match="has 3 classes .* MODEL.QUERYINST.NUM_CLASSES is 1"):
            train_net.main(args)
    finally:
        DatasetCatalog.remove("cls3_train")
        MetadataCatalog.remove("cls3_train")


@pytest.mark.parametrize("roi, ours, ok", [(80, 2, True), (2, 2, True), (3, 2, False),
                                           (1, 80, False)])
def test_roi_heads_num_classes(roi, ours, ok):
    cfg = nuclei_cfg("MODEL.ROI_HEADS.NUM_CLASSES", str(roi),
                     "MODEL.QUERYINST.NUM_CLASSES", str(ours))
    if ok:
        check_num_classes_keys(cfg)
        return
    with pytest.raises(ValueError) as info:
        check_num_classes_keys(cfg)
    assert str(info.value).startswith(
        f"MODEL.ROI_HEADS.NUM_CLASSES is {roi} but MODEL.QUERYINST.NUM_CLASSES is {ours}")
    assert f"Set MODEL.QUERYINST.NUM_CLASSES {roi}" in str(info.value)


def test_unregistered_dataset_names_the_option():
    with pytest.raises(KeyError, match="DATASETS.TEST names dataset 'nope', which is not "
                                       "registered.*--dataset nope:JSON:IMAGES"):
        check_config_datasets(nuclei_cfg("DATASETS.TEST", "('nope',)"))


# ---- boxes without masks ---------------------------------------------------------------------

def test_boxes_without_masks_need_mask_on_false(registered):
    """Before: the validator passed, training raised AttributeError about 'gt_masks'."""
    json_file = registered("boxes_only", n_categories=2, masks=False)
    cfg = nuclei_cfg("MODEL.QUERYINST.NUM_CLASSES", "2")
    with pytest.raises(DatasetFormatError) as info:
        check_dataset(cfg, "boxes_only")
    message = str(info.value)
    assert message.startswith(f"{json_file} (dataset 'boxes_only'): 6 of 6 annotations have "
                              "no 'segmentation'")
    assert "boxes_only_0.png" in message and "set MODEL.MASK_ON False" in message
    cfg.MODEL.MASK_ON = False
    check_dataset(cfg, "boxes_only")


def test_boxes_only_json_trains_and_evaluates_with_mask_on_false(tmp_path):
    train_json = write_shapes(str(tmp_path), "train", masks=False)
    val_json = write_shapes(str(tmp_path), "val", masks=False)
    images = tmp_path / "images"
    base = ["--config-file", CONFIG, "--dataset", f"box_train:{train_json}:{images}",
            "--dataset", f"box_val:{val_json}:{images}", *QUICK,
            "DATASETS.TRAIN", "('box_train',)", "DATASETS.TEST", "('box_val',)",
            "MODEL.QUERYINST.NUM_CLASSES", "2"]
    try:
        with pytest.raises(DatasetFormatError, match="MODEL.MASK_ON False"):
            train_net.main(_parse([*base, "OUTPUT_DIR", str(tmp_path / "masks")]))
        results = train_net.main(_parse([*base, "MODEL.MASK_ON", "False",
                                         "OUTPUT_DIR", str(tmp_path / "boxes")]))
    finally:
        for name in ("box_train", "box_val"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    assert set(results) == {"bbox"} and isinstance(results["bbox"]["AP"], float)
    assert (tmp_path / "boxes" / "model_final.pth").is_file()


# ---- the --dataset option --------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ("only_a_name", "is not NAME:JSON:IMAGES"),
    ("a:b", "is not NAME:JSON:IMAGES"),
    ("x::imgs", "is not NAME:JSON:IMAGES"),
    ("x:{tmp}/missing.json:{tmp}", "annotation file {tmp}/missing.json does not exist"),
    ("x:{json}:{tmp}/no_images", "image folder {tmp}/no_images does not exist"),
])
def test_dataset_option_errors(tmp_path, capsys, value, message):
    json_file = write_shapes(str(tmp_path), "train")
    fill = {"tmp": str(tmp_path), "json": json_file}
    with pytest.raises(SystemExit) as info:
        _parse(["--dataset", value.format(**fill)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dataset: " in err and message.format(**fill) in err


def test_dataset_option_registers_once_and_refuses_taken_names(tmp_path):
    json_file = write_shapes(str(tmp_path), "train")
    images = tmp_path / "images"
    args = _parse(["--dataset", f"opt_train:{json_file}:{images}"])
    assert args.dataset[0].json_file == json_file and args.opts == []
    try:
        train_net.register_dataset_specs(args.dataset)
        train_net.register_dataset_specs(args.dataset)  # same files again: kept
        assert MetadataCatalog.get("opt_train").json_file == json_file
        assert len(DatasetCatalog.get("opt_train")) == 2
    finally:
        DatasetCatalog.remove("opt_train")
        MetadataCatalog.remove("opt_train")
    taken = _parse(["--dataset", f"nuclei_dsb_train:{json_file}:{images}"])
    with pytest.raises(ValueError, match="'nuclei_dsb_train' is already registered"):
        train_net.register_dataset_specs(taken.dataset)
