"""Issue 24, a new user's second hour: class names that survive training, one-line errors,
the CPU model with every result, quiet logs, and saying what the demo did (and did not) do.

The custom dataset is generated (test_custom_dataset.write_shapes: one category, renamed
"cell" as in the issue); training runs test_train_net's reduced model for 2 iterations.
"""
import json
import logging
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import load_script
from queryinst.config_loading import missing_config_message
from queryinst.data import input_size_note, model_metadata, register_coco_instances_checked
from test_custom_dataset import QUICK, _parse, write_shapes
from test_demo import _write_video
from test_train_net import CONFIG, REPO, nuclei_cfg, train_net

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*"),
    pytest.mark.usefixtures("one_torch_thread"),  # tests/conftest.py
]

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _cells(root, split, n_categories=1, size=64):
    """write_shapes' json with its categories named "cell", "cell2", ...; returns it."""
    json_file = write_shapes(str(root), split, n_categories=n_categories, size=size)
    with open(json_file) as f:
        data = json.load(f)
    for c in data["categories"]:
        c["name"] = "cell" if c["id"] == 1 else f"cell{c['id']}"
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file


def _forget(*names):
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def psc_run(tmp_path_factory):
    """The issue's training: ``--dataset psc_train:... --dataset psc_val:...`` (1 class,
    "cell"; 64x64 images, tested at 128 px: 2x, a size note). The datasets are unregistered
    afterwards, as in a new process: only what the run wrote knows the names."""
    root = tmp_path_factory.mktemp("psc")
    train, val = _cells(root, "train"), _cells(root, "val")
    images = root / "images"
    out = root / "out"
    args = _parse(["--config-file", CONFIG, "--dataset", f"psc_train:{train}:{images}",
                   "--dataset", f"psc_val:{val}:{images}", *QUICK,
                   "DATASETS.TRAIN", "('psc_train',)", "DATASETS.TEST", "('psc_val',)",
                   "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", str(out)])
    try:
        train_net.main(args)
    finally:
        _forget("psc_train", "psc_val")
    return {"out": out, "val": val, "images": images}


# ---- 1. class names survive training ---------------------------------------------------------

def test_training_records_the_class_names(psc_run):
    out = psc_run["out"]
    with open(out / "config.yaml") as f:
        saved = yaml.safe_load(f)
    assert saved["MODEL"]["QUERYINST"]["CLASS_NAMES"] == ["cell"]
    for name in ("model_final.pth", "model_0000000.pth"):  # final and periodic checkpoints
        checkpoint = torch.load(out / name, map_location="cpu", weights_only=True)
        assert checkpoint.get("class_names") == ["cell"], name
    # the dataset's median image (64x64) is tested at 128 px: 2x, said in one line
    with open(out / "log.txt") as f:
        notes = [line for line in f if "the median image of 'psc_train', 'psc_val'" in line]
    assert len(notes) == 1 and "is 64x64 (HxW)" in notes[0] and "2.00x" in notes[0]


@pytest.fixture(scope="module")
def demo():
    return load_script("demo/demo.py", "queryinst_demo_usability")


def test_video_demo_names_the_class(psc_run, demo, tmp_path, capsys):
    """The issue's command: OUT/config.yaml, a video, --save-json; psc_val not registered."""
    out = psc_run["out"]
    video, tracks = tmp_path / "clip.mp4", tmp_path / "tracks.json"
    _write_video(video, frames=3, size=(96, 64))
    argv = ["--config-file", str(out / "config.yaml"), "--video-input", str(video),
            "--save-json", str(tracks), "--confidence-threshold", "0", "--opts",
            "MODEL.WEIGHTS", str(out / "model_final.pth"),
            "MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH", "0.0",
            "MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH", "0.0"]
    assert demo.main(argv) == 0
    saved = json.loads(tracks.read_text())["tracks"]
    assert saved and {t["category"] for t in saved} == {"cell"}
    printed = capsys.readouterr().out
    # 7: nothing written, said; 5: the frame size and the size the model ran at (128 px)
    assert re.search(rf"{re.escape(str(video))}: 3 frames, \d+ detections with score >= 0, .*; "
                     r"frames of 64x96 run at 128x192 \(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST\); "
                     r"no --output: nothing written", printed)


def test_image_demo_and_export_name_the_class(psc_run, demo, tmp_path, capsys):
    out = psc_run["out"]
    image = str(psc_run["images"] / "val_0.png")
    argv = ["--config-file", str(out / "config.yaml"), "--input", image,
            "--opts", "MODEL.WEIGHTS", str(out / "model_final.pth")]
    assert demo.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{image}: ") and line.endswith("; no --output: nothing written")
    drawer = demo.VisualizationDemo(demo.setup_cfg(demo.parse_args(argv)))
    assert drawer.metadata.thing_classes == ["cell"]  # the labels the Visualizer draws

    export_tool = load_script("tools/export_model.py", "queryinst_export_usability")
    exported = tmp_path / "exported"
    assert export_tool.main(["--config-file", str(out / "config.yaml"), "--format",
                             "torchscript", "--output", str(exported),
                             "MODEL.WEIGHTS", str(out / "model_final.pth")]) == 0
    assert json.loads((exported / "model.json").read_text())["thing_classes"] == ["cell"]
    from queryinst.export.predictor import ExportedPredictor

    assert ExportedPredictor(str(exported / "model.ts")).metadata.thing_classes == ["cell"]


@pytest.fixture
def warnings_of_names():
    """Warning records of queryinst.data.class_names (Detectron2's setup_logger may have
    stopped the "queryinst" logger's propagation, so caplog alone could miss them)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("queryinst.data.class_names")
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_dataset_option_names_a_model_without_names(psc_run, demo, tmp_path, warnings_of_names):
    """A checkpoint and config without names: --dataset of the test set names the classes in
    the demo and the export; without it, one warning line."""
    out = psc_run["out"]
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    bare = tmp_path / "bare.pth"
    torch.save({"model": checkpoint["model"]}, bare)
    opts = ["MODEL.WEIGHTS", str(bare), "MODEL.QUERYINST.CLASS_NAMES", "()"]
    dataset = ["--dataset", f"psc_val:{psc_run['val']}:{psc_run['images']}"]
    base = ["--config-file", str(out / "config.yaml"), "--input", str(psc_run["images"])]

    drawer = demo.VisualizationDemo(demo.setup_cfg(demo.parse_args([*base, "--opts", *opts])))
    assert drawer.metadata.get("thing_classes", None) is None
    assert len(warnings_of_names) == 1
    message = warnings_of_names[0].getMessage()
    assert "\n" not in message and "DATASETS.TEST[0] 'psc_val' has none" in message

    try:
        args = demo.parse_args([*base, *dataset, "--opts", *opts])
        demo.register_dataset_specs(args.dataset)
        assert demo.VisualizationDemo(demo.setup_cfg(args)).metadata.thing_classes == ["cell"]
        export_tool = load_script("tools/export_model.py", "queryinst_export_usability2")
        exported = tmp_path / "exported"
        assert export_tool.main(["--config-file", str(out / "config.yaml"), *dataset,
                                 "--format", "torchscript", "--output", str(exported),
                                 *opts]) == 0
    finally:
        _forget("psc_val")
    assert json.loads((exported / "model.json").read_text())["thing_classes"] == ["cell"]
    assert len(warnings_of_names) == 1  # no second warning where names were found


def test_model_metadata_prefers_the_model_names(registered_cells):
    """Config names, then the checkpoint's, then DATASETS.TEST[0]'s (read from its json
    without loading the images: thing_classes is unset until then)."""
    registered_cells("cells_val", n_categories=2)
    assert MetadataCatalog.get("cells_val").get("thing_classes", None) is None
    cfg = nuclei_cfg("DATASETS.TEST", "('cells_val',)", "MODEL.QUERYINST.NUM_CLASSES", "2")
    assert model_metadata(cfg).thing_classes == ["cell", "cell2"]
    assert model_metadata(cfg, ["a", "b"]).thing_classes == ["a", "b"]
    assert model_metadata(cfg, ["a"]).thing_classes == ["cell", "cell2"]  # 1 name: not these
    cfg.MODEL.QUERYINST.CLASS_NAMES = ("x", "y")
    assert model_metadata(cfg, ["a", "b"]).thing_classes == ["x", "y"]


@pytest.fixture
def registered_cells(tmp_path):
    names = []

    def register(name, **kwargs):
        json_file = _cells(tmp_path, name, **kwargs)
        register_coco_instances_checked(name, {}, json_file, str(tmp_path / "images"))
        names.append(name)
        return json_file

    yield register
    _forget(*names)


# ---- 2. wrong class count, 3. missing config, 6. quiet logs: one line, exit status ---------

def _train_net(*argv, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), *argv],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def _one_error_line(run, status):
    assert run.returncode == status, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and run.stderr.strip().splitlines()[-1] == errors[0]
    return errors[0]


def test_num_classes_2_on_1_class_data_is_one_error_line(tmp_path):
    """The README recipe with MODEL.QUERYINST.NUM_CLASSES 2 on 1-class data; the console
    (a pipe here) has no colour codes and no environment report, log.txt has it."""
    json_file = _cells(tmp_path, "train")
    out = tmp_path / "out"
    run = _train_net("--config-file", CONFIG, "--dataset",
                     f"psc_train:{json_file}:{tmp_path / 'images'}", *QUICK,
                     "DATASETS.TRAIN", "('psc_train',)", "DATASETS.TEST", "()",
                     "MODEL.QUERYINST.NUM_CLASSES", "2", "OUTPUT_DIR", str(out))
    error = _one_error_line(run, 1)
    assert f"{json_file} (dataset 'psc_train'), named in DATASETS.TRAIN, has 1 class (cell) " \
           "but MODEL.QUERYINST.NUM_CLASSES is 2. Set MODEL.QUERYINST.NUM_CLASSES 1." in error
    console = run.stdout + run.stderr
    assert "\x1b[" not in console
    assert "Environment info" not in console and "Running with full config" not in console
    summary = [line for line in run.stdout.splitlines()
               if re.search(r"torch \S+, detectron2 \S+, device cpu, \d+ threads", line)]
    assert len(summary) == 1 and str(out / "log.txt") in summary[0]
    log = (out / "log.txt").read_text()
    assert "Environment info" in log and "Running with full config" in log
    assert "\x1b[" not in log
    assert len(console.splitlines()) < 40  # was ~840 lines before the error


def test_eval_only_with_a_2_category_val_json_is_one_error_line(tmp_path):
    val = _cells(tmp_path, "val", n_categories=2)
    run = _train_net("--config-file", CONFIG, "--eval-only", "--dataset",
                     f"psc_val:{val}:{tmp_path / 'images'}", *QUICK,
                     "DATASETS.TEST", "('psc_val',)", "OUTPUT_DIR", str(tmp_path / "out"))
    error = _one_error_line(run, 1)
    assert "(dataset 'psc_val'), named in DATASETS.TEST, has 2 classes (cell, cell2) but " \
           "MODEL.QUERYINST.NUM_CLASSES is 1." in error


def _nearest(error):
    return error.split("; nearest: ", 1)[1].split(", ")


def _check_nearest(error):
    assert error.startswith("ERROR: configs/nope.yaml: config file does not exist; nearest: ")
    nearest = _nearest(error)
    assert len(nearest) == 3 and all(os.path.isfile(os.path.join(REPO, p)) for p in nearest)


@pytest.mark.parametrize("script, argv, status", [
    ("demo/demo.py", ["--config-file", "configs/nope.yaml", "--input",
                      "docs/nuclei_demo_losses.jpg"], 2),  # the command
    ("train_net.py", ["--config-file", "configs/nope.yaml"], 1),
])
def test_missing_config_file_is_one_line_with_the_nearest_configs(script, argv, status):
    run = subprocess.run([sys.executable, os.path.join(REPO, script), *argv], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=300)
    _check_nearest(_one_error_line(run, status))


@pytest.mark.parametrize("script, argv, status", [
    ("tools/export_model.py", ["--config-file", "configs/nope.yaml", "--format", "onnx",
                               "--output", "unused"], 2),
    ("tools/run_demo.py", ["--config-file", "configs/nope.yaml"], 1),
    ("tools/vis_report.py", ["--vis-config", "configs/nope.yaml"], 1),
    ("tools/benchmark.py", ["--config-file", "configs/nope.yaml"], 1),
    ("tools/convert_mmdet_checkpoint.py", ["--input", "x.pth", "--output", "y.pth",
                                           "--config", "configs/nope.yaml"], 2),
])
def test_tools_name_a_missing_config_in_one_line(script, argv, status, monkeypatch, capsys):
    """The tools' command lines, run in this process (as ``python tools/x.py``: their
    ``__main__`` part, where the ERROR line is made)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    code = info.value.code  # sys.exit("ERROR: ...") prints the text and exits with 1
    stderr = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert (1 if isinstance(code, str) else code) == status
    assert len(stderr.splitlines()) == 1
    _check_nearest(stderr.replace("ERROR: --config ", "ERROR: "))


def test_nearest_configs_of_a_misplaced_name():
    """Independent truth: the file exists under configs/bundled/, so it comes first."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        nearest = _nearest(missing_config_message("configs/queryinst_MNV2_FPN_nuclei.yaml"))
        base = _nearest(missing_config_message("configs/Base-nucleus.yaml"))
    finally:
        os.chdir(cwd)
    assert nearest[0] == os.path.join("configs", "bundled", "queryinst_MNV2_FPN_nuclei.yaml")
    assert base[0] == os.path.join("configs", "bundled", "Base-nuclei.yaml")
    assert all(os.path.basename(p).startswith("Base-") for p in base)


# ---- 5. the input size against the dataset's images --------------------------------------------

def _sized_json(tmp_path, sizes):
    """A COCO json with only "images" of the given (height, width): all that the note reads."""
    json_file = tmp_path / "sizes.json"
    json_file.write_text(json.dumps({"images": [
        {"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w}
        for i, (h, w) in enumerate(sizes)]}))
    return str(json_file)


@pytest.mark.parametrize("opts, expected", [
    # the case: 576x720 frames, the bundled 256 px -> 256x320, 576 / 256 = 2.25
    ([], "resized to 256x320 in training (INPUT.MIN_SIZE_TRAIN (256,)) and 256x320 at test "
         "time (INPUT.MIN_SIZE_TEST 256), up to 2.25x off"),
    (["INPUT.MIN_SIZE_TRAIN", "(576,)", "INPUT.MIN_SIZE_TEST", "576"], None),
    # 576 / 412 = 1.40: within 1.5, no note; 576 / 360 = 1.60: a note
    (["INPUT.MIN_SIZE_TRAIN", "(412,)", "INPUT.MIN_SIZE_TEST", "412"], None),
    (["INPUT.MIN_SIZE_TRAIN", "(360, 576)", "INPUT.MIN_SIZE_TEST", "360"], "up to 1.60x off"),
    # MAX_SIZE_TEST 900 caps 1000 px -> 900: scale 900/720 = 1.25 (no note); training at
    # 1000 -> 1000x1250, 1.74x
    (["INPUT.MIN_SIZE_TRAIN", "(1000,)", "INPUT.MAX_SIZE_TRAIN", "2000", "INPUT.MIN_SIZE_TEST",
      "1000", "INPUT.MAX_SIZE_TEST", "900"], "1000x1250 in training"),
])
def test_input_size_note(tmp_path, opts, expected):
    # median of (576, 720), (576, 720), (100, 100): 576x720
    json_file = _sized_json(tmp_path, [(576, 720), (100, 100), (576, 720)])
    MetadataCatalog.get("sized_train").set(json_file=json_file)
    try:
        note = input_size_note(nuclei_cfg(*opts), ["sized_train"])
    finally:
        MetadataCatalog.remove("sized_train")
    if expected is None:
        assert note is None
    else:
        assert note.startswith("the median image of 'sized_train' is 576x720 (HxW), ")
        assert expected in note and "INPUT.MIN_SIZE_TRAIN \"(576,)\"" in note
        assert "\n" not in note


# ---- 4. the CPU model with every table ---------------------------------------------------------

@pytest.fixture(scope="module")
def results_table():
    from qi_bench import results  # the library of tools/results_table.py

    return results


def test_results_table_records_the_cpu_model(results_table, monkeypatch):
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True,
                           env=dict(os.environ, LC_ALL="C")).stdout
    expected = re.search(r"^Model name:\s*(.+)$", lscpu, re.M).group(1).strip()
    assert results_table.cpu_model() == expected
    assert results_table.versions()["CPU model"] == expected

    def no_lscpu(*args, **kwargs):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(results_table.subprocess, "run", no_lscpu)
    monkeypatch.setattr(results_table.platform, "processor", lambda: "")
    with open("/proc/cpuinfo") as f:
        proc = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    assert results_table.cpu_model() == proc


# ---- 8. a re-run of make demo says what it reused ----------------------------------------------

def test_run_demo_says_what_it_reused(tmp_path):
    run_demo = load_script("tools/run_demo.py", "queryinst_run_demo_usability")
    cfg = nuclei_cfg("OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "250")
    assert run_demo.finished_checkpoint(str(tmp_path)) is None  # nothing yet
    (tmp_path / "model_0000099.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")
    assert run_demo.finished_checkpoint(str(tmp_path)) is None  # interrupted: trains on
    assert run_demo.timing_line(cfg, 90.0, None).startswith(
        "[demo] training + evaluation wall time: 1.5 min (250 iterations")
    (tmp_path / "model_final.pth").write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    final = run_demo.finished_checkpoint(str(tmp_path))
    assert final == str(tmp_path / "model_final.pth")
    line = run_demo.timing_line(cfg, 3.2, final)
    assert line.startswith(f"[demo] reused the trained model {final} (a finished run of 250 "
                           "iterations: not trained again")
    assert "wall time: 0.0 min" not in line and "evaluation wall time 3 s" in line
