"""tools/video_benchmark.py (tools/qi_bench/video.py): per-frame online video inference of
QueryInst-VIS side by side with MMDetection's MaskTrack R-CNN, and the exported QueryInstVIS
graph it runs (queryinst/export: ``query_indices`` and ``track_embeddings``).

The fast tests use the MobileNetV2 QueryInst-VIS config on 3 frames of the bundled real
time-lapse at 192x256; the peer runs only in the slow test, where its venv exists.
"""
import math
import os
import time

import numpy as np
import pytest
import torch
from conftest import load_script

import queryinst.video  # noqa: F401  (QueryInstVIS, the video datasets)
from qi_bench.measure import interleaved_times
from qi_bench.models import queryinst_cfg
from qi_bench.reference import default_venv
from qi_bench.video import (
    FAIR_OPTS,
    ClipPlayer,
    ExportedPlayer,
    TorchPlayer,
    load_clip,
    player_summary,
    save_random_checkpoint,
    to_model_input,
)

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SMALL = os.path.join(ROOT, "configs", "bundled", "queryinst_vis_MNV2_FPN_nuclei.yaml")
SMALL_OPTS = ["MODEL.QUERYINST.NUM_PROPOSALS", "20", "MODEL.QUERYINST.TEST_TOPK", "20"]
SIZE = (192, 256)


@pytest.fixture(scope="module")
def tool():
    return load_script("tools/video_benchmark.py", "queryinst_video_benchmark_script")


@pytest.fixture(scope="module")
def clip(one_torch_thread):
    frames, info = load_clip(["ctc_psc_video_train"], 3, SIZE)
    return frames, info


@pytest.fixture(scope="module")
def small_players(clip, tmp_path_factory):
    """Two fp32 players of the small config on the same random checkpoint."""
    frames, _ = clip
    cfg = queryinst_cfg(SMALL, FAIR_OPTS + SMALL_OPTS, "cpu")
    inputs = [to_model_input(f, cfg.INPUT.FORMAT) for f in frames]
    ckpt = str(tmp_path_factory.mktemp("vidbench") / "random.pth")
    save_random_checkpoint(cfg, 0, inputs[0], ckpt)
    cfg = queryinst_cfg(SMALL, FAIR_OPTS + SMALL_OPTS, "cpu", weights=ckpt)
    return [TorchPlayer(f"p{i}", cfg, inputs) for i in range(2)]


def test_clip_is_the_real_timelapse_resized(clip):
    frames, info = clip
    assert frames.shape == (3, *SIZE, 3) and frames.dtype == np.uint8
    assert info["original_size"] == [536, 700] and info["first_file"].endswith("t000.png")
    assert not np.array_equal(frames[0], frames[1])  # real, changing frames
    keep, info2 = load_clip(["ctc_psc_video_train"], 1, (360, 640), keep_aspect=True)
    assert keep.shape[1:3] == (360, 470)  # 536x700 -> shorter side 360
    with pytest.raises(ValueError, match="hold only 35 frames"):
        load_clip(["ctc_psc_video_train"], 36)


def test_summary_by_hand():
    """Tracker share and frames/s from made-up measurements, computed by hand."""
    player = ClipPlayer("x", 2)
    player.tracker_s, player.detections, player.tracked = [0.1, 0.2], [4, 6], [3, 5]
    s = player_summary(player, [1.0, 2.0])
    assert s["tracker_share"] == pytest.approx(0.3 / 3.0, abs=1e-4)
    assert s["tracker_share_median"] == pytest.approx((0.1 + 0.1) / 2, abs=1e-4)
    assert s["frames_per_s"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["frame_median_s"] == pytest.approx(1.5)
    assert s["tracker_median_ms"] == pytest.approx(150.0)
    assert (s["detections_per_frame"], s["tracked_per_frame"]) == (5.0, 4.0)


def test_tracker_share_comes_from_measured_time(small_players):
    """A tracker made slower by 0.3 s a frame shows it: its measured tracker time grows by
    at least that, and so does its share of the frame, in the same interleaved rounds."""
    normal, slow = small_players
    original = slow.update._fn

    def slow_update(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)

    slow.update._fn = slow_update
    try:
        for p in (normal, slow):
            p.restart()
        times = interleaved_times([normal.step, slow.step], 3, 0, "cpu")
    finally:
        slow.update._fn = original
    fast_s, slow_s = (player_summary(p, t) for p, t in zip((normal, slow), times))
    assert all(t >= 0.3 for t in slow.tracker_s)
    assert all(t < 0.3 for t in normal.tracker_s)
    assert slow_s["tracker_share"] > fast_s["tracker_share"] + 0.3 / max(times[1]) - 0.05
    # The share is the measured tracker time over the measured frame time.
    assert slow_s["tracker_share"] == pytest.approx(
        math.fsum(slow.tracker_s) / math.fsum(times[1]), abs=1e-4)
    # Both played the same real frames with the same weights: the same tracks.
    assert normal.tracked == slow.tracked and normal.detections == slow.detections


def test_exported_vis_graph_tracks_like_pytorch(small_players, tmp_path):
    """The ONNX graph of QueryInstVIS gives PyTorch's top-k rows with their track
    embeddings, and the Python tracker on it the same tracks over the clip."""
    torch_player = small_players[0]
    onnx = ExportedPlayer(torch_player, str(tmp_path), 1)
    assert onnx.result["frame0_shared_topk"] == 1.0
    # Relative to the largest embedding value; measured 0.3% (onnxruntime's RoiAlign and
    # kernels against PyTorch's folded, channels-last inference, through every stage).
    scale = torch_player.first_frame_detections().track_embeddings.abs().max().item()
    assert onnx.result["frame0_max_embedding_diff"] < 1e-2 * scale
    assert onnx.result["frame0_max_score_diff"] < 1e-4
    for p in (torch_player, onnx):
        p.restart()
        for _ in range(3):
            p.step()
    assert onnx.tracked == torch_player.tracked and onnx.detections == torch_player.detections
    assert len(onnx.tracker.finish()) == len(torch_player.model.tracker.finish())


def test_end_to_end_ours_with_peer_skipped(tool, tmp_path, capsys):
    """3 frames, --iters 1, every candidate of ours; the peer's venv is absent here, so
    the peer is skipped and the report says why and what to run."""
    out = tmp_path / "report.json"
    report = tool.main(["--config-file", SMALL, "--frames", "3", "--iters", "1", "--warmup",
                        "1", "--frame-size", *map(str, SIZE), "--datasets",
                        "ctc_psc_video_train", "--venv", str(tmp_path / "no_venv"),
                        "--threads", "1", "--json-out", str(out), *SMALL_OPTS])
    names = [c["name"] for c in report["candidates"]]
    assert names == ["queryinst-vis fp32", "queryinst-vis bf16", "queryinst-vis onnx"]
    for c in report["candidates"]:
        assert len(c["frame_times_s"]) == 3
        assert 0 < c["tracker_share"] < 1
        assert c["frames_per_s"] == pytest.approx(3 / sum(c["frame_times_s"]), rel=0.01)
    assert "no reference venv" in report["peer_skipped"]
    assert "tools/reference/setup.sh" in report["peer_skipped"]
    assert report["goals"]["fp32_vs_peer_at_most_0.7"] is None
    assert report["clip"]["frame_size"] == list(SIZE)
    printed = capsys.readouterr().out
    assert "peer skipped: the MMDetection peer could not be set up" in printed
    assert out.read_text().strip() == printed.strip().splitlines()[-1]


def test_bad_options_are_refused(tool, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--ours", "int4"])
    assert "--ours int4: choose from fp32,bf16,onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.parse_args(["--ours", "none", "--no-peer"])


def _peer_ready() -> bool:
    return os.access(os.path.join(default_venv(), "bin", "python"), os.X_OK)


@pytest.mark.slow
@pytest.mark.skipif(not _peer_ready(), reason="the MMDetection reference venv is not built "
                    "(bash tools/reference/setup.sh, or tools/video_benchmark.py --setup-peer)")
def test_end_to_end_with_masktrack_rcnn(tool):
    """3 frames, our fp32 R50 beside MaskTrack R-CNN R50 in its own process."""
    report = tool.main(["--frames", "3", "--iters", "1", "--warmup", "0", "--ours", "fp32",
                        "--datasets", "ctc_psc_video_train"])
    peer = report["candidates"][-1]
    assert peer["name"] == "mmdet 3.3.0 MaskTrack R-CNN"
    assert peer["detections_per_frame"] > 0 and 0 < peer["tracker_share"] < 1
    assert len(peer["peer_self_times_s"]) == 3
    # The wall time around a request covers the peer's own clock of the frame.
    assert all(w >= s for w, s in zip(peer["frame_times_s"], peer["peer_self_times_s"]))
    ratio = report["vs_peer"]["queryinst-vis fp32"]["per_frame_ratio_median"]
    assert ratio > 0 and "peer_skipped" not in report
