"""tools/choose_tracker.py: the documented tracker rule applied to tune_tracker rows.

Truth: rows written here by hand, whose best qualifying setting is worked out in each test's
comments; and the rule's own definition (every model, the choosing dataset only).
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import choose_tracker  # noqa: E402


def _row(dataset, nms, missed, ap, switches, frames=1000):
    return {"dataset": dataset, "NMS_THRESH": nms, "MAX_MISSED": missed,
            "INIT_SCORE_THRESH": 0.3, "AP": ap, "AP50": ap + 20, "ID switches": switches,
            "GT track-frames": frames, "tracks": 70}


def _runs():
    # Two models (seeds), three settings, a training and a held-out clip.
    # (0.5, 1): train AP 60, 62 -> mean 61, switches 5, 5 (< 20): qualifies.
    # (0.7, 1): train AP 64, 66 -> mean 65, but 25 switches on model 2 (>= 2% of 1000): out.
    # (0.6, 2): train AP 63, 58 -> mean 60.5: qualifies, lower. Held-out APs are set so that
    # choosing on them would pick (0.6, 2) instead.
    seed1 = [_row("train", 0.5, 1, 60, 5), _row("val", 0.5, 1, 50, 1),
             _row("train", 0.7, 1, 64, 3), _row("val", 0.7, 1, 51, 1),
             _row("train", 0.6, 2, 63, 0), _row("val", 0.6, 2, 59, 0)]
    seed2 = [_row("train", 0.5, 1, 62, 5), _row("val", 0.5, 1, 52, 2),
             _row("train", 0.7, 1, 66, 25), _row("val", 0.7, 1, 53, 0),
             _row("train", 0.6, 2, 58, 1), _row("val", 0.6, 2, 60, 0)]
    return [seed1, seed2]


def test_rank_keeps_the_switch_rule_and_chooses_on_the_training_clip_only():
    ranked = choose_tracker.rank_settings(_runs(), "train", 0.02)
    assert [(r["setting"]["NMS_THRESH"], r["mean AP"], r["qualifies"]) for r in ranked] == [
        (0.7, 65, False), (0.5, 61, True), (0.6, 60.5, True)]
    assert ranked[1]["rows"][1]["val"]["AP"] == 52


def test_where_and_missing_settings():
    runs = _runs()
    runs[1] = [r for r in runs[1] if r["NMS_THRESH"] != 0.5]  # model 2 never ran (0.5, 1)
    ranked = choose_tracker.rank_settings(runs, "train", 0.02, {"MAX_MISSED": 2})
    assert [(r["setting"]["NMS_THRESH"], r["qualifies"]) for r in ranked] == [
        (0.7, False), (0.6, True)]
    with pytest.raises(ValueError, match="no setting has rows on 'test'"):
        choose_tracker.rank_settings(runs, "test", 0.02)
    with pytest.raises(ValueError, match="INIT_SCORE_THRESH=0.3"):
        choose_tracker.parse_where(["INIT_SCORE_THRESH"])
    # a --where key that the grid never varied: an error naming it, not "no setting qualifies"
    with pytest.raises(ValueError, match="--where MIN_IOU: not a key.*MAX_MISSED, NMS_THRESH"):
        choose_tracker.rank_settings(runs, "train", 0.02, {"MIN_IOU": 0.1})


def test_command_prints_the_overrides_and_the_held_out_result(tmp_path):
    paths = []
    for i, rows in enumerate(_runs()):
        paths.append(str(tmp_path / f"s{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(rows, f)
    cmd = [sys.executable, os.path.join(REPO, "tools", "choose_tracker.py"), "--rows", *paths,
           "--on", "train", "--confirm", "val"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert ("chosen: MODEL.QUERYINST_VIS.TRACKING.NMS_THRESH 0.5 "
            "MODEL.QUERYINST_VIS.TRACKING.MAX_MISSED 1 "
            "MODEL.QUERYINST_VIS.TRACKING.INIT_SCORE_THRESH 0.3") in out
    assert "val: VIS AP 50.0, 52.0 (51.0 ± 1.4), ID switches 1, 2" in out
    # Nothing qualifies at a 0.1% switch rate: exit status 1, and it says why.
    strict = subprocess.run(cmd + ["--max-switch-rate", "0.001"], capture_output=True, text=True)
    assert strict.returncode == 1 and "no setting qualifies" in strict.stdout
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "missing.json"), "--on", "train"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "missing.json: cannot read tune_tracker rows" in bad.stderr


def test_make_row_is_what_setting_of_reads_back():
    # the row format lives in make_row (tune_tracker writes with it): the setting read back
    # is the one put in, in its order, and every metric is kept
    setting = {"NMS_THRESH": 0.5, "MIN_IOU": 0.1, "MAX_MISSED": 1}
    row = choose_tracker.make_row("clip", setting, AP=61.5, AP50=80.0, tracks=70,
                                  **{"ID switches": 2, "GT track-frames": 1109})
    assert choose_tracker.setting_of(row) == (("NMS_THRESH", 0.5), ("MIN_IOU", 0.1),
                                              ("MAX_MISSED", 1))
    assert list(row)[0] == "dataset" and row["dataset"] == "clip"
    assert (row["AP"], row["AP50"], row["ID switches"], row["GT track-frames"],
            row["tracks"]) == (61.5, 80.0, 2, 1109, 70)


def test_make_row_rejects_missing_metrics_and_clashing_keys():
    with pytest.raises(ValueError, match="metrics must be"):
        choose_tracker.make_row("clip", {"NMS_THRESH": 0.5}, AP=1.0, AP50=2.0, tracks=3)
    with pytest.raises(ValueError, match=r"\['AP'\] are metric names"):
        choose_tracker.make_row("clip", {"AP": 0.5}, AP=1.0, AP50=2.0, tracks=3,
                                **{"ID switches": 0, "GT track-frames": 10})
