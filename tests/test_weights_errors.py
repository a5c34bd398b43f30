"""Unusable MODEL.WEIGHTS, end to end (issue 10, items 5, 6, 8, 9).

- 5: a checkpoint of another config is refused for inference (demo, ``--eval-only``) with the
  keys and the ``config.yaml`` saved next to it; training may load it partially (a warning).
- 6: a truncated or foreign file is "not a readable checkpoint", named, without torch's
  advice to disable ``weights_only``; also in the converter.
- 8: the load messages say what happens (no "No checkpoint found" before a load).
- 9: a failed download names the URL and what to pass instead; an empty ``MODEL.WEIGHTS``
  is an error for ``--eval-only`` and one "UNTRAINED MODEL" warning in the demo.

The checkpoints are real: a tiny QueryInst (R18, narrow heads) saved by Detectron2's
checkpointer, with the ``config.yaml`` that ``default_setup`` writes beside it. Downloads
are made to fail by replacing ``urllib.request.urlopen`` (no network is used).
"""
import logging
import os
import pickle
import runpy
import shutil
import sys
import traceback
import urllib.error
import urllib.request

import matplotlib
import pytest
import torch
from conftest import load_script
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model

from queryinst import add_queryinst_config
from queryinst.checkpoint import (
    CheckpointFormatError,
    QueryInstCheckpointer,
    WeightsUnavailableError,
)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
import train_net  # noqa: E402

BASE = os.path.join(ROOT, "configs", "Base-QueryInst.yaml")
COCO = os.path.join(ROOT, "configs", "queryinst_R50_FPN_1x_coco.yaml")
NUCLEI = os.path.join(ROOT, "configs", "bundled", "queryinst_R50_FPN_nuclei.yaml")
PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
R50_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"
# torch's advice on any weights_only failure: unsafe, and wrong for a corrupt file.
TORCH_ADVICE = "weights_only` set to `False`"
# A small QueryInst (R18, 64 channels); TRAINED_AS and OTHER differ as two configs do.
TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.QUERYINST.HIDDEN_DIM", "64",
        "MODEL.QUERYINST.DIM_FEEDFORWARD", "128", "MODEL.QUERYINST.MASK_CONV_DIM", "32",
        "MODEL.QUERYINST.NUM_MASK_CONVS", "1", "MODEL.QUERYINST.NUM_PROPOSALS", "10",
        "MODEL.QUERYINST.TEST_TOPK", "10", "MODEL.DEVICE", "cpu",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"]
TRAINED_AS = ["MODEL.QUERYINST.NUM_STAGES", "2", "MODEL.QUERYINST.NUM_CLASSES", "1"]
OTHER = ["MODEL.QUERYINST.NUM_STAGES", "1", "MODEL.QUERYINST.NUM_CLASSES", "3"]
# Another config with the test set's class count: train_net checks the classes of
# DATASETS.TEST (nuclei: 1) before it loads any weights.
OTHER_SAME_CLASSES = ["MODEL.QUERYINST.NUM_STAGES", "1", "MODEL.QUERYINST.DIM_FEEDFORWARD", "96"]


def make_cfg(*opts, config=BASE):
    cfg = get_cfg()
    add_queryinst_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list([*TINY, *opts])
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _own_log_handlers():
    """Start this module without the handlers that earlier modules' setup_logger calls left
    (Detectron2 caches them; those made under capsys write to closed streams and print
    "--- Logging error ---" tracebacks into this module's stderr); restore them after."""
    loggers = [logging.getLogger(name) for name in ("fvcore", "detectron2", "queryinst")]
    saved = [list(lg.handlers) for lg in loggers]
    for lg in loggers:
        lg.handlers.clear()
    yield
    for lg, handlers in zip(loggers, saved):
        lg.handlers[:] = handlers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_torch_thread):
    """OUTPUT_DIR of a "training run": model_final.pth and config.yaml (as default_setup)."""
    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg(*TRAINED_AS)
    (out / "config.yaml").write_text(cfg.dump())
    os.utime(out / "config.yaml", (1e9, 1e9))  # written at the start of the run
    DetectionCheckpointer(build_model(cfg), str(out)).save("model_final")
    return out


@pytest.fixture(scope="module")
def bad_files(run_dir, tmp_path_factory):
    """name -> path: a real checkpoint cut in half, a text file and an HTML page as .pth."""
    folder = tmp_path_factory.mktemp("bad")
    data = (run_dir / "model_final.pth").read_bytes()
    files = {"truncated": data[: len(data) // 2], "text": b"not a checkpoint\n",
             "html": b"<html><body>404 Not Found</body></html>\n"}
    for name, content in files.items():
        (folder / f"{name}.pth").write_bytes(content)
    return {name: str(folder / f"{name}.pth") for name in files}


@pytest.fixture
def logs():
    """Records of the fvcore and queryinst loggers (Detectron2's setup_logger stops their
    propagation to the root logger, so caplog alone may miss them)."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.INFO)
    loggers = [logging.getLogger(name) for name in ("fvcore", "queryinst")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: every urlopen fails as a machine without DNS does; empty download cache."""
    def urlopen(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def demo():
    """demo.py as a module; its main(argv) returns the exit status. Its setup_logger calls
    are skipped: Detectron2 caches the handler, which would keep writing to the stderr
    capture of the first test after that test has closed it."""
    module = load_script("demo/demo.py", "queryinst_demo_weights")
    module.setup_logger = lambda *args, name="detectron2", **kwargs: logging.getLogger(name)
    return module


def run_demo(demo, weights, *opts, config=BASE):
    argv = ["--config-file", config, "--input", PHOTO, "--opts", *TINY, *opts]
    if weights is not None:
        argv += ["MODEL.WEIGHTS", weights]
    return demo.main(argv)


def eval_only_args(weights, out_dir, *opts):
    return default_argument_parser().parse_args(
        ["--config-file", NUCLEI, "--eval-only", *TINY, *opts,
         "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out_dir)])


def run_train_net_script(argv, monkeypatch):
    """train_net.py as ``python train_net.py ...`` runs it (its __main__ block)."""
    monkeypatch.setattr(sys, "argv", ["train_net.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "train_net.py"), run_name="__main__")
    return exit_info.value.code


def full_text(exc: BaseException) -> str:
    """What Python prints for an uncaught ``exc``: message, and the chained exceptions."""
    return "".join(traceback.format_exception(exc))


# ------------------------------------------------------------ 5: checkpoint of another config
def test_strict_load_of_another_config_names_keys_and_its_config_yaml(run_dir):
    weights = str(run_dir / "model_final.pth")
    model = build_model(make_cfg(*OTHER))
    with pytest.raises(CheckpointFormatError) as info:
        QueryInstCheckpointer(model, strict=True).load(weights)
    message = str(info.value)
    assert weights in message and "refusing a partial load" in message
    # 3 classes against 1: shapes named with both sizes
    assert "roi_heads.box_heads.0.cls_score.weight (1, 64) in the checkpoint, (3, 64)" in message
    config_yaml = str(run_dir / "config.yaml")
    assert f"--config-file {config_yaml}" in message


def test_strict_load_without_config_yaml_names_the_likely_cause(run_dir, tmp_path):
    weights = shutil.copy(run_dir / "model_final.pth", tmp_path / "model.pth")
    model = build_model(make_cfg("MODEL.QUERYINST.NUM_STAGES", "3",
                                 "MODEL.QUERYINST.NUM_CLASSES", "1"))
    with pytest.raises(CheckpointFormatError) as info:
        QueryInstCheckpointer(model, strict=True).load(str(weights))
    message = str(info.value)
    # the third stage is missing: counted, first keys named
    assert "model tensors not in the checkpoint:" in message
    assert "roi_heads.box_heads.2." in message
    assert "trained with another config" in message and "config.yaml" not in message


def test_config_yaml_newer_than_the_checkpoint_is_named_with_a_doubt(run_dir, tmp_path):
    """An --eval-only run whose OUTPUT_DIR is the checkpoint's folder rewrites config.yaml
    (default_setup) with its own config before loading: not named as the training one."""
    weights = shutil.copy(run_dir / "model_final.pth", tmp_path / "model_final.pth")
    os.utime(weights, (1e9, 1e9))
    (tmp_path / "config.yaml").write_text(make_cfg(*OTHER).dump())
    with pytest.raises(CheckpointFormatError) as info:
        train_net.main(eval_only_args(str(weights), tmp_path, *OTHER_SAME_CLASSES))
    assert "was written after it" in str(info.value)
    assert f"if it is the training config, run with --config-file {tmp_path / 'config.yaml'}" \
        in str(info.value)


def test_strict_load_of_its_own_config_loads_everything(run_dir):
    weights = str(run_dir / "model_final.pth")
    model = build_model(make_cfg(*TRAINED_AS))
    QueryInstCheckpointer(model, strict=True).load(weights)
    saved = torch.load(weights, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_training_loads_another_config_partially_with_one_warning(run_dir, logs):
    """Fine-tuning with another class count: allowed, one summary warning."""
    weights = str(run_dir / "model_final.pth")
    model = build_model(make_cfg("MODEL.QUERYINST.NUM_STAGES", "2",
                                 "MODEL.QUERYINST.NUM_CLASSES", "3"))
    QueryInstCheckpointer(model).resume_or_load(weights, resume=False)
    warnings = [r.getMessage() for r in logs if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"Partial load of {weights}")
    assert "cls_score.weight (1, 64) in the checkpoint, (3, 64) in the model" in warnings[0]
    saved = torch.load(weights, weights_only=True)["model"]
    key = "roi_heads.box_heads.1.self_attn.in_proj_weight"
    assert torch.equal(model.state_dict()[key], saved[key])  # the matching tensors loaded


def _backbone_pkl(path, cfg):
    """An ImageNet-style backbone file as Detectron2's model zoo has them (numpy, no prefix)."""
    prefix = "backbone.bottom_up."
    state = {k[len(prefix):]: v.numpy() for k, v in build_model(cfg).state_dict().items()
             if k.startswith(prefix)}
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    return str(path)


def test_backbone_only_file_initialises_training_but_is_refused_for_inference(tmp_path, logs):
    cfg = make_cfg(*TRAINED_AS)
    weights = _backbone_pkl(tmp_path / "R-18.pkl", cfg)
    QueryInstCheckpointer(build_model(cfg)).load(weights)
    assert not [r for r in logs if r.levelno >= logging.WARNING]
    assert any("filled the backbone only" in r.getMessage() for r in logs)
    with pytest.raises(CheckpointFormatError, match="holds only a backbone"):
        QueryInstCheckpointer(build_model(cfg), strict=True).load(weights)


def test_demo_refuses_a_checkpoint_of_another_config(demo, run_dir, capsys):
    weights = str(run_dir / "model_final.pth")
    assert run_demo(demo, weights, *OTHER) == 1
    err = capsys.readouterr().err
    assert f"ERROR: {weights} does not fit this model" in err
    assert f"--config-file {run_dir / 'config.yaml'}" in err


def test_eval_only_refuses_a_checkpoint_of_another_config(run_dir, tmp_path):
    weights = str(run_dir / "model_final.pth")
    with pytest.raises(CheckpointFormatError, match="does not fit this model"):
        train_net.main(eval_only_args(weights, tmp_path, *OTHER_SAME_CLASSES))


# ------------------------------------------------------------ 6: unreadable files
@pytest.mark.parametrize("kind,what", [("truncated", "truncated or corrupt"),
                                       ("text", "neither a zip archive nor a pickle"),
                                       ("html", "HTML")])
def test_unreadable_file_is_named_without_torch_advice(bad_files, kind, what):
    path = bad_files[kind]
    if kind == "html":  # the case where torch gives its advice
        with pytest.raises(Exception, match="weights_only") as raw:
            torch.load(path, weights_only=True)
        assert TORCH_ADVICE in str(raw.value)
    model = build_model(make_cfg(*TRAINED_AS))
    with pytest.raises(CheckpointFormatError) as info:
        QueryInstCheckpointer(model).load(path)
    assert str(info.value).startswith(f"{path}: not a readable checkpoint: ")
    assert what in str(info.value)
    assert "weights_only" not in full_text(info.value)


def test_demo_with_a_truncated_checkpoint_exits_1(demo, bad_files, capsys):
    assert run_demo(demo, bad_files["truncated"], *TRAINED_AS) == 1
    err = capsys.readouterr().err
    assert f"ERROR: {bad_files['truncated']}: not a readable checkpoint" in err
    assert "weights_only" not in err and "Traceback" not in err


def test_eval_only_script_with_a_garbage_file_exits_with_one_error(bad_files, tmp_path,
                                                                    monkeypatch):
    path = bad_files["html"]
    code = run_train_net_script(["--config-file", NUCLEI, "--eval-only", *TINY,
                                 "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path)],
                                monkeypatch)
    assert isinstance(code, str)  # sys.exit(message): printed on stderr, exit status 1
    assert code.startswith(f"ERROR: {path}: not a readable checkpoint")
    assert "weights_only" not in code


@pytest.mark.parametrize("kind", ["truncated", "html", "missing"])
def test_converter_gives_one_error_line(bad_files, kind, tmp_path, capsys):
    converter = load_script("tools/convert_mmdet_checkpoint.py", "convert_mmdet_checkpoint")
    path = bad_files.get(kind, str(tmp_path / "missing.pth"))
    assert converter.main(["--input", path, "--output", str(tmp_path / "out.pth")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ERROR: {path}: ") and len(err.splitlines()) == 1
    assert "weights_only" not in err
    assert not os.path.exists(tmp_path / "out.pth")


# ------------------------------------------------------------ 8: load messages
def _messages(records):
    return [r.getMessage() for r in records]


def test_empty_weights_are_reported_once_and_truly(logs, tmp_path):
    model = build_model(make_cfg(*TRAINED_AS))
    QueryInstCheckpointer(model, str(tmp_path)).resume_or_load("", resume=False)
    assert _messages(logs) == [
        "No weights to load (MODEL.WEIGHTS is empty): the model starts from random "
        "initialisation"]


def test_loading_weights_says_so_only(run_dir, logs):
    model = build_model(make_cfg(*TRAINED_AS))
    QueryInstCheckpointer(model).resume_or_load(str(run_dir / "model_final.pth"), resume=False)
    messages = _messages(logs)
    assert not any("No checkpoint found" in m or "from scratch" in m for m in messages)
    assert any(str(run_dir / "model_final.pth") in m for m in messages)


def test_demo_predictor_messages(demo, run_dir, logs):
    named = ["MODEL.QUERYINST.CLASS_NAMES", "('nucleus',)"]  # else a warning about the names
    demo.VisualizationDemo(make_cfg(*TRAINED_AS, *named, "MODEL.WEIGHTS",
                                    str(run_dir / "model_final.pth")))
    assert not any("No checkpoint found" in m for m in _messages(logs))
    logs.clear()
    demo.VisualizationDemo(make_cfg(*TRAINED_AS, *named))  # MODEL.WEIGHTS ""
    messages = _messages(logs)
    assert len(messages) == 1 and messages[0].startswith("UNTRAINED MODEL: MODEL.WEIGHTS is")


# ------------------------------------------------------------ 9: downloads, no weights
def test_failed_download_names_the_url_and_what_to_pass(offline):
    model = build_model(make_cfg(*TRAINED_AS))
    with pytest.raises(WeightsUnavailableError) as info:
        QueryInstCheckpointer(model).load("detectron2://ImageNetPretrained/torchvision/R-50.pkl")
    message = str(info.value)
    assert R50_URL in message and "Temporary failure in name resolution" in message
    assert "MODEL.WEIGHTS path/to/R-50.pkl" in message and 'MODEL.WEIGHTS ""' in message
    assert "Traceback" not in full_text(info.value).split("\n", 1)[1]  # nothing chained


def test_demo_with_the_coco_config_offline_exits_1(demo, offline, capsys):
    assert run_demo(demo, None, config=COCO) == 1
    err = capsys.readouterr().err
    assert f"from {R50_URL}" in err and "set MODEL.WEIGHTS to a trained checkpoint" in err
    assert "Traceback" not in err


def test_training_offline_says_what_to_pass(offline, tmp_path, monkeypatch):
    code = run_train_net_script(
        ["--config-file", NUCLEI, *TINY, "MODEL.WEIGHTS",
         "detectron2://ImageNetPretrained/torchvision/R-50.pkl", "OUTPUT_DIR", str(tmp_path)],
        monkeypatch)
    assert isinstance(code, str) and code.startswith("ERROR: cannot download MODEL.WEIGHTS")
    assert R50_URL in code and 'MODEL.WEIGHTS ""' in code


def test_eval_only_without_weights_is_an_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="MODEL.WEIGHTS is empty"):
        train_net.main(eval_only_args("", tmp_path))
