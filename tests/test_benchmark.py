"""tools/benchmark.py: a short CPU run gives a well-formed table and JSON; FLOPs match hand counts.

Truth from outside the tool: hand-counted multiply-adds of a toy module, the parameter
difference between Cascade and Mask R-CNN added up from Detectron2's head shapes, the
hand-derived QueryInst parameter count (tests/test_model.py), and the invariance that all
three models share one backbone (equal backbone FLOPs).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from detectron2 import model_zoo
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from qi_bench import measure, runner  # tools/qi_bench (setup.cfg puts tools/ on the path)
from qi_bench import models as bench_models
from qi_bench.report import COLUMNS
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = str(ROOT / "configs" / "Base-QueryInst.yaml")
QUERYINST_R50_PARAMS = 172_635_688  # hand-derived in tests/test_model.py
TOPK = 20  # QueryInst's TEST_TOPK in the short run

# The tool calls torch.set_num_threads; the fixture restores the setting after this module.
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


bench = load_script("tools/benchmark.py", "queryinst_benchmark")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One iteration of every model at 64x96 on one thread: training, profiling, channels-last."""
    out = tmp_path_factory.mktemp("bench") / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        report = bench.main(
            [
                "--config-file", BASE_CONFIG, "--input-size", "64", "96", "--iters", "1",
                "--warmup", "0", "--threads", "1", "--train", "--profile", "3", "--channels-last",
                "--json-out", str(out),
                # QueryInst's top-k, which the baselines' detections follow; 20 keeps it quick.
                "MODEL.QUERYINST.TEST_TOPK", "20",
            ]
        )
    return report, stdout.getvalue(), out


def test_json_is_printed_written_and_returned(short_run):
    report, text, out = short_run
    last_line = text.strip().splitlines()[-1]
    assert json.loads(last_line) == report
    assert json.loads(out.read_text()) == report
    assert report["settings"]["input_size"] == [64, 96]
    assert report["settings"]["threads"] == 1
    assert report["settings"]["channels_last"] is True
    assert report["settings"]["train_batch_size"] == 2 and report["settings"]["amp"] is False
    assert report["settings"]["train_instances_per_image"] == 5
    assert [m["name"] for m in report["models"]] == [
        "queryinst", "mask_rcnn_R_50_FPN", "cascade_mask_rcnn_R_50_FPN",
    ]


def test_numbers_are_consistent(short_run):
    report, _, _ = short_run
    for m in report["models"]:
        assert m["resnet_depth"] == 50
        assert len(m["infer_times_s"]) == 1 and m["infer_times_s"][0] > 0
        assert m["infer_median_s"] == m["infer_p90_s"] == m["infer_times_s"][0]
        assert m["images_per_s"] == pytest.approx(1 / m["infer_median_s"], rel=1e-2)
        assert m["peak_mem_mib"] > 0
        assert m["train_median_s"] > 0 and np.isfinite(m["train_last_loss"])
        assert m["train_batch"] == 2
        assert m["train_peak_mem_mib"] >= m["train_mem_mib"] > 0
        assert len(m["profile_top"]) == 3
        assert len(m["train_profile_top"]) == 3
        assert m["gflops"] >= sum(m["gflops_by_module"].values()) - 0.05
        # The fairness rule: every mask head serves QueryInst's top-k detections.
        assert m["detections_per_image"] == [TOPK]
    qi, mrcnn, cascade = report["models"]
    assert qi["params"] == QUERYINST_R50_PARAMS
    assert qi["proposals_per_image"] == [100]
    assert qi["train_optimizer"] == "AdamWWithFullModelGradientClip"
    assert mrcnn["train_optimizer"] == cascade["train_optimizer"] == "SGD"
    assert 1 <= qi["mask_head_rois_per_image"][0] <= TOPK
    # One backbone for all: ResNet-50 (stride on the 3x3 conv) + FPN, so equal FLOPs there.
    assert qi["gflops_by_module"]["backbone"] > 0
    assert (
        qi["gflops_by_module"]["backbone"]
        == mrcnn["gflops_by_module"]["backbone"]
        == cascade["gflops_by_module"]["backbone"]
    )
    # Cascade = Mask R-CNN - (1 box head, class-specific regression) + 3 x (box head,
    # class-agnostic regression); a box head is fc 12544->1024, fc 1024->1024, cls 1024->81.
    head = (12544 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 81 + 81)
    assert cascade["params"] - mrcnn["params"] == 3 * (head + 1024 * 4 + 4) - (
        head + 1024 * 320 + 320
    )
    assert qi["latency_vs_queryinst"] == 1.0


def test_table_has_a_row_per_model(short_run):
    report, text, _ = short_run
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert set(lines[header + 1]) == {"-"}
    rows = lines[header + 2 : header + 2 + len(report["models"])]
    for row, m in zip(rows, report["models"]):
        cells = row.split()
        assert cells[0] == m["name"]
        assert len(cells) == len(COLUMNS)
        dets = [h for h, _, _ in COLUMNS].index("dets/img")
        assert cells[1] == "R50" and cells[dets] == str(TOPK)
        assert cells[-1] == f"{m['train_peak_mem_mib']:.0f}"


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 10 * 10, 10)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, image, a, b, tokens):
        x = self.fc(self.conv(image).flatten(1))
        y = torch.bmm(a, b)
        z = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return x, y, z


def test_flops_of_toy_module_match_hand_count():
    model = Toy().eval()
    inputs = (
        torch.rand(1, 3, 10, 10), torch.rand(2, 5, 4), torch.rand(2, 4, 6), torch.rand(2, 5, 16)
    )
    with torch.no_grad():
        flops = measure.count_flops(model, inputs)
        by_module = flops.by_module()
        total = flops.total()
    conv = 8 * 3 * 3 * 3 * 10 * 10  # out channels x in channels x kernel x positions
    fc = 800 * 10
    bmm = 2 * 5 * 4 * 6
    # q, k, v and output projections (4 x 2 x 5 tokens x 16 x 16), then QK^T and AV.
    attn = 4 * 2 * 5 * 16 * 16 + 2 * (2 * 5 * 5 * 16)
    # Detectron2 traces inside a TracingAdapter, whose attribute "model" is the toy.
    assert by_module["model.conv"] == conv
    assert by_module["model.fc"] == fc
    assert by_module["model.attn"] == attn
    assert total == conv + fc + bmm + attn
    assert not flops.unsupported_ops()


def test_calibration_normalises_every_frozen_bn_input():
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)}]
    assert measure.calibrate_frozen_bn(model, inputs) == sum(
        isinstance(m, FrozenBatchNorm2d) for m in model.modules()
    )
    outputs = []
    hooks = [
        # clone: the ReLU that follows runs in place
        m.register_forward_hook(lambda mod, args, out: outputs.append(out.clone()))
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    with torch.no_grad():
        model.backbone(model.preprocess_image(inputs).tensor)
    for h in hooks:
        h.remove()
    assert len(outputs) == 53  # ResNet-50: stem + 16 blocks x 3 + 4 shortcuts
    for out in outputs:
        channels = out.shape[1]
        mean, var = out.mean(dim=(0, 2, 3)), out.var(dim=(0, 2, 3))
        torch.testing.assert_close(mean, torch.zeros(channels), atol=1e-3, rtol=0)
        torch.testing.assert_close(var, torch.ones(channels), atol=1e-2, rtol=0)


def test_unfair_or_unknown_baselines_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--config-file", BASE_CONFIG, "--baselines", "retinanet_R_50_FPN"])
    with pytest.raises(SystemExit, match="compare the same depth"):
        bench.main(
            ["--config-file", BASE_CONFIG, "--baselines", "mask_rcnn_R_101_FPN", "--iters", "1"]
        )


def test_default_baselines_follow_the_queryinst_depth():
    args = bench.parse_args(["--config-file", BASE_CONFIG])
    assert args.baselines is None  # chosen by main() once the config is read
    report = bench.main(
        [
            "--config-file", BASE_CONFIG, "--input-size", "64", "64", "--iters", "1",
            "--warmup", "0", "--no-flops", "MODEL.RESNETS.DEPTH", "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.QUERYINST.TEST_TOPK", "5",
        ]
    )
    assert [(m["name"], m["resnet_depth"]) for m in report["models"]] == [
        ("queryinst", 18), ("mask_rcnn_R_18_FPN", 18), ("cascade_mask_rcnn_R_18_FPN", 18),
    ]
    assert all(m["detections_per_image"] == [5] for m in report["models"])


def test_baselines_take_queryinsts_inference_layout():
    """On the CPU QueryInst's inference runs every conv channels-last (INFERENCE_MEMORY_FORMAT
    auto); a baseline then gets channels-last weights in all its convs (heads too), and none
    with QueryInst's layout set to contiguous."""
    qcfg = bench_models.queryinst_cfg(BASE_CONFIG, ["MODEL.RESNETS.DEPTH", "18",
                                             "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"], "cpu")
    assert runner.queryinst_infers_channels_last(qcfg, "cpu")
    assert not runner.queryinst_infers_channels_last(qcfg, "cuda")
    cand = bench_models.Candidate("mask_rcnn_R_18_FPN",
                                 bench_models.baseline_cfg("mask_rcnn_R_18_FPN", qcfg, "cpu"), None)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    inputs = [{"image": image, "height": 64, "width": 64}]
    for layout in (True, False):
        model = bench_models.Bench(cand, inputs, 0, False, layout).model
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
        assert any("roi_heads" in n for n, m in model.named_modules() if m in convs)
        assert all((c.weight.stride(1) == 1) == layout for c in convs)


def test_timed_calls_alternate_between_models():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = measure.interleaved_times(fns, iters=3, warmup=1, device="cpu")
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert [len(t) for t in times] == [3, 3] and all(x >= 0 for t in times for x in t)


def test_batch_of_two_reports_per_image_numbers():
    report = bench.main(
        [
            "--config-file", BASE_CONFIG, "--baselines", "none", "--batch-size", "2",
            "--input-size", "64", "96", "--iters", "1", "--warmup", "0", "--no-flops",
            "MODEL.QUERYINST.TEST_TOPK", "5",
        ]
    )
    (qi,) = report["models"]
    assert qi["detections_per_image"] == [5, 5]
    assert qi["proposals_per_image"] == [100, 100]
    assert qi["infer_per_image_s"] == pytest.approx(qi["infer_median_s"] / 2, abs=1e-4)
    assert qi["images_per_s"] == pytest.approx(2 / qi["infer_median_s"], rel=1e-2)
    assert "gflops" not in qi


def test_training_memory_grows_with_the_training_batch():
    small = ["--config-file", BASE_CONFIG, "--baselines", "none", "--input-size", "128", "128",
             "--iters", "1", "--warmup", "0", "--no-flops", "--train"]
    opts = ["MODEL.QUERYINST.NUM_STAGES", "1", "MODEL.RESNETS.DEPTH", "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.QUERYINST.TEST_TOPK", "5"]
    one, four = (bench.main([*small, "--train-batch-size", n, *opts])["models"][0]
                 for n in ("1", "4"))
    assert (one["train_batch"], four["train_batch"]) == (1, 4)
    # Measured: ~150 MiB for one image, ~340 MiB for four (R18, one stage, 128x128).
    assert four["train_mem_mib"] > one["train_mem_mib"] > 0
    # Gradients and AdamW's two moment buffers are resident in training, not in inference.
    assert one["train_peak_mem_mib"] > one["peak_mem_mib"]
    with pytest.raises(SystemExit):  # fp16 autocast is for the CUDA training step
        bench.parse_args(["--config-file", BASE_CONFIG, "--train", "--amp"])


def test_bf16_training_step_beside_fp32():
    """--bf16: the same model's step in bf16 autocast, timed in the same rounds, finite loss."""
    args = ["--config-file", BASE_CONFIG, "--baselines", "none", "--input-size", "64", "96",
            "--iters", "2", "--warmup", "0", "--no-flops", "--train", "--bf16",
            "MODEL.QUERYINST.NUM_STAGES", "1", "MODEL.RESNETS.DEPTH", "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.QUERYINST.TEST_TOPK", "5"]
    report = bench.main(args)
    (qi,) = report["models"]
    assert report["settings"]["bf16"] is True
    assert len(qi["train_bf16_times_s"]) == len(qi["train_times_s"]) == 2
    assert qi["train_bf16_median_s"] > 0 and qi["train_bf16_vs_fp32"] > 0
    assert np.isfinite(qi["train_bf16_last_loss"]) and np.isfinite(qi["train_last_loss"])
    for wrong in (["--bf16"], ["--train", "--bf16", "--amp"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--config-file", BASE_CONFIG, *wrong])


MNV2_COCO = str(ROOT / "configs" / "queryinst_MNV2_FPN_1x_coco.yaml")


def test_also_config_measures_mobilenet_beside_r50_without_resnet_baselines():
    opts = ["MODEL.QUERYINST.NUM_STAGES", "1", "MODEL.QUERYINST.TEST_TOPK", "5"]
    small = ["--input-size", "64", "64", "--iters", "1", "--warmup", "0", "--no-flops", *opts]
    report = bench.main(["--config-file", BASE_CONFIG, "--baselines", "none",
                         "--also-config", MNV2_COCO, *small])
    models = report["models"]
    assert [(m["name"], m["backbone"]) for m in models] == [
        ("queryinst", "R50"), ("queryinst MNV2_FPN_1x_coco", "MNV2")]
    assert models[1]["resnet_depth"] is None
    # Same heads and queries: the parameter difference is the backbone's alone.
    r50, mnv2 = (bench_models.queryinst_cfg(f, opts, "cpu") for f in (BASE_CONFIG, MNV2_COCO))
    diff = sum(p.numel() for p in build_backbone(r50).parameters()) - sum(
        p.numel() for p in build_backbone(mnv2).parameters())
    assert models[0]["params"] - models[1]["params"] == diff
    # A MobileNetV2 config gets no ResNet baselines by default, and refuses named ones.
    assert [m["name"] for m in bench.main(["--config-file", MNV2_COCO, *small])["models"]] == [
        "queryinst"]
    with pytest.raises(SystemExit, match="use --baselines none"):
        bench.main(["--config-file", MNV2_COCO, "--baselines", "mask_rcnn_R_50_FPN", *small])


NUCLEI = str(ROOT / "configs" / "bundled" / "queryinst_MNV2_FPN_nuclei.yaml")


def _nuclei_run(iters: int, *options: str) -> dict:
    """The report of a quiet run of the MobileNetV2 nuclei config alone at 64x96, one
    thread, 10 queries, ``iters`` rounds, with ``options`` added."""
    with contextlib.redirect_stdout(io.StringIO()):
        return bench.main([
            "--config-file", NUCLEI, "--baselines", "none", "--input-size", "64", "96",
            "--iters", str(iters), "--warmup", "0", "--threads", "1", "--no-flops", *options,
            "MODEL.QUERYINST.NUM_PROPOSALS", "10", "MODEL.QUERYINST.TEST_TOPK", "10",
        ])


def test_exported_model_is_timed_beside_pytorch():
    """--exported: the ONNX graph of the same model, timed in the same rounds, and its
    detections compared with the PyTorch model's."""
    report = _nuclei_run(2, "--exported", "onnx")
    assert report["settings"]["exported"] == ["onnx"]
    pytorch, onnx = report["models"]
    assert onnx["name"] == "exported onnx" and onnx["params"] == pytorch["params"]
    assert len(onnx["infer_times_s"]) == len(pytorch["infer_times_s"]) == 2
    assert min(onnx["infer_times_s"]) > 0
    assert onnx["latency_vs_queryinst"] == round(
        onnx["infer_median_s"] / pytorch["infer_median_s"], 3)
    assert onnx["labels_equal"] and onnx["max_score_diff"] < 1e-4


def test_int8_graph_and_memory_in_own_processes():
    """--exported int8 --memory: the quantized graph timed in the same rounds; every model's
    peak RSS of one inference measured in a process of its own."""
    report = _nuclei_run(1, "--exported", "int8", "--memory")
    assert report["settings"]["memory_in_own_process"]
    pytorch, int8 = report["models"]
    assert int8["name"] == "exported int8" and len(int8["infer_times_s"]) == 1
    for row in (pytorch, int8):  # a whole process: interpreter, torch, the model
        assert 100 < row["process_rss_before_mib"] <= row["process_peak_mib"]
        assert row["process_infer_mem_mib"] == pytest.approx(
            row["process_peak_mib"] - row["process_rss_before_mib"], abs=0.11)


def test_peak_of_one_call_counts_what_it_allocates():
    """qi_bench.memory.measure_pid against a known allocation: 256 MiB touched page by page
    and freed inside the measured call (the warm-up call does the same). The block is an
    anonymous mmap of its own, so no allocator can serve it from pages the process already
    holds (in a long pytest process malloc may keep a freed heap resident)."""
    import mmap

    from qi_bench.memory import measure_pid

    def allocate():
        size = 256 * 2**20
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):  # written: resident
            block[offset] = 1
        block.close()

    mem = measure_pid("self", allocate)
    assert 250 <= mem["infer_mem_mib"] <= 300, mem


def test_inference_variants_are_timed_in_the_same_rounds():
    """--inference-dtype / --unfolded / --also-opts: the first config again with inference
    keys changed, the same weights, timed in the same rounds; per-round ratios to the first
    model."""
    report = _nuclei_run(
        3, "--inference-dtype", "bfloat16", "--unfolded", "--also-opts",
        "MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT contiguous MODEL.QUERYINST.TEST_TOPK 5")
    first, bf16, unfolded, plain = report["models"]
    assert [m["name"] for m in report["models"]] == [
        "queryinst", "queryinst bfloat16", "queryinst unfolded",
        "queryinst INFERENCE_MEMORY_FORMAT=contiguous TEST_TOPK=5"]
    assert bf16["opts"][-2:] == ["MODEL.QUERYINST.INFERENCE_DTYPE", "bfloat16"]
    assert unfolded["opts"][-2:] == ["MODEL.QUERYINST.FUSE_BN_INFERENCE", "False"]
    assert plain["opts"][-4:] == ["MODEL.QUERYINST.INFERENCE_MEMORY_FORMAT", "contiguous",
                                  "MODEL.QUERYINST.TEST_TOPK", "5"]
    assert plain["detections_per_image"] == [5] and first["detections_per_image"] == [10]
    assert first["params"] == bf16["params"] == unfolded["params"] == plain["params"]
    for m in report["models"]:
        assert len(m["infer_times_s"]) == 3
        ratios = [a / b for a, b in zip(m["infer_times_s"], first["infer_times_s"])]
        assert m["round_ratio_vs_queryinst"] == pytest.approx(float(np.median(ratios)), abs=2e-3)
    assert first["round_ratio_vs_queryinst"] == 1.0
    with pytest.raises(SystemExit):
        bench.parse_args(["--config-file", NUCLEI, "--inference-dtype", "half"])
    with pytest.raises(SystemExit, match="--also-opts 'MODEL.QUERYINST.TEST_TOPK': expected"):
        bench.parse_args(["--config-file", NUCLEI, "--also-opts", "MODEL.QUERYINST.TEST_TOPK"])
