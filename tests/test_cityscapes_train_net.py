"""train_net.py with the CityScapes config on a real Cityscapes-layout folder (docs/method.md §7).

labelme's street frames written in Cityscapes' layout (``write_cityscapes_sample``) stand in
for ``$DETECTRON2_DATASETS/cityscapes``; Detectron2's own built-in splits read them. One
training iteration at lr 0 from an 80-class "COCO" checkpoint checks that the Trainer gives
the Cityscapes classes their COCO rows; ``--eval-only`` then runs Cityscapes' and COCO's
evaluators end to end. Subprocesses: Detectron2 registers its Cityscapes splits under
``$DETECTRON2_DATASETS`` when it is imported.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from queryinst import add_queryinst_config
from queryinst.data.cityscapes import write_cityscapes_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cityscapes", "queryinst_R50_FPN_cityscapes.yaml")
# Small inputs and batch: seconds on 2 CPU cores. lr 0: the weights stay the loaded ones.
FAST = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "512",
        "INPUT.MIN_SIZE_TEST", "384", "INPUT.MAX_SIZE_TEST", "768", "DATALOADER.NUM_WORKERS",
        "0"]
COCO_ROWS = (0, 0, 2, 7, 5, 6, 3, 1)  # person, person, car, truck, bus, train, motorcycle, bicycle


def _cfg(opts):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(opts)
    return cfg


def _run(args, root, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _copypaste(log, task):
    """Detectron2's ``print_csv_format`` lines of one task: {metric: value}."""
    match = re.search(rf"copypaste: Task: {task}\n.*copypaste: (.+)\n.*copypaste: (.+)\n", log)
    assert match, f"no results of task {task!r} in the log"
    return dict(zip(match.group(1).split(","), map(float, match.group(2).split(","))))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    write_cityscapes_sample(str(root))
    return root


def test_fine_tune_from_coco_rows_then_eval_only_with_the_cityscapes_evaluator(sample, tmp_path):
    torch.manual_seed(0)
    coco = build_model(_cfg(FAST + ["MODEL.QUERYINST.NUM_CLASSES", 80,
                                    "MODEL.QUERYINST.CLASS_INIT_FROM", "()"]))
    coco_state = coco.state_dict()
    coco_file = str(tmp_path / "coco_model.pth")
    torch.save({"model": coco_state}, coco_file)
    out = str(tmp_path / "out")

    # Training: one iteration at lr 0 from the 80-class file, no evaluation.
    _run(["--config-file", CONFIG, *FAST, "MODEL.WEIGHTS", coco_file, "OUTPUT_DIR", out,
          "SOLVER.IMS_PER_BATCH", "1", "SOLVER.MAX_ITER", "1", "SOLVER.BASE_LR", "0.0",
          "DATASETS.TEST", "()"], sample, tmp_path)
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["model"]
    for key in ("roi_heads.box_heads.0.cls_score.weight", "roi_heads.box_heads.5.cls_score.bias",
                "roi_heads.mask_heads.3.predictor.weight", "roi_heads.mask_heads.5.predictor.bias"):
        assert final[key].shape[0] == 8
        assert torch.equal(final[key], coco_state[key][list(COCO_ROWS)]), key
    assert torch.equal(final["proposal_generator.init_proposal_features.weight"],
                       coco_state["proposal_generator.init_proposal_features.weight"])

    # Evaluation of that model on the val split (2 street frames, 5 instances).
    log = _run(["--config-file", CONFIG, "--eval-only", *FAST, "OUTPUT_DIR", out,
                "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")], sample, tmp_path)
    cityscapes = _copypaste(log, "cityscapes")
    assert set(cityscapes) == {"AP", "AP50"}
    assert all(0.0 <= v <= 100.0 for v in cityscapes.values())
    for task in ("bbox", "segm"):
        coco_ap = _copypaste(log, task)
        assert {"AP", "AP50", "AP75"} <= set(coco_ap)
    # COCOEvaluator's predictions: the top 100 per val image, for both images
    with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
        predictions = json.load(f)
    per_image = {}
    for p in predictions:
        per_image[p["image_id"]] = per_image.get(p["image_id"], 0) + 1
    assert sorted(per_image.values()) == [100, 100]
    assert {p["category_id"] for p in predictions} <= set(range(8))  # contiguous ids
